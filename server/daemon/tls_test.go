package daemon_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/devtls"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// HTTPS on the public listener: keyissuerd as a process with a certificate
// from a test CA, driven by Go's crypto/tls; its reload on SIGHUP; mutual
// TLS.

// tlsSetup is setup's config with HTTPS on: see addTLS.
func tlsSetup(t *testing.T, extraAPI string) (cfgPath string, ca *devtls.CA) {
	t.Helper()
	path, _ := setup(t, "session")
	return path, addTLS(t, path, extraAPI)
}

// addTLS writes a CA (ca.pem) and a server certificate for 127.0.0.1
// (server.pem, server.key) beside the config at path, and turns HTTPS on
// with extraAPI added to [api].
func addTLS(t *testing.T, path, extraAPI string) *devtls.CA {
	t.Helper()
	dir := filepath.Dir(path)
	ca, err := devtls.NewCA("keyissuer test CA")
	if err != nil {
		t.Fatal(err)
	}
	writePair(t, ca, dir)
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), devtls.CertPEM(ca.Cert), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b = bytes.Replace(b, []byte("\n[api]\n"),
		[]byte("\n[api]\ntls_cert_file = \"server.pem\"\ntls_key_file = \"server.key\"\n"+extraAPI+"\n"), 1)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return ca
}

// writePair issues a server certificate for 127.0.0.1 and writes it, with
// ca's certificate as its chain, to server.pem and server.key in dir.
func writePair(t *testing.T, ca *devtls.CA, dir string) *x509.Certificate {
	t.Helper()
	p, err := ca.Server(24*time.Hour, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WriteFiles(filepath.Join(dir, "server.pem"), filepath.Join(dir, "server.key"), ca.Cert); err != nil {
		t.Fatal(err)
	}
	return p.Cert
}

// tlsClientConfig trusts ca and presents client, if not nil, whichever CAs
// the server asks for (left to itself, crypto/tls would send none that the
// server's list does not name).
func tlsClientConfig(ca *devtls.CA, client *devtls.Pair) *tls.Config {
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	cfg := &tls.Config{RootCAs: roots}
	if client != nil {
		cert := &tls.Certificate{Certificate: [][]byte{client.Cert.Raw}, PrivateKey: client.Key, Leaf: client.Cert}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	return cfg
}

// applyOver posts an unsigned apply with client and returns its resultCode.
func applyOver(client *http.Client, apiURL string) (string, error) {
	resp, err := client.Post(apiURL, "application/json", strings.NewReader(`{}`))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var a applyAnswer
	if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
		return "", err
	}
	return a.Result.ResultCode, nil
}

// servedCert is the leaf certificate a new handshake with addr gets.
func servedCert(t *testing.T, addr string, cfg *tls.Config) *x509.Certificate {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

// TestHTTPS: with a certificate configured, applyPublicKey answers over
// HTTPS with the configured chain, refuses TLS 1.1 and plain HTTP, and the
// certificate's expiry is a metric.
func TestHTTPS(t *testing.T) {
	path, ca := tlsSetup(t, "")
	c := start(t, path)
	u, err := url.Parse(c.api)
	if err != nil || u.Scheme != "https" {
		t.Fatalf("the daemon serves %q, want an https URL", c.api)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsClientConfig(ca, nil)}}
	if code, err := applyOver(client, c.api); err != nil || code != "SUCCESS" {
		t.Fatalf("apply over HTTPS: %q, %v", code, err)
	}

	conn, err := tls.Dial("tcp", u.Host, tlsClientConfig(ca, nil))
	if err != nil {
		t.Fatal(err)
	}
	st := conn.ConnectionState()
	conn.Close()
	if st.Version < tls.VersionTLS12 || len(st.PeerCertificates) != 2 || !st.PeerCertificates[1].Equal(ca.Cert) {
		t.Errorf("handshake: version %x, %d certificates; want TLS 1.2 or later and the chain of server.pem", st.Version, len(st.PeerCertificates))
	}
	for _, v := range []uint16{tls.VersionTLS10, tls.VersionTLS11} {
		cfg := tlsClientConfig(ca, nil)
		cfg.MinVersion, cfg.MaxVersion = v, v
		if conn, err := tls.Dial("tcp", u.Host, cfg); err == nil {
			conn.Close()
			t.Errorf("a TLS %s handshake succeeded; want TLS 1.2 at least", tls.VersionName(v))
		}
	}
	plain := "http://" + u.Host + u.Path
	if resp, err := http.Post(plain, "application/json", strings.NewReader(`{}`)); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("plain HTTP to the HTTPS listener: %s, want 400", resp.Status)
		}
	}

	m := scrape(t, c.admin)
	v, err := strconv.ParseFloat(m["keyissuer_api_tls_cert_expiry_seconds"], 64)
	if err != nil || v <= 23*3600 || v > 24*3600 {
		t.Errorf("keyissuer_api_tls_cert_expiry_seconds = %q; want the certificate's 24h, less the seconds since", m["keyissuer_api_tls_cert_expiry_seconds"])
	}
	c.stop()
}

// TestHTTPSExpiryWarning: a certificate that expires within 30 days is a
// warning at start-up.
func TestHTTPSExpiryWarning(t *testing.T) {
	path, _ := tlsSetup(t, "") // 24 hours
	c := start(t, path)
	if !strings.Contains(c.stderr.String(), "the certificate expires soon") {
		t.Errorf("no start-up warning for a certificate that expires within a day:\n%s", c.stderr.String())
	}
	c.stop()
}

// TestHTTPSReload: SIGHUP serves a new certificate to new handshakes while
// a connection made before it goes on; a pair that does not match keeps the
// running certificate, and says so.
func TestHTTPSReload(t *testing.T) {
	path, ca := tlsSetup(t, "")
	dir := filepath.Dir(path)
	c := start(t, path)
	u, _ := url.Parse(c.api)
	cfg := tlsClientConfig(ca, nil)
	first := servedCert(t, u.Host, cfg)

	// A connection open across the reload, a request on it before and
	// after.
	conn, err := tls.Dial("tcp", u.Host, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	applyOn := func() string {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, c.api, strings.NewReader(`{}`))
		req.Header.Set("Content-Type", "application/json")
		if err := req.Write(conn); err != nil {
			t.Fatalf("request on the open connection: %v", err)
		}
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			t.Fatalf("answer on the open connection: %v", err)
		}
		defer resp.Body.Close()
		var a applyAnswer
		json.NewDecoder(resp.Body).Decode(&a)
		return a.Result.ResultCode
	}
	if code := applyOn(); code != "SUCCESS" {
		t.Fatalf("apply before the reload: %s", code)
	}

	second := writePair(t, ca, dir)
	c.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the new certificate to be served", func() bool { return servedCert(t, u.Host, cfg).Equal(second) })
	if code := applyOn(); code != "SUCCESS" {
		t.Errorf("apply on the connection opened before the reload: %s", code)
	}
	if !conn.ConnectionState().PeerCertificates[0].Equal(first) {
		t.Error("the open connection's certificate changed")
	}

	// A key that does not go with the certificate: refused, the second
	// pair stays.
	other, err := ca.Server(time.Hour, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	key, _ := devtls.KeyPEM(other.Key)
	os.WriteFile(filepath.Join(dir, "server.key"), key, 0o600)
	c.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the bad pair to be refused", func() bool {
		return strings.Contains(c.stderr.String(), "TLS certificate reload failed; keeping the running certificate")
	})
	if got := servedCert(t, u.Host, cfg); !got.Equal(second) {
		t.Errorf("after a bad pair, serial %x is served; want the running certificate's %x", got.SerialNumber, second.SerialNumber)
	}
	if code := applyOn(); code != "SUCCESS" {
		t.Errorf("apply after the refused reload: %s", code)
	}
	c.stop()
}

// TestSignedApplyHTTPS: the wallet SDKs' signed apply over HTTPS, on the
// production and the sandbox path; each answer's signature verifies over
// the path used. (The same with Java's HttpsURLConnection: sdk_java_test.go.)
func TestSignedApplyHTTPS(t *testing.T) {
	path := signedSetup(t, "")
	ca := addTLS(t, path, "")
	c := start(t, path)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsClientConfig(ca, nil)}}
	for _, p := range []string{publicapi.ApplyPath, publicapi.SandboxApplyPath} {
		a := sdkApply(t, client, strings.Replace(c.api, publicapi.ApplyPath, p, 1), `{"customerId":"2188000123456789"}`)
		if a.Result.ResultCode != "SUCCESS" || a.PublicKeyInfo == nil {
			t.Errorf("%s: %+v", p, a.Result)
		}
	}
	c.stop()
}

// TestMutualTLS: with api.tls_client_ca_file, a client certificate from
// that CA gets in; none, or one from another CA, fails the handshake.
func TestMutualTLS(t *testing.T) {
	path, ca := tlsSetup(t, `tls_client_ca_file = "ca.pem"`)
	c := start(t, path)
	merchant, err := ca.Client("merchant")
	if err != nil {
		t.Fatal(err)
	}
	otherCA, err := devtls.NewCA("another CA")
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := otherCA.Client("stranger")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name   string
		client *devtls.Pair
		ok     bool
	}{
		{"client certificate from the CA", merchant, true},
		{"no client certificate", nil, false},
		{"client certificate from another CA", stranger, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
				cfg := tlsClientConfig(ca, tt.client)
				cfg.MinVersion, cfg.MaxVersion = v, v
				client := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
				code, err := applyOver(client, c.api)
				switch {
				case tt.ok && (err != nil || code != "SUCCESS"):
					t.Errorf("%s: apply: %q, %v; want SUCCESS", tls.VersionName(v), code, err)
				case !tt.ok && err == nil:
					t.Errorf("%s: apply answered %q; want the handshake to fail", tls.VersionName(v), code)
				case !tt.ok && !strings.Contains(err.Error(), "tls: "):
					t.Errorf("%s: apply failed with %v; want a TLS alert", tls.VersionName(v), err)
				case !tt.ok:
					t.Logf("%s: refused: %v", tls.VersionName(v), err)
				}
			}
		})
	}
	c.stop()
}
