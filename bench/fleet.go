package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// fleetBucket is where one round's fleet keeps its shared cache: a bucket on
// the benchmark's MinIO, reached through the counting proxy, and a prefix
// of its own so every round starts from an empty fleet cache.
type fleetBucket struct {
	endpoint  string // the counting proxy
	bucket    string
	prefix    string
	region    string
	accessKey string
	secretKey string
}

// awsEnv hands a host the credentials the way a host gets them, through the
// standard AWS variables, with no config files or instance metadata to
// consult.
func (f *fleetBucket) awsEnv() []string {
	return []string{
		"AWS_ACCESS_KEY_ID=" + f.accessKey,
		"AWS_SECRET_ACCESS_KEY=" + f.secretKey,
		"AWS_REGION=" + f.region,
		"AWS_CONFIG_FILE=/nonexistent",
		"AWS_SHARED_CREDENTIALS_FILE=/nonexistent",
		"AWS_EC2_METADATA_DISABLED=true",
	}
}

// s3Env is the MinIO of the run and the counter in front of it.
type s3Env struct {
	minio   *server
	counter *s3Counter
	base    fleetBucket
}

const fleetRegion = "us-east-1"

func (b *bench) ensureS3(ctx context.Context) error {
	if b.s3 != nil {
		return nil
	}
	secret := make([]byte, 12)
	rand.Read(secret)
	f := fleetBucket{bucket: "berth-bench", region: fleetRegion, accessKey: "berthbench", secretKey: hex.EncodeToString(secret)}
	m, err := b.launch(ctx, "minio", "/minio/health/ready", func(dir, addr string) (*exec.Cmd, error) {
		console, err := freeAddr()
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(b.opt.minioBin, "server", filepath.Join(dir, "data"),
			"--address", addr, "--console-address", console, "--quiet")
		cmd.Env = append(cleanEnv("MINIO_"),
			"MINIO_ROOT_USER="+f.accessKey, "MINIO_ROOT_PASSWORD="+f.secretKey, "MINIO_REGION="+f.region,
			"MINIO_BROWSER=off", "MINIO_UPDATE=off", "MINIO_CI_CD=1")
		return cmd, nil
	})
	if err != nil {
		return err
	}
	client := s3.New(s3.Options{
		Region:       f.region,
		BaseEndpoint: aws.String(m.url()),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(f.accessKey, f.secretKey, ""),
	})
	if _, err := client.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(f.bucket)}); err != nil {
		return fmt.Errorf("creating the bucket: %w", err)
	}
	counter, err := startS3Counter(m.url())
	if err != nil {
		return err
	}
	f.endpoint = counter.url()
	b.s3 = &s3Env{minio: m, counter: counter, base: f}
	return nil
}

// fleetRun is one round of concurrent cold pulls through a fleet, and the
// pull of a host that joins the fleet afterwards.
type fleetRun struct {
	wall     time.Duration
	upstream int64
	s3       s3Counts
	avoided  int64 // berth: blobs its hosts took from the bucket or a peer, by its own count
	fromPeer int64 // berth: bytes its hosts served that streamed from a peer
	fromS3   int64 // berth: bytes its hosts served that came from the bucket
	hotWall  time.Duration

	// The warm bucket: a fresh host on the same prefix, the others gone,
	// pulls the image once.
	warmWall time.Duration
	warmS3   s3Counts
}

// fleetRound starts hosts fresh mirrors of one kind on a fresh prefix and
// has each of them serve pulls concurrent pulls, all at once. With hot, the
// same pulls run again once everything is cached, for the floor this
// machine's CPU sets, and then a fresh host pulls the image from the bucket
// the round filled.
func (b *bench) fleetRound(ctx context.Context, kind string, hosts, pulls int, hot bool, berthFlags ...string) (fleetRun, error) {
	f := b.s3.base
	b.seq++
	f.prefix = fmt.Sprintf("round-%02d-%s/", b.seq, kind)
	var srvs []*server
	defer func() {
		for _, s := range srvs {
			s.stop()
		}
	}()
	start := func() (*server, error) {
		if kind == "berth" {
			return b.startBerthVia(ctx, b.link.Addr, 5*time.Minute, &f, berthFlags...)
		}
		return b.startDistributionOn(ctx, &f)
	}
	for range hosts {
		s, err := start()
		if err != nil {
			return fleetRun{}, err
		}
		srvs = append(srvs, s)
	}
	// Each host is a node of its own, with its own connections.
	trs := make([]*http.Transport, hosts)
	for i := range trs {
		trs[i] = newTransport()
		defer trs[i].CloseIdleConnections()
	}
	b.link.Reset()
	b.s3.counter.take()
	ctx, cancel := context.WithTimeout(ctx, b.pullDeadline(hosts*pulls+1))
	defer cancel()
	round := func() (time.Duration, error) {
		return concurrently(ctx, hosts*pulls, func(ctx context.Context, i int) error {
			h := i % hosts
			got, err := pullImage(ctx, trs[h], srvs[h].addr, b.image)
			if err == nil && got != b.image.bytes {
				err = fmt.Errorf("pulled %d bytes, the image has %d", got, b.image.bytes)
			}
			if err != nil {
				return fmt.Errorf("host %d: %w (log: %s)", h+1, err, srvs[h].p.log)
			}
			return nil
		})
	}
	wall, err := round()
	if err != nil {
		return fleetRun{}, err
	}
	// Uploads to the bucket may finish after the last client is served;
	// they belong to the round.
	time.Sleep(time.Second)
	res := fleetRun{wall: wall, upstream: b.link.UpstreamBytes(), s3: b.s3.counter.take()}
	if kind == "berth" {
		for _, s := range srvs {
			for _, m := range []struct {
				name, label string
				sum         *int64
			}{
				{"berth_fleet_upstream_fetches_avoided_total", `kind="blob"`, &res.avoided},
				{"berth_bytes_served_total", `source="peer"`, &res.fromPeer},
				{"berth_bytes_served_total", `source="s3"`, &res.fromS3},
			} {
				n, err := metricValue(ctx, s.url()+"/metrics", m.name, m.label)
				if err != nil {
					return fleetRun{}, err
				}
				*m.sum += int64(n)
			}
		}
	}
	if !hot {
		return res, nil
	}
	if res.hotWall, err = round(); err != nil {
		return fleetRun{}, fmt.Errorf("hot round: %w", err)
	}
	// The fleet's hosts go before the new one comes, so that every request
	// the counter sees from here on is the new host's.
	for _, s := range srvs {
		s.stop()
	}
	srvs = nil
	s, err := start()
	if err != nil {
		return fleetRun{}, fmt.Errorf("warm bucket host: %w", err)
	}
	srvs = append(srvs, s)
	tr := newTransport()
	defer tr.CloseIdleConnections()
	b.s3.counter.take()
	t0 := time.Now()
	got, err := pullImage(ctx, tr, s.addr, b.image)
	if err == nil && got != b.image.bytes {
		err = fmt.Errorf("pulled %d bytes, the image has %d", got, b.image.bytes)
	}
	if err != nil {
		return fleetRun{}, fmt.Errorf("warm bucket host: %w (log: %s)", err, s.p.log)
	}
	res.warmWall = time.Since(t0)
	res.warmS3 = b.s3.counter.take()
	return res, nil
}

// metricValue reads one series from a Prometheus text endpoint; a series
// not exported yet is 0.
func metricValue(ctx context.Context, url, name, label string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, label) {
			continue
		}
		fields := strings.Fields(line)
		return strconv.ParseFloat(fields[len(fields)-1], 64)
	}
	return 0, sc.Err()
}

// The fleet of issue 3: three hosts sharing one bucket, ten concurrent cold
// pulls on each.
const (
	fleetHosts = 3
	fleetPulls = 10
)

func (b *bench) scenarioFleet(ctx context.Context) error {
	if err := b.ensureImage(ctx); err != nil {
		return err
	}
	if err := b.ensureS3(ctx); err != nil {
		return err
	}
	o := b.opt
	// Three hosts, their clients, MinIO and the upstream share this
	// machine's cores, where each host of a real fleet has cores of its own.
	// A slower link keeps the balance of link and CPU that one host sees
	// here in the pulls scenario, so the ratio below measures what the fleet
	// costs over one host rather than how thinly this machine is sliced.
	b.link.SetRate(o.fleetRate)
	defer b.link.SetRate(o.rate)
	b.logf("fleet: upstream link at %s", rateString(o.fleetRate))
	shape := fmt.Sprintf("%d hosts × %d cold pulls", fleetHosts, fleetPulls)
	up := b.table.add("fleet, "+shape+": upstream bytes ÷ image bytes", "%.3f").withGoal(1.05)
	wall := b.table.add("fleet, "+shape+": wall time (s)", "%.2f").informational()
	one := b.table.add("fleet: one cold pull on one host on the bucket (s)", "%.2f").informational()
	ratio := b.table.add("fleet wall time ÷ one cold pull on one host", "%.2f").withGoal(2)
	hot := b.table.add("fleet, "+shape+": the same pulls hot (s)", "%.2f").informational()
	floor := b.table.add("fleet: hot round ÷ one cold pull (this machine's floor)", "%.2f").informational()
	coldReqs := b.table.add("fleet, cold round: S3 requests per blob of the image", "%.1f").informational()
	writes := b.table.add("fleet, cold round: S3 write requests", "%.0f").informational()
	warmWall := b.table.add("fleet, warm bucket: one pull on a new host (s)", "%.2f").informational()
	warmReqs := b.table.add("fleet, warm bucket: S3 requests per blob read from S3", "%.2f").withGoal(3)
	renewShape := fmt.Sprintf("%d hosts × 1 slow cold pull", fleetHosts)
	renewWall := b.table.add("fleet, lease renewals, "+renewShape+": wall time (s)", "%.2f").informational()
	renewals := b.table.add("fleet, lease renewals: S3 renewal requests in the round", "%.0f").informational()
	others := b.table.add("fleet, lease renewals: other S3 requests in the round", "%.0f").informational()
	// A holder renews every third of the TTL: 180 ÷ TTL a minute at most.
	perMinute := b.table.add("fleet, lease renewals: S3 requests per held blob lease per minute", "%.1f").withGoal(180 / o.leaseTTL.Seconds())
	for _, r := range []*row{renewWall, renewals, others, perMinute} {
		r.dist.note = "not run"
	}
	for rep := range o.reps {
		for _, m := range b.mirrors(0) {
			kind := m.name
			single, err := b.fleetRound(ctx, kind, 1, 1, false)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				b.fail(m.cell(one), fmt.Sprintf("%s, one host, repetition %d", kind, rep+1), err)
				continue
			}
			m.cell(one).add(single.wall.Seconds())
			res, err := b.fleetRound(ctx, kind, fleetHosts, fleetPulls, true)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				b.fail(m.cell(up), fmt.Sprintf("%s, fleet, repetition %d", kind, rep+1), err)
				continue
			}
			rb := float64(res.upstream) / float64(b.image.bytes)
			b.logf("%s fleet, repetition %d: %.2f s, hot %.2f s (one pull on one host %.2f s), upstream sent %.3f × the image; "+
				"S3: %d reads, %d writes, %d blob reads [%s]",
				kind, rep+1, res.wall.Seconds(), res.hotWall.Seconds(), single.wall.Seconds(), rb,
				res.s3.reads(), res.s3.writes(), res.s3.blobReads, res.s3)
			if kind == "berth" {
				b.logf("berth fleet, repetition %d: %d blob fetches avoided; clients got %.2f × the image streamed from a peer, %.2f × from S3",
					rep+1, res.avoided, float64(res.fromPeer)/float64(b.image.bytes), float64(res.fromS3)/float64(b.image.bytes))
			}
			b.logf("%s warm bucket, repetition %d: one pull on a new host %.2f s; S3: %d reads, %d writes, %d blob reads [%s]",
				kind, rep+1, res.warmWall.Seconds(), res.warmS3.reads(), res.warmS3.writes(), res.warmS3.blobReads, res.warmS3)
			if o.verbose {
				b.logf("%s fleet S3 requests by operation, object and status: %s", kind, res.s3.details())
				b.logf("%s warm bucket S3 requests by operation, object and status: %s", kind, res.warmS3.details())
			}
			m.cell(up).add(rb)
			m.cell(wall).add(res.wall.Seconds())
			m.cell(ratio).add(res.wall.Seconds() / single.wall.Seconds())
			m.cell(hot).add(res.hotWall.Seconds())
			m.cell(floor).add(res.hotWall.Seconds() / single.wall.Seconds())
			m.cell(coldReqs).add(float64(res.s3.reads()+res.s3.writes()) / float64(b.image.blobs))
			m.cell(writes).add(float64(res.s3.writes()))
			m.cell(warmWall).add(res.warmWall.Seconds())
			if res.warmS3.blobReads > 0 {
				m.cell(warmReqs).add(float64(res.warmS3.reads()+res.warmS3.writes()) / float64(res.warmS3.blobReads))
			} else {
				m.cell(warmReqs).note = "no blob read from S3"
			}
		}
		res, err := b.renewalRound(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			b.fail(&perMinute.berth, fmt.Sprintf("berth, lease renewals, repetition %d", rep+1), err)
			continue
		}
		c := res.s3
		b.logf("berth lease renewals, repetition %d: --s3-lease-ttl %v, %.2f s; %d blob leases held %.1f s in all; %d renewal requests, %d other S3 requests [%s]",
			rep+1, o.leaseTTL, res.wall.Seconds(), c.leaseHeld, c.leaseSecs, c.renewals, c.total()-c.renewals, c)
		if o.verbose {
			b.logf("berth lease renewals S3 requests by operation, object and status: %s", c.details())
		}
		renewWall.berth.add(res.wall.Seconds())
		renewals.berth.add(float64(c.renewals))
		others.berth.add(float64(c.total() - c.renewals))
		if c.leaseSecs > 0 {
			perMinute.berth.add(float64(c.renewals) / (c.leaseSecs / 60))
		} else {
			perMinute.berth.note = "no lease held"
		}
	}
	return nil
}

// renewalIntervals is how many renewal intervals (a third of the lease TTL
// each) the image takes to come down in the lease-renewal round: its
// layers come down side by side, so each layer's lease is held across
// several renewals, the link's burst at the start notwithstanding.
const renewalIntervals = 4

// renewalRound is a cold round of one pull per host through a link slowed
// so that the image takes renewalIntervals to come down.
func (b *bench) renewalRound(ctx context.Context) (fleetRun, error) {
	ttl := b.opt.leaseTTL
	rate := int64(float64(b.image.bytes) / (renewalIntervals * ttl.Seconds() / 3))
	b.link.SetRate(rate)
	defer b.link.SetRate(b.opt.fleetRate)
	b.logf("fleet lease renewals: upstream link at %s, --s3-lease-ttl %v", rateString(rate), ttl)
	return b.fleetRound(ctx, "berth", fleetHosts, 1, false, "--s3-lease-ttl", ttl.String())
}
