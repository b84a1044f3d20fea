package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
)

// Func adapts a check that takes no context. The Checker still bounds it
// by its timeout, but cannot interrupt it, so prefer context-aware checks
// for anything that talks to the network.
func Func(f func() error) func(context.Context) error {
	return func(context.Context) error { return f() }
}

// DirWritable checks that a file can be created, written and removed in
// dir: the data directory of a node whose disk went read-only or vanished
// cannot cache anything, and a restart (or an operator) has to fix it. It
// never creates dir itself, so a missing directory fails.
func DirWritable(dir string) func(context.Context) error {
	return func(ctx context.Context) error {
		f, err := os.CreateTemp(dir, ".berth-healthcheck-*")
		if err != nil {
			return fmt.Errorf("cannot create a file in %s: %w", dir, err)
		}
		name := f.Name()
		_, werr := f.Write([]byte("berth\n"))
		cerr := f.Close()
		rerr := os.Remove(name)
		if err := errors.Join(werr, cerr); err != nil {
			return fmt.Errorf("cannot write in %s: %w", dir, err)
		}
		if rerr != nil {
			return fmt.Errorf("cannot remove a file in %s: %w", dir, rerr)
		}
		return nil
	}
}

// HTTPGet checks that url answers HTTP with a status below 500. A registry's
// /v2/ answering 401 (it wants a token) is up: it is reachable and able to
// serve; only no answer or a server error counts as down. A nil client
// means http.DefaultClient; the check's timeout bounds the request.
func HTTPGet(client *http.Client, url string) func(context.Context) error {
	if client == nil {
		client = http.DefaultClient
	}
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		req.Header.Set("User-Agent", "berth-healthcheck")
		// The client strips any password from the URL in its errors.
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		// Draining a little lets the connection be reused by the next round.
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if resp.StatusCode >= 500 {
			return fmt.Errorf("%s answered %s", req.URL.Redacted(), resp.Status)
		}
		return nil
	}
}

// TCPDial checks that something accepts TCP connections at addr; a listen
// address such as ":5000" or "0.0.0.0:5000" is dialled on loopback (see
// DialAddr). berth uses it to make readiness wait for its own listener.
func TCPDial(addr string) func(context.Context) error {
	return func(ctx context.Context) error {
		target, err := DialAddr(addr)
		if err != nil {
			return err
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", target)
		if err != nil {
			return err
		}
		return conn.Close()
	}
}
