package main

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// The prewarm scenario (docs/prewarm.md): `berth prewarm` onto N nodes on
// one bucket, beside what a per-node pre-pull job does (each node pulls the
// image itself, no shared bucket), measured in the same run.

// prewarmPulls is how many concurrent pulls run on a warmed node.
const prewarmPulls = 20

// smallRepo is the small image of the scale round.
const smallRepo = "bench/small"

// prewarmRound is one `berth prewarm` run and what it cost.
type prewarmRound struct {
	wall     time.Duration
	upstream int64
	s3       s3Counts
	maxRSS   int64 // KiB, of the prewarm process
}

// nodeURLs is the nodes' URLs, comma-separated, as --nodes takes them.
func nodeURLs(nodes []*server) string {
	var urls []string
	for _, n := range nodes {
		urls = append(urls, n.url())
	}
	return strings.Join(urls, ",")
}

// runPrewarm runs berth prewarm against nodes for ref and waits for it.
func (b *bench) runPrewarm(ctx context.Context, nodes []*server, ref string, parallel int) (prewarmRound, error) {
	return b.runPrewarmVia(ctx, []string{"--nodes", nodeURLs(nodes)}, ref, parallel)
}

// runPrewarmVia runs berth prewarm with target (the flags naming the nodes,
// or the coordinator to hand the job to) for ref and waits for it.
func (b *bench) runPrewarmVia(ctx context.Context, target []string, ref string, parallel int) (prewarmRound, error) {
	b.link.Reset()
	b.s3.counter.take()
	args := append([]string{"prewarm"}, target...)
	args = append(args, "--parallel", fmt.Sprint(parallel), "--output", "json", "--timeout", "20m", ref)
	cmd := exec.CommandContext(ctx, b.opt.berthBin, args...)
	cmd.Env = cleanEnv("BERTH_", "AWS_")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	t0 := time.Now()
	err := cmd.Run()
	wall := time.Since(t0)
	if err != nil {
		tail := out.String()
		if len(tail) > 2000 {
			tail = tail[len(tail)-2000:]
		}
		return prewarmRound{}, fmt.Errorf("berth prewarm: %v\n%s", err, tail)
	}
	// Uploads to the bucket may finish after the last node reported: they
	// count too.
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	b.s3.counter.settle(sctx, time.Second)
	cancel()
	r := prewarmRound{wall: wall, upstream: b.link.UpstreamBytes(), s3: b.s3.counter.take()}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.maxRSS = ru.Maxrss
	}
	return r, nil
}

// pullsOn runs n concurrent pulls of the test image on one node.
func (b *bench) pullsOn(ctx context.Context, s *server, n int) (time.Duration, error) {
	tr := newTransport()
	defer tr.CloseIdleConnections()
	return concurrently(ctx, n, func(ctx context.Context, i int) error {
		got, err := pullImage(ctx, tr, s.addr, b.image)
		if err == nil && got != b.image.bytes {
			err = fmt.Errorf("pulled %d bytes, the image has %d", got, b.image.bytes)
		}
		return err
	})
}

func (b *bench) startNodes(ctx context.Context, n int, f *fleetBucket) ([]*server, func(), error) {
	var srvs []*server
	stop := func() {
		for _, s := range srvs {
			s.stop()
		}
	}
	for range n {
		var s *server
		var err error
		if f != nil {
			s, err = b.startBerthOn(ctx, 5*time.Minute, f)
		} else {
			s, err = b.startBerth(ctx, 5*time.Minute)
		}
		if err != nil {
			stop()
			return nil, nil, err
		}
		srvs = append(srvs, s)
	}
	return srvs, stop, nil
}

func (b *bench) scenarioPrewarm(ctx context.Context) error {
	if err := b.ensureImage(ctx); err != nil {
		return err
	}
	if err := b.ensureS3(ctx); err != nil {
		return err
	}
	o := b.opt
	n := o.prewarmNodes
	ref := upstreamName + "/" + imageRepo + ":" + imageTag
	shape := fmt.Sprintf("prewarm, %d nodes", n)
	up := b.table.add(shape+": upstream bytes ÷ image bytes", "%.3f").withGoal(1.02)
	naiveUp := b.table.add(fmt.Sprintf("prewarm, naive (%d nodes pull it themselves, no bucket): bytes from the upstream ÷ image bytes", n), "%.3f").informational()
	wall := b.table.add(shape+": time until all warm (s)", "%.2f").informational()
	one := b.table.add("prewarm: one cold pull on one node (s)", "%.2f").informational()
	ratio := b.table.add(shape+": time until all warm ÷ one cold pull", "%.2f").withGoal(2)
	naiveWall := b.table.add(fmt.Sprintf("prewarm, naive: %d nodes each pulling the image (s)", n), "%.2f").informational()
	reqs := b.table.add(shape+": S3 requests per node per blob", "%.2f").withGoal(3)
	hotUp := b.table.add(fmt.Sprintf("prewarm, %d pulls on a warmed node: bytes from the upstream", prewarmPulls), "%.0f").withGoal(0)
	hotS3 := b.table.add(fmt.Sprintf("prewarm, %d pulls on a warmed node: S3 blob GETs", prewarmPulls), "%.0f").withGoal(0)
	hotRatio := b.table.add(fmt.Sprintf("prewarm, %d pulls on a warmed node ÷ on a node that pulled it itself", prewarmPulls), "%.2f").withGoal(1.1)
	again := b.table.add("prewarm, repeated on warm nodes: blob bytes from the upstream, S3 blob GETs", "%.0f").withGoal(0)
	scale := fmt.Sprintf("prewarm, %d nodes × %d × %s image", o.prewarmScale, o.layers, sizeString(o.prewarmSmall))
	scaleUp := b.table.add(scale+": upstream bytes ÷ image bytes", "%.3f").withGoal(1.02)
	scaleReqs := b.table.add(scale+": S3 requests per node per blob", "%.2f").withGoal(3)
	scaleWall := b.table.add(scale+": time until all warm (s)", "%.2f").informational()
	scaleRSS := b.table.add(scale+": berth prewarm peak RSS (MiB)", "%.1f").informational()
	coordWall := b.table.add(scale+": berth coordinator: time until all warm (s)", "%.2f").informational()
	coordRSS := b.table.add(scale+": berth coordinator peak RSS (MiB)", "%.1f").informational()
	for _, r := range []*row{up, naiveUp, wall, one, ratio, naiveWall, reqs, hotUp, hotS3, hotRatio, again, scaleUp, scaleReqs, scaleWall, scaleRSS, coordWall, coordRSS} {
		r.dist.note = "not run"
	}
	for rep := range o.reps {
		ctx, cancel := context.WithTimeout(ctx, b.pullDeadline(2*n+prewarmPulls)+2*time.Minute)
		err := b.prewarmRep(ctx, rep, n, ref, up, naiveUp, wall, one, ratio, naiveWall, reqs, hotUp, hotS3, hotRatio, again)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			b.fail(&up.berth, fmt.Sprintf("prewarm, repetition %d", rep+1), err)
		}
	}
	if err := b.prewarmScaleRound(ctx, scaleUp, scaleReqs, scaleWall, scaleRSS, coordWall, coordRSS); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		b.fail(&scaleUp.berth, "prewarm scale round", err)
	}
	return nil
}

func (b *bench) prewarmRep(ctx context.Context, rep, n int, ref string, up, naiveUp, wall, one, ratio, naiveWall, reqs, hotUp, hotS3, hotRatio, again *row) error {
	// One cold pull on one node: the unit of time.
	single, stopSingle, err := b.startNodes(ctx, 1, nil)
	if err != nil {
		return err
	}
	b.link.Reset()
	oneWall, err := b.pullsOn(ctx, single[0], 1)
	stopSingle()
	if err != nil {
		return fmt.Errorf("one cold pull: %w", err)
	}

	// berth prewarm onto n fresh nodes on a fresh bucket prefix.
	f := b.s3.base
	b.seq++
	f.prefix = fmt.Sprintf("round-%02d-prewarm/", b.seq)
	nodes, stopNodes, err := b.startNodes(ctx, n, &f)
	if err != nil {
		return err
	}
	defer stopNodes()
	res, err := b.runPrewarm(ctx, nodes, ref, n)
	if err != nil {
		return err
	}
	rb := float64(res.upstream) / float64(b.image.bytes)
	perNodeBlob := float64(res.s3.reads()+res.s3.writes()) / float64(n*b.image.blobs)
	b.logf("prewarm, repetition %d: %d nodes warm in %.2f s (one cold pull %.2f s), upstream sent %.3f × the image; S3: %d reads, %d writes, %d blob reads [%s]; by kind: %s",
		rep+1, n, res.wall.Seconds(), oneWall.Seconds(), rb, res.s3.reads(), res.s3.writes(), res.s3.blobReads, res.s3, res.s3.details())

	// Pulls on a warmed node: nothing from the upstream or the bucket.
	b.link.Reset()
	b.s3.counter.take()
	warmWall, err := b.pullsOn(ctx, nodes[0], prewarmPulls)
	if err != nil {
		return fmt.Errorf("pulls on a warmed node: %w", err)
	}
	hot := prewarmRound{upstream: b.link.UpstreamBytes(), s3: b.s3.counter.take()}

	// The same pre-warm again: nothing moves.
	rerun, err := b.runPrewarm(ctx, nodes, ref, n)
	if err != nil {
		return fmt.Errorf("repeated prewarm: %w", err)
	}
	stopNodes()

	// The naive alternative: every node pulls the image itself, no bucket.
	naive, stopNaive, err := b.startNodes(ctx, n, nil)
	if err != nil {
		return err
	}
	defer stopNaive()
	b.link.Reset()
	nw, err := concurrently(ctx, n, func(ctx context.Context, i int) error {
		_, err := b.pullsOn(ctx, naive[i], 1)
		return err
	})
	if err != nil {
		return fmt.Errorf("naive pulls: %w", err)
	}
	naiveBytes := b.link.UpstreamBytes()
	selfWall, err := b.pullsOn(ctx, naive[0], prewarmPulls)
	if err != nil {
		return fmt.Errorf("pulls on a node that pulled the image itself: %w", err)
	}
	stopNaive()
	b.logf("prewarm, repetition %d: %d pulls on a warmed node %.2f s (upstream %d B, S3 blob reads %d), on a node that pulled it itself %.2f s; naive: %d nodes in %.2f s, upstream %.3f × the image; repeat: upstream %d B, S3 blob reads %d",
		rep+1, prewarmPulls, warmWall.Seconds(), hot.upstream, hot.s3.blobReads, selfWall.Seconds(), n, nw.Seconds(), float64(naiveBytes)/float64(b.image.bytes), rerun.upstream, rerun.s3.blobReads)

	up.berth.add(rb)
	naiveUp.berth.add(float64(naiveBytes) / float64(b.image.bytes))
	wall.berth.add(res.wall.Seconds())
	one.berth.add(oneWall.Seconds())
	ratio.berth.add(res.wall.Seconds() / oneWall.Seconds())
	naiveWall.berth.add(nw.Seconds())
	reqs.berth.add(perNodeBlob)
	hotUp.berth.add(float64(hot.upstream))
	hotS3.berth.add(float64(hot.s3.blobReads))
	hotRatio.berth.add(warmWall.Seconds() / selfWall.Seconds())
	again.berth.add(float64(rerun.upstream + rerun.s3.blobReads))
	return nil
}

// prewarmScaleRound warms many nodes with a small image, with berth
// prewarm, then with another small image through a berth coordinator.
func (b *bench) prewarmScaleRound(ctx context.Context, up, reqs, wall, rss, coordWall, coordRSS *row) error {
	o := b.opt
	// A seed of its own: the small image shares no layer with the test image.
	img, err := pushImage(ctx, b.up.addr, smallRepo, o.layers, o.prewarmSmall, uint64(time.Now().UnixNano())^0x5a5a)
	if err != nil {
		return err
	}
	f := b.s3.base
	b.seq++
	f.prefix = fmt.Sprintf("round-%02d-prewarm-scale/", b.seq)
	b.logf("prewarm scale: starting %d nodes", o.prewarmScale)
	nodes, stop, err := b.startNodes(ctx, o.prewarmScale, &f)
	if err != nil {
		return err
	}
	defer stop()
	res, err := b.runPrewarm(ctx, nodes, upstreamName+"/"+smallRepo+":"+imageTag, 16)
	if err != nil {
		return err
	}
	b.logf("prewarm scale: %d nodes warm in %.2f s, upstream sent %.3f × the image; S3: %d reads, %d writes, %d blob reads; berth prewarm peak RSS %.1f MiB; by kind: %s",
		o.prewarmScale, res.wall.Seconds(), float64(res.upstream)/float64(img.bytes), res.s3.reads(), res.s3.writes(), res.s3.blobReads, float64(res.maxRSS)/1024, res.s3.details())
	up.berth.add(float64(res.upstream) / float64(img.bytes))
	reqs.berth.add(float64(res.s3.reads()+res.s3.writes()) / float64(o.prewarmScale*img.blobs))
	wall.berth.add(res.wall.Seconds())
	rss.berth.add(float64(res.maxRSS) / 1024)
	if err := b.prewarmCoordinatorRound(ctx, nodes, &f, coordWall, coordRSS); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// The berth prewarm rows above stand; only the coordinator's fail.
		b.fail(&coordWall.berth, "prewarm scale round, coordinator", err)
	}
	return nil
}

// smallCoordRepo is the small image the coordinator warms in the scale
// round: the same shape as smallRepo, other layers, so the nodes that hold
// smallRepo still have the whole job to do.
const smallCoordRepo = "bench/small-coordinator"

// prewarmCoordinatorRound runs a berth coordinator over the nodes (a static
// list, their bucket and prefix), hands it a job with berth prewarm
// --coordinator and reports the coordinator's peak memory.
func (b *bench) prewarmCoordinatorRound(ctx context.Context, nodes []*server, f *fleetBucket, wall, rss *row) error {
	o := b.opt
	img, err := pushImage(ctx, b.up.addr, smallCoordRepo, o.layers, o.prewarmSmall, uint64(time.Now().UnixNano())^0xc00d)
	if err != nil {
		return err
	}
	coord, err := b.launch(ctx, "coordinator", "/healthz", func(dir, addr string) (*exec.Cmd, error) {
		cmd := exec.Command(b.opt.berthBin, "coordinator", "--listen", addr,
			"--s3-bucket", f.bucket, "--s3-prefix", f.prefix, "--s3-endpoint", f.endpoint,
			"--s3-path-style=true", "--s3-region", f.region,
			"--nodes", nodeURLs(nodes), "--log-level", "warn")
		cmd.Env = append(cleanEnv("BERTH_", "AWS_"), f.awsEnv()...)
		return cmd, nil
	})
	if err != nil {
		return err
	}
	defer coord.stop()
	res, err := b.runPrewarmVia(ctx, []string{"--coordinator", coord.url()}, upstreamName+"/"+smallCoordRepo+":"+imageTag, 16)
	if err != nil {
		return fmt.Errorf("through the coordinator: %w\n%s", err, coord.p.logTail())
	}
	// The kernel's high-water mark covers the coordinator's whole life:
	// start, discovery, the job and following it.
	_, hwm, err := memKiB(coord.p.pid())
	if err != nil {
		return fmt.Errorf("coordinator memory: %w", err)
	}
	b.logf("prewarm scale, coordinator: %d nodes warm in %.2f s, upstream sent %.3f × the image; S3 (the coordinator's job and lease records and polls too): %d reads, %d writes, %d blob reads; coordinator peak RSS %.1f MiB",
		len(nodes), res.wall.Seconds(), float64(res.upstream)/float64(img.bytes), res.s3.reads(), res.s3.writes(), res.s3.blobReads, float64(hwm)/1024)
	wall.berth.add(res.wall.Seconds())
	rss.berth.add(float64(hwm) / 1024)
	return nil
}
