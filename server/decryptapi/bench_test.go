package decryptapi_test

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/decryptapi"
	"github.com/keyissuer/keyissuer/server/peercred"
)

// benchIssuer answers every decrypt at once: the benchmarks time the
// handler alone, not the token or the store.
type benchIssuer struct{}

func (benchIssuer) DecryptWithPadding(context.Context, string, []byte, hsm.Padding) ([]byte, error) {
	return []byte("correct horse battery staple"), nil
}

func (benchIssuer) Record(context.Context, string) (store.Record, error) { return store.Record{}, nil }

func (benchIssuer) Stats() issuer.Stats { return issuer.Stats{TokenReady: true} }

// BenchmarkServeDecrypt is the socket API's own cost per decrypt: routing,
// the peer check, parsing and validating the body, decoding a 2048-bit
// ciphertext, and writing the password back.
func BenchmarkServeDecrypt(b *testing.B) {
	h := decryptapi.New(benchIssuer{}, decryptapi.Config{})
	ct := make([]byte, 256)
	rand.Read(ct)
	body := `{"uniqueId": "` + strings.Repeat("A", 32) + `", "ciphertext": "` + base64.StdEncoding.EncodeToString(ct) + `"}`
	self := peercred.Cred{UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), PID: int32(os.Getpid())}
	ctx := peercred.NewContext(context.Background(), self)
	b.ReportAllocs()
	for b.Loop() {
		r := httptest.NewRequestWithContext(ctx, http.MethodPost, "/v1/decrypt", strings.NewReader(body))
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusOK {
			b.Fatalf("HTTP %d: %s", w.Code, w.Body)
		}
	}
}
