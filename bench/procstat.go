package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

func numCPU() int { return runtime.NumCPU() }

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat;
// the kernel fixes it at 100 on every architecture Go supports on Linux.
const clockTicks = 100

// statFields returns the fields of /proc/<pid>/stat after the command name
// (which may itself contain spaces): index 0 is the state (field 3).
func statFields(pid int) ([]string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return strings.Fields(s[i+1:]), nil
}

// cpuSeconds is the user+system time of the process (all its threads).
func cpuSeconds(pid int) (float64, error) {
	f, err := statFields(pid)
	if err != nil {
		return 0, err
	}
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	// utime and stime are fields 14 and 15.
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime/stime", pid)
	}
	return float64(ut+st) / clockTicks, nil
}

// treeCPUSeconds adds the CPU time of pid's live children, which is where
// nginx's workers do the serving.
func treeCPUSeconds(pid int) (float64, error) {
	total, err := cpuSeconds(pid)
	if err != nil {
		return 0, err
	}
	for _, c := range children(pid) {
		if s, err := cpuSeconds(c); err == nil {
			total += s
		}
	}
	return total, nil
}

func children(pid int) []int {
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	var out []int
	for _, d := range dirs {
		c, err := strconv.Atoi(filepath.Base(d))
		if err != nil {
			continue
		}
		f, err := statFields(c)
		if err != nil || len(f) < 2 {
			continue
		}
		if pp, _ := strconv.Atoi(f[1]); pp == pid {
			out = append(out, c)
		}
	}
	return out
}

// memKiB reads VmRSS and VmHWM (peak RSS) from /proc/<pid>/status.
func memKiB(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		var dst *int64
		switch {
		case strings.HasPrefix(line, "VmRSS:"):
			dst = &rss
		case strings.HasPrefix(line, "VmHWM:"):
			dst = &hwm
		default:
			continue
		}
		fields := strings.Fields(line)
		if len(fields) >= 2 {
			*dst, _ = strconv.ParseInt(fields[1], 10, 64)
		}
	}
	return rss, hwm, sc.Err()
}

// rssWatch follows one process's resident memory during a measurement. The
// kernel's own peak (VmHWM) is reset at the start when the kernel allows it
// (clear_refs 5); polling VmRSS covers the case where it does not.
type rssWatch struct {
	pid      int
	resetHWM bool
	stop     chan struct{}
	done     chan struct{}
	mu       sync.Mutex
	maxRSS   int64
}

func watchRSS(pid int) *rssWatch {
	w := &rssWatch{pid: pid, stop: make(chan struct{}), done: make(chan struct{})}
	w.resetHWM = os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0) == nil
	go func() {
		defer close(w.done)
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			if rss, _, err := memKiB(pid); err == nil {
				w.mu.Lock()
				w.maxRSS = max(w.maxRSS, rss)
				w.mu.Unlock()
			}
			select {
			case <-w.stop:
				return
			case <-t.C:
			}
		}
	}()
	return w
}

// peakMiB ends the watch and returns the peak resident set in MiB.
func (w *rssWatch) peakMiB() float64 {
	close(w.stop)
	<-w.done
	peak := w.maxRSS
	if w.resetHWM {
		if _, hwm, err := memKiB(w.pid); err == nil {
			peak = max(peak, hwm)
		}
	}
	return float64(peak) / 1024
}

// profile records the CPU profile of the server (and its workers) with perf while a measurement
// runs, when -perf DIR is given, into DIR/LABEL.perf.data (read it with
// `perf report -i FILE`). The returned function ends the recording.
func (b *bench) profile(s *server, label string) func() {
	if b.opt.perfDir == "" {
		return func() {}
	}
	if err := os.MkdirAll(b.opt.perfDir, 0o755); err != nil {
		b.logf("perf: %v", err)
		return func() {}
	}
	out := filepath.Join(b.opt.perfDir, label+".perf.data")
	pids := []string{strconv.Itoa(s.p.pid())}
	for _, c := range children(s.p.pid()) {
		pids = append(pids, strconv.Itoa(c))
	}
	cmd := exec.Command("perf", "record", "-F", "499", "-g", "-p", strings.Join(pids, ","), "-o", out)
	p, err := b.start("perf-"+label, cmd)
	if err != nil {
		b.logf("perf: %v", err)
		return func() {}
	}
	// perf needs a moment to attach before the measurement starts.
	time.Sleep(300 * time.Millisecond)
	return func() {
		_ = p.cmd.Process.Signal(os.Interrupt)
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			p.stop()
		}
		b.logf("perf profile of %s: %s", s.kind, out)
	}
}
