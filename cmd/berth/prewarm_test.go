package main

import (
	"bytes"
	"context"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/coordinator"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/storage"
)

// prewarmNode is an in-process node API over a real engine, its upstream
// an in-process registry known as registry.test.
func prewarmNode(t *testing.T, upstreamURL string) string {
	t.Helper()
	dir := t.TempDir()
	local, err := storage.OpenLocal(dir, storage.LocalOptions{Budget: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Upstreams = map[string]config.Upstream{"registry.test": {URL: upstreamURL}}
	cfg.DefaultUpstream = "registry.test"
	eng, err := engine.New(engine.Options{Config: cfg, Local: local})
	if err != nil {
		t.Fatal(err)
	}
	n, err := coordinator.NewNode(coordinator.NodeOptions{Engine: eng, Local: local, DataDir: dir, Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(n.Handler())
	t.Cleanup(func() { srv.Close(); n.Close(); eng.Close() })
	return srv.URL
}

func TestPrewarmTerminalOutput(t *testing.T) {
	up := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer up.Close()
	img, _ := random.Image(2048, 2)
	ref, _ := name.ParseReference(strings.TrimPrefix(up.URL, "http://") + "/org/app:v1")
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	nodes := []string{prewarmNode(t, up.URL), prewarmNode(t, up.URL)}
	list := filepath.Join(t.TempDir(), "images.txt")
	os.WriteFile(list, []byte("registry.test/org/app:v1\n"), 0o644)
	var out, errb bytes.Buffer
	code := prewarmMain(context.Background(), []string{"-f", list, "--nodes", strings.Join(nodes, ","), "--pin", "1h"}, nil, &out, &errb, true)
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	for _, want := range []string{"registry.test/org/app:v1 -> registry.test/org/app@sha256:", "NODE", "IMAGES", nodes[0], nodes[1], "2 of 2 nodes warm; --require all met"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	// A node down: exit 1 naming it, with --require all; 0 with --require 50%.
	down := httptest.NewServer(nil)
	down.Close()
	args := []string{"--nodes", nodes[0] + "," + down.URL, "registry.test/org/app:v1"}
	out.Reset()
	errb.Reset()
	if code := prewarmMain(context.Background(), args, nil, &out, &errb, true); code != 1 || !strings.Contains(errb.String(), down.URL) || !strings.Contains(errb.String(), "node_unreachable") {
		t.Errorf("a node down: exit %d\n%s", code, errb.String())
	}
	if code := prewarmMain(context.Background(), append([]string{"--require", "50%"}, args...), nil, io.Discard, io.Discard, true); code != 0 {
		t.Errorf("a node down with --require 50%%: exit %d", code)
	}

	// One node under two names is one node: --require 2 is not met.
	byName := strings.Replace(nodes[0], "127.0.0.1", "localhost", 1)
	args = []string{"--nodes", nodes[0] + "," + byName, "--require", "2", "registry.test/org/app:v1"}
	out.Reset()
	errb.Reset()
	if code := prewarmMain(context.Background(), args, nil, &out, &errb, true); code != 1 || !strings.Contains(errb.String(), "1 of 1 nodes warm (2 URLs") {
		t.Errorf("two URLs of one node, --require 2: exit %d\n%s", code, errb.String())
	}
	for _, want := range []string{nodes[0] + " is also " + byName + " (node ID ", "1 of 1 nodes warm (2 URLs); --require 2 NOT met"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestPrewarmUsage(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"alpine:3.20"},
		{"--nodes", "http://127.0.0.1:1", "--require", "x", "alpine"},
		{"--nodes", "http://127.0.0.1:1", "--platform", "linux", "alpine"},
		{"--nodes", "http://127.0.0.1:1", "--parallel", "0", "alpine"},
		{"--nodes", "http://127.0.0.1:1", "--output", "xml", "alpine"},
		{"--nodes", "http://127.0.0.1:1", "-f", "/nonexistent", "alpine"},
		{"--nodes", "http://127.0.0.1:1", "--token-file", "/nonexistent", "alpine"},
		{"--coordinator", "http://127.0.0.1:1", "--nodes", "http://127.0.0.1:1", "alpine"},
		{"--nodes-dns", "x", "--dns-server", "nope", "alpine"},
		{"--bogus"},
	} {
		var errb bytes.Buffer
		if code := prewarmMain(context.Background(), args, strings.NewReader(""), io.Discard, &errb, false); code != 2 {
			t.Errorf("%q: exit %d, want 2 (%s)", args, code, errb.String())
		}
	}
}
