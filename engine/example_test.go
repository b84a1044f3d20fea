package engine_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/storage"
)

// Prefetch one image's blobs into the cache and pin them for an hour.
func Example_prefetch() {
	// A registry with one image of three layers, standing in for an upstream.
	upstream := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer upstream.Close()
	host := strings.TrimPrefix(upstream.URL, "http://")
	img, _ := random.Image(1024, 3)
	ref, _ := name.ParseReference(host + "/org/app:v1")
	if err := remote.Write(ref, img); err != nil {
		log.Fatal(err)
	}

	dir, _ := os.MkdirTemp("", "berth-example")
	defer os.RemoveAll(dir)
	local, _ := storage.OpenLocal(dir, storage.LocalOptions{Budget: 1 << 30})
	cfg := config.Default()
	cfg.Upstreams = map[string]config.Upstream{"registry.test": {URL: upstream.URL}}
	eng, err := engine.New(engine.Options{Config: cfg, Local: local})
	if err != nil {
		log.Fatal(err)
	}
	defer eng.Close()

	ctx := context.Background()
	repo, _ := eng.Resolve("registry.test", "org/app")
	m, err := eng.Manifest(ctx, repo, "v1", nil)
	if err != nil {
		log.Fatal(err)
	}
	var manifest struct {
		Config struct{ Digest digest.Digest }
		Layers []struct{ Digest digest.Digest }
	}
	json.Unmarshal(m.Content, &manifest)
	blobs := []digest.Digest{manifest.Config.Digest}
	for _, l := range manifest.Layers {
		blobs = append(blobs, l.Digest)
	}
	for _, d := range blobs {
		if err := eng.Prefetch(ctx, repo, d, time.Now().Add(time.Hour)); err != nil {
			fmt.Println(d, engine.KindOf(err))
		}
	}
	fmt.Println("pinned blobs:", len(eng.Pinned()))
	// Output: pinned blobs: 4
}
