package auth

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
)

// ServerTLS is the fleet port's TLS: a certificate and key, and optionally
// a client CA, which makes the port require a client certificate signed by
// it (mutual TLS): a client without one cannot complete the handshake.
//
// The files are read again by Prepare; the *tls.Config from Config picks the
// material in force for every new connection (GetConfigForClient), so a
// reload needs no restart and connections already open are not cut.
type ServerTLS struct {
	certFile, keyFile, clientCAFile string
	cur                             atomic.Pointer[tls.Config]
}

// NewServerTLS reads the certificate and key files, and the client CA file
// unless it is "".
func NewServerTLS(certFile, keyFile, clientCAFile string) (*ServerTLS, error) {
	s := &ServerTLS{certFile: certFile, keyFile: keyFile, clientCAFile: clientCAFile}
	apply, err := s.Prepare()
	if err != nil {
		return nil, err
	}
	apply()
	return s, nil
}

// Prepare re-reads the files and returns the func that puts them in force
// for new connections. If the certificate does not match its key, or a
// file is missing or holds nothing usable, the error says why; the
// material in force stays until apply is called.
func (s *ServerTLS) Prepare() (apply func(), err error) {
	cert, err := LoadKeyPair(s.certFile, s.keyFile)
	if err != nil {
		return nil, err
	}
	conf := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		// Peers stream large blobs: HTTP/1.1, one stream a connection, with
		// no HTTP/2 flow-control window between the disk and the peer.
		NextProtos: []string{"http/1.1"},
	}
	if s.clientCAFile != "" {
		pool, err := LoadCertPool(s.clientCAFile)
		if err != nil {
			return nil, err
		}
		conf.ClientCAs = pool
		conf.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return func() { s.cur.Store(conf) }, nil
}

// Mutual reports whether the port requires client certificates.
func (s *ServerTLS) Mutual() bool { return s.clientCAFile != "" }

// Config is the *tls.Config for the fleet listener (http.Server.TLSConfig,
// tls.NewListener). Each handshake uses the material of the last successful
// load.
func (s *ServerTLS) Config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return s.cur.Load(), nil
		},
	}
}

// ClientTLSConfig is the *tls.Config for calling peers: their certificates
// must chain to the CAs in caFile (the system's when ""), and be issued for
// serverName (the host called when ""); certFile and keyFile, when given,
// are presented to a peer that asks for a client certificate.
func ClientTLSConfig(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: serverName}
	if caFile != "" {
		pool, err := LoadCertPool(caFile)
		if err != nil {
			return nil, err
		}
		conf.RootCAs = pool
	}
	if certFile != "" || keyFile != "" {
		cert, err := LoadKeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf, nil
}

// LoadKeyPair reads a PEM certificate (with its chain) and the private key
// that matches it. Errors name the files, never the key.
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	if certFile == "" || keyFile == "" {
		return tls.Certificate{}, errors.New("a certificate needs both a certificate file and a key file")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			return tls.Certificate{}, err // names the file already
		}
		return tls.Certificate{}, fmt.Errorf("certificate %s with key %s: %v", certFile, keyFile, err)
	}
	return cert, nil
}

// LoadCertPool reads PEM CA certificates from path. A file with no
// certificate, or one that does not parse, is an error.
func LoadCertPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	n := 0
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %v", path, n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, fmt.Errorf("%s holds no PEM certificates", path)
	}
	return pool, nil
}
