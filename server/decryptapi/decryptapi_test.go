package decryptapi_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/decryptapi"
	"github.com/keyissuer/keyissuer/server/peercred"
)

// fakeIssuer answers Decrypt with password or decryptErr, Record with
// record or recordErr, and Stats with stats. It records Decrypt's calls.
type fakeIssuer struct {
	password   []byte
	decryptErr error
	record     store.Record
	recordErr  error
	stats      issuer.Stats

	mu          sync.Mutex
	calls       int
	ids         []string
	ciphertexts [][]byte
	paddings    []hsm.Padding
	recordIDs   []string
}

var _ decryptapi.Issuer = (*fakeIssuer)(nil)

func (f *fakeIssuer) DecryptWithPadding(ctx context.Context, uniqueID string, ciphertext []byte, p hsm.Padding) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.ids = append(f.ids, uniqueID)
	f.ciphertexts = append(f.ciphertexts, bytes.Clone(ciphertext))
	f.paddings = append(f.paddings, p)
	if f.decryptErr != nil {
		return nil, f.decryptErr
	}
	// A copy: the handler clears the password it gets.
	return bytes.Clone(f.password), nil
}

func (f *fakeIssuer) Record(ctx context.Context, uniqueID string) (store.Record, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.recordIDs = append(f.recordIDs, uniqueID)
	if f.recordErr != nil {
		return store.Record{}, f.recordErr
	}
	return f.record, nil
}

func (f *fakeIssuer) Stats() issuer.Stats { return f.stats }

const testID = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"

var (
	// testCiphertext has bytes that base64 to '+' and '/', so that
	// URL-safe base64 of it differs from the standard encoding.
	testCiphertext = append(bytes.Repeat([]byte{0xfb, 0xff, 0xbf}, 85), 0x01)
	testCTB64      = base64.StdEncoding.EncodeToString(testCiphertext)
	testPassword   = []byte("hunter2\xff\x00salt")
)

func newHandler(is decryptapi.Issuer) http.Handler {
	return decryptapi.New(is, decryptapi.Config{Log: slog.New(slog.DiscardHandler)})
}

// self is the test's own identity, which the default policy allows.
var self = peercred.Cred{UID: uint32(os.Geteuid()), GID: uint32(os.Getegid()), PID: int32(os.Getpid())}

type answer struct {
	status int
	header http.Header
	raw    []byte
}

// do sends a request from the test's own user.
func do(tb testing.TB, h http.Handler, method, path string, body []byte) answer {
	tb.Helper()
	return doAs(tb, h, &self, method, path, body)
}

// doAs sends a request from peer c; nil for none known.
func doAs(tb testing.TB, h http.Handler, c *peercred.Cred, method, path string, body []byte) answer {
	tb.Helper()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req := httptest.NewRequest(method, path, r)
	if c != nil {
		req = req.WithContext(peercred.NewContext(req.Context(), *c))
	}
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return answer{status: rec.Code, header: rec.Header(), raw: rec.Body.Bytes()}
}

// errorCode decodes an error body and returns its code, failing on any
// other shape.
func errorCode(tb testing.TB, a answer) (code, msg string) {
	tb.Helper()
	var e struct {
		Error *decryptapi.ErrorBody `json:"error"`
	}
	dec := json.NewDecoder(bytes.NewReader(a.raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil || e.Error == nil {
		tb.Fatalf("HTTP %d body %q is not an error object: %v", a.status, a.raw, err)
	}
	if e.Error.Code == "" || e.Error.Message == "" {
		tb.Fatalf("error body %s lacks a code or a message", a.raw)
	}
	if ct := a.header.Get("Content-Type"); ct != "application/json" {
		tb.Errorf("Content-Type = %q, want application/json", ct)
	}
	return e.Error.Code, e.Error.Message
}

func decryptBody(id, ct string) []byte {
	b, _ := json.Marshal(map[string]string{"uniqueId": id, "ciphertext": ct})
	return b
}

func TestDecrypt(t *testing.T) {
	tests := []struct {
		name      string
		issuerErr error
		wantHTTP  int
		wantCode  string
	}{
		{"not found", issuer.ErrNotFound, http.StatusNotFound, decryptapi.CodeKeyNotFound},
		{"consumed", issuer.ErrConsumed, http.StatusGone, decryptapi.CodeKeyConsumed},
		{"expired", issuer.ErrExpired, http.StatusGone, decryptapi.CodeKeyExpired},
		{"lost", issuer.ErrLost, http.StatusGone, decryptapi.CodeKeyLost},
		{"decrypt failed", issuer.ErrDecrypt, http.StatusUnprocessableEntity, decryptapi.CodeDecryptFailed},
		{"abandoned", issuer.ErrAbandoned, http.StatusGone, decryptapi.CodeDecryptAbandoned},
		{"wrapped decrypt failed", fmt.Errorf("token: %w", issuer.ErrDecrypt), http.StatusUnprocessableEntity, decryptapi.CodeDecryptFailed},
		// As the issuer wraps it.
		{"ciphertext length", fmt.Errorf("%w: got 3 bytes, want 256", issuer.ErrCiphertext), http.StatusBadRequest, decryptapi.CodeParamIllegal},
		{"token unavailable", issuer.ErrUnavailable, http.StatusServiceUnavailable, decryptapi.CodeHSMUnavailable},
		{"padding not accepted", issuer.ErrPadding, http.StatusBadRequest, decryptapi.CodeParamIllegal},
		{"deadline", context.DeadlineExceeded, http.StatusServiceUnavailable, decryptapi.CodeHSMUnavailable},
		{"unknown error", errors.New("bbolt: secret-cause at page 7"), http.StatusInternalServerError, decryptapi.CodeInternal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeIssuer{password: testPassword, decryptErr: tt.issuerErr}
			a := do(t, newHandler(fake), http.MethodPost, "/v1/decrypt", decryptBody(testID, testCTB64))
			if a.status != tt.wantHTTP {
				t.Errorf("HTTP status = %d, want %d; body %s", a.status, tt.wantHTTP, a.raw)
			}
			if code, _ := errorCode(t, a); code != tt.wantCode {
				t.Errorf("code = %s, want %s", code, tt.wantCode)
			}
			if bytes.Contains(a.raw, []byte("secret-cause")) {
				t.Errorf("body leaks the issuer error's text: %s", a.raw)
			}
			if bytes.Contains(a.raw, []byte("password")) {
				t.Errorf("error body mentions a password: %s", a.raw)
			}
			checkCalled(t, fake)
		})
	}
}

// checkCalled checks that Decrypt was called once, with the request's id
// and decoded ciphertext.
func checkCalled(tb testing.TB, fake *fakeIssuer) {
	tb.Helper()
	fake.mu.Lock()
	defer fake.mu.Unlock()
	if fake.calls != 1 {
		tb.Fatalf("Decrypt called %d times, want once", fake.calls)
	}
	if fake.ids[0] != testID || !bytes.Equal(fake.ciphertexts[0], testCiphertext) {
		tb.Errorf("Decrypt(%q, %x), want (%q, %x)", fake.ids[0], fake.ciphertexts[0], testID, testCiphertext)
	}
}

func TestDecryptSuccess(t *testing.T) {
	fake := &fakeIssuer{password: testPassword}
	a := do(t, newHandler(fake), http.MethodPost, "/v1/decrypt", decryptBody(testID, testCTB64))
	if a.status != http.StatusOK {
		t.Fatalf("HTTP status = %d, want 200; body %s", a.status, a.raw)
	}
	if ct := a.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	if cc := a.header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("Cache-Control = %q, want no-store", cc)
	}
	var got map[string]any
	if err := json.Unmarshal(a.raw, &got); err != nil {
		t.Fatalf("body %q: %v", a.raw, err)
	}
	if len(got) != 1 {
		t.Errorf("body %s has fields other than password", a.raw)
	}
	pw, ok := got["password"].(string)
	if !ok {
		t.Fatalf("password is %T, want a string; body %s", got["password"], a.raw)
	}
	dec, err := base64.StdEncoding.Strict().DecodeString(pw)
	if err != nil {
		t.Fatalf("password %q is not standard base64: %v", pw, err)
	}
	if !bytes.Equal(dec, testPassword) {
		t.Errorf("password = %q, want %q", dec, testPassword)
	}
	checkCalled(t, fake)
}

func TestDecryptMalformed(t *testing.T) {
	tooBig := `{"uniqueId":"` + testID + `","ciphertext":"` + testCTB64 + `","pad":"` + strings.Repeat("x", 8<<10) + `"}`
	tests := []struct {
		name string
		body string
	}{
		{"empty body", ``},
		{"not JSON", `uniqueId=x`},
		{"top-level array", `[]`},
		{"trailing data", string(decryptBody(testID, testCTB64)) + `{}`},
		{"trailing comma", `{"uniqueId":"` + testID + `","ciphertext":"` + testCTB64 + `",}`},
		{"duplicate uniqueId", `{"uniqueId":"` + testID + `","uniqueId":"` + testID + `","ciphertext":"` + testCTB64 + `"}`},
		{"missing uniqueId", `{"ciphertext":"` + testCTB64 + `"}`},
		{"uniqueId too short", string(decryptBody(testID[:31], testCTB64))},
		{"uniqueId too long", string(decryptBody(testID+"6", testCTB64))},
		{"uniqueId with a dash", string(decryptBody(testID[:31]+"-", testCTB64))},
		{"uniqueId with an underscore", string(decryptBody("_"+testID[1:], testCTB64))},
		{"uniqueId with a space", string(decryptBody(testID[:16]+" "+testID[17:], testCTB64))},
		{"uniqueId with non-ASCII", string(decryptBody(testID[:30]+"é", testCTB64))},
		{"uniqueId as number", `{"uniqueId":12345678901234567890123456789012,"ciphertext":"` + testCTB64 + `"}`},
		{"missing ciphertext", `{"uniqueId":"` + testID + `"}`},
		{"empty ciphertext", string(decryptBody(testID, ""))},
		{"ciphertext as number", `{"uniqueId":"` + testID + `","ciphertext":1234}`},
		{"ciphertext as array", `{"uniqueId":"` + testID + `","ciphertext":["` + testCTB64 + `"]}`},
		{"ciphertext null", `{"uniqueId":"` + testID + `","ciphertext":null}`},
		{"non-base64 ciphertext", string(decryptBody(testID, "not base64!"))},
		{"URL-safe base64 ciphertext", string(decryptBody(testID, base64.URLEncoding.EncodeToString(testCiphertext)))},
		{"unpadded base64 ciphertext", string(decryptBody(testID, base64.RawStdEncoding.EncodeToString(testCiphertext)))},
		{"base64 with non-zero trailing bits", string(decryptBody(testID, "AB=="))},
		{"base64 with a space", string(decryptBody(testID, testCTB64[:4]+" "+testCTB64[4:]))},
		{"oversized body", tooBig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeIssuer{password: testPassword}
			a := do(t, newHandler(fake), http.MethodPost, "/v1/decrypt", []byte(tt.body))
			if a.status != http.StatusBadRequest {
				t.Errorf("HTTP status = %d, want 400; body %s", a.status, a.raw)
			}
			if code, _ := errorCode(t, a); code != decryptapi.CodeParamIllegal {
				t.Errorf("code = %s, want %s", code, decryptapi.CodeParamIllegal)
			}
			if bytes.Contains(a.raw, []byte(testCTB64[:40])) {
				t.Errorf("error echoes the ciphertext: %s", a.raw)
			}
			fake.mu.Lock()
			defer fake.mu.Unlock()
			if fake.calls != 0 {
				t.Errorf("Decrypt called %d times for a malformed request", fake.calls)
			}
		})
	}
}

func TestRouting(t *testing.T) {
	tests := []struct {
		name      string
		method    string
		path      string
		wantHTTP  int
		wantCode  string
		wantAllow string
	}{
		{"GET decrypt", http.MethodGet, "/v1/decrypt", http.StatusMethodNotAllowed, decryptapi.CodeMethod, "POST"},
		{"PUT decrypt", http.MethodPut, "/v1/decrypt", http.StatusMethodNotAllowed, decryptapi.CodeMethod, "POST"},
		{"POST key", http.MethodPost, "/v1/keys/" + testID, http.StatusMethodNotAllowed, decryptapi.CodeMethod, "GET"},
		{"DELETE key", http.MethodDelete, "/v1/keys/" + testID, http.StatusMethodNotAllowed, decryptapi.CodeMethod, "GET"},
		{"POST health", http.MethodPost, "/v1/health", http.StatusMethodNotAllowed, decryptapi.CodeMethod, "GET"},
		{"root", http.MethodGet, "/", http.StatusNotFound, decryptapi.CodeNotFound, ""},
		{"unknown path", http.MethodPost, "/v1/encrypt", http.StatusNotFound, decryptapi.CodeNotFound, ""},
		{"unknown version", http.MethodPost, "/v2/decrypt", http.StatusNotFound, decryptapi.CodeNotFound, ""},
		{"decrypt with trailing slash", http.MethodPost, "/v1/decrypt/", http.StatusNotFound, decryptapi.CodeNotFound, ""},
		{"keys without id", http.MethodGet, "/v1/keys/", http.StatusNotFound, decryptapi.CodeNotFound, ""},
		{"keys with two segments", http.MethodGet, "/v1/keys/" + testID + "/salt", http.StatusNotFound, decryptapi.CodeNotFound, ""},
		{"key with a bad id", http.MethodGet, "/v1/keys/short", http.StatusBadRequest, decryptapi.CodeParamIllegal, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeIssuer{record: newRecord(), stats: issuer.Stats{TokenReady: true}}
			a := do(t, newHandler(fake), tt.method, tt.path, []byte(decryptBody(testID, testCTB64)))
			if a.status != tt.wantHTTP {
				t.Errorf("HTTP status = %d, want %d; body %s", a.status, tt.wantHTTP, a.raw)
			}
			if code, _ := errorCode(t, a); code != tt.wantCode {
				t.Errorf("code = %s, want %s", code, tt.wantCode)
			}
			if got := a.header.Get("Allow"); got != tt.wantAllow {
				t.Errorf("Allow = %q, want %q", got, tt.wantAllow)
			}
			fake.mu.Lock()
			defer fake.mu.Unlock()
			if fake.calls != 0 || len(fake.recordIDs) != 0 {
				t.Errorf("the issuer was called: %d decrypts, records %q", fake.calls, fake.recordIDs)
			}
		})
	}
}

const testSalt = "SALTsalt1234"

func newRecord() store.Record {
	return store.Record{
		UniqueID:   testID,
		Salt:       testSalt,
		CustomerID: "2188000123456789",
		ClientID:   "client-1",
		State:      store.Consumed,
		IssuedAt:   time.Date(2030, 1, 2, 3, 4, 5, 6, time.FixedZone("CST", 8*3600)),
		ExpiresAt:  time.Date(2030, 1, 2, 3, 14, 5, 6, time.FixedZone("CST", 8*3600)),
		ClosedAt:   time.Date(2030, 1, 2, 3, 5, 0, 0, time.FixedZone("CST", 8*3600)),
	}
}

func TestKey(t *testing.T) {
	open := newRecord()
	open.State, open.ClosedAt, open.ClientID = store.Issued, time.Time{}, ""
	tests := []struct {
		name   string
		record store.Record
		want   map[string]string
	}{
		{
			name:   "consumed",
			record: newRecord(),
			want: map[string]string{
				"uniqueId":   testID,
				"state":      "consumed",
				"customerId": "2188000123456789",
				"clientId":   "client-1",
				"issuedAt":   "2030-01-01T19:04:05.000000006Z",
				"expiresAt":  "2030-01-01T19:14:05.000000006Z",
				"closedAt":   "2030-01-01T19:05:00Z",
				"consumedAt": "2030-01-01T19:05:00Z",
			},
		},
		{
			name:   "issued",
			record: open,
			want: map[string]string{
				"uniqueId":   testID,
				"state":      "issued",
				"customerId": "2188000123456789",
				"issuedAt":   "2030-01-01T19:04:05.000000006Z",
				"expiresAt":  "2030-01-01T19:14:05.000000006Z",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeIssuer{record: tt.record}
			a := do(t, newHandler(fake), http.MethodGet, "/v1/keys/"+testID, nil)
			if a.status != http.StatusOK {
				t.Fatalf("HTTP status = %d, want 200; body %s", a.status, a.raw)
			}
			var got map[string]string
			if err := json.Unmarshal(a.raw, &got); err != nil {
				t.Fatalf("body %s: %v", a.raw, err)
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("body = %v, want %v", got, tt.want)
			}
			if bytes.Contains(bytes.ToLower(a.raw), []byte("salt")) || bytes.Contains(a.raw, []byte(testSalt)) {
				t.Errorf("body mentions the salt: %s", a.raw)
			}
			fake.mu.Lock()
			defer fake.mu.Unlock()
			if len(fake.recordIDs) != 1 || fake.recordIDs[0] != testID {
				t.Errorf("Record called with %q, want [%s]", fake.recordIDs, testID)
			}
		})
	}
}

func TestKeyErrors(t *testing.T) {
	tests := []struct {
		name     string
		err      error
		wantHTTP int
		wantCode string
	}{
		{"not found", issuer.ErrNotFound, http.StatusNotFound, decryptapi.CodeKeyNotFound},
		{"unknown error", errors.New("secret-cause"), http.StatusInternalServerError, decryptapi.CodeInternal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeIssuer{recordErr: tt.err}
			a := do(t, newHandler(fake), http.MethodGet, "/v1/keys/"+testID, nil)
			if a.status != tt.wantHTTP {
				t.Errorf("HTTP status = %d, want %d; body %s", a.status, tt.wantHTTP, a.raw)
			}
			if code, _ := errorCode(t, a); code != tt.wantCode {
				t.Errorf("code = %s, want %s", code, tt.wantCode)
			}
			if bytes.Contains(a.raw, []byte("secret-cause")) {
				t.Errorf("body leaks the error's text: %s", a.raw)
			}
		})
	}
}

func TestHealth(t *testing.T) {
	tests := []struct {
		name     string
		stats    issuer.Stats
		wantHTTP int
		want     decryptapi.HealthResponse
	}{
		{
			name:     "ok",
			stats:    issuer.Stats{TokenReady: true, PoolReady: 60, PoolSize: 64, Outstanding: 3, PendingDestroys: 1, Issued: 99},
			wantHTTP: http.StatusOK,
			want:     decryptapi.HealthResponse{Status: "ok", TokenReady: true, PoolReady: 60, PoolSize: 64, OutstandingKeys: 3, PendingDestroys: 1},
		},
		{
			name:     "degraded",
			stats:    issuer.Stats{TokenReady: false, PoolReady: 0, PoolSize: 64, Outstanding: 2},
			wantHTTP: http.StatusServiceUnavailable,
			want:     decryptapi.HealthResponse{Status: "degraded", PoolSize: 64, OutstandingKeys: 2},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := do(t, newHandler(&fakeIssuer{stats: tt.stats}), http.MethodGet, "/v1/health", nil)
			if a.status != tt.wantHTTP {
				t.Errorf("HTTP status = %d, want %d; body %s", a.status, tt.wantHTTP, a.raw)
			}
			if ct := a.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q, want application/json", ct)
			}
			var got decryptapi.HealthResponse
			dec := json.NewDecoder(bytes.NewReader(a.raw))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&got); err != nil {
				t.Fatalf("body %s: %v", a.raw, err)
			}
			if got != tt.want {
				t.Errorf("health = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestOverUnixSocket serves the handler on a Unix socket, as the daemon
// does, and decrypts through it.
func TestOverUnixSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "d.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Skipf("no Unix sockets here: %v", err)
	}
	fake := &fakeIssuer{password: testPassword, stats: issuer.Stats{TokenReady: true}}
	srv := httptest.NewUnstartedServer(newHandler(fake))
	srv.Config.ConnContext = peercred.ConnContext // the peer is this process
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	t.Cleanup(client.CloseIdleConnections)

	resp, err := client.Post("http://keyissuer/v1/decrypt", "application/json", bytes.NewReader(decryptBody(testID, testCTB64)))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var got decryptapi.DecryptResponse
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &got) != nil ||
		got.Password != base64.StdEncoding.EncodeToString(testPassword) {
		t.Errorf("decrypt over the socket: HTTP %d %s", resp.StatusCode, body)
	}

	big := bytes.NewReader([]byte(`{"pad":"` + strings.Repeat("x", 1<<20) + `"}`))
	resp, err = client.Post("http://keyissuer/v1/decrypt", "application/json", big)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !bytes.Contains(body, []byte(decryptapi.CodeParamIllegal)) {
		t.Errorf("oversized decrypt over the socket: HTTP %d %s, want 400 PARAM_ILLEGAL", resp.StatusCode, body)
	}
}

// FuzzDecryptBody sends arbitrary bodies to /v1/decrypt with an issuer that
// always fails to decrypt: the handler never panics, never answers 500, and
// always answers a JSON error. Callers may name the padding, so that the
// field's checks are fuzzed too.
func FuzzDecryptBody(f *testing.F) {
	f.Add(decryptBody(testID, testCTB64))
	f.Fuzz(func(t *testing.T, body []byte) {
		fake := &fakeIssuer{decryptErr: issuer.ErrDecrypt}
		h := decryptapi.New(fake, decryptapi.Config{AllowClientPadding: true})
		a := do(t, h, http.MethodPost, "/v1/decrypt", body)
		code, _ := errorCode(t, a)
		switch {
		case a.status == http.StatusBadRequest && code == decryptapi.CodeParamIllegal:
			fake.mu.Lock()
			defer fake.mu.Unlock()
			if fake.calls != 0 {
				t.Fatalf("Decrypt called, then 400: %s", a.raw)
			}
		case a.status == http.StatusUnprocessableEntity && code == decryptapi.CodeDecryptFailed:
			fake.mu.Lock()
			defer fake.mu.Unlock()
			if fake.calls != 1 {
				t.Fatalf("DECRYPT_FAILED after %d Decrypt calls", fake.calls)
			}
			if err := decryptapi.ValidUniqueID(fake.ids[0]); err != nil {
				t.Fatalf("Decrypt called with bad uniqueId %q", fake.ids[0])
			}
			if len(fake.ciphertexts[0]) == 0 {
				t.Fatal("Decrypt called with an empty ciphertext")
			}
		default:
			t.Fatalf("HTTP %d %s, want 400 PARAM_ILLEGAL or 422 DECRYPT_FAILED; body %s", a.status, code, a.raw)
		}
	})
}
