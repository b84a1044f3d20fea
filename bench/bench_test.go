package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testsupport"
)

// need skips the test when a tool is missing, except in CI, where nothing
// may be skipped.
func need(t *testing.T, root, tool string) {
	t.Helper()
	var err error
	if tool == "go" {
		_, err = exec.LookPath("go")
	} else {
		_, err = findTool(root, tool)
	}
	if err == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%v (CI=true: tools must be installed; scripts/test installs them)", err)
	}
	t.Skipf("%v; scripts/test installs it", err)
}

// TestQuickRun runs the whole benchmark with tiny sizes and checks that the
// table has every row and that its numbers parse and make sense.
func TestQuickRun(t *testing.T) {
	if testing.Short() {
		t.Skip("starts registries, berth and nginx; not in -short mode")
	}
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	for _, tool := range []string{"go", "registry", "nginx", "minio"} {
		need(t, root, tool)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var out, log bytes.Buffer
	args := []string{"-quick", "-layer-size", "128KiB", "-big", "16MiB", "-ns", "1,3", "-wall-n", "3",
		"-reps", "1", "-rss-clients", "3", "-cpu-clients", "2", "-cpu-reads", "8", "-hang-cap", "5s", "-work", t.TempDir()}
	err = run(ctx, args, &out, &log)
	t.Logf("progress:\n%s", log.String())
	t.Logf("output:\n%s", out.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	// The fleet runs on its own link rate, and the header says which.
	if !strings.Contains(out.String(), "upstream link 100 MB/s (fleet: 33 MB/s)") {
		t.Error("the header does not name the fleet's link rate")
	}
	if !strings.Contains(log.String(), "fleet: upstream link at 33 MB/s") {
		t.Error("the fleet scenario did not set its link rate")
	}
	rows := parseTable(t, out.String())
	want := []string{
		"upstream bytes ÷ image bytes, 1 cold pull",
		"upstream bytes ÷ image bytes, 3 cold pulls",
		"cold pull wall time, 1 pull (s)",
		"cold pull wall time, 3 concurrent pulls (s)",
		"wall time 3 concurrent ÷ 1 cold pull",
		"hot pull wall time, 3 concurrent pulls (s)",
		"hot 3 concurrent ÷ 1 cold pull (this machine's floor)",
		"hot blob: server CPU-s per GiB served, 2 clients",
		"hot blob: server CPU ÷ nginx's (sendfile)",
		"peak RSS, 3 clients streaming one 16 MiB blob, cold (MiB)",
		"peak RSS, 3 clients streaming one 16 MiB blob, hot (MiB)",
		"pull of a cached tag, upstream hung (s)",
		"next pull of that tag, upstream still hung (s)",
		"fleet, 3 hosts × 10 cold pulls: upstream bytes ÷ image bytes",
		"fleet, 3 hosts × 10 cold pulls: wall time (s)",
		"fleet: one cold pull on one host on the bucket (s)",
		"fleet wall time ÷ one cold pull on one host",
		"fleet, 3 hosts × 10 cold pulls: the same pulls hot (s)",
		"fleet: hot round ÷ one cold pull (this machine's floor)",
		"fleet, cold round: S3 requests per blob of the image",
		"fleet, cold round: S3 write requests",
		"fleet, warm bucket: one pull on a new host (s)",
		"fleet, warm bucket: S3 requests per blob read from S3",
		"fleet, lease renewals, 3 hosts × 1 slow cold pull: wall time (s)",
		"fleet, lease renewals: S3 renewal requests in the round",
		"fleet, lease renewals: other S3 requests in the round",
		"fleet, lease renewals: S3 requests per held blob lease per minute",
		"stall: 3 cold pulls, upstream not stalling (s)",
		"stall: 3 cold pulls, upstream stalling once mid-layer (s)",
		"stall: stalled − (not stalling + 5s idle timeout) (s)",
		"stall: upstream bytes ÷ image bytes",
		"stall: failed pulls of 3",
		"prewarm, 4 nodes: upstream bytes ÷ image bytes",
		"prewarm, naive (4 nodes pull it themselves, no bucket): bytes from the upstream ÷ image bytes",
		"prewarm, 4 nodes: time until all warm (s)",
		"prewarm: one cold pull on one node (s)",
		"prewarm, 4 nodes: time until all warm ÷ one cold pull",
		"prewarm, naive: 4 nodes each pulling the image (s)",
		"prewarm, 4 nodes: S3 requests per node per blob",
		"prewarm, 20 pulls on a warmed node: bytes from the upstream",
		"prewarm, 20 pulls on a warmed node: S3 blob GETs",
		"prewarm, 20 pulls on a warmed node ÷ on a node that pulled it itself",
		"prewarm, repeated on warm nodes: blob bytes from the upstream, S3 blob GETs",
		"prewarm, 8 nodes × 3 × 256.0 KiB image: upstream bytes ÷ image bytes",
		"prewarm, 8 nodes × 3 × 256.0 KiB image: S3 requests per node per blob",
		"prewarm, 8 nodes × 3 × 256.0 KiB image: time until all warm (s)",
		"prewarm, 8 nodes × 3 × 256.0 KiB image: berth prewarm peak RSS (MiB)",
		"prewarm, 8 nodes × 3 × 256.0 KiB image: berth coordinator: time until all warm (s)",
		"prewarm, 8 nodes × 3 × 256.0 KiB image: berth coordinator peak RSS (MiB)",
	}
	if len(rows) != len(want) {
		t.Errorf("table has %d rows, want %d", len(rows), len(want))
	}
	for _, metric := range want {
		r, ok := rows[metric]
		if !ok {
			t.Errorf("row %q missing", metric)
			continue
		}
		// A new host with an empty disk on a filled bucket reads every blob
		// from S3, so there is always something to divide by.
		berth := number(t, metric, "berth", r[0], false)
		if r[1] != "not run" {
			number(t, metric, "distribution", r[1], true)
		}
		switch r[3] {
		case "yes", "**no**":
		case "":
			if r[2] != "—" {
				t.Errorf("%s: goal %q but no verdict", metric, r[2])
			}
		default:
			t.Errorf("%s: verdict %q", metric, r[3])
		}
		// The link counts every byte berth fetches: one complete copy at
		// least, and per-request overhead on 128 KiB layers stays small.
		if strings.Contains(metric, "upstream bytes") && (berth < 1 || berth > 1.5) {
			t.Errorf("%s: berth %v, want between 1 and 1.5", metric, berth)
		}
		if strings.Contains(metric, "peak RSS") && berth <= 0 {
			t.Errorf("%s: berth %v MiB", metric, berth)
		}
	}
}

// parseTable maps each metric to its berth, distribution, goal and verdict cells.
func parseTable(t *testing.T, out string) map[string][4]string {
	t.Helper()
	rows := map[string][4]string{}
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, "|") {
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		if len(cells) != 5 {
			t.Errorf("table line with %d cells: %q", len(cells), line)
			continue
		}
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		if cells[0] == "metric" || strings.HasPrefix(cells[0], "---") {
			continue
		}
		rows[cells[0]] = [4]string{cells[1], cells[2], cells[3], cells[4]}
	}
	return rows
}

func number(t *testing.T, metric, who, s string, mayBeCapped bool) float64 {
	t.Helper()
	if mayBeCapped {
		s = strings.TrimPrefix(s, "> ")
	}
	v, err := strconv.ParseFloat(s, 64)
	// A difference row ("a − b") goes below zero when the stall is caught
	// a little before the slowest unstalled pull finishes; every other row
	// counts or times something.
	if err != nil || (v < 0 && !strings.Contains(metric, " − ")) {
		t.Errorf("%s: %s cell %q is not a measurement", metric, who, s)
	}
	return v
}

func TestQuickKeepsExplicitFlags(t *testing.T) {
	o, err := parseFlags([]string{"-quick", "-reps", "5"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.reps != 5 {
		t.Errorf("reps %d, want the explicit 5", o.reps)
	}
	if o.layerSize != 4<<20 {
		t.Errorf("layer size %d, want -quick's 4 MiB", o.layerSize)
	}
	if _, err := parseFlags([]string{"-scenarios", "pulls,nope"}, io.Discard); err == nil {
		t.Error("an unknown scenario was accepted")
	}
}

func TestFleetRate(t *testing.T) {
	for _, c := range []struct {
		args []string
		want int64
	}{
		{nil, 100_000_000 / 3},
		{[]string{"-rate", "30MB"}, 10_000_000},
		{[]string{"-rate", "30MB", "-fleet-rate", "100MB"}, 100_000_000},
		{[]string{"-fleet-rate", "0"}, 0},
		{[]string{"-rate", "0"}, 0},
	} {
		o, err := parseFlags(c.args, io.Discard)
		if err != nil {
			t.Fatalf("%q: %v", c.args, err)
		}
		if o.fleetRate != c.want {
			t.Errorf("%q: fleet rate %d, want %d", c.args, o.fleetRate, c.want)
		}
	}
	if _, err := parseFlags([]string{"-fleet-rate", "-5"}, io.Discard); err == nil {
		t.Error("a negative -fleet-rate was accepted")
	}
}

// serveBytes answers every connection with n zero bytes.
func serveBytes(t *testing.T, n int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.Write(make([]byte, n))
			}()
		}
	}()
	return ln.Addr().String()
}

func TestThrottleRateAndCount(t *testing.T) {
	const size, rate = 4 << 20, 40 << 20 // 100 ms of link time
	link, err := testsupport.NewProxy(serveBytes(t, size), rate)
	if err != nil {
		t.Fatal(err)
	}
	defer link.Close()
	start := time.Now()
	c, err := net.Dial("tcp", link.Addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, c)
	c.Close()
	took := time.Since(start)
	if err != nil || n != size {
		t.Fatalf("read %d bytes (%v), want %d", n, err, size)
	}
	if took < 80*time.Millisecond {
		t.Errorf("%d bytes at %d B/s took %v; the limit was not applied", size, rate, took)
	}
	if got := link.UpstreamBytes(); got != size {
		t.Errorf("counted %d upstream bytes, want %d", got, size)
	}
}

func TestThrottleHang(t *testing.T) {
	link, err := testsupport.NewProxy(serveBytes(t, 10), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer link.Close()
	link.Hang()
	c, err := net.Dial("tcp", link.Addr)
	if err != nil {
		t.Fatalf("a hung link must still accept: %v", err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	buf := make([]byte, 10)
	if n, err := c.Read(buf); n != 0 || err == nil {
		t.Fatalf("hung link answered: %d bytes, %v", n, err)
	}
	link.Resume()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.ReadFull(c, buf); n != 10 {
		t.Fatalf("after Resume read %d bytes: %v", n, err)
	}
}
