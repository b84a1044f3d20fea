// Package engine is berth's pull-through engine: it answers for blobs and
// manifests from the host's disk and fetches what it lacks, once however
// many callers ask at the same moment, from the fleet's bucket, a peer
// that is fetching it, or the upstream registry under a fleet lease.
//
// It has three callers and knows none of them: the registry API (package
// mirror) turns HTTP requests into Blob, StatBlob, Manifest and Tags
// calls; pre-warm calls Prefetch, which puts a blob on disk through the
// same shared download and sends its bytes nowhere; the inspector reads
// manifests through Manifest and learns of changes from Subscribe.
//
// A cold Blob call reads top to bottom in three files: blobs.go (join or
// start the download, commit, share with the fleet), sources.go (where the
// bytes come from: bucket, lease, peer, upstream) and download.go (one
// download's state, its readers, the relay window when the disk has no room).
//
// Prefetching one image's blobs, as pre-warm does:
//
//	repo, _ := eng.Resolve("ghcr.io", "org/app")
//	m, err := eng.Manifest(ctx, repo, "sha256:...", nil)
//	// decode m.Content (an image manifest: its config and layers), then
//	for _, d := range blobs {
//		if err := eng.Prefetch(ctx, repo, d, time.Now().Add(time.Hour)); err != nil {
//			// engine.KindOf(err) says why: not_found, no_space, ...
//		}
//	}
//
// Example (Prefetch) runs this against a registry.
package engine
