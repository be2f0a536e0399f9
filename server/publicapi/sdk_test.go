package publicapi_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// TestWalletSDK plays a merchant's wallet SDK against the handler, with
// keyissuer's response-signing key inside SoftHSM: requests signed exactly
// as the SDKs sign them (the request builder does not use apisig), answers
// verified exactly as the SDKs verify them (split the Signature header on
// commas, take the third item).
func TestWalletSDK(t *testing.T) {
	ctx := context.Background()
	st := hsmtest.Shared(t)
	tok, err := hsm.Open(ctx, hsm.Config{
		Module: st.Module, TokenLabel: st.Label, PIN: st.PIN,
		LabelPrefix: "publicapi-test:", Sessions: 2,
	})
	if err != nil {
		t.Fatalf("hsm.Open: %v", err)
	}
	t.Cleanup(func() { tok.Close() })
	signer, _, err := tok.CreateSigningKey(ctx, "publicapi-test-response-signing", 2048)
	if err != nil {
		t.Fatalf("CreateSigningKey: %v", err)
	}

	fake := &fakeIssuer{issued: newIssued()}
	cfg := baseConfig(fake)
	cfg.Signer, cfg.SignerKeyVersion = signer, 3
	srv := httptest.NewServer(publicapi.New(cfg))
	defer srv.Close()

	tests := []struct {
		name     string
		req      request
		wantCode string
	}{
		{name: "Request-Time in epoch millis", wantCode: "SUCCESS"},
		{name: "Request-Time in ISO 8601", req: request{requestTime: time.Now().Format("2006-01-02T15:04:05.000-07:00")}, wantCode: "SUCCESS"},
		{name: "keyVersion 2", req: request{key: "v2", keyVersion: "2"}, wantCode: "SUCCESS"},
		{name: "without customerId", req: request{body: `{}`}, wantCode: "SUCCESS"},
		{name: "a refusal after authentication is signed too", req: request{body: `{"customerId":"31"}`}, wantCode: "PARAM_ILLEGAL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.req.body == "" {
				tt.req.body = defaultBody
			}
			r := tt.req.build(t, srv.URL)
			a := send(t, srv.Client(), r)
			if a.resp.Result.ResultCode != tt.wantCode {
				t.Fatalf("result %+v, want %s", a.resp.Result, tt.wantCode)
			}
			if err := sdkVerify(signer.Public(), http.MethodPost, publicapi.ApplyPath, a.header, a.raw); err != nil {
				t.Fatalf("the SDK rejects the answer: %v\nheaders %v\nbody %s", err, a.header, a.raw)
			}
			if got := a.header.Get("Client-Id"); got != clientID {
				t.Errorf("answer's Client-Id = %q, want %q", got, clientID)
			}
			sig := a.header.Get("Signature")
			if !strings.HasPrefix(sig, "algorithm=RSA256,keyVersion=3,signature=") || strings.ContainsAny(sig[len("algorithm=RSA256,keyVersion=3,signature="):], "+/= ,") {
				t.Errorf("Signature = %q, want algorithm=RSA256,keyVersion=3,signature=<URL-encoded base64>", sig)
			}
			if _, err := time.Parse(time.RFC3339, a.header.Get("Response-Time")); err != nil {
				t.Errorf("Response-Time %q is not ISO 8601: %v", a.header.Get("Response-Time"), err)
			}

			// The verification means something: any change to what was
			// signed fails it.
			for what, tamper := range map[string]func(h http.Header, body []byte) (http.Header, []byte){
				"body": func(h http.Header, b []byte) (http.Header, []byte) {
					return h, []byte(strings.Replace(string(b), `"S"`, `"F"`, 1) + " ")
				},
				"Response-Time": func(h http.Header, b []byte) (http.Header, []byte) {
					h = h.Clone()
					h.Set("Response-Time", strconv.Itoa(1))
					return h, b
				},
				"Client-Id": func(h http.Header, b []byte) (http.Header, []byte) {
					h = h.Clone()
					h.Set("Client-Id", limitedID)
					return h, b
				},
			} {
				h, b := tamper(a.header, a.raw)
				if sdkVerify(signer.Public(), http.MethodPost, publicapi.ApplyPath, h, b) == nil {
					t.Errorf("a changed %s still verifies", what)
				}
			}
			if sdkVerify(&testKeys()["server"].PublicKey, http.MethodPost, publicapi.ApplyPath, a.header, a.raw) == nil {
				t.Error("the answer verifies with another key")
			}
		})
	}
}
