package publicapi_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// fakeIssuer records what Apply was asked and answers with issued or err.
type fakeIssuer struct {
	issued issuer.Issued
	err    error

	mu          sync.Mutex
	calls       int
	customerIDs []string
	clientIDs   []string
}

var _ publicapi.Issuer = (*fakeIssuer)(nil)

func (f *fakeIssuer) Apply(ctx context.Context, customerID, clientID string) (issuer.Issued, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.customerIDs = append(f.customerIDs, customerID)
	f.clientIDs = append(f.clientIDs, clientID)
	if f.err != nil {
		return issuer.Issued{}, f.err
	}
	return f.issued, nil
}

// testPublicKey stands in for a DER SubjectPublicKeyInfo; bytes that base64
// to '+' and '/' show the encoding is the standard one.
var testPublicKey = []byte{0x30, 0x82, 0x01, 0x22, 0xfb, 0xff, 0xbf, 0x00, 0x3e, 0x3f}

func newIssued() issuer.Issued {
	return issuer.Issued{
		UniqueID:  "AbCdEfGhIjKlMnOpQrStUvWxYz012345",
		Salt:      "s4lt0123abcd",
		PublicKey: testPublicKey,
		ExpiresAt: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

const maxBody = 4096

func newHandler(is publicapi.Issuer) http.Handler {
	return publicapi.New(is, slog.New(slog.DiscardHandler), maxBody)
}

// answer is a decoded applyPublicKey response.
type answer struct {
	status int
	header http.Header
	raw    []byte
	resp   publicapi.Response
}

func do(tb testing.TB, h http.Handler, method, path, contentType string, body []byte) answer {
	tb.Helper()
	req := httptest.NewRequest(method, path, bytes.NewReader(body))
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	a := answer{status: rec.Code, header: rec.Header(), raw: rec.Body.Bytes()}
	if err := json.Unmarshal(a.raw, &a.resp); err != nil {
		tb.Fatalf("%s %s: body %q is not a response: %v", method, path, a.raw, err)
	}
	return a
}

// checkAllStrings checks that every value in body, at any depth, is a JSON
// string, as the wallet API family requires.
func checkAllStrings(tb testing.TB, body []byte) {
	tb.Helper()
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		tb.Fatalf("body %q is not JSON: %v", body, err)
	}
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, e := range v {
				walk(path+"."+k, e)
			}
		case string:
		default:
			tb.Errorf("%s is %T (%v), want a string; body %s", path, v, v, body)
		}
	}
	m, ok := v.(map[string]any)
	if !ok {
		tb.Fatalf("body %s is not a JSON object", body)
	}
	walk("$", m)
}

const jsonType = "application/json"

func TestApply(t *testing.T) {
	errSecret := errors.New("store exploded: secret-cause")
	tests := []struct {
		name        string
		method      string // POST if empty
		path        string // ApplyPath if empty
		contentType string // jsonType if empty; "-" for none
		body        string
		issuerErr   error

		wantHTTP     int
		wantCode     string
		wantStatus   string
		wantMessage  string // a substring of resultMessage
		wantCustomer *string
		wantAllow    string
	}{
		{
			name:         "success",
			body:         `{"customerId":"2188000123456789"}`,
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantMessage:  "success.",
			wantCustomer: ptr("2188000123456789"),
		},
		{
			name:         "customerId of 13 digits",
			body:         `{"customerId":"2188000123456"}`,
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantCustomer: ptr("2188000123456"),
		},
		{
			name:         "customerId of 19 digits",
			body:         `{"customerId":"2188000123456789012"}`,
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantCustomer: ptr("2188000123456789012"),
		},
		{
			name:         "customerId of 32 digits",
			body:         `{"customerId":"21` + strings.Repeat("0", 30) + `"}`,
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantCustomer: ptr("21" + strings.Repeat("0", 30)),
		},
		{
			name:         "customerId absent",
			body:         `{}`,
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantCustomer: ptr(""),
		},
		{
			name:         "unknown fields ignored",
			body:         `{"extendInfo":{"a":1},"amount":12,"customerId":"2188000123456789","flag":true}`,
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantCustomer: ptr("2188000123456789"),
		},
		{
			name:         "charset parameter accepted",
			contentType:  "application/json; charset=utf-8",
			body:         `{"customerId":"2188000123456789"}`,
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantCustomer: ptr("2188000123456789"),
		},
		{
			name:         "media type is case insensitive",
			contentType:  "Application/JSON;charset=UTF-8",
			body:         `{"customerId":"2188000123456789"}`,
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantCustomer: ptr("2188000123456789"),
		},
		{
			name:        "customerId as number",
			body:        `{"customerId":2188000123456789}`,
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "customerId",
		},
		{
			name:        "customerId not starting with 21",
			body:        `{"customerId":"3188000123456789"}`,
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "21",
		},
		{
			name:        "customerId with letters",
			body:        `{"customerId":"21880001234567ab"}`,
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "digits",
		},
		{
			name:        "customerId with non-ASCII digits",
			body:        `{"customerId":"21٣"}`,
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "digits",
		},
		{
			name:        "customerId of 33 characters",
			body:        `{"customerId":"21` + strings.Repeat("0", 31) + `"}`,
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "32",
		},
		{
			name:        "customerId empty",
			body:        `{"customerId":""}`,
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "empty",
		},
		{
			name:        "customerId null",
			body:        `{"customerId":null}`,
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "customerId",
		},
		{
			name:       "invalid JSON",
			body:       `{"customerId":`,
			wantHTTP:   http.StatusOK,
			wantCode:   "PARAM_ILLEGAL",
			wantStatus: "F",
		},
		{
			name:       "trailing comma",
			body:       `{"customerId":"2188000123456789",}`,
			wantHTTP:   http.StatusOK,
			wantCode:   "PARAM_ILLEGAL",
			wantStatus: "F",
		},
		{
			name:        "duplicate keys",
			body:        `{"customerId":"2188000123456789","customerId":"2188000123456780"}`,
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "duplicate",
		},
		{
			name:       "empty body",
			body:       ``,
			wantHTTP:   http.StatusOK,
			wantCode:   "PARAM_ILLEGAL",
			wantStatus: "F",
		},
		{
			name:       "top-level array",
			body:       `[{"customerId":"2188000123456789"}]`,
			wantHTTP:   http.StatusOK,
			wantCode:   "PARAM_ILLEGAL",
			wantStatus: "F",
		},
		{
			name:       "invalid UTF-8",
			body:       "{\"customerId\":\"2188000123456789\",\"x\":\"\xff\"}",
			wantHTTP:   http.StatusOK,
			wantCode:   "PARAM_ILLEGAL",
			wantStatus: "F",
		},
		{
			name:         "body of exactly the limit",
			body:         padTo(`{"customerId":"2188000123456789","pad":"`, `"}`, maxBody),
			wantHTTP:     http.StatusOK,
			wantCode:     "SUCCESS",
			wantStatus:   "S",
			wantCustomer: ptr("2188000123456789"),
		},
		{
			name:        "body one byte over the limit",
			body:        padTo(`{"customerId":"2188000123456789","pad":"`, `"}`, maxBody+1),
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "limit",
		},
		{
			name:        "body far over the limit",
			body:        padTo(`{"pad":"`, `"}`, 1<<20),
			wantHTTP:    http.StatusOK,
			wantCode:    "PARAM_ILLEGAL",
			wantStatus:  "F",
			wantMessage: "limit",
		},
		{
			name:        "GET",
			method:      http.MethodGet,
			wantHTTP:    http.StatusMethodNotAllowed,
			wantCode:    "METHOD_NOT_SUPPORTED",
			wantStatus:  "F",
			wantAllow:   "POST",
			contentType: "-",
		},
		{
			name:       "PUT",
			method:     http.MethodPut,
			body:       `{"customerId":"2188000123456789"}`,
			wantHTTP:   http.StatusMethodNotAllowed,
			wantCode:   "METHOD_NOT_SUPPORTED",
			wantStatus: "F",
			wantAllow:  "POST",
		},
		{
			name:        "text/plain",
			contentType: "text/plain",
			body:        `{"customerId":"2188000123456789"}`,
			wantHTTP:    http.StatusUnsupportedMediaType,
			wantCode:    "MEDIA_TYPE_NOT_ACCEPTABLE",
			wantStatus:  "F",
		},
		{
			name:        "no Content-Type",
			contentType: "-",
			body:        `{"customerId":"2188000123456789"}`,
			wantHTTP:    http.StatusUnsupportedMediaType,
			wantCode:    "MEDIA_TYPE_NOT_ACCEPTABLE",
			wantStatus:  "F",
		},
		{
			name:        "form Content-Type",
			contentType: "application/x-www-form-urlencoded",
			body:        `customerId=2188000123456789`,
			wantHTTP:    http.StatusUnsupportedMediaType,
			wantCode:    "MEDIA_TYPE_NOT_ACCEPTABLE",
			wantStatus:  "F",
		},
		{
			name:        "malformed Content-Type",
			contentType: "application/json; charset",
			body:        `{"customerId":"2188000123456789"}`,
			wantHTTP:    http.StatusUnsupportedMediaType,
			wantCode:    "MEDIA_TYPE_NOT_ACCEPTABLE",
			wantStatus:  "F",
		},
		{
			name:       "unknown path",
			path:       "/ams/api/v1/customer/applyPrivateKey",
			body:       `{"customerId":"2188000123456789"}`,
			wantHTTP:   http.StatusNotFound,
			wantCode:   "INVALID_API",
			wantStatus: "F",
		},
		{
			name:       "path with trailing slash",
			path:       publicapi.ApplyPath + "/",
			body:       `{"customerId":"2188000123456789"}`,
			wantHTTP:   http.StatusNotFound,
			wantCode:   "INVALID_API",
			wantStatus: "F",
		},
		{
			name:        "unknown path with GET is still INVALID_API",
			method:      http.MethodGet,
			path:        "/ams/api/",
			contentType: "-",
			wantHTTP:    http.StatusNotFound,
			wantCode:    "INVALID_API",
			wantStatus:  "F",
		},
		{
			name:         "pool empty",
			body:         `{"customerId":"2188000123456789"}`,
			issuerErr:    fmt.Errorf("apply: %w", issuer.ErrPoolEmpty),
			wantHTTP:     http.StatusOK,
			wantCode:     "UNKNOWN_EXCEPTION",
			wantStatus:   "U",
			wantMessage:  "retry",
			wantCustomer: ptr("2188000123456789"),
		},
		{
			name:         "token unavailable",
			body:         `{"customerId":"2188000123456789"}`,
			issuerErr:    issuer.ErrUnavailable,
			wantHTTP:     http.StatusOK,
			wantCode:     "UNKNOWN_EXCEPTION",
			wantStatus:   "U",
			wantMessage:  "retry",
			wantCustomer: ptr("2188000123456789"),
		},
		{
			name:         "request cancelled",
			body:         `{"customerId":"2188000123456789"}`,
			issuerErr:    context.Canceled,
			wantHTTP:     http.StatusOK,
			wantCode:     "UNKNOWN_EXCEPTION",
			wantStatus:   "U",
			wantCustomer: ptr("2188000123456789"),
		},
		{
			name:         "other issuer error",
			body:         `{"customerId":"2188000123456789"}`,
			issuerErr:    errSecret,
			wantHTTP:     http.StatusOK,
			wantCode:     "UNKNOWN_EXCEPTION",
			wantStatus:   "U",
			wantCustomer: ptr("2188000123456789"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeIssuer{issued: newIssued(), err: tt.issuerErr}
			method, path, ct := tt.method, tt.path, tt.contentType
			if method == "" {
				method = http.MethodPost
			}
			if path == "" {
				path = publicapi.ApplyPath
			}
			switch ct {
			case "":
				ct = jsonType
			case "-":
				ct = ""
			}
			a := do(t, newHandler(fake), method, path, ct, []byte(tt.body))

			if a.status != tt.wantHTTP {
				t.Errorf("HTTP status = %d, want %d; body %s", a.status, tt.wantHTTP, a.raw)
			}
			if got := a.header.Get("Content-Type"); got != "application/json; charset=UTF-8" {
				t.Errorf("Content-Type = %q, want application/json; charset=UTF-8", got)
			}
			if got := a.header.Get("Allow"); got != tt.wantAllow {
				t.Errorf("Allow = %q, want %q", got, tt.wantAllow)
			}
			checkAllStrings(t, a.raw)
			r := a.resp.Result
			if r.ResultCode != tt.wantCode || r.ResultStatus != tt.wantStatus {
				t.Errorf("result = %s/%s (%q), want %s/%s", r.ResultCode, r.ResultStatus, r.ResultMessage, tt.wantCode, tt.wantStatus)
			}
			if r.ResultMessage == "" {
				t.Error("resultMessage is empty")
			}
			if !strings.Contains(r.ResultMessage, tt.wantMessage) {
				t.Errorf("resultMessage = %q, want it to contain %q", r.ResultMessage, tt.wantMessage)
			}
			if bytes.Contains(a.raw, []byte("secret-cause")) {
				t.Errorf("body leaks the issuer error's text: %s", a.raw)
			}

			if tt.wantCode == "SUCCESS" {
				checkPublicKeyInfo(t, a)
			} else if a.resp.PublicKeyInfo != nil || bytes.Contains(a.raw, []byte("publicKeyInfo")) {
				t.Errorf("a %s answer carries publicKeyInfo: %s", tt.wantCode, a.raw)
			}

			fake.mu.Lock()
			defer fake.mu.Unlock()
			if tt.wantCustomer == nil {
				if fake.calls != 0 {
					t.Errorf("Apply called %d times (customerIds %q), want none", fake.calls, fake.customerIDs)
				}
				return
			}
			if fake.calls != 1 {
				t.Fatalf("Apply called %d times, want once", fake.calls)
			}
			if fake.customerIDs[0] != *tt.wantCustomer {
				t.Errorf("Apply got customerId %q, want %q", fake.customerIDs[0], *tt.wantCustomer)
			}
			if fake.clientIDs[0] != "" {
				t.Errorf("Apply got clientId %q, want empty", fake.clientIDs[0])
			}
		})
	}
}

func checkPublicKeyInfo(tb testing.TB, a answer) {
	tb.Helper()
	pki := a.resp.PublicKeyInfo
	if pki == nil {
		tb.Fatalf("no publicKeyInfo in %s", a.raw)
	}
	want := newIssued()
	if pki.UniqueID != want.UniqueID || pki.Salt != want.Salt {
		tb.Errorf("publicKeyInfo = %+v, want uniqueId %q salt %q", pki, want.UniqueID, want.Salt)
	}
	der, err := base64.StdEncoding.Strict().DecodeString(pki.PublicKey)
	if err != nil {
		tb.Fatalf("publicKey %q is not standard base64: %v", pki.PublicKey, err)
	}
	if !bytes.Equal(der, want.PublicKey) {
		tb.Errorf("publicKey decodes to %x, want %x", der, want.PublicKey)
	}
	if got := a.header.Get("Cache-Control"); got != "no-store" {
		tb.Errorf("Cache-Control = %q, want no-store", got)
	}
}

// TestApplyOverHTTP runs a request through a real server and client, so
// the oversized body goes through a real connection.
func TestApplyOverHTTP(t *testing.T) {
	fake := &fakeIssuer{issued: newIssued()}
	mux := http.NewServeMux()
	mux.Handle("/ams/api/", newHandler(fake))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	post := func(body string) publicapi.Response {
		t.Helper()
		resp, err := srv.Client().Post(srv.URL+publicapi.ApplyPath, "application/json; charset=UTF-8", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK {
			t.Errorf("HTTP status = %d, want 200; body %s", resp.StatusCode, raw)
		}
		checkAllStrings(t, raw)
		var r publicapi.Response
		if err := json.Unmarshal(raw, &r); err != nil {
			t.Fatalf("body %q: %v", raw, err)
		}
		return r
	}
	if r := post(`{"customerId":"2188000123456789"}`); r.Result.ResultCode != "SUCCESS" || r.PublicKeyInfo == nil {
		t.Errorf("apply = %+v, want SUCCESS with publicKeyInfo", r)
	}
	if r := post(padTo(`{"pad":"`, `"}`, 64<<10)); r.Result.ResultCode != "PARAM_ILLEGAL" || r.Result.ResultStatus != "F" {
		t.Errorf("oversized apply = %+v, want PARAM_ILLEGAL/F", r.Result)
	}
}

func ptr(s string) *string { return &s }

// padTo returns prefix + 'x'... + suffix of exactly n bytes.
func padTo(prefix, suffix string, n int) string {
	return prefix + strings.Repeat("x", n-len(prefix)-len(suffix)) + suffix
}

// FuzzApplyBody sends arbitrary bodies to applyPublicKey: the handler never
// panics, and always answers HTTP 200 with a result whose status is S, F or
// U, every value a string.
func FuzzApplyBody(f *testing.F) {
	f.Add([]byte(`{"customerId":"2188000123456789"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		fake := &fakeIssuer{issued: newIssued()}
		a := do(t, newHandler(fake), http.MethodPost, publicapi.ApplyPath, jsonType, body)
		if a.status != http.StatusOK {
			t.Fatalf("HTTP status = %d, want 200; body %s", a.status, a.raw)
		}
		checkAllStrings(t, a.raw)
		r := a.resp.Result
		switch {
		case r.ResultStatus == "S" && r.ResultCode == "SUCCESS":
			if a.resp.PublicKeyInfo == nil {
				t.Fatalf("SUCCESS without publicKeyInfo: %s", a.raw)
			}
		case r.ResultStatus == "F" && r.ResultCode == "PARAM_ILLEGAL":
			if a.resp.PublicKeyInfo != nil {
				t.Fatalf("PARAM_ILLEGAL with publicKeyInfo: %s", a.raw)
			}
		case r.ResultStatus == "U" && r.ResultCode == "UNKNOWN_EXCEPTION":
		default:
			t.Fatalf("result %s/%s, want SUCCESS/S, PARAM_ILLEGAL/F or UNKNOWN_EXCEPTION/U; body %s", r.ResultCode, r.ResultStatus, a.raw)
		}
		if r.ResultMessage == "" {
			t.Fatalf("empty resultMessage: %s", a.raw)
		}
		fake.mu.Lock()
		defer fake.mu.Unlock()
		if r.ResultStatus == "S" {
			if fake.calls != 1 {
				t.Fatalf("SUCCESS after %d Apply calls", fake.calls)
			}
			id := fake.customerIDs[0]
			if id != "" && (len(id) > 32 || !strings.HasPrefix(id, "21") || strings.Trim(id, "0123456789") != "") {
				t.Fatalf("Apply got invalid customerId %q", id)
			}
		} else if fake.calls != 0 {
			t.Fatalf("Apply called for a rejected body")
		}
	})
}
