// Package systemd holds berth's systemd units: berth.service, the
// environment file example berth.env, and the drop-ins that order containerd
// and Docker after berth. The Go code here is only their tests, which run the
// files through systemd-analyze verify; docs/deploy.md explains installing them.
package systemd
