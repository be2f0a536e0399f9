package wallet_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/cmd/keyissuer-demo/wallet"
	"github.com/keyissuer/keyissuer/server/decryptclient"
)

// fakeDecrypter answers every decrypt with password or err.
type fakeDecrypter struct {
	password string
	err      error
}

func (f fakeDecrypter) Decrypt(context.Context, string, []byte) ([]byte, error) {
	if f.err != nil {
		return nil, f.err
	}
	return []byte(f.password), nil
}

func TestCheck(t *testing.T) {
	hash, err := wallet.HashPassword("correct horse")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(hash, []byte("correct horse")) {
		t.Fatal("the stored hash contains the password")
	}
	ct := base64.StdEncoding.EncodeToString([]byte("ciphertext"))
	tests := []struct {
		name string
		dec  fakeDecrypter
		body string
		want string
	}{
		{"right password", fakeDecrypter{password: "correct horse"}, "", wallet.Verified},
		{"wrong password", fakeDecrypter{password: "correct horse "}, "", wallet.WrongPassword},
		{"replay", fakeDecrypter{err: &decryptclient.Error{Status: 409, Code: decryptclient.KeyConsumed}}, "", wallet.KeyAlreadyUsed},
		{"expired", fakeDecrypter{err: &decryptclient.Error{Status: 410, Code: decryptclient.KeyExpired}}, "", wallet.KeyExpired},
		{"unknown key", fakeDecrypter{err: &decryptclient.Error{Status: 404, Code: decryptclient.KeyNotFound}}, "", wallet.KeyExpired},
		{"bad padding", fakeDecrypter{err: &decryptclient.Error{Status: 400, Code: decryptclient.DecryptFailed}}, "", wallet.DecryptFailed},
		{"token down", fakeDecrypter{err: &decryptclient.Error{Status: 503, Code: decryptclient.HSMUnavailable}}, "", wallet.Unavailable},
		{"socket unreachable", fakeDecrypter{err: errors.New("dial unix: no such file")}, "", wallet.Unavailable},
		{"ciphertext not base64", fakeDecrypter{password: "correct horse"}, `{"uniqueId":"k","ciphertext":"%%%"}`, wallet.BadRequest},
		{"no uniqueId", fakeDecrypter{password: "correct horse"}, `{"ciphertext":"` + ct + `"}`, wallet.BadRequest},
		{"not JSON", fakeDecrypter{password: "correct horse"}, `uniqueId=k`, wallet.BadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(wallet.New(wallet.Config{Decrypter: tt.dec, PasswordHash: hash}))
			defer srv.Close()
			body := tt.body
			if body == "" {
				body = `{"uniqueId":"k","ciphertext":"` + ct + `"}`
			}
			resp, err := http.Post(srv.URL, "application/json", strings.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var a wallet.Answer
			if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
				t.Fatal(err)
			}
			if a.Outcome != tt.want || a.Message == "" {
				t.Errorf("answer %+v, want outcome %s with a message", a, tt.want)
			}
			if strings.Contains(a.Message, "correct horse") {
				t.Errorf("the answer shows the password: %+v", a)
			}
		})
	}
}
