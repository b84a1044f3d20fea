package e2e

// The image inspector through `berth serve`: images pulled with crane from
// the distribution registry are inspected in the background, served by the
// JSON API, and shown on pages that Debian's chromium loads headless with
// no console error; a label holding a <script> shows as text.

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berth-dev/berth/internal/testsupport"
)

const xssLabel = `<script>window.__berthXSS=1</script>`

// labelledImage is a Docker v2 image with label-schema labels, a label
// that tries to run a script, and empty-layer history.
func labelledImage(t *testing.T) *PushedImage {
	t.Helper()
	img := RandomImage(t, Docker, 48<<10, 2, "linux", "amd64")
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Author = "berth e2e"
	cf.Created = v1.Time{Time: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
	cf.Config.Labels = map[string]string{
		"org.label-schema.name":     "inspector-e2e",
		"org.label-schema.vcs-url":  "https://git.example/berth-e2e.git",
		"com.microscaling.priority": "5",
		"evil":                      xssLabel,
	}
	cf.Config.Cmd = []string{"/bin/app", "--serve"}
	cf.Config.ExposedPorts = map[string]struct{}{"8080/tcp": {}}
	cf.History = []v1.History{
		{CreatedBy: "/bin/sh -c #(nop) ADD file:base in / "},
		{CreatedBy: "/bin/sh -c #(nop)  LABEL evil=...", EmptyLayer: true},
		{CreatedBy: "/bin/sh -c make install-app"},
		{CreatedBy: `/bin/sh -c #(nop)  CMD ["/bin/app" "--serve"]`, EmptyLayer: true},
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	return describeImage(t, img)
}

func TestInspectorThroughBerth(t *testing.T) {
	testsupport.RequireTool(t, "crane")
	chromium := testsupport.RequireTool(t, "chromium")
	reg := StartRegistry(t)
	img := labelledImage(t)
	if err := remote.Write(pushRef(t, reg.Host, "library/webapp", "1"), img.Image); err != nil {
		t.Fatal(err)
	}
	PushIndex(t, OCI, reg.Host, "library/multi", "2", 32<<10, 1)

	// A webhook receiver, to fill the delivery log.
	var mu sync.Mutex
	var hooks []map[string]any
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var p map[string]any
		json.NewDecoder(r.Body).Decode(&p)
		mu.Lock()
		hooks = append(hooks, p)
		mu.Unlock()
	}))
	defer recv.Close()
	cfg := filepath.Join(t.TempDir(), "berth.yml")
	if err := os.WriteFile(cfg, []byte("webhooks:\n  - url: "+recv.URL+"/hook\n    events: [new]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	b := StartBerth(t, append(UpstreamArgs(reg.Host, reg.URL), "--config", cfg)...)
	cranePullVerify(t, b.Host+"/library/webapp:1", img)
	Run(t, 2*time.Minute, nil, "crane", "pull", "--insecure", "--format=oci", "--platform=linux/amd64", b.Host+"/library/multi:2", filepath.Join(t.TempDir(), "multi"))

	// The API: the background inspection is there once the pull is done.
	var view struct {
		Digest string
		Image  struct {
			Labels      map[string]string
			Annotations map[string]string
			Layers      []struct{ Command string }
			Dockerfile  []string
		}
	}
	waitJSON(t, b.URL+"/berth/v1/images/docker.io/library/webapp:1", &view, func() bool { return view.Digest == img.Digest && len(view.Image.Layers) == 2 })
	if view.Image.Labels["evil"] != xssLabel || view.Image.Annotations["org.opencontainers.image.source"] != "https://git.example/berth-e2e.git" {
		t.Errorf("labels %v annotations %v", view.Image.Labels, view.Image.Annotations)
	}
	if view.Image.Layers[0].Command != "ADD file:base in /" || view.Image.Layers[1].Command != "RUN make install-app" || len(view.Image.Dockerfile) != 4 {
		t.Errorf("layers %+v dockerfile %q", view.Image.Layers, view.Image.Dockerfile)
	}
	var mb struct {
		ImageName, LatestSHA string
		LayerCount           int
		Versions             []struct{ SHA string }
	}
	waitJSON(t, b.URL+"/v1/images/library/webapp", &mb, func() bool { return mb.LatestSHA == img.Digest })
	if mb.ImageName != "webapp" || mb.LayerCount != 2 || len(mb.Versions) != 1 {
		t.Errorf("MicroBadger %+v", mb)
	}
	var deliveries struct{ Deliveries []struct{ State string } }
	waitJSON(t, b.URL+"/berth/v1/webhooks", &deliveries, func() bool {
		n := 0
		for _, d := range deliveries.Deliveries {
			if d.State == "delivered" {
				n++
			}
		}
		return n == 2 // the two new tags
	})

	// The pages, in chromium.
	shots := filepath.Join(artifactsRoot(t), "inspector")
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	browser := newBrowser(t, chromium)
	t.Run("detector", func(t *testing.T) {
		// The check itself: a page that logs an error, throws and loads a
		// missing image is caught.
		bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/" {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/html")
			fmt.Fprint(w, `<!doctype html><title>bad</title><main>bad page</main><img src="/missing.png"><script>console.error("boom"); throw new Error("thrown")</script>`)
		}))
		defer bad.Close()
		_, scripts, _, _, problems := browser.load(t, bad.URL+"/")
		if scripts != 1 || len(problems) < 3 {
			t.Fatalf("the console check saw %d problems on a page with three (scripts %d): %q", len(problems), scripts, problems)
		}
	})
	for _, pg := range []struct {
		name, path string
		want       []string
	}{
		{"images", "/ui/", []string{"docker.io/library/webapp", "docker.io/library/multi", "Cached images"}},
		{"image", "/ui/image/docker.io/library/webapp:1", []string{xssLabel, "RUN make install-app", "org.opencontainers.image.title", "inspector-e2e", "CMD [\"/bin/app\" \"--serve\"]", "8080/tcp", "Tag history"}},
		{"index", "/ui/image/docker.io/library/multi:2", []string{"Platforms", "linux/amd64", "linux/arm64"}},
		{"webhooks", "/ui/webhooks", []string{recv.URL + "/hook", "delivered"}},
		{"node", "/ui/node", []string{"Cache", "Health", "listener"}},
	} {
		t.Run(pg.name, func(t *testing.T) {
			resp, err := http.Get(b.URL + pg.path)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
				t.Fatalf("GET %s: %d %s", pg.path, resp.StatusCode, resp.Header.Get("Content-Type"))
			}
			text, scripts, xss, shot, problems := browser.load(t, b.URL+pg.path)
			if err := os.WriteFile(filepath.Join(shots, pg.name+".png"), shot, 0o644); err != nil {
				t.Fatal(err)
			}
			if len(problems) > 0 {
				t.Errorf("console errors on %s:\n%s", pg.path, strings.Join(problems, "\n"))
			}
			for _, w := range pg.want {
				if !strings.Contains(text, w) {
					t.Errorf("%s does not show %q; it shows:\n%s", pg.path, w, text)
				}
			}
			if scripts != 0 || xss {
				t.Errorf("%s has %d script elements, injected script ran: %v", pg.path, scripts, xss)
			}
		})
	}
}

// waitJSON polls url until it answers 200 with JSON for which ok holds.
func waitJSON(t *testing.T, url string, into any, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		resp, err := http.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			last = fmt.Sprintf("%d %s", resp.StatusCode, body)
			if resp.StatusCode == 200 && json.Unmarshal(body, into) == nil && ok() {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("GET %s: never as expected; last answer: %s", url, last)
}

// artifactsRoot is test/e2e/tmp of the checkout (gitignored): screenshots
// are kept there as test artifacts.
func artifactsRoot(t *testing.T) string {
	root, err := testsupport.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "test", "e2e", "tmp")
}

type browser struct {
	ctx context.Context
}

// newBrowser starts Debian's chromium headless with a fresh profile.
func newBrowser(t *testing.T, path string) *browser {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(path),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("no-default-browser-check", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 1000),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancel()
		cancelAlloc()
	})
	// The first action starts the browser, which lives as long as ctx: no
	// shorter context here.
	if err := chromedp.Do(ctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("starting %s: %v", path, err)
	}
	return &browser{ctx: ctx}
}

// load opens url in a new tab and returns the text of <main>, the number of
// <script> elements, whether the injected label's script ran, a PNG
// screenshot and the console errors, warnings and exceptions seen.
func (b *browser) load(t *testing.T, url string) (text string, scripts int, xss bool, shot []byte, problems []string) {
	t.Helper()
	return b.loadWith(t, url, nil)
}

// loadWith is load with headers sent on every request of the tab (a
// bearer token for the coordinator's page).
func (b *browser) loadWith(t *testing.T, url string, headers network.Headers) (text string, scripts int, xss bool, shot []byte, problems []string) {
	t.Helper()
	tab, cancel := chromedp.NewContext(b.ctx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(tab, 60*time.Second)
	defer cancelT()
	// The first action attaches the tab; Console subscribes after it.
	if err := chromedp.Do(ctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("opening a tab: %v", err)
	}
	if headers != nil {
		if err := chromedp.Do(ctx, chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			_, err := cdp.Call(ctx, tg, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{Headers: headers})
			return err
		})); err != nil {
			t.Fatalf("setting the tab's headers: %v", err)
		}
	}
	var mu sync.Mutex
	done := make(chan struct{})
	messages := chromedp.Console(ctx)
	go func() {
		defer close(done)
		for m, err := range messages {
			if err != nil {
				return
			}
			if m.IsException() || m.Type == chromedp.ConsoleError || m.Type == "warning" {
				mu.Lock()
				problems = append(problems, m.String()+" ("+m.URL+")")
				mu.Unlock()
			}
		}
	}()
	if err := chromedp.Do(ctx,
		chromedp.Navigate(url),
		chromedp.WaitReady(chromedp.CSS("main")),
		chromedp.Sleep(300*time.Millisecond), // late messages: a favicon 404, a refused style
	); err != nil {
		t.Fatalf("loading %s: %v", url, err)
	}
	var err error
	if text, err = chromedp.Run(ctx, chromedp.Text(chromedp.CSS("main"))); err != nil {
		t.Fatal(err)
	}
	if scripts, err = chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("script").length`)); err != nil {
		t.Fatal(err)
	}
	if xss, err = chromedp.Run(ctx, chromedp.Evaluate[bool](`window.__berthXSS === 1`)); err != nil {
		t.Fatal(err)
	}
	if shot, err = chromedp.Run(ctx, chromedp.FullScreenshot(100)); err != nil {
		t.Fatal(err)
	}
	cancelT()
	cancel()
	<-done
	mu.Lock()
	defer mu.Unlock()
	return text, scripts, xss, shot, append([]string(nil), problems...)
}

// Three berth hosts on one MinIO bucket revalidate the same tag change; the
// webhook receiver, which checks the signature and refuses each delivery's
// first attempt, gets it exactly once, by retry.
func TestInspectorWebhookOncePerFleet(t *testing.T) {
	reg := StartRegistry(t)
	bucket := StartFleetBucket(t)
	secret := "e2e-fleet-secret"
	var mu sync.Mutex
	attempts := map[string]int{}
	var delivered []map[string]any
	badSig := 0
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		mac := hmac.New(sha256.New, []byte(secret))
		mac.Write(body)
		if !hmac.Equal([]byte(r.Header.Get("Berth-Signature")), []byte("sha256="+hex.EncodeToString(mac.Sum(nil)))) {
			badSig++
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		id := r.Header.Get("Berth-Delivery")
		attempts[id]++
		if attempts[id] == 1 {
			http.Error(w, "try again", http.StatusServiceUnavailable)
			return
		}
		var p map[string]any
		json.Unmarshal(body, &p)
		delivered = append(delivered, p)
	}))
	defer recv.Close()
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "secret")
	os.WriteFile(secretFile, []byte(secret+"\n"), 0o600)
	cfg := filepath.Join(dir, "berth.yml")
	os.WriteFile(cfg, []byte("webhooks:\n  - url: "+recv.URL+"/hook\n    secret_file: "+secretFile+"\n"), 0o644)
	args := append(append(UpstreamArgs(reg.Host, reg.URL), bucket.Args()...), "--config", cfg)
	var hosts []*Berth
	for range 3 {
		hosts = append(hosts, StartBerth(t, args...))
	}
	getTag := func() {
		var wg sync.WaitGroup
		for _, h := range hosts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				req, _ := http.NewRequest(http.MethodGet, h.URL+"/v2/library/app/manifests/prod", nil)
				req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Errorf("%s: GET manifest: %d", h.Host, resp.StatusCode)
				}
			}()
		}
		wg.Wait()
	}
	v1img := PushImage(t, Docker, reg.Host, "library/app", "prod", 16<<10, 1)
	getTag()
	v2img := PushImage(t, Docker, reg.Host, "library/app", "prod", 16<<10, 1)
	time.Sleep(1100 * time.Millisecond) // past --tag-ttl: the next GET revalidates
	getTag()

	deadline := time.Now().Add(60 * time.Second)
	for {
		mu.Lock()
		n := len(delivered)
		mu.Unlock()
		if n >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // a duplicate would have arrived by now
	mu.Lock()
	defer mu.Unlock()
	if badSig > 0 {
		t.Errorf("%d requests with a bad signature", badSig)
	}
	byEvent := map[string][]map[string]any{}
	for _, p := range delivered {
		byEvent[fmt.Sprint(p["event"])] = append(byEvent[fmt.Sprint(p["event"])], p)
	}
	if len(delivered) != 2 || len(byEvent["new"]) != 1 || len(byEvent["changed"]) != 1 {
		t.Fatalf("deliveries %v, want one new and one changed", delivered)
	}
	ch := byEvent["changed"][0]
	if ch["old_digest"] != v1img.Digest || ch["new_digest"] != v2img.Digest || ch["tag"] != "prod" || ch["repository"] != "library/app" {
		t.Errorf("changed delivery %v", ch)
	}
	for id, n := range attempts {
		if n != 2 {
			t.Errorf("delivery %s took %d attempts, want 2 (refused, then retried)", id, n)
		}
	}
	if evs := bucket.List(t, "objects/events/"); len(evs) != 2 {
		t.Errorf("the bucket records %d tag events, want 2: %v", len(evs), evs)
	}
}
