package e2e

// The inspector in a fleet: three `berth serve` hosts on one MinIO bucket
// pull the same image; the host that fetched it from the upstream inspects
// it and writes the record to the bucket, the others inspect nothing and
// read that record when their API is asked (docs/inspector.md).

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestInspectorFleetInspectsOnce(t *testing.T) {
	f := startFleet(t)
	img := PushImage(t, Docker, f.reg.Host, "library/shared", "1", 64<<10, 2)
	hosts := f.hosts(t, 3)
	alg, hexDigest, _ := strings.Cut(img.Digest, ":")
	recordKey := f.bucket.Prefix + "objects/inspect/v1/docker.io/" + alg + "/" + hexDigest

	// The first host fetches the image from the upstream and inspects it.
	mustPull(t, hosts[0], "library/shared", "1", img)
	deadline := time.Now().Add(30 * time.Second)
	for !f.bucket.Exists(t, recordKey) {
		if time.Now().After(deadline) {
			hosts[0].ShowLog(t, 30)
			t.Fatalf("no inspection record at %s 30s after the pull", recordKey)
		}
		time.Sleep(50 * time.Millisecond)
	}
	var stored struct{ Digest, Inspected string }
	if err := json.Unmarshal(f.bucket.Get(t, recordKey), &stored); err != nil || stored.Digest != img.Digest {
		t.Fatalf("record in the bucket: %v %+v", err, stored)
	}

	// The other two pull at once, the manifest from the bucket.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	errs := make(chan error, 2)
	for _, h := range hosts[1:] {
		go func() { errs <- pullImage(ctx, h.Host, "library/shared", "1", img) }()
	}
	for range hosts[1:] {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range hosts[1:] {
		deadline := time.Now().Add(30 * time.Second)
		for metric(t, h, "berth_inspections_total", "result", "deferred") < 1 {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the manifest from the bucket was not left to the fleet", h.Host)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	// Every host's API answers with the one record.
	for _, h := range hosts {
		var view struct {
			Digest    string
			Inspected string
			Image     struct{ Layers []struct{ Digest string } }
		}
		waitJSON(t, h.URL+"/berth/v1/images/docker.io/library/shared:1", &view, func() bool { return view.Digest == img.Digest })
		if view.Inspected != stored.Inspected || len(view.Image.Layers) != len(img.Layers) {
			t.Errorf("%s: inspected %s (the bucket's %s), %d layers, want %d", h.Host, view.Inspected, stored.Inspected, len(view.Image.Layers), len(img.Layers))
		}
	}
	inspected := 0.0
	for k, h := range hosts {
		ok := metric(t, h, "berth_inspections_total", "result", "ok")
		shared := metric(t, h, "berth_inspections_total", "result", "shared")
		inspected += ok
		if k > 0 && shared != 1 {
			t.Errorf("%s read the fleet's record %v times, want 1", h.Host, shared)
		}
	}
	if inspected != 1 {
		t.Errorf("the fleet inspected the image %v times, want once", inspected)
	}
	if n := len(f.bucket.List(t, "objects/inspect/")); n != 1 {
		t.Errorf("%d inspection records in the bucket, want 1", n)
	}
}
