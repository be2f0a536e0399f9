package apisig

import (
	"crypto/rand"
	"crypto/rsa"
	"strings"
	"testing"
	"time"
)

// BenchmarkVerify is the check of a request signature: RSA256 with a
// 2048-bit client key over a typical applyPublicKey request.
func BenchmarkVerify(b *testing.B) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	ts := FormatTime(time.Now())
	content := Content("POST", "/ams/api/v1/customer/applyPublicKey", "bench", ts, []byte(`{"customerId": "2188000123456789"}`))
	sig, err := Sign(key, content)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := Verify(&key.PublicKey, content, sig); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseSignature parses a Signature header of a 2048-bit key.
func BenchmarkParseSignature(b *testing.B) {
	sig := make([]byte, 256)
	rand.Read(sig)
	h := Signature{Algorithm: AlgorithmRSA256, KeyVersion: 1, Value: sig}.String()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseSignature(h); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkContent builds the signed content of an answer.
func BenchmarkContent(b *testing.B) {
	body := []byte(`{"result":{"resultCode":"SUCCESS","resultStatus":"S","resultMessage":"success."},"publicKeyInfo":{"uniqueId":"` +
		strings.Repeat("A", 32) + `","salt":"ssssssssssss","publicKey":"` + strings.Repeat("M", 392) + `"}}`)
	ts := FormatTime(time.Now())
	b.ReportAllocs()
	for b.Loop() {
		Content("POST", "/ams/api/v1/customer/applyPublicKey", "bench", ts, body)
	}
}
