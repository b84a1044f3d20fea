package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/berth-dev/berth/coordinator"
)

// prewarmViaCoordinator hands the job to a coordinator, follows its
// progress there and applies the policy to the nodes' results.
func prewarmViaCoordinator(ctx context.Context, o prewarmOptions, refs []string, token string, pinUntil time.Time, policy coordinator.Policy, jsonOut bool, stdout, stderr io.Writer) int {
	base, err := coordinator.NormalizeNodeURL(o.coordinator, "http")
	if err != nil {
		fmt.Fprintf(stderr, "berth prewarm: --coordinator: %v\n", err)
		return 2
	}
	c := &coordinator.Client{Base: base, Token: token}
	spec := coordinator.JobSpec{Refs: refs, Platforms: o.platforms, PinUntil: pinUntil, Parallel: o.parallel, Require: policy.String()}
	id, err := c.Submit(ctx, spec)
	if err != nil {
		fmt.Fprintf(stderr, "berth prewarm: coordinator %s: %v\n", base, err)
		return 1
	}
	out := newPrewarmOutput(jsonOut, stdout, nil)
	if jsonOut {
		out.event(map[string]any{"event": "submitted", "coordinator": base, "job": id})
	} else {
		fmt.Fprintf(stdout, "job %s submitted to %s\n", id, base)
	}
	var last coordinator.JobRecord
	seen := map[string]coordinator.Progress{}
	started := false
	for {
		err = coordinator.Events(ctx, nil, base+"/berth/v1/coordinator/jobs/"+url.PathEscape(id)+"/events", token, func(ev string, data []byte) error {
			var rec coordinator.JobRecord
			if err := json.Unmarshal(data, &rec); err != nil {
				return err
			}
			last = rec
			if !started && len(rec.Images) > 0 {
				started = true
				out.resolved(rec.Spec.Refs, rec.Images, rec.RefErrors)
				var nodes []string
				for k := range rec.Progress {
					nodes = append(nodes, strings.Fields(k)[0])
				}
				sort.Strings(nodes)
				out.nodes = dedupeStrings(nodes)
				out.start()
			}
			keys := make([]string, 0, len(rec.Progress))
			for k := range rec.Progress {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				p := rec.Progress[k]
				if seen[k] != p {
					seen[k] = p
					out.progress(p)
				}
			}
			return nil
		})
		if last.Terminal() || ctx.Err() != nil {
			break
		}
		// The stream broke (a coordinator restarted): follow it again.
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
	out.stop()
	if !last.Terminal() {
		fmt.Fprintf(stderr, "berth prewarm: job %s on %s did not end within --timeout (%v); it goes on there\n", id, base, err)
		return 1
	}
	if len(last.Nodes) == 0 && last.Error != nil {
		fmt.Fprintf(stderr, "berth prewarm: job %s %s: %s\n", id, last.State, last.Error.Error())
		return 1
	}
	return finish(out, last.Nodes, last.RefErrors, policy, stderr)
}

func dedupeStrings(s []string) []string {
	var out []string
	for i, x := range s {
		if i == 0 || x != s[i-1] {
			out = append(out, x)
		}
	}
	return out
}
