package config_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/devtls"
)

// tlsFiles writes a CA, a server pair, another server pair and an
// intermediate chain into dir.
func tlsFiles(t *testing.T, dir string) {
	t.Helper()
	ca, err := devtls.NewCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"server", "other"} {
		p, err := ca.Server(time.Hour, "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		if err := p.WriteFiles(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key"), ca.Cert); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(dir, "ca.pem"), devtls.CertPEM(ca.Cert), 0o644)
	os.WriteFile(filepath.Join(dir, "garbage.pem"), []byte("not PEM\n"), 0o644)
}

func TestLoadTLS(t *testing.T) {
	dir := t.TempDir()
	tlsFiles(t, dir)
	c, err := config.Load(writeConfig(t, dir, base+`[api]
tls_cert_file = "server.pem"
tls_key_file = "server.key"
tls_client_ca_file = "ca.pem"
`))
	if err != nil {
		t.Fatal(err)
	}
	if !c.API.TLS() || c.API.TLSCertFile != filepath.Join(dir, "server.pem") || c.API.TLSClientCAFile != filepath.Join(dir, "ca.pem") {
		t.Errorf("api: %+v; want HTTPS with the paths relative to the config file", c.API)
	}
	pair, err := config.LoadKeyPair(c.API.TLSCertFile, c.API.TLSKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(pair.Certificate) != 2 || pair.Leaf == nil || pair.Leaf.IsCA {
		t.Errorf("the pair has %d certificates, leaf %v; want the server's and its CA's, the server's first", len(pair.Certificate), pair.Leaf)
	}
	plain, err := config.Load(writeConfig(t, t.TempDir(), base))
	if err != nil || plain.API.TLS() {
		t.Errorf("without the keys: TLS %v, %v; want plain HTTP", plain.API.TLS(), err)
	}
}

func TestLoadTLSErrors(t *testing.T) {
	dir := t.TempDir()
	tlsFiles(t, dir)
	tests := []struct {
		name    string
		api     string
		wantErr string
	}{
		{"cert without key", `tls_cert_file = "server.pem"`, "api.tls_key_file: api.tls_cert_file is set"},
		{"key without cert", `tls_key_file = "server.key"`, "api.tls_cert_file: api.tls_key_file is set"},
		{"client CA without HTTPS", `tls_client_ca_file = "ca.pem"`, "api.tls_client_ca_file: client certificates need HTTPS"},
		{"unreadable cert", "tls_cert_file = \"missing.pem\"\ntls_key_file = \"server.key\"", "api.tls_cert_file: open"},
		{"unreadable key", "tls_cert_file = \"server.pem\"\ntls_key_file = \"missing.key\"", "api.tls_key_file: open"},
		{"cert not PEM", "tls_cert_file = \"garbage.pem\"\ntls_key_file = \"server.key\"", "api.tls_cert_file: " + dir + "/garbage.pem does not start with a PEM CERTIFICATE"},
		{"key not PEM", "tls_cert_file = \"server.pem\"\ntls_key_file = \"garbage.pem\"", "api.tls_key_file: " + dir + "/garbage.pem holds no PEM private key"},
		{"certificate as key", "tls_cert_file = \"server.pem\"\ntls_key_file = \"server.pem\"", "api.tls_key_file: " + dir + "/server.pem holds no PEM private key"},
		{"key not matching", "tls_cert_file = \"server.pem\"\ntls_key_file = \"other.key\"", "api.tls_key_file: " + dir + "/other.key does not go with the certificate"},
		{"unreadable client CA", "tls_cert_file = \"server.pem\"\ntls_key_file = \"server.key\"\ntls_client_ca_file = \"missing.pem\"", "api.tls_client_ca_file: open"},
		{"client CA not PEM", "tls_cert_file = \"server.pem\"\ntls_key_file = \"server.key\"\ntls_client_ca_file = \"garbage.pem\"", "api.tls_client_ca_file: " + dir + "/garbage.pem holds no PEM certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Load(writeConfig(t, dir, base+"[api]\n"+tt.api+"\n"))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Load: %v; want an error with %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "PRIVATE KEY-----") {
				t.Errorf("the error shows a key: %v", err)
			}
		})
	}
}
