// Package testsupport starts the real servers berth's tests run against.
package testsupport

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
)

// MinIO is a MinIO server on 127.0.0.1 with its own data directory, owned by
// one test. It may be stopped and started again on the same port and data, so
// tests can take S3 away from berth and give it back.
type MinIO struct {
	Endpoint  string // http://127.0.0.1:PORT
	AccessKey string
	SecretKey string
	Region    string
	Dir       string // data directory

	bin     string
	addr    string
	console string
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// StartMinIO starts MinIO for the test and stops it when the test ends.
func StartMinIO(t testing.TB) *MinIO {
	t.Helper()
	bin := RequireTool(t, "minio")
	dir := t.TempDir()
	m := &MinIO{
		AccessKey: "berthtest",
		SecretKey: "berthtest-" + randomHex(8),
		Region:    "us-east-1",
		Dir:       filepath.Join(dir, "data"),
		bin:       bin,
		addr:      FreeAddr(t),
		console:   FreeAddr(t),
		logPath:   filepath.Join(dir, "minio.log"),
	}
	m.Endpoint = "http://" + m.addr
	if err := os.MkdirAll(m.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Stop(t)
		if t.Failed() {
			if b, err := os.ReadFile(m.logPath); err == nil {
				t.Logf("minio log:\n%s", tail(b, 4096))
			}
		}
	})
	m.Start(t)
	return m
}

// Start runs the server (again) on its port and data directory and waits
// until it answers.
func (m *MinIO) Start(t testing.TB) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		t.Fatal("minio: already running")
	}
	logf, err := os.OpenFile(m.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(m.bin, "server", m.Dir,
		"--address", m.addr,
		"--console-address", m.console,
		"--certs-dir", filepath.Join(filepath.Dir(m.Dir), "certs"),
		"--quiet")
	cmd.Env = append(os.Environ(),
		"MINIO_ROOT_USER="+m.AccessKey,
		"MINIO_ROOT_PASSWORD="+m.SecretKey,
		"MINIO_REGION="+m.Region,
		"MINIO_BROWSER=off",
		"MINIO_UPDATE=off",
		"MINIO_CI_CD=1",
	)
	cmd.Stdout = logf
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("minio: %v", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	m.cmd, m.done = cmd, done

	deadline := time.Now().Add(60 * time.Second)
	client := &http.Client{Timeout: time.Second}
	for {
		select {
		case <-done:
			m.cmd = nil
			b, _ := os.ReadFile(m.logPath)
			t.Fatalf("minio exited during start:\n%s", tail(b, 4096))
		default:
		}
		resp, err := client.Get(m.Endpoint + "/minio/health/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("minio did not become ready on %s within 60s", m.addr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop kills the server at once, as a crash or a network cut would, and waits
// for it to exit. Stopping a stopped server does nothing.
func (m *MinIO) Stop(t testing.TB) {
	t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return
	}
	_ = m.cmd.Process.Kill()
	select {
	case <-m.done:
	case <-time.After(30 * time.Second):
		t.Errorf("minio (pid %d) did not exit after SIGKILL", m.cmd.Process.Pid)
	}
	m.cmd = nil
}

// Client returns an S3 client with the server's root credentials.
func (m *MinIO) Client() *s3.Client {
	return s3.New(s3.Options{
		Region:       m.Region,
		BaseEndpoint: aws.String(m.Endpoint),
		UsePathStyle: true,
		Credentials:  m.Credentials(),
	})
}

// Credentials are the server's root credentials.
func (m *MinIO) Credentials() aws.CredentialsProvider {
	return credentials.NewStaticCredentialsProvider(m.AccessKey, m.SecretKey, "")
}

// NewBucket creates a bucket with a fresh name and returns the name.
func (m *MinIO) NewBucket(t testing.TB) string {
	t.Helper()
	name := "berth-test-" + randomHex(6)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := m.Client().CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(name)}); err != nil {
		t.Fatalf("minio: create bucket %s: %v", name, err)
	}
	return name
}

// PutObject writes an object unconditionally, past berth, as an operator, a
// faulty tool or another host might: tests plant what berth must cope with.
func (m *MinIO) PutObject(t testing.TB, bucket, key string, body []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := m.Client().PutObject(ctx, &s3.PutObjectInput{
		Bucket: aws.String(bucket), Key: aws.String(key), Body: bytes.NewReader(body),
		ContentLength: aws.Int64(int64(len(body))),
	})
	if err != nil {
		t.Fatalf("minio: put s3://%s/%s: %v", bucket, key, err)
	}
}

// GetObject reads an object past berth, to check what berth left in the
// bucket; ok is false when there is no such key. A missing bucket is not a
// missing key: it fails the test.
func (m *MinIO) GetObject(t testing.TB, bucket, key string) (body []byte, ok bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := m.Client().GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode() == "NoSuchKey" {
		return nil, false
	}
	if err != nil {
		t.Fatalf("minio: get s3://%s/%s: %v", bucket, key, err)
	}
	defer out.Body.Close()
	body, err = io.ReadAll(out.Body)
	if err != nil {
		t.Fatalf("minio: get s3://%s/%s: %v", bucket, key, err)
	}
	return body, true
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
