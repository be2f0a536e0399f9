package daemon

// HTTPS on the public listener: the certificate behind an atomic pointer,
// which a SIGHUP replaces while connections carry on.

import (
	"crypto/tls"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/config"
)

// certExpiryWarning is how close to its notAfter a certificate is logged
// as a warning, at start-up and at each reload.
const certExpiryWarning = 30 * 24 * time.Hour

// serverTLS is the public listener's TLS state.
type serverTLS struct {
	cert   atomic.Pointer[tls.Certificate]
	config *tls.Config
}

// openTLS loads the certificate and the client CAs when api.tls_cert_file
// is set, and exports the certificate's expiry. d.tls stays nil otherwise.
func (d *Daemon) openTLS() error {
	api := d.cfg.API
	if !api.TLS() {
		return nil
	}
	pair, err := config.LoadKeyPair(api.TLSCertFile, api.TLSKeyFile)
	if err != nil {
		return err
	}
	s := &serverTLS{}
	s.cert.Store(&pair)
	s.config = &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return s.cert.Load(), nil
		},
	}
	if api.TLSClientCAFile != "" {
		pool, err := config.LoadClientCAs(api.TLSClientCAFile)
		if err != nil {
			return err
		}
		s.config.ClientCAs = pool
		s.config.ClientAuth = tls.RequireAndVerifyClientCert
	}
	d.tls = s
	d.ops.metrics.CertExpiry(func() time.Time { return s.cert.Load().Leaf.NotAfter })
	d.logCert("HTTPS on the public listener", &pair)
	return nil
}

// logCert logs the certificate's names and expiry, as a warning when it
// expires within certExpiryWarning.
func (d *Daemon) logCert(msg string, c *tls.Certificate) {
	leaf := c.Leaf
	left := time.Until(leaf.NotAfter)
	args := []any{"cert_file", d.cfg.API.TLSCertFile, "subject", leaf.Subject.String(), "dns_names", leaf.DNSNames,
		"ip_addresses", leaf.IPAddresses, "not_after", leaf.NotAfter.UTC(), "chain", len(c.Certificate),
		"mutual_tls", d.cfg.API.TLSClientCAFile != ""}
	if left < certExpiryWarning {
		d.log.Warn(msg+"; the certificate expires soon: replace it and send SIGHUP",
			append(args, "expires_in", left.Round(time.Minute).String())...)
		return
	}
	d.log.Info(msg, args...)
}

// reloadCert reads the certificate and key files again. New handshakes
// get the new pair; connections already open keep theirs. A pair that
// does not load leaves the running one, and says why.
func (d *Daemon) reloadCert() {
	if d.tls == nil {
		return
	}
	pair, err := config.LoadKeyPair(d.cfg.API.TLSCertFile, d.cfg.API.TLSKeyFile)
	if err != nil {
		d.log.Error("TLS certificate reload failed; keeping the running certificate", "err", err,
			"not_after", d.tls.cert.Load().Leaf.NotAfter.UTC())
		d.record(audit.Event{Type: audit.ConfigReloadFailed, Detail: errText(fmt.Errorf("tls certificate: %w", err))})
		return
	}
	d.tls.cert.Store(&pair)
	d.logCert("TLS certificate reloaded", &pair)
}

// apiScheme is the public listener's URL scheme.
func (d *Daemon) apiScheme() string {
	if d.tls != nil {
		return "https"
	}
	return "http"
}
