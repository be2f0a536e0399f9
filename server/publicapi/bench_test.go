package publicapi_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/apisig"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// benchApplier issues the same key at once: the benchmarks time the
// handler alone, not the pool, the store or the token.
type benchApplier struct{ issued issuer.Issued }

func (a benchApplier) ApplyWithin(context.Context, string, string, issuer.Limits) (issuer.Issued, error) {
	return a.issued, nil
}

// softSigner signs answers with a key in memory, standing in for the
// token's key (whose C_Sign the end-to-end benchmark measures).
type softSigner struct{ key *rsa.PrivateKey }

func (s softSigner) Sign(_ context.Context, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	return rsa.SignPKCS1v15(rand.Reader, s.key, crypto.SHA256, d[:])
}

// BenchmarkServeApply is applyPublicKey's own cost per request: header and
// signature checks, the body, the answer's JSON; with the answer unsigned,
// and signed by a key in memory (RSA-2048, as the token's key would).
func BenchmarkServeApply(b *testing.B) {
	clientKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	signKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	pub := make([]byte, 294) // the size of a 2048-bit SubjectPublicKeyInfo
	rand.Read(pub)
	fake := benchApplier{issued: issuer.Issued{UniqueID: strings.Repeat("A", 32), Salt: strings.Repeat("s", 12),
		PublicKey: pub, ExpiresAt: time.Now().Add(10 * time.Minute)}}
	body := []byte(`{"customerId": "2188000123456789"}`)
	signed, err := http.NewRequest(http.MethodPost, publicapi.ApplyPath, nil)
	if err != nil {
		b.Fatal(err)
	}
	if err := apisig.SignRequest(signed, "bench", 1, clientKey, body, time.Now()); err != nil {
		b.Fatal(err)
	}
	for _, bm := range []struct {
		name   string
		signer publicapi.Signer
	}{
		{"answer-unsigned", nil},
		{"answer-signed-in-memory", softSigner{signKey}},
	} {
		b.Run(bm.name, func(b *testing.B) {
			h := publicapi.New(publicapi.Config{
				Issuer:  fake,
				Clients: []publicapi.Client{{ID: "bench", Keys: map[int]*rsa.PublicKey{1: &clientKey.PublicKey}}},
				Signer:  bm.signer,
			})
			b.ReportAllocs()
			for b.Loop() {
				r := httptest.NewRequest(http.MethodPost, publicapi.ApplyPath, bytes.NewReader(body))
				r.Header = signed.Header.Clone()
				r.Header.Set("Content-Type", "application/json")
				w := httptest.NewRecorder()
				h.ServeHTTP(w, r)
				if w.Code != http.StatusOK || !bytes.Contains(w.Body.Bytes(), []byte(`"SUCCESS"`)) {
					b.Fatalf("HTTP %d: %s", w.Code, w.Body)
				}
			}
		})
	}
}

// BenchmarkResponseJSON is the encoding of a successful answer.
func BenchmarkResponseJSON(b *testing.B) {
	resp := publicapi.Response{
		Result: publicapi.Result{ResultCode: publicapi.CodeSuccess, ResultStatus: "S", ResultMessage: "success."},
		PublicKeyInfo: &publicapi.PublicKeyInfo{UniqueID: strings.Repeat("A", 32), Salt: strings.Repeat("s", 12),
			PublicKey: strings.Repeat("M", 392)},
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := json.Marshal(resp); err != nil {
			b.Fatal(err)
		}
	}
}
