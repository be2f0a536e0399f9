package publicapi_test

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/keyissuer/keyissuer/server/publicapi"
)

// TestSandboxPath: the SDKs' sandbox path is served like the production
// path, and each answer's signature covers the path its request used, so
// that an SDK checking it over its own path accepts it and one checking
// over the other path does not.
func TestSandboxPath(t *testing.T) {
	srv := httptest.NewServer(publicapi.New(baseConfig(&fakeIssuer{issued: newIssued()})))
	defer srv.Close()
	paths := map[string]string{publicapi.ApplyPath: publicapi.SandboxApplyPath, publicapi.SandboxApplyPath: publicapi.ApplyPath}
	for path, other := range paths {
		t.Run(path, func(t *testing.T) {
			a := send(t, srv.Client(), request{path: path, body: defaultBody}.build(t, srv.URL))
			if a.status != http.StatusOK || a.resp.Result.ResultCode != "SUCCESS" {
				t.Fatalf("apply: HTTP %d, %+v", a.status, a.resp.Result)
			}
			checkPublicKeyInfo(t, a)
			pub := &testKeys()["server"].PublicKey
			if err := sdkVerify(pub, http.MethodPost, path, a.header, a.raw); err != nil {
				t.Errorf("the answer does not verify over %s: %v", path, err)
			}
			if sdkVerify(pub, http.MethodPost, other, a.header, a.raw) == nil {
				t.Errorf("the answer verifies over %s too; want its signature to cover the path used", other)
			}
			// A request signed over the other path is refused.
			b := send(t, srv.Client(), request{path: path, body: defaultBody, signPath: &other}.build(t, srv.URL))
			if b.resp.Result.ResultCode != "INVALID_SIGNATURE" {
				t.Errorf("request to %s signed over %s: %+v, want INVALID_SIGNATURE", path, other, b.resp.Result)
			}
		})
	}
	for _, path := range []string{
		publicapi.SandboxApplyPath + "/",
		"/ams/sandbox/api/v1/customer/applyPublicKeys",
		"/ams/sandbox/v1/customer/applyPublicKey",
		"/ams/api/sandbox/v1/customer/applyPublicKey",
	} {
		a := send(t, srv.Client(), request{path: path, body: defaultBody}.build(t, srv.URL))
		if a.status != http.StatusNotFound || a.resp.Result.ResultCode != "INVALID_API" {
			t.Errorf("%s: HTTP %d, %+v; want 404 INVALID_API", path, a.status, a.resp.Result)
		}
	}
}
