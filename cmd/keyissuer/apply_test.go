package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/apisig"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

func TestMain(m *testing.M) { hsmtest.Main(m) }

type oneKey struct{}

func (oneKey) ApplyWithin(ctx context.Context, customerID, clientID string, lim issuer.Limits) (issuer.Issued, error) {
	return issuer.Issued{UniqueID: "U" + clientID, Salt: "salt00000000", PublicKey: []byte{1, 2, 3}}, nil
}

type memSigner struct{ k *rsa.PrivateKey }

func (s memSigner) Sign(_ context.Context, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	return rsa.SignPKCS1v15(nil, s.k, crypto.SHA256, d[:])
}

func writePEM(t *testing.T, dir, name, typ string, der []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestApply runs `keyissuer apply` against applyPublicKey with signed
// requests only and signed answers.
func TestApply(t *testing.T) {
	merchant, _ := rsa.GenerateKey(rand.Reader, 2048)
	server, _ := rsa.GenerateKey(rand.Reader, 2048)
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	srv := httptest.NewServer(publicapi.New(publicapi.Config{
		Issuer:  oneKey{},
		Log:     slog.New(slog.DiscardHandler),
		Clients: []publicapi.Client{{ID: "M1", Keys: map[int]*rsa.PublicKey{4: &merchant.PublicKey}}},
		Signer:  memSigner{server},
	}))
	defer srv.Close()
	url := srv.URL + publicapi.ApplyPath

	dir := t.TempDir()
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(merchant)
	keyPKCS8 := writePEM(t, dir, "client.pem", "PRIVATE KEY", pkcs8)
	keyPKCS1 := writePEM(t, dir, "client-rsa.pem", "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(merchant))
	serverDER, _ := x509.MarshalPKIXPublicKey(&server.PublicKey)
	serverPub := writePEM(t, dir, "server.pub", "PUBLIC KEY", serverDER)
	serverB64 := filepath.Join(dir, "server.b64")
	os.WriteFile(serverB64, []byte(base64.StdEncoding.EncodeToString(serverDER)+"\n"), 0o600)
	otherDER, _ := x509.MarshalPKIXPublicKey(&other.PublicKey)
	otherPub := writePEM(t, dir, "other.pub", "PUBLIC KEY", otherDER)

	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{name: "signed, verified", args: []string{"-client-id", "M1", "-key", keyPKCS8, "-key-version", "4", "-server-key", serverPub, "-customer-id", "2188000123456789"}},
		{name: "PKCS #1 key, base64 server key", args: []string{"-client-id", "M1", "-key", keyPKCS1, "-key-version", "4", "-server-key", serverB64}},
		{name: "signed, not verified", args: []string{"-client-id", "M1", "-key", keyPKCS8, "-key-version", "4"}},
		{name: "another server key", args: []string{"-client-id", "M1", "-key", keyPKCS8, "-key-version", "4", "-server-key", otherPub}, wantErr: "does not verify"},
		{name: "wrong keyVersion", args: []string{"-client-id", "M1", "-key", keyPKCS8, "-server-key", serverPub}, wantErr: "INVALID_SIGNATURE"},
		{name: "unsigned", args: []string{"-client-id", "M1", "-server-key", serverPub}, wantErr: "INVALID_SIGNATURE"},
		{name: "key without client", args: []string{"-key", keyPKCS8}, wantErr: "-client-id"},
		{name: "public key as -key", args: []string{"-client-id", "M1", "-key", serverPub}, wantErr: "not an RSA private key"},
		{name: "missing key file", args: []string{"-client-id", "M1", "-key", filepath.Join(dir, "nope")}, wantErr: "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			err := run(context.Background(), "apply", append([]string{"-url", url}, tt.args...), nil, &out)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("apply = %v, want an error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("apply = %v", err)
			}
			var pki struct{ UniqueID, Salt, PublicKey string }
			if err := json.Unmarshal(out.Bytes(), &pki); err != nil || pki.UniqueID != "UM1" {
				t.Errorf("apply printed %q (%v), want publicKeyInfo of client M1", out.String(), err)
			}
		})
	}
}

// TestSigningKey makes the response-signing key in a token with
// `keyissuer signing-key -create`, prints it again, and finds it through a
// daemon config file; on SoftHSM and on openCryptoki, which signs by the
// DigestInfo fallback.
func TestSigningKey(t *testing.T) { hsmtest.ForEach(t, testSigningKey) }

func testSigningKey(t *testing.T, st hsmtest.Token) {
	label := st.Prefix + "cli-test-signing"
	t.Cleanup(func() { hsmtest.DestroyObjects(t, st, label) })
	dir := t.TempDir()
	pinFile := filepath.Join(dir, "user.pin")
	if err := os.WriteFile(pinFile, []byte(st.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	signingKey := func(args ...string) (string, error) {
		var out bytes.Buffer
		err := run(ctx, "signing-key", args, nil, &out)
		return out.String(), err
	}
	flags := []string{"-module", st.Module, "-token-label", st.Label, "-pin-file", pinFile, "-label", label}
	if _, err := signingKey(flags...); err == nil || !strings.Contains(err.Error(), "-create") {
		t.Fatalf("signing-key before -create = %v, want a hint to -create", err)
	}
	created, err := signingKey(append(flags, "-create")...)
	if err != nil {
		t.Fatalf("signing-key -create = %v", err)
	}
	block, _ := pem.Decode([]byte(created))
	if block == nil || block.Type != "PUBLIC KEY" {
		t.Fatalf("signing-key printed %q, want a PEM public key", created)
	}
	pub, err := apisig.ParsePublicKey(created)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := signingKey(append(flags, "-create")...); err != nil || again != created {
		t.Errorf("second -create = %q, %v; want the same key", again, err)
	}
	b64, err := signingKey(append(flags, "-base64")...)
	if err != nil || strings.TrimSpace(b64) != base64.StdEncoding.EncodeToString(block.Bytes) {
		t.Errorf("-base64 printed %q, %v", b64, err)
	}

	cfgPath := filepath.Join(dir, "keyissuerd.toml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("[token]\nmodule = %q\nlabel = %q\npin_file = \"user.pin\"\n[api]\nsigning_key_label = %q\n",
		st.Module, st.Label, label)), 0o600)
	fromConfig, err := signingKey("-config", cfgPath)
	if err != nil || fromConfig != created {
		t.Errorf("signing-key -config = %q, %v; want the created key", fromConfig, err)
	}
	if strings.Contains(created+fromConfig, st.PIN) {
		t.Error("the PIN is in the output")
	}
	// The key signs, inside the token; its public half verifies.
	msg := []byte("POST /x\nM1.1.{}")
	sig := signWithToken(t, st, label, msg)
	if err := apisig.Verify(pub, msg, sig); err != nil {
		t.Errorf("the key's signature does not verify: %v", err)
	}
	if _, err := signingKey("-token-label", st.Label); err == nil {
		t.Error("signing-key without a PIN file succeeded")
	}
}

func signWithToken(t *testing.T, st hsmtest.Token, label string, msg []byte) []byte {
	t.Helper()
	ctx := context.Background()
	tok, err := hsm.Open(ctx, hsm.Config{Module: st.Module, TokenLabel: st.Label, PIN: st.PIN, Sessions: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	s, err := tok.Signer(ctx, label)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := s.Sign(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	return sig
}
