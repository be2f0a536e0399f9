package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/issuer"
)

// TestEncryptLayouts encrypts as a merchant would, for each layout, and
// decrypts with the private key.
func TestEncryptLayouts(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	pub := base64.StdEncoding.EncodeToString(der)
	const salt = "SALTsalt1234"
	want := map[issuer.Layout]string{
		issuer.LayoutPasswordSalt: "hunter2" + salt,
		issuer.LayoutSaltPassword: salt + "hunter2",
		issuer.LayoutPipe:         "hunter2|" + salt,
		issuer.LayoutNone:         "hunter2",
	}
	for l, w := range want {
		t.Run(string(l), func(t *testing.T) {
			var out bytes.Buffer
			args := []string{"-public-key", pub, "-salt", salt, "-layout", string(l)}
			if err := run(context.Background(), "encrypt", args, strings.NewReader("hunter2\n"), &out); err != nil {
				t.Fatal(err)
			}
			ct, err := base64.StdEncoding.DecodeString(strings.TrimSpace(out.String()))
			if err != nil {
				t.Fatal(err)
			}
			pt, err := rsa.DecryptOAEP(sha256.New(), nil, priv, ct, nil)
			if err != nil || string(pt) != w {
				t.Errorf("plaintext %q, %v; want %q", pt, err, w)
			}
		})
	}
	err = run(context.Background(), "encrypt", []string{"-public-key", pub, "-salt", salt, "-layout", "salt|password"}, strings.NewReader("x"), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "-layout") {
		t.Errorf("unknown layout: %v", err)
	}
}

// TestDecryptPadding checks that decrypt sends -padding only when given.
func TestDecryptPadding(t *testing.T) {
	dir, err := os.MkdirTemp("", "kic") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "d.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var got []map[string]string
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req map[string]string
		json.NewDecoder(r.Body).Decode(&req)
		got = append(got, req)
		io.WriteString(w, `{"password":"`+base64.StdEncoding.EncodeToString([]byte("hunter2"))+`"}`)
	}))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	defer srv.Close()

	ct := base64.StdEncoding.EncodeToString([]byte("ciphertext"))
	for _, padding := range []string{"", "pkcs1v15"} {
		var out bytes.Buffer
		args := []string{"-socket", sock, "-unique-id", "AbCdEfGhIjKlMnOpQrStUvWxYz012345"}
		if padding != "" {
			args = append(args, "-padding", padding)
		}
		if err := run(context.Background(), "decrypt", args, strings.NewReader(ct+"\n"), &out); err != nil {
			t.Fatal(err)
		}
		if out.String() != "hunter2\n" {
			t.Errorf("output %q", out.String())
		}
		req := got[len(got)-1]
		if p, ok := req["padding"]; p != padding || ok != (padding != "") {
			t.Errorf("-padding %q sent padding %q (present %v)", padding, p, ok)
		}
		if req["ciphertext"] != ct {
			t.Errorf("ciphertext sent %q, want %q", req["ciphertext"], ct)
		}
	}
}
