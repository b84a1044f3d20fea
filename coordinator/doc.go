// Package coordinator is berth's pre-warm: the node API every `berth serve`
// answers under /berth/v1/ (prefetch jobs, their progress, durable pins,
// the warm gate, node facts), the client that `berth prewarm` and the
// coordinator use to drive nodes, the parsing of the files a deploy is
// made of (Kubernetes manifests, Compose files, plain lists), and the
// completion policy (--require).
//
// A node turns a prefetch request into engine.Prefetch calls, so every
// blob still goes through the engine's one shared download: the fleet
// fetches it from the upstream once, under the bucket's lease, whoever asks.
package coordinator
