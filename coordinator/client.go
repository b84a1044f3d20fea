package coordinator

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// Client calls one node's API (or a coordinator's: same conventions).
type Client struct {
	// Base is the node's URL, e.g. http://10.0.3.7:5001.
	Base string
	// Token is sent as `Authorization: Bearer`; "" sends none. It is
	// never put in an error or a log line.
	Token string
	HTTP  *http.Client
}

func (c *Client) url(p string) string { return strings.TrimRight(c.Base, "/") + p }

// send makes one request, with the token, and types a failure to send:
// the context's end, or node_unreachable.
func (c *Client) send(ctx context.Context, method, u string, body io.Reader, h http.Header) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, &ErrorInfo{Kind: "invalid_request", Message: err.Error()}
	}
	for k, v := range h {
		req.Header[k] = v
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, infoOf(ctx.Err())
		}
		return nil, &ErrorInfo{Kind: "node_unreachable", Message: err.Error()}
	}
	return resp, nil
}

func (c *Client) do(ctx context.Context, method, p string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	h := http.Header{}
	if in != nil {
		h.Set("Content-Type", "application/json")
	}
	resp, err := c.send(ctx, method, c.url(p), body, h)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return &ErrorInfo{Kind: "node_unreachable", Message: "reading the answer: " + err.Error()}
	}
	if resp.StatusCode/100 != 2 {
		return apiErrorBody(resp.StatusCode, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return &ErrorInfo{Kind: "bad_answer", Message: fmt.Sprintf("%s %s: %v", method, p, err)}
		}
	}
	return nil
}

// Facts asks the node for its facts.
func (c *Client) Facts(ctx context.Context) (NodeFacts, error) {
	var f NodeFacts
	err := c.do(ctx, http.MethodGet, "/berth/v1/node", nil, &f)
	return f, err
}

// Resolve asks the node to resolve ref to a digest.
func (c *Client) Resolve(ctx context.Context, ref string) (Resolved, error) {
	var r Resolved
	err := c.do(ctx, http.MethodGet, "/berth/v1/resolve?ref="+url.QueryEscape(ref), nil, &r)
	return r, err
}

// Prefetch starts a job on the node.
func (c *Client) Prefetch(ctx context.Context, req PrefetchRequest) (string, error) {
	var a PrefetchAccepted
	err := c.do(ctx, http.MethodPost, "/berth/v1/prefetch", req, &a)
	return a.ID, err
}

// Job gets a job's snapshot.
func (c *Client) Job(ctx context.Context, id string) (JobSnapshot, error) {
	var s JobSnapshot
	err := c.do(ctx, http.MethodGet, "/berth/v1/jobs/"+url.PathEscape(id), nil, &s)
	return s, err
}

// Cancel cancels a job.
func (c *Client) Cancel(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/berth/v1/jobs/"+url.PathEscape(id), nil, nil)
}

// Warm reports whether every pin of the node is on its disk.
func (c *Client) Warm(ctx context.Context) (WarmStatus, error) {
	return c.WarmImages(ctx, nil, nil)
}

// WarmImages reports, beside the node's pins, how much of each image
// (expanded to platforms, default the node's own) the node lacks.
func (c *Client) WarmImages(ctx context.Context, images []Image, platforms []string) (WarmStatus, error) {
	q := url.Values{}
	for _, img := range images {
		q.Add("image", img.Repository+"@"+img.Digest.String())
	}
	for _, p := range platforms {
		q.Add("platform", p)
	}
	u := c.url("/berth/v1/warm")
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	resp, err := c.send(ctx, http.MethodGet, u, nil, nil)
	if err != nil {
		return WarmStatus{}, err
	}
	defer resp.Body.Close()
	var st WarmStatus
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode != 200 && resp.StatusCode != 503 {
		return st, apiErrorBody(resp.StatusCode, b)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, &ErrorInfo{Kind: "bad_answer", Message: "warm: " + err.Error()}
	}
	return st, nil
}

// Watch follows a job's server-sent events, calling fn with every
// snapshot, until the job ends (the last snapshot is returned).
func (c *Client) Watch(ctx context.Context, id string, fn func(JobSnapshot)) (JobSnapshot, error) {
	var last JobSnapshot
	err := Events(ctx, c.HTTP, c.url("/berth/v1/jobs/"+url.PathEscape(id)+"/events"), c.Token, func(ev string, data []byte) error {
		var s JobSnapshot
		if err := json.Unmarshal(data, &s); err != nil {
			return &ErrorInfo{Kind: "bad_answer", Message: "job event: " + err.Error()}
		}
		last = s
		if fn != nil {
			fn(s)
		}
		return nil
	})
	if err == nil && !last.Terminal() {
		err = &ErrorInfo{Kind: "node_unreachable", Message: "the job's event stream ended before the job"}
	}
	return last, err
}

// Events reads a server-sent event stream, calling fn with each event's
// name and data, until an "end" event (nil), the stream's end or ctx.
func Events(ctx context.Context, hc *http.Client, u, token string, fn func(event string, data []byte) error) error {
	resp, err := (&Client{Token: token, HTTP: hc}).send(ctx, http.MethodGet, u, nil, http.Header{"Accept": {"text/event-stream"}})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return apiErrorBody(resp.StatusCode, b)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	event, data := "", []byte(nil)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if data != nil {
				if err := fn(event, data); err != nil {
					return err
				}
				if event == "end" {
					return nil
				}
			}
			event, data = "", nil
		case strings.HasPrefix(line, ":"):
		case strings.HasPrefix(line, "event:"):
			event = strings.TrimSpace(strings.TrimPrefix(line, "event:"))
		case strings.HasPrefix(line, "data:"):
			data = append(data, strings.TrimPrefix(strings.TrimPrefix(line, "data:"), " ")...)
		}
	}
	if ctx.Err() != nil {
		return infoOf(ctx.Err())
	}
	if err := sc.Err(); err != nil {
		return &ErrorInfo{Kind: "node_unreachable", Message: "event stream: " + err.Error()}
	}
	return nil
}

// Submit hands a job to a coordinator.
func (c *Client) Submit(ctx context.Context, spec JobSpec) (string, error) {
	var a PrefetchAccepted
	err := c.do(ctx, http.MethodPost, "/berth/v1/coordinator/jobs", spec, &a)
	return a.ID, err
}

// CoordinatorJob gets a coordinator's job.
func (c *Client) CoordinatorJob(ctx context.Context, id string) (JobRecord, error) {
	var r JobRecord
	err := c.do(ctx, http.MethodGet, "/berth/v1/coordinator/jobs/"+url.PathEscape(id), nil, &r)
	return r, err
}
