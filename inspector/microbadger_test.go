package inspector

import (
	"bytes"
	"encoding/json"
	"net/http/httptest"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/config"
)

// The MicroBadger answer's layout is MicroBadger's own, pinned here:
//
//   - testdata/microbadger-image.json is shaped field for field like what
//     api.microbadger.com/v1/images/NAMESPACE/IMAGE answered: the Image and
//     ImageVersion types (and Tag, ImageLayer, License, VersionControl) of
//     github.com/microscaling/microbadger database/interface.go with their
//     JSON tags, filled as api/image.go handleGetImage filled them (the
//     omitempty fields Parents, Identical, MicrobadgerURL and WebhookURL,
//     which berth never fills, left out). Decoding it into berth's types
//     with unknown fields refused proves berth has every field, typed alike.
//   - mbClient* below are the types MicroBadger's own Go client decoded into
//     (api/interface.go at 63d3a9d, the revision Microscaling's label mode
//     vendors, Godeps.json): time.Time fields reject an empty string, so
//     berth must always send RFC 3339 times.
type mbClientImage struct {
	ImageName     string
	Author        string
	Description   string
	DownloadSize  int64
	ImageURL      string
	Labels        map[string]string
	LastUpdated   time.Time
	LayerCount    int
	LatestSHA     string
	LatestVersion string
	UpdatedAt     time.Time
	Versions      []mbClientVersion
	WebhookURL    string
}

type mbClientVersion struct {
	SHA            string
	Tags           []struct{ Tag string }
	Author         string
	Labels         map[string]string
	LayerCount     int
	DownloadSize   int64
	Created        time.Time
	MicrobadgerURL string
}

func TestMicroBadgerSampleDecodes(t *testing.T) {
	raw, err := os.ReadFile("testdata/microbadger-image.json")
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var img mbImage
	if err := dec.Decode(&img); err != nil {
		t.Fatalf("MicroBadger's payload does not fit berth's types: %v", err)
	}
	v := img.Versions[0]
	if img.LatestSHA != v.SHA || img.PullCount != 31337 || img.UpdatedAt.IsZero() || len(v.Tags) != 2 || v.Tags[1].Tag != "0.9.1" ||
		v.Layers[1].DownloadSize != 1048576 || v.License.Code != "Apache-2.0" || v.VersionControl.Commit != "0f1e2d3" || v.Created.IsZero() {
		t.Errorf("decoded %+v", img)
	}
	// Its keys, level by level, are the keys berth sends (berth's own
	// additions aside).
	var sample, ours map[string]any
	if err := json.Unmarshal(raw, &sample); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(img)
	if err := json.Unmarshal(b, &ours); err != nil {
		t.Fatal(err)
	}
	sameKeys(t, "image", sample, ours)
	sameKeys(t, "version", sample["Versions"].([]any)[0].(map[string]any), ours["Versions"].([]any)[0].(map[string]any))
	sameKeys(t, "layer", sample["Versions"].([]any)[0].(map[string]any)["Layers"].([]any)[0].(map[string]any),
		ours["Versions"].([]any)[0].(map[string]any)["Layers"].([]any)[0].(map[string]any))
	sameKeys(t, "tag", sample["Versions"].([]any)[0].(map[string]any)["Tags"].([]any)[0].(map[string]any),
		ours["Versions"].([]any)[0].(map[string]any)["Tags"].([]any)[0].(map[string]any))
}

func sameKeys(t *testing.T, what string, a, b map[string]any) {
	t.Helper()
	keys := func(m map[string]any) string {
		var k []string
		for key := range m {
			k = append(k, key)
		}
		sort.Strings(k)
		return strings.Join(k, " ")
	}
	if keys(a) != keys(b) {
		t.Errorf("%s keys: MicroBadger %s; berth %s", what, keys(a), keys(b))
	}
}

// berth's answer decodes into MicroBadger's client types, and the labels
// Microscaling's label mode reads (config/label.go: GetLabels returns the
// top-level Labels) are there.
func TestMicroBadgerClientReadsBerth(t *testing.T) {
	up := inProcessRegistry(t)
	spec := dockerSpec(t)
	spec.created = time.Time{} // no created time: the answer must still decode
	up.push(t, "org/scaled:2.0", build(t, spec))
	h := newHarness(t, up, harnessOptions{config: func(c *config.Config) { c.DefaultUpstream = "registry.test" }})
	h.pull("org/scaled", "2.0")
	srv := httptest.NewServer(h.ins.Handler())
	defer srv.Close()
	for _, path := range []string{"/v1/images/org/scaled", "/v1/images/org/scaled:2.0"} {
		var img mbClientImage
		getJSON(t, srv.URL+path, 200, &img)
		if img.ImageName != "registry.test/org/scaled" || img.LatestVersion != "2.0" || len(img.Versions) != 1 || img.UpdatedAt.IsZero() {
			t.Errorf("%s: %+v", path, img)
		}
		for _, k := range []string{"com.microscaling.priority", "com.microscaling.max-containers", "com.microscaling.is-scalable"} {
			if img.Labels[k] == "" {
				t.Errorf("%s: label %s missing from %v", path, k, img.Labels)
			}
		}
	}
}
