package merchant_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/cmd/keyissuer-demo/merchant"
	"github.com/keyissuer/keyissuer/server/apisig"
)

func key(t *testing.T) *rsa.PrivateKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048) // a test fixture
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// fakeKeyissuerd answers applyPublicKey with body, signed by signer over
// the path asked, after checking the merchant's signature.
func fakeKeyissuerd(t *testing.T, merchantPub *rsa.PublicKey, signer *rsa.PrivateKey, body string) *httptest.Server {
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reqBody, _ := io.ReadAll(r.Body)
		sig, err := apisig.ParseSignature(r.Header.Get(apisig.HeaderSignature))
		content := apisig.Content(r.Method, r.URL.EscapedPath(), r.Header.Get(apisig.HeaderClientID), r.Header.Get(apisig.HeaderRequestTime), reqBody)
		if err != nil || apisig.Verify(merchantPub, content, sig.Value) != nil {
			t.Errorf("the merchant's request is not signed with its key: %v", err)
		}
		respTime := apisig.FormatTime(time.Now())
		s, err := apisig.Sign(signer, apisig.Content(r.Method, r.URL.EscapedPath(), r.Header.Get(apisig.HeaderClientID), respTime, []byte(body)))
		if err != nil {
			t.Error(err)
		}
		w.Header().Set(apisig.HeaderClientID, r.Header.Get(apisig.HeaderClientID))
		w.Header().Set(apisig.HeaderResponseTime, respTime)
		w.Header().Set(apisig.HeaderSignature, apisig.Signature{Algorithm: apisig.AlgorithmRSA256, KeyVersion: 1, Value: s}.String())
		io.WriteString(w, body)
	}))
}

// TestApply: the merchant takes a key only from an answer signed by
// keyissuerd's key, on the production and the sandbox path.
func TestApply(t *testing.T) {
	merchantKey, server, stranger := key(t), key(t), key(t)
	const ok = `{"result":{"resultCode":"SUCCESS","resultStatus":"S","resultMessage":"success."},` +
		`"publicKeyInfo":{"uniqueId":"u1","salt":"s1","publicKey":"MIIB"}}`
	for _, path := range []string{"/ams/api/v1/customer/applyPublicKey", "/ams/sandbox/api/v1/customer/applyPublicKey"} {
		for _, tt := range []struct {
			name    string
			signer  *rsa.PrivateKey
			body    string
			wantErr string
		}{
			{"signed by keyissuerd", server, ok, ""},
			{"signed by another key", stranger, ok, "not signed by its key"},
			{"refused", server, `{"result":{"resultCode":"INVALID_CLIENT","resultStatus":"F","resultMessage":"unknown Client-Id"}}`, "INVALID_CLIENT"},
		} {
			t.Run(path+"/"+tt.name, func(t *testing.T) {
				srv := fakeKeyissuerd(t, &merchantKey.PublicKey, tt.signer, tt.body)
				defer srv.Close()
				m := merchant.New(merchant.Config{APIURL: srv.URL + path, ClientID: "DEMO_MERCHANT", Key: merchantKey,
					ServerKey: &server.PublicKey, HTTP: srv.Client()})
				k, err := m.Apply(context.Background())
				switch {
				case tt.wantErr == "" && (err != nil || k.UniqueID != "u1" || k.Salt != "s1"):
					t.Errorf("Apply = %+v, %v; want the key", k, err)
				case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
					t.Errorf("Apply = %+v, %v; want an error with %q", k, err, tt.wantErr)
				}
			})
		}
	}
}
