package storage

// Fuzz targets for what berth reads back from the bucket: lease records
// (any JSON another host, an older berth or an operator left in a lease
// object) and the Content-Range of a resumed blob read. Plain `go test` runs
// the seeds and the kept corpus under testdata/fuzz/.

import (
	"encoding/json"
	"testing"
	"time"
	"unicode/utf8"
)

// FuzzLeaseRecord decodes any body as a lease record and judges its expiry
// at any times, as AcquireLease does with what it reads from the bucket.
// It must not panic; a record whose TTL is not positive has expired; with
// S3's times, a lease never expires before LastModified + TTL and, once
// expired, stays expired as S3's clock moves on. A record berth writes
// reads back unchanged.
func FuzzLeaseRecord(f *testing.F) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	good, _ := json.Marshal(newLeaseRecord("http://10.0.3.7:5001", 2*time.Minute, now))
	for _, body := range []string{
		string(good),
		`{"holder":"node-17/4711","token":"9f3c0a7e5b2d4c11","acquired":"2025-03-01T12:00:00Z","expires":"2025-03-01T12:02:00Z"}`,
		`{"holder":"","token":"","acquired":"2025-03-01T12:00:00Z","expires":"2025-03-01T11:00:00Z"}`,
		`{"acquired":"0001-01-01T00:00:00Z","expires":"9999-12-31T23:59:59Z"}`,
		`{"acquired":"2025-03-01T12:00:00+14:00","expires":"2025-03-01T12:00:00-12:00"}`,
		`{"expires":"not a time"}`,
		`{"holder":7}`,
		`null`, `[]`, `{}`, ``, `{"holder":"a","holder":"b"}`,
	} {
		f.Add([]byte(body), now.Unix(), now.Add(time.Minute).Unix(), now.UnixNano())
	}
	f.Fuzz(func(t *testing.T, body []byte, lastModified, serverNow, localNow int64) {
		var rec leaseRecord
		if json.Unmarshal(body, &rec) != nil {
			return // AcquireLease takes an unreadable lease over
		}
		lm, sn, ln := time.Unix(lastModified, 0).UTC(), time.Unix(serverNow, 0).UTC(), time.Unix(0, localNow).UTC()
		ttl := rec.Expires.Sub(rec.Acquired)
		exp := rec.expired(lm, sn, ln)
		if ttl <= 0 && !exp {
			t.Fatalf("a lease with TTL %v has not expired: %+v", ttl, rec)
		}
		if ttl <= 0 {
			return
		}
		if lm.IsZero() || sn.IsZero() {
			return
		}
		// A TTL within a second of the largest Duration overflows in
		// expired's ttl + 1s and reads as expired at once: such a record
		// (acquired in year 1, expiring in 9999) is junk that is taken over,
		// which is the right outcome, so the timing properties below stop
		// short of it.
		if ttl > time.Duration(1<<62) {
			return
		}
		if limit := lm.Add(ttl); sn.Before(limit) && !limit.Before(lm) && exp {
			t.Fatalf("lease expired at %v, before LastModified %v + TTL %v: %+v", sn, lm, ttl, rec)
		}
		if exp {
			if later := sn.Add(time.Second); later.After(sn) && !rec.expired(lm, later, ln) {
				t.Fatalf("lease expired at %v but not at %v: %+v", sn, later, rec)
			}
		}

		// What berth writes reads back the same.
		// (json.Marshal writes invalid UTF-8 as U+FFFD, so such a holder
		// would not read back byte for byte; berth's are URLs or host/pid.)
		holder := rec.Holder
		if !utf8.ValidString(holder) {
			holder = "h"
		}
		w := newLeaseRecord(holder, ttl, sn)
		b, err := json.Marshal(w)
		if err != nil {
			t.Fatalf("marshal %+v: %v", w, err)
		}
		var back leaseRecord
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatalf("unmarshal own lease %s: %v", b, err)
		}
		if back.Holder != w.Holder || back.Token != w.Token || !back.Acquired.Equal(w.Acquired) || !back.Expires.Equal(w.Expires) {
			t.Fatalf("lease %+v read back as %+v", w, back)
		}
	})
}

// FuzzParseContentRange: a resumed read from the bucket trusts the
// Content-Range it gets back only if it names a sane span; whatever S3 (or
// something in front of it) sends, parsing must not panic, and what it
// accepts is 0 <= start < total.
func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{
		"bytes 0-99/100", "bytes 100-199/200", "bytes 5-4/10", "bytes 0-9/9", "bytes */100",
		"bytes -1-5/10", "bytes 0-9223372036854775807/9223372036854775807", "bytes 1-2/3/4",
		"bytes 1--2/3", "items 0-1/2", "", "bytes ", "bytes 0-0/1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		start, total, ok := parseContentRange(v)
		if ok && (start < 0 || start >= total) {
			t.Fatalf("parseContentRange(%q) accepted start %d of total %d", v, start, total)
		}
	})
}
