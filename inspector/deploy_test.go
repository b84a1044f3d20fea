package inspector

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/sirupsen/logrus"
	"github.com/tidwall/gjson"
	"gopkg.in/yaml.v3"

	"github.com/berth-dev/berth/config"
	"github.com/berth-dev/berth/engine"
	"github.com/berth-dev/berth/healthcheck"
	"github.com/berth-dev/berth/mirror"
	"github.com/berth-dev/berth/storage"
)

// recorder is a Registerer that keeps the names of every metric registered.
type recorder struct {
	*prometheus.Registry
	names map[string]bool
}

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

func (r *recorder) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			r.names[m[1]] = true
		}
	}
	return r.Registry.Register(c)
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

// berthMetrics builds the parts of berth serve that register metrics, as
// serve does, and returns every metric name they register.
func berthMetrics(t *testing.T) map[string]bool {
	t.Helper()
	rec := &recorder{Registry: prometheus.NewRegistry(), names: map[string]bool{}}
	rec.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	cfg := config.Default()
	cfg.Data = t.TempDir()
	local, err := storage.OpenLocal(cfg.Data, storage.LocalOptions{Budget: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	eng, err := engine.New(engine.Options{Config: cfg, Local: local, Metrics: rec, Bucket: storage.NewMemory(storage.MemoryOptions{})})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(eng.Close)
	engine.CountS3Requests(rec)
	mirror.New(eng, rec, logrus.NewEntry(logrus.New()))
	healthcheck.New(rec)
	ins, err := New(Options{Engine: eng, Local: local, Config: cfg, Metrics: rec, PrewarmQueue: func() int { return 0 }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ins.Close)
	return rec.names
}

var metricRef = regexp.MustCompile(`\b((?:berth|go|process)_[a-z0-9_]+)`)

// The Grafana dashboard parses, every query names metrics berth has, and
// every berth_* metric is on it.
func TestGrafanaDashboard(t *testing.T) {
	have := berthMetrics(t)
	b, err := os.ReadFile(filepath.Join("..", "deploy", "grafana", "berth.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title      string `json:"title"`
		UID        string `json:"uid"`
		Templating struct {
			List []struct {
				Name, Type string
				Query      any
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			Title   string                   `json:"title"`
			Type    string                   `json:"type"`
			GridPos struct{ H, W, X, Y int } `json:"gridPos"`
			Targets []struct {
				Expr  string `json:"expr"`
				RefID string `json:"refId"`
			} `json:"targets"`
		} `json:"panels"`
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&dash); err != nil {
		t.Fatalf("deploy/grafana/berth.json: %v", err)
	}
	if dash.Title == "" || dash.UID == "" || len(dash.Panels) == 0 {
		t.Fatalf("dashboard lacks a title, uid or panels")
	}
	queried := map[string]bool{}
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if p.Title == "" || len(p.Targets) == 0 || p.GridPos.W == 0 || p.GridPos.H == 0 {
			t.Errorf("panel %q: needs a title, a target and a size", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Expr == "" || tg.RefID == "" {
				t.Errorf("panel %q: a target without expr or refId", p.Title)
			}
			if strings.Count(tg.Expr, "(") != strings.Count(tg.Expr, ")") {
				t.Errorf("panel %q: unbalanced parentheses in %s", p.Title, tg.Expr)
			}
			for _, m := range metricRef.FindAllString(tg.Expr, -1) {
				base := m
				for _, suf := range []string{"_bucket", "_sum", "_count"} {
					if !have[base] && strings.HasSuffix(base, suf) {
						base = strings.TrimSuffix(base, suf)
					}
				}
				if !have[base] {
					t.Errorf("panel %q queries %s, which berth does not export", p.Title, m)
				}
				queried[base] = true
			}
		}
	}
	var missing []string
	for m := range have {
		if strings.HasPrefix(m, "berth_") && !queried[m] {
			missing = append(missing, m)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("berth metrics on no panel of the dashboard: %v", missing)
	}
}

// The KEDA ScaledObject example reads the scaler endpoint, and its
// valueLocation finds a number in a real feed.
func TestKEDAScaledObject(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "deploy", "keda", "scaledobject.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	type trigger struct {
		Type              string            `yaml:"type"`
		Metadata          map[string]string `yaml:"metadata"`
		AuthenticationRef *struct {
			Name string `yaml:"name"`
		} `yaml:"authenticationRef"`
	}
	type object struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
		Metadata   struct {
			Name      string `yaml:"name"`
			Namespace string `yaml:"namespace"`
		} `yaml:"metadata"`
		Spec struct {
			ScaleTargetRef *struct {
				Name string `yaml:"name"`
			} `yaml:"scaleTargetRef"`
			MinReplicaCount *int      `yaml:"minReplicaCount"`
			MaxReplicaCount *int      `yaml:"maxReplicaCount"`
			PollingInterval *int      `yaml:"pollingInterval"`
			Triggers        []trigger `yaml:"triggers"`
			SecretTargetRef []struct {
				Parameter, Name, Key string
			} `yaml:"secretTargetRef"`
		} `yaml:"spec"`
	}
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	var objs []object
	for {
		var o object
		if err := dec.Decode(&o); err != nil {
			if err.Error() == "EOF" {
				break
			}
			t.Fatalf("deploy/keda/scaledobject.yaml: %v", err)
		}
		objs = append(objs, o)
	}
	// A feed as berth serves it, with one watched image missing bytes.
	feed := Feed{Images: []FeedImage{{Image: "docker.io/library/nginx:1.27", MissingBytes: 50 << 20, ColdStartSeconds: 5, Watched: true}},
		MissingBytes: 50 << 20, ColdStartSeconds: 5, InspectQueue: 3}
	fj, _ := json.Marshal(feed)
	var scaled, auth int
	for _, o := range objs {
		switch o.Kind {
		case "ScaledObject":
			scaled++
			if o.APIVersion != "keda.sh/v1alpha1" || o.Spec.ScaleTargetRef == nil || o.Spec.ScaleTargetRef.Name == "" || len(o.Spec.Triggers) == 0 {
				t.Fatalf("ScaledObject %s: %+v", o.Metadata.Name, o.Spec)
			}
			for _, tr := range o.Spec.Triggers {
				if tr.Type != "metrics-api" {
					t.Errorf("trigger type %q, want metrics-api", tr.Type)
				}
				md := tr.Metadata
				if !strings.HasSuffix(md["url"], "/berth/v1/scaler") || md["format"] != "json" || md["targetValue"] == "" {
					t.Errorf("trigger metadata %v", md)
				}
				res := gjson.GetBytes(fj, md["valueLocation"])
				if !res.Exists() || res.Type != gjson.Number {
					t.Errorf("valueLocation %q finds no number in the feed %s", md["valueLocation"], fj)
				}
				if tr.AuthenticationRef != nil && !slices.Contains([]string{"basic", "bearer"}, md["authMode"]) {
					t.Errorf("authenticationRef without authMode basic or bearer: %v", md)
				}
			}
		case "TriggerAuthentication":
			auth++
			if len(o.Spec.SecretTargetRef) == 0 {
				t.Errorf("TriggerAuthentication %s names no secret", o.Metadata.Name)
			}
		default:
			t.Errorf("unexpected kind %s", o.Kind)
		}
	}
	if scaled == 0 {
		t.Fatal("no ScaledObject")
	}
}

// Every valueLocation docs/inspector.md shows finds a number in a feed.
func TestDocumentedValueLocations(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "docs", "inspector.md"))
	if err != nil {
		t.Fatal(err)
	}
	feed := Feed{Images: []FeedImage{{Image: "docker.io/library/nginx:1.27", MissingBytes: 50 << 20, ColdStartSeconds: 5, Watched: true}},
		MissingBytes: 50 << 20, ColdStartSeconds: 5, InspectQueue: 3, InflightFetches: 1, PrewarmQueue: new(int)}
	fj, _ := json.Marshal(feed)
	locs := regexp.MustCompile(`valueLocation: '([^']+)'`).FindAllStringSubmatch(string(b), -1)
	if len(locs) < 3 {
		t.Fatalf("docs/inspector.md shows %d valueLocation examples", len(locs))
	}
	for _, l := range locs {
		if res := gjson.GetBytes(fj, l[1]); !res.Exists() || res.Type != gjson.Number {
			t.Errorf("valueLocation %q finds no number in %s", l[1], fj)
		}
	}
}
