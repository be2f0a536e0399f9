package config

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// HTTPS on the public listener: the API fields TLSCertFile, TLSKeyFile and
// TLSClientCAFile.

// TLS reports whether api.listen serves HTTPS.
func (a API) TLS() bool { return a.TLSCertFile != "" }

func (c *Config) resolveTLS(dir string) {
	for _, p := range []*string{&c.API.TLSCertFile, &c.API.TLSKeyFile, &c.API.TLSClientCAFile} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
}

func (c *Config) validateTLS() error {
	a := c.API
	switch {
	case a.TLSCertFile == "" && a.TLSKeyFile == "":
		if a.TLSClientCAFile != "" {
			return errors.New("api.tls_client_ca_file: client certificates need HTTPS; set api.tls_cert_file and api.tls_key_file too")
		}
		return nil
	case a.TLSKeyFile == "":
		return errors.New("api.tls_key_file: api.tls_cert_file is set, so its key is needed too")
	case a.TLSCertFile == "":
		return errors.New("api.tls_cert_file: api.tls_key_file is set, so its certificate is needed too")
	}
	if _, err := LoadKeyPair(a.TLSCertFile, a.TLSKeyFile); err != nil {
		return err
	}
	if a.TLSClientCAFile != "" {
		if _, err := LoadClientCAs(a.TLSClientCAFile); err != nil {
			return err
		}
	}
	return nil
}

// LoadKeyPair reads the certificate (PEM, the server's first, then any
// intermediates) and its key, and checks that they belong together. Each
// error names the field at fault; none shows the key.
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("api.tls_cert_file: %w", err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("api.tls_key_file: %w", err)
	}
	if b, _ := pem.Decode(certPEM); b == nil || b.Type != "CERTIFICATE" {
		return tls.Certificate{}, fmt.Errorf("api.tls_cert_file: %s does not start with a PEM CERTIFICATE", certFile)
	}
	if b, _ := pem.Decode(keyPEM); b == nil || b.Type == "CERTIFICATE" {
		return tls.Certificate{}, fmt.Errorf("api.tls_key_file: %s holds no PEM private key", keyFile)
	}
	// The certificate parses on its own first, so that a bad one is not
	// blamed on the key.
	var leaf *x509.Certificate
	for rest := certPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("api.tls_cert_file: %s: %w", certFile, err)
		}
		if leaf == nil {
			leaf = c
		}
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("api.tls_key_file: %s does not go with the certificate in %s (or is not a key): %w",
			keyFile, certFile, err)
	}
	pair.Leaf = leaf
	return pair, nil
}

// LoadClientCAs reads the CA certificates (PEM) that client certificates
// must chain to.
func LoadClientCAs(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("api.tls_client_ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("api.tls_client_ca_file: %s holds no PEM certificate", file)
	}
	return pool, nil
}
