package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"time"
)

const gib = 1 << 30

// mirror is one of the two pull-through mirrors compared side by side.
type mirror struct {
	name  string
	start func(context.Context) (*server, error)
	cell  func(*row) *cell
}

func (b *bench) mirrors(tagTTL time.Duration) []mirror {
	return []mirror{
		{"berth", func(ctx context.Context) (*server, error) { return b.startBerth(ctx, tagTTL) }, func(r *row) *cell { return &r.berth }},
		{"distribution", b.startDistribution, func(r *row) *cell { return &r.dist }},
	}
}

// fail records a measurement that could not be taken. The run goes on so
// the rest of the table is still produced; the command fails at the end.
func (b *bench) fail(c *cell, what string, err error) {
	c.note = "failed"
	b.failures = append(b.failures, fmt.Sprintf("%s: %v", what, err))
	b.logf("FAILED %s: %v", what, err)
}

func (b *bench) ensureImage(ctx context.Context) error {
	if b.image.blobs > 0 {
		return nil
	}
	b.logf("pushing a %d × %s image to the upstream", b.opt.layers, sizeString(b.opt.layerSize))
	img, err := pushImage(ctx, b.up.addr, imageRepo, b.opt.layers, b.opt.layerSize, uint64(time.Now().UnixNano()))
	if err != nil {
		return err
	}
	b.image = img
	return nil
}

// pullDeadline bounds one round of n concurrent pulls: three times what the
// link needs for n full copies (the distribution proxy's worst case), plus
// slack.
func (b *bench) pullDeadline(n int) time.Duration {
	if b.opt.rate == 0 {
		return 5 * time.Minute
	}
	link := time.Duration(float64(n) * float64(b.image.bytes) / float64(b.opt.rate) * float64(time.Second))
	return time.Minute + 3*link
}

// pullRun is one round of concurrent cold pulls through one mirror.
type pullRun struct {
	wall      time.Duration
	upstream  int64   // bytes the upstream sent
	serverCPU float64 // CPU-seconds of the mirror
	clientCPU float64 // CPU-seconds of this process: clients and link
	hotWall   time.Duration
}

// coldPulls runs n concurrent pulls of the test image through a mirror
// started with an empty cache. With hot, n more pulls follow from the now
// full cache: their wall time is the floor that the CPU of this machine (the
// mirror's and the clients', which hash every byte) sets, with no upstream
// in the way.
func (b *bench) coldPulls(ctx context.Context, m mirror, n int, hot bool) (pullRun, error) {
	srv, err := m.start(ctx)
	if err != nil {
		return pullRun{}, err
	}
	defer srv.stop()
	tr := newTransport()
	defer tr.CloseIdleConnections()
	b.link.Reset()
	ctx, cancel := context.WithTimeout(ctx, b.pullDeadline(n))
	defer cancel()
	s0, _ := cpuSeconds(srv.p.pid())
	c0, _ := cpuSeconds(os.Getpid())
	pulls := func() (time.Duration, error) {
		return concurrently(ctx, n, func(ctx context.Context, i int) error {
			got, err := pullImage(ctx, tr, srv.addr, b.image)
			if err == nil && got != b.image.bytes {
				err = fmt.Errorf("pulled %d bytes, the image has %d", got, b.image.bytes)
			}
			return err
		})
	}
	endProfile := func() {}
	if m.name == "berth" {
		endProfile = b.profile(srv, fmt.Sprintf("%02d-berth-%d-cold-pulls", b.seq, n))
	}
	wall, err := pulls()
	endProfile()
	if err != nil {
		return pullRun{}, fmt.Errorf("%v (log: %s)", err, srv.p.log)
	}
	s1, _ := cpuSeconds(srv.p.pid())
	c1, _ := cpuSeconds(os.Getpid())
	// Anything the mirror still fetches after the clients are served (a
	// download nobody waits for any more) counts too.
	time.Sleep(300 * time.Millisecond)
	res := pullRun{wall: wall, upstream: b.link.UpstreamBytes(), serverCPU: s1 - s0, clientCPU: c1 - c0}
	if hot {
		if res.hotWall, err = pulls(); err != nil {
			return pullRun{}, fmt.Errorf("hot pulls: %v (log: %s)", err, srv.p.log)
		}
	}
	return res, nil
}

func (b *bench) scenarioPulls(ctx context.Context) error {
	if err := b.ensureImage(ctx); err != nil {
		return err
	}
	o := b.opt
	byteRows := map[int]*row{}
	for _, n := range o.pullNs {
		if byteRows[n] == nil {
			byteRows[n] = b.table.add(fmt.Sprintf("upstream bytes ÷ image bytes, %d cold %s", n, plural(n, "pull")), "%.3f").withGoal(1.02)
		}
	}
	wall1 := b.table.add("cold pull wall time, 1 pull (s)", "%.2f").informational()
	wallN := b.table.add(fmt.Sprintf("cold pull wall time, %d concurrent pulls (s)", o.wallN), "%.2f").informational()
	ratio := b.table.add(fmt.Sprintf("wall time %d concurrent ÷ 1 cold pull", o.wallN), "%.2f").withGoal(1.5)
	hotN := b.table.add(fmt.Sprintf("hot pull wall time, %d concurrent pulls (s)", o.wallN), "%.2f").informational()
	floor := b.table.add(fmt.Sprintf("hot %d concurrent ÷ 1 cold pull (this machine's floor)", o.wallN), "%.2f").informational()

	// One pull and wall-n pulls are timed, so they are repeated; other
	// counts only measure bytes, which do not vary with noise, and run once.
	ns := slices.Clone(o.pullNs)
	ns = append(ns, 1, o.wallN)
	slices.Sort(ns)
	ns = slices.Compact(ns)
	timed := func(n int) bool { return n == 1 || n == o.wallN }
	for rep := range o.reps {
		walls := map[string]map[int]time.Duration{}
		hots := map[string]time.Duration{}
		for _, n := range ns {
			if rep > 0 && !timed(n) {
				continue
			}
			for _, m := range b.mirrors(5 * time.Minute) {
				what := fmt.Sprintf("%s, %d cold pulls, repetition %d", m.name, n, rep+1)
				res, err := b.coldPulls(ctx, m, n, n == o.wallN)
				if err != nil {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					if r := byteRows[n]; r != nil {
						b.fail(m.cell(r), what, err)
					} else {
						b.failures = append(b.failures, fmt.Sprintf("%s: %v", what, err))
					}
					continue
				}
				wall, rb := res.wall, float64(res.upstream)/float64(b.image.bytes)
				b.logf("%s: %.2f s, upstream sent %s = %.3f × the image; CPU-s: %s %.2f, clients and link %.2f",
					what, wall.Seconds(), sizeString(res.upstream), rb, m.name, res.serverCPU, res.clientCPU)
				if r := byteRows[n]; r != nil {
					m.cell(r).add(rb)
				}
				if walls[m.name] == nil {
					walls[m.name] = map[int]time.Duration{}
				}
				walls[m.name][n] = wall
				if n == 1 {
					m.cell(wall1).add(wall.Seconds())
				}
				if n == o.wallN {
					m.cell(wallN).add(wall.Seconds())
					m.cell(hotN).add(res.hotWall.Seconds())
					hots[m.name] = res.hotWall
					b.logf("%s, %d hot pulls: %.2f s", m.name, n, res.hotWall.Seconds())
				}
			}
		}
		for _, m := range b.mirrors(0) {
			w1, ok1 := walls[m.name][1]
			wn, okn := walls[m.name][o.wallN]
			if ok1 && okn {
				m.cell(ratio).add(wn.Seconds() / w1.Seconds())
				m.cell(floor).add(hots[m.name].Seconds() / w1.Seconds())
			}
		}
	}
	return nil
}

func (b *bench) ensureBig(ctx context.Context) error {
	if b.big != nil {
		return nil
	}
	dir, err := b.newDir("big")
	if err != nil {
		return err
	}
	b.logf("writing a %s random blob and pushing it to the upstream", sizeString(b.opt.bigSize))
	blob, err := makeBigBlob(dir, b.opt.bigSize)
	if err != nil {
		return err
	}
	if err := pushBlob(ctx, b.up.url(), bigRepo, blob); err != nil {
		return err
	}
	b.big = &blob
	return nil
}

func (b *bench) blobURL(s *server) string {
	if s.kind == "nginx" {
		return s.url() + "/" + bigBlobFile
	}
	return s.url() + "/v2/" + bigRepo + "/blobs/" + b.big.digest
}

// prime puts the big blob into a mirror's cache. The link is opened up
// meanwhile: priming is set-up, not a measurement. The distribution proxy
// commits a blob only after it has sent the last byte, so a read is repeated
// until one costs the upstream nothing: only then is the blob hot.
func (b *bench) prime(ctx context.Context, s *server) error {
	b.link.SetRate(0)
	defer b.link.SetRate(b.opt.rate)
	client := &http.Client{Transport: newTransport()}
	defer client.CloseIdleConnections()
	for attempt := 1; ; attempt++ {
		b.link.Reset()
		if err := getBlob(ctx, client, b.blobURL(s), b.big.size); err != nil {
			return err
		}
		if attempt > 1 && b.checkHot(s) == nil {
			return nil
		}
		if attempt == 10 {
			return fmt.Errorf("the blob still came from the upstream after %d reads", attempt)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkHot fails a hot measurement that fetched blob bytes from the
// upstream after all. A few hundred bytes are the mirrors' health pings.
func (b *bench) checkHot(s *server) error {
	if n := b.link.UpstreamBytes(); n > 64<<10 {
		return fmt.Errorf("%s fetched %s from the upstream while serving a cached blob", s.kind, sizeString(n))
	}
	return nil
}

// readBlob has n clients read the big blob reads times each, at once.
func (b *bench) readBlob(ctx context.Context, s *server, n, reads int) (time.Duration, error) {
	tr := newTransport()
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	return concurrently(ctx, n, func(ctx context.Context, i int) error {
		for range reads {
			if err := getBlob(ctx, client, b.blobURL(s), b.big.size); err != nil {
				return err
			}
		}
		return nil
	})
}

func (b *bench) scenarioCPU(ctx context.Context) error {
	if err := b.ensureBig(ctx); err != nil {
		return err
	}
	o := b.opt
	perGiB := b.table.add(fmt.Sprintf("hot blob: server CPU-s per GiB served, %d clients", o.cpuConc), "%.3f")
	vsNginx := b.table.add("hot blob: server CPU ÷ nginx's (sendfile)", "%.2f").withGoal(1.3)

	nginx, err := b.startNginx(ctx, filepath.Dir(b.big.path))
	if err != nil {
		return err
	}
	defer nginx.stop()
	servers := []*server{nginx}
	cells := map[*server]func(*row) *cell{}
	for _, m := range b.mirrors(5 * time.Minute) {
		s, err := m.start(ctx)
		if err != nil {
			return err
		}
		defer s.stop()
		if err := b.prime(ctx, s); err != nil {
			b.fail(m.cell(perGiB), m.name+", priming the hot blob", err)
			b.fail(m.cell(vsNginx), m.name+", priming the hot blob", err)
			continue
		}
		servers = append(servers, s)
		cells[s] = m.cell
	}
	// Servers take turns within each repetition, so a noisy neighbour
	// hurts them alike.
	var nginxSamples []float64
	served := float64(o.cpuConc*o.cpuReads) * float64(b.big.size)
	for rep := range o.reps {
		var nginxCPU float64
		for _, s := range servers {
			c0, err := treeCPUSeconds(s.p.pid())
			if err != nil {
				return err
			}
			b.link.Reset()
			endProfile := b.profile(s, fmt.Sprintf("%02d-%s-cpu-hot-%d", b.seq, s.kind, rep+1))
			wall, err := b.readBlob(ctx, s, o.cpuConc, o.cpuReads)
			endProfile()
			if err == nil {
				err = b.checkHot(s)
			}
			if err != nil {
				if s == nginx {
					return fmt.Errorf("nginx: %w", err)
				}
				b.fail(cells[s](perGiB), s.kind+", reading the hot blob", err)
				continue
			}
			c1, err := treeCPUSeconds(s.p.pid())
			if err != nil {
				return err
			}
			v := (c1 - c0) / (served / gib)
			b.logf("%s, repetition %d: %.2f CPU-s for %s in %.2f s (%.2f GiB/s): %.3f CPU-s/GiB",
				s.kind, rep+1, c1-c0, sizeString(int64(served)), wall.Seconds(), served/gib/wall.Seconds(), v)
			if s == nginx {
				if c1 == c0 {
					return fmt.Errorf("nginx used less CPU than the clock's resolution (%v) serving %s; raise -big or -cpu-reads",
						time.Second/clockTicks, sizeString(int64(served)))
				}
				nginxCPU = v
				nginxSamples = append(nginxSamples, v)
				continue
			}
			cells[s](perGiB).add(v)
			if nginxCPU > 0 {
				cells[s](vsNginx).add(v / nginxCPU)
			}
		}
	}
	ref := median(nginxSamples)
	perGiB.goal = 1.3 * ref
	perGiB.goalIs = fmt.Sprintf("≤ %.3f (1.3 × nginx %.3f)", 1.3*ref, ref)
	return nil
}

func (b *bench) scenarioRSS(ctx context.Context) error {
	if err := b.ensureBig(ctx); err != nil {
		return err
	}
	o := b.opt
	big := sizeString(b.big.size)
	cold := b.table.add(fmt.Sprintf("peak RSS, %d clients streaming one %s blob, cold (MiB)", o.rssConc, big), "%.0f").withGoal(100)
	hot := b.table.add(fmt.Sprintf("peak RSS, %d clients streaming one %s blob, hot (MiB)", o.rssConc, big), "%.0f").withGoal(100)
	// Cold, the distribution proxy fetches the blob once per client: 50
	// copies through the link would take most of the run's time budget.
	cold.dist.note = "not run"

	for _, m := range b.mirrors(5 * time.Minute) {
		s, err := m.start(ctx)
		if err != nil {
			return err
		}
		if m.name == "berth" {
			w := watchRSS(s.p.pid())
			wall, err := b.readBlob(ctx, s, o.rssConc, 1)
			peak := w.peakMiB()
			if err != nil {
				b.fail(m.cell(cold), "berth, cold streams", err)
			} else {
				b.logf("berth, %d cold streams in %.2f s: peak RSS %.0f MiB", o.rssConc, wall.Seconds(), peak)
				m.cell(cold).add(peak)
			}
		} else if err := b.prime(ctx, s); err != nil {
			b.fail(m.cell(hot), m.name+", priming the hot blob", err)
			s.stop()
			continue
		}
		b.link.Reset()
		w := watchRSS(s.p.pid())
		wall, err := b.readBlob(ctx, s, o.rssConc, 1)
		peak := w.peakMiB()
		if err == nil {
			err = b.checkHot(s)
		}
		if err != nil {
			b.fail(m.cell(hot), m.name+", hot streams", err)
		} else {
			b.logf("%s, %d hot streams in %.2f s: peak RSS %.0f MiB", m.name, o.rssConc, wall.Seconds(), peak)
			m.cell(hot).add(peak)
		}
		s.stop()
	}
	return nil
}

func (b *bench) scenarioHang(ctx context.Context) error {
	if err := b.ensureImage(ctx); err != nil {
		return err
	}
	o := b.opt
	first := b.table.add("pull of a cached tag, upstream hung (s)", "%.2f").withGoal(3)
	next := b.table.add("next pull of that tag, upstream still hung (s)", "%.2f").informational()
	// Each repetition starts from a fresh mirror and a link that has just
	// hung: a mirror may remember a failed revalidation, so only the first
	// pull after the hang shows what a client waits the first time.
	for _, m := range b.mirrors(o.tagTTL) {
		for rep := range o.reps {
			capped, err := b.hungPulls(ctx, m, rep, m.cell(first), m.cell(next))
			if err != nil {
				return err
			}
			if capped {
				// One capped pull says what there is to say; more would
				// only spend the time budget.
				break
			}
		}
	}
	return nil
}

// hungPulls seeds a fresh mirror, hangs the link and times two pulls of the
// cached tag, each after the tag's TTL has passed.
func (b *bench) hungPulls(ctx context.Context, m mirror, rep int, first, next *cell) (capped bool, err error) {
	s, err := m.start(ctx)
	if err != nil {
		return false, err
	}
	tr := newTransport()
	defer func() {
		// Let stuck requests finish so the mirror can shut down promptly.
		b.link.Resume()
		s.stop()
		tr.CloseIdleConnections()
	}()
	if _, err := pullImage(ctx, tr, s.addr, b.image); err != nil {
		return false, fmt.Errorf("%s: seeding the cache: %w (log: %s)", m.name, err, s.p.log)
	}
	b.link.Hang()
	for i, c := range []*cell{first, next} {
		// The tag must be past its TTL so the mirror has to ask the upstream.
		time.Sleep(b.opt.tagTTL + 250*time.Millisecond)
		what := fmt.Sprintf("%s, repetition %d, pull %d with the upstream hung", m.name, rep+1, i+1)
		pctx, cancel := context.WithTimeout(ctx, b.opt.hangCap)
		start := time.Now()
		_, err := pullImage(pctx, tr, s.addr, b.image)
		d := time.Since(start)
		cancel()
		switch {
		case ctx.Err() != nil:
			return false, ctx.Err()
		case err != nil && errors.Is(pctx.Err(), context.DeadlineExceeded):
			b.logf("%s: no answer within %v", what, b.opt.hangCap)
			c.capped = true
			c.add(b.opt.hangCap.Seconds())
			if i == 0 && !next.measured() {
				next.note = "not run"
			}
			return true, nil
		case err != nil:
			b.fail(c, what, err)
			return false, nil
		default:
			b.logf("%s: %.2f s", what, d.Seconds())
			c.add(d.Seconds())
		}
	}
	return false, nil
}

func plural(n int, s string) string {
	if n == 1 {
		return s
	}
	return s + "s"
}

func sizeString(n int64) string {
	switch {
	case n >= gib && n%gib == 0:
		return fmt.Sprintf("%d GiB", n/gib)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	default:
		return fmt.Sprintf("%d B", n)
	}
}
