package config_test

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/config"
)

// testKeys are a 2048-bit client key and a 1024-bit one, too small.
var testKeys = sync.OnceValues(func() (*rsa.PrivateKey, *rsa.PrivateKey) {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		panic(err)
	}
	return k, small
})

func pubDER(tb testing.TB, k *rsa.PrivateKey) []byte {
	tb.Helper()
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

func pubPEM(tb testing.TB, k *rsa.PrivateKey) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER(tb, k)}))
}

func TestLoadClients(t *testing.T) {
	k, _ := testKeys()
	body := base + fmt.Sprintf(`
[api]
allow_unsigned = true
clock_skew = "30s"
signing_key_label = "resp-sign"
signing_key_version = 2
blocklist_file = "lists/blocked.txt"

[limits]
rate = 10.0
max_outstanding = 100

[[clients]]
id = "SANDBOX_5Y3A3N2YEA4Y02222"
[clients.public_keys]
1 = """
%s"""
2 = %q

[[clients]]
id = "T_2"
enabled = false
rate = 0.5
burst = 3
max_outstanding = 7
public_keys = { 1 = %q }
`, pubPEM(t, k), base64.StdEncoding.EncodeToString(pubDER(t, k)),
		string(pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(&k.PublicKey)})))
	dir := t.TempDir()
	c, err := config.Load(writeConfig(t, dir, body))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	a := c.API
	if !a.AllowUnsigned || a.ClockSkew != 30*time.Second || a.SigningKeyLabel != "resp-sign" ||
		a.SigningKeyVersion != 2 || a.BlocklistFile != filepath.Join(dir, "lists/blocked.txt") || a.BlocklistPoll != 5*time.Second {
		t.Errorf("api = %+v", a)
	}
	if l := c.Limits; l.Rate != 10 || l.Burst != 20 || l.MaxOutstanding != 100 || l.MaxOutstandingPerCustomer != 10 {
		t.Errorf("limits = %+v, want rate 10, burst 20, max_outstanding 100, per customer 10", l)
	}
	if len(c.Clients) != 2 {
		t.Fatalf("%d clients, want 2", len(c.Clients))
	}
	c1, c2 := c.Clients[0], c.Clients[1]
	if !c1.IsEnabled() || c1.Rate != 50 || c1.Burst != 100 || c1.MaxOutstanding != 100 {
		t.Errorf("client 1 = %+v, want enabled, rate 50, burst 100, max_outstanding 100", c1)
	}
	if c2.IsEnabled() || c2.Rate != 0.5 || c2.Burst != 3 || c2.MaxOutstanding != 7 {
		t.Errorf("client 2 = %+v, want disabled, rate 0.5, burst 3, max_outstanding 7", c2)
	}
	for _, cl := range c.Clients {
		keys, err := cl.Keys()
		if err != nil {
			t.Fatalf("Keys() of %s: %v", cl.ID, err)
		}
		for v, pub := range keys {
			if !pub.Equal(&k.PublicKey) {
				t.Errorf("client %s keyVersion %d is not the test key", cl.ID, v)
			}
		}
		if cl.ID == c1.ID && (len(keys) != 2 || keys[1] == nil || keys[2] == nil) {
			t.Errorf("client 1 keys = %v, want versions 1 and 2", keys)
		}
	}
}

func TestLoadClientErrors(t *testing.T) {
	k, small := testKeys()
	key := fmt.Sprintf("public_keys = { 1 = %q }\n", base64.StdEncoding.EncodeToString(pubDER(t, k)))
	client := "[[clients]]\nid = \"C1\"\n"
	tests := []struct {
		name    string
		body    string
		wantErr string
	}{
		{"clock_skew too small", "[api]\nclock_skew = \"10ms\"\n", "api.clock_skew"},
		{"clock_skew too large", "[api]\nclock_skew = \"48h\"\n", "api.clock_skew"},
		{"signing key under the one-time prefix", "[api]\nsigning_key_label = \"keyissuer:sign\"\n", "api.signing_key_label"},
		{"signing_key_version negative", "[api]\nsigning_key_version = -1\n", "api.signing_key_version"},
		{"blocklist_poll too short", "[api]\nblocklist_poll = \"1ms\"\n", "api.blocklist_poll"},
		{"limits.rate negative", "[limits]\nrate = -1.0\n", "limits.rate"},
		{"limits.rate nan", "[limits]\nrate = nan\n", "limits.rate"},
		{"limits.burst negative", "[limits]\nburst = -1\n", "limits.burst"},
		{"limits.max_outstanding negative", "[limits]\nmax_outstanding = -5\n", "limits.max_outstanding"},
		{"per customer negative", "[limits]\nmax_outstanding_per_customer = -1\n", "limits.max_outstanding_per_customer"},
		{"address rate negative", "[limits]\naddress_rate = -1.0\n", "limits.address_rate"},
		{"address burst negative", "[limits]\naddress_burst = -1\n", "limits.address_burst"},
		{"unverified rate too high", "[limits]\nunverified_rate = 1e7\n", "limits.unverified_rate"},
		{"unverified burst negative", "[limits]\nunverified_burst = -2\n", "limits.unverified_burst"},
		{"addresses negative", "[limits]\naddresses = -1\n", "limits.addresses"},
		{"client without id", "[[clients]]\n" + key, "clients[0].id"},
		{"client id with a dot", "[[clients]]\nid = \"a.b\"\n" + key, "clients[0]"},
		{"client id too long", "[[clients]]\nid = \"" + strings.Repeat("a", 65) + "\"\n" + key, "clients[0]"},
		{"client twice", client + key + client + key, "registered twice"},
		{"client without keys", client, "public_keys"},
		{"keyVersion not a number", client + "public_keys = { v1 = \"x\" }\n", "public_keys"},
		{"keyVersion zero", client + strings.Replace(key, "1 =", "0 =", 1), "public_keys"},
		{"key not base64", client + "public_keys = { 1 = \"not a key!\" }\n", "public_keys"},
		{"key of 1024 bits", client + fmt.Sprintf("public_keys = { 1 = %q }\n", pubPEM(t, small)), "1024"},
		{"private key PEM", client + "public_keys = { 1 = \"-----BEGIN PRIVATE KEY-----\\nAAAA\\n-----END PRIVATE KEY-----\\n\" }\n", "public_keys"},
		{"client rate zero after default", client + key + "rate = -2.0\n", "clients[0] (id \"C1\").rate"},
		{"client max_outstanding negative", client + key + "max_outstanding = -1\n", "max_outstanding"},
		{"client unknown key", client + key + "secret = \"x\"\n", "clients.secret"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeConfig(t, t.TempDir(), base+tt.body)
			c, err := config.Load(p)
			if err == nil {
				t.Fatalf("Load accepted:\n%s\nas %+v", tt.body, c)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not name %s", err, tt.wantErr)
			}
		})
	}
}
