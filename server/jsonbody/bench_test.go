package jsonbody_test

import (
	"crypto/rand"
	"encoding/base64"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/server/jsonbody"
)

// BenchmarkParse parses the two request bodies of the APIs: an
// applyPublicKey body and a decrypt body with a 2048-bit ciphertext.
func BenchmarkParse(b *testing.B) {
	ct := make([]byte, 256)
	rand.Read(ct)
	for _, bm := range []struct {
		name   string
		body   []byte
		fields []string
	}{
		{"apply", []byte(`{"customerId": "2188000123456789"}`), []string{"customerId"}},
		{"decrypt", []byte(`{"uniqueId": "` + strings.Repeat("A", 32) + `", "ciphertext": "` +
			base64.StdEncoding.EncodeToString(ct) + `"}`), []string{"uniqueId", "ciphertext", "padding"}},
	} {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bm.body)))
			for b.Loop() {
				if _, err := jsonbody.Parse(bm.body, bm.fields...); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
