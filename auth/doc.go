// Package auth holds the credentials of berth's two doors.
//
// The registry listener (listen) is the door the node's container runtime
// pulls through. It normally stays on loopback and asks for nothing; where it
// must listen beyond loopback, an htpasswd file (bcrypt, read by
// distribution's own registry/auth/htpasswd) makes every pull carry a user
// and password: see HTPasswd and RequireHTPasswd.
//
// The fleet port (fleet_listen) is the door other machines use: peers
// streaming a blob this host is downloading, the node API under /berth/v1/,
// /metrics and the health endpoints. Requests on it carry a bearer token
// from a token file (Tokens, RequireFleetCredential) or a client certificate
// verified against a CA (ServerTLS). A host calling its peers presents the
// same credentials through a PeerTransport.
//
// Every credential here can be re-read while berth runs (on SIGHUP) in two
// steps: Prepare reads and checks the files and returns an apply func that
// cannot fail; nothing changes until it is called. A reload of several
// credentials prepares them all and applies them only when every one is
// ready, so a file that cannot be used leaves all of them as they were. No
// error or log line from this package contains a token, a password or a
// key.
package auth
