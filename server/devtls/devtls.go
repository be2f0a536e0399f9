// Package devtls makes development and test certificates: a CA and the
// certificates it signs, for `make dev-tls` (keyissuer dev-tls) and for the
// tests of HTTPS. Nothing it makes belongs in production: the keys are
// written unencrypted, and the CA is trusted by nobody but those told to.
package devtls

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// CA is a certificate authority with its key in memory.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// Pair is a certificate and its key.
type Pair struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// NewCA makes a CA named name, valid for ten years.
func NewCA(name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"keyissuer development"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("failed to make the CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key}, nil
}

// Server issues a server certificate for hosts (DNS names or IP
// addresses), valid for the given time from now.
func (ca *CA) Server(valid time.Duration, hosts ...string) (*Pair, error) {
	return ca.issue(hosts[0], valid, x509.ExtKeyUsageServerAuth, hosts)
}

// Client issues a client certificate named name, valid for a year.
func (ca *CA) Client(name string) (*Pair, error) {
	return ca.issue(name, 365*24*time.Hour, x509.ExtKeyUsageClientAuth, nil)
}

func (ca *CA) issue(cn string, valid time.Duration, usage x509.ExtKeyUsage, hosts []string) (*Pair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"keyissuer development"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(valid),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, fmt.Errorf("failed to issue a certificate for %s: %w", cn, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &Pair{Cert: cert, Key: key}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return n
}

// CertPEM is the certificate in PEM.
func CertPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// KeyPEM is the key in PKCS #8 PEM.
func KeyPEM(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// WriteFiles writes the pair's certificate (followed by chain, PEM) to
// certFile and its key to keyFile, mode 0600, each by a rename so that a
// reader never sees half a file.
func (p *Pair) WriteFiles(certFile, keyFile string, chain ...*x509.Certificate) error {
	certPEM := CertPEM(p.Cert)
	for _, c := range chain {
		certPEM = append(certPEM, CertPEM(c)...)
	}
	keyPEM, err := KeyPEM(p.Key)
	if err != nil {
		return err
	}
	if err := writeFile(keyFile, keyPEM, 0o600); err != nil {
		return err
	}
	return writeFile(certFile, certPEM, 0o644)
}

// Hosts are the names `make dev-tls`'s server certificate is for.
var Hosts = []string{"127.0.0.1", "localhost", "::1"}

// WriteDev writes what `make dev-tls` makes into dir (created 0700 if
// missing): ca.pem, ca.key (to issue more), server.pem and server.key for
// [Hosts], valid for a year. Keys get mode 0600.
func WriteDev(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ca, err := NewCA("keyissuer development CA")
	if err != nil {
		return err
	}
	caKey, err := KeyPEM(ca.Key)
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, "ca.key"), caKey, 0o600); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, "ca.pem"), CertPEM(ca.Cert), 0o644); err != nil {
		return err
	}
	srv, err := ca.Server(365*24*time.Hour, Hosts...)
	if err != nil {
		return err
	}
	return srv.WriteFiles(filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"))
}

func writeFile(path string, b []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil { // the umask may have narrowed it; never widened
		return err
	}
	return os.Rename(tmp, path)
}
