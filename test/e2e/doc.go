// Package e2e runs berth end to end against real parts: a distribution
// registry as the upstream, docker, containerd, crane, skopeo and the OCI
// conformance suite as clients, MinIO as S3.
//
// The helpers live in ordinary (non-test) files so that other packages, the
// benchmarks among them, can start the same parts. Every helper takes a
// testing.TB, bounds its own waiting and registers its own cleanup.
//
// Tools are found on PATH (scripts/test puts ./bin first). A test whose tool
// is missing is skipped with the reason, except under CI=true, where it fails:
// CI must never pass by skipping.
package e2e
