package main

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// The ledger counts a lease write as a renewal when its If-Match names an
// ETag the same holder wrote, and adds up hold time from creation or
// takeover to deletion.
func TestLeaseLedger(t *testing.T) {
	const key = "/bucket/p/leases/blobs/docker.io/sha256/ab"
	put := func(body, ifMatch, ifNoneMatch string) *http.Request {
		r := httptest.NewRequest(http.MethodPut, key, strings.NewReader(body))
		if ifMatch != "" {
			r.Header.Set("If-Match", ifMatch)
		}
		if ifNoneMatch != "" {
			r.Header.Set("If-None-Match", ifNoneMatch)
		}
		return leaseHolder(r)
	}
	t0 := time.Unix(1_000_000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	var l leaseLedger
	// Host a creates the lease and renews it; host b's If-None-Match loses.
	l.note(put(`{"holder":"a","token":"1"}`, "", "*"), 200, `"e1"`, at(0))
	l.note(put(`{"holder":"b","token":"2"}`, "", "*"), 412, "", at(1))
	// aws-chunked: the JSON is what starts at the first '{'.
	l.note(put("1d;chunk-signature=x\r\n{\"holder\":\"a\",\"token\":\"3\"}\r\n0\r\n\r\n", `"e1"`, ""), 200, `"e2"`, at(5))
	// b takes it over (a stopped renewing); a's next renewal fails.
	l.note(put(`{"holder":"b","token":"4"}`, `"e2"`, ""), 200, `"e3"`, at(20))
	l.note(put(`{"holder":"a","token":"5"}`, `"e2"`, ""), 412, "", at(21))
	renewals, holds, secs := l.take(at(30))
	if renewals != 2 || holds != 2 || secs != 30 {
		t.Errorf("first period: %d renewals, %d holds, %v s; want 2, 2, 30 (a 0–20 s, b 20–30 s so far)", renewals, holds, secs)
	}
	l.note(httptest.NewRequest(http.MethodDelete, key, nil), 204, "", at(32))
	renewals, holds, secs = l.take(at(40))
	if renewals != 0 || holds != 0 || secs != 2 {
		t.Errorf("second period: %d renewals, %d holds, %v s; want 0, 0, 2 (b's hold ran on until its release)", renewals, holds, secs)
	}
}
