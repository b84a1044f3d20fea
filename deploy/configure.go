// Package deploy points container runtimes at berth (`berth configure`) and
// holds the Kubernetes manifests, runtime examples and the container image
// test. The manifests themselves live under deploy/kubernetes.
package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Target is the berth a runtime should pull through.
type Target struct {
	// Listen is the address berth listens on (host:port). An unspecified
	// host (0.0.0.0, ::, empty) is reached on loopback.
	Listen string
	// Upstreams maps each registry host clients name (docker.io, ghcr.io)
	// to the URL berth fetches it from.
	Upstreams map[string]string
	// DialTimeout bounds containerd's connect to berth, so that a stopped
	// berth costs a pull this much before containerd uses the upstream.
	DialTimeout time.Duration
}

// DefaultDialTimeout: a connect on loopback completes in microseconds, or is
// refused at once when nothing listens; the timeout only trips when packets
// to berth's address vanish, and then a pull should not wait containerd's
// default 30s per blob.
const DefaultDialTimeout = 200 * time.Millisecond

// Validate reports the first thing wrong with t, in one line.
func (t Target) Validate() error {
	host, port, err := net.SplitHostPort(t.Listen)
	if err != nil {
		return fmt.Errorf("--listen %q is not HOST:PORT", t.Listen)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("--listen %q: port must be a number from 1 to 65535", t.Listen)
	}
	if host != "" && net.ParseIP(host) == nil && !validHostname(host) {
		return fmt.Errorf("--listen %q: %q is neither an IP address nor a host name", t.Listen, host)
	}
	if len(t.Upstreams) == 0 {
		return errors.New("no upstream registries: give --upstream HOST=URL or a --config that lists upstreams")
	}
	for _, h := range t.Hosts() {
		if err := validRegistry(h); err != nil {
			return fmt.Errorf("upstream %q: %v", h, err)
		}
		u, err := url.Parse(t.Upstreams[h])
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			return fmt.Errorf("upstream %s: %q is not an http:// or https:// URL", h, t.Upstreams[h])
		}
	}
	if t.DialTimeout <= 0 {
		return fmt.Errorf("--dial-timeout %v: must be positive", t.DialTimeout)
	}
	return nil
}

// validRegistry accepts what clients write before the first slash of an
// image name: a host name or IP with an optional port, lower case.
func validRegistry(h string) error {
	if h != strings.ToLower(h) {
		return errors.New("registry host names are lower case")
	}
	name := h
	if hh, port, err := net.SplitHostPort(h); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return errors.New("port must be a number from 1 to 65535")
		}
		name = hh
	}
	if net.ParseIP(name) == nil && !validHostname(name) {
		return errors.New("not a registry host name (like docker.io or registry.example.com:5000)")
	}
	return nil
}

func validHostname(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// Hosts returns the upstream registry hosts, sorted.
func (t Target) Hosts() []string {
	hs := make([]string, 0, len(t.Upstreams))
	for h := range t.Upstreams {
		hs = append(hs, h)
	}
	sort.Strings(hs)
	return hs
}

// Addr is the host:port a runtime dials to reach berth.
func (t Target) Addr() string {
	host, port, _ := net.SplitHostPort(t.Listen)
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return net.JoinHostPort(host, port)
}

// MirrorURL is berth's registry endpoint as runtimes write it; berth serves
// plain HTTP.
func (t Target) MirrorURL() string { return "http://" + t.Addr() }

// loopback says whether runtimes reach berth on a loopback address, which
// Docker and containerd accept over plain HTTP without further settings.
func (t Target) loopback() bool {
	host, _, _ := net.SplitHostPort(t.Addr())
	ip := net.ParseIP(host)
	return host == "localhost" || ip != nil && ip.IsLoopback()
}

// canonicalEndpoint is where a registry's clients go when nothing is
// configured: Docker Hub's API is served from registry-1.docker.io.
func canonicalEndpoint(host string) string {
	if host == "docker.io" {
		return "https://registry-1.docker.io"
	}
	return "https://" + host
}

// A File is a runtime configuration file and the content berth wants in it.
type File struct {
	Path    string
	Content []byte
	// Changed is false when the file already holds exactly this content.
	Changed bool
}

// ReadFunc reads an existing file; a missing file is fs.ErrNotExist.
type ReadFunc func(path string) ([]byte, error)

// NoFiles is the ReadFunc for printing snippets without looking at the host.
func NoFiles(string) ([]byte, error) { return nil, fs.ErrNotExist }

// IOError is a failure to read or write a runtime's file, as opposed to
// something wrong with the input.
type IOError struct{ Err error }

func (e *IOError) Error() string { return e.Err.Error() }
func (e *IOError) Unwrap() error { return e.Err }

func readExisting(read ReadFunc, path string) ([]byte, error) {
	b, err := read(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, &IOError{err}
	}
	return b, nil
}

// Runtimes are the names `berth configure` accepts, with the file or
// directory each writes by default.
var Runtimes = map[string]string{
	"containerd": "/etc/containerd/certs.d",
	"docker":     "/etc/docker/daemon.json",
	"crio":       "/etc/containers/registries.conf.d/berth.conf",
}

// Plan computes the files that point runtime at t, merged into what read
// finds there. path is the directory (containerd) or file (docker, crio) to
// use, empty for the default. notes are things the operator should know.
func Plan(runtime string, t Target, path string, read ReadFunc) (files []File, notes []string, err error) {
	def, ok := Runtimes[runtime]
	if !ok {
		return nil, nil, fmt.Errorf("unknown runtime %q: want containerd, docker or crio", runtime)
	}
	if err := t.Validate(); err != nil {
		return nil, nil, err
	}
	if path == "" {
		path = def
	}
	switch runtime {
	case "containerd":
		files, notes, err = planContainerd(t, path, read)
	case "docker":
		files, notes, err = planDocker(t, path, read)
	case "crio":
		files, notes, err = planCRIO(t, path, read)
	}
	return files, notes, err
}

// Write stores the files that changed, each atomically (a runtime reading
// it meanwhile sees the old or the new file, never half of one), keeping an
// existing file's permissions.
func Write(files []File) error {
	for _, f := range files {
		if !f.Changed {
			continue
		}
		if err := writeAtomic(f.Path, f.Content); err != nil {
			return &IOError{err}
		}
	}
	return nil
}

func writeAtomic(path string, content []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	mode := fs.FileMode(0o644)
	if st, err := os.Stat(path); err == nil {
		mode = st.Mode().Perm()
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".berth-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(content); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func newFile(path string, old, content []byte) File {
	return File{Path: path, Content: content, Changed: old == nil || !bytes.Equal(old, content)}
}
