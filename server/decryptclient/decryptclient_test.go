package decryptclient_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/decryptclient"
)

// fakeDaemon answers on a Unix socket with the scripted answers in turn,
// repeating the last, and records the requests.
type fakeDaemon struct {
	mu       sync.Mutex
	answers  []answer
	requests []map[string]string
	paths    []string
}

type answer struct {
	status int
	body   string
}

func errBody(code, msg string) string {
	b, _ := json.Marshal(map[string]any{"error": map[string]string{"code": code, "message": msg}})
	return string(b)
}

func (f *fakeDaemon) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var req map[string]string
	if r.Method == http.MethodPost {
		b, _ := io.ReadAll(r.Body)
		json.Unmarshal(b, &req)
	}
	f.requests = append(f.requests, req)
	f.paths = append(f.paths, r.Method+" "+r.URL.Path)
	a := f.answers[min(len(f.requests), len(f.answers))-1]
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(a.status)
	io.WriteString(w, a.body)
}

func (f *fakeDaemon) calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.requests)
}

// serve starts f on a Unix socket and returns a client for it with quick
// retries.
func serve(t *testing.T, f *fakeDaemon) *decryptclient.Client {
	t.Helper()
	dir, err := os.MkdirTemp("", "dc") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "d.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(f)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	c := decryptclient.New(sock)
	c.Backoff = time.Millisecond
	return c
}

var (
	password   = []byte("correct horse\x00\xff")
	ciphertext = []byte{0xfb, 0xff, 0xbf, 0x01}
	uniqueID   = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
)

func okBody() string {
	return `{"password":"` + base64.StdEncoding.EncodeToString(password) + `"}`
}

func TestDecrypt(t *testing.T) {
	f := &fakeDaemon{answers: []answer{{200, okBody()}}}
	c := serve(t, f)
	got, err := c.Decrypt(context.Background(), uniqueID, ciphertext)
	if err != nil || string(got) != string(password) {
		t.Fatalf("Decrypt = %q, %v; want %q", got, err, password)
	}
	req := f.requests[0]
	if f.paths[0] != "POST /v1/decrypt" || req["uniqueId"] != uniqueID ||
		req["ciphertext"] != base64.StdEncoding.EncodeToString(ciphertext) || len(req) != 2 {
		t.Errorf("request %s %v", f.paths[0], req)
	}

	if _, err := c.DecryptWithPadding(context.Background(), uniqueID, ciphertext, "oaep-sha1"); err != nil {
		t.Fatal(err)
	}
	if p := f.requests[1]["padding"]; p != "oaep-sha1" {
		t.Errorf("padding sent = %q, want oaep-sha1", p)
	}
}

func TestDecryptErrors(t *testing.T) {
	tests := []struct {
		code      string
		status    int
		retryable bool
	}{
		{decryptclient.ParamIllegal, 400, false},
		{decryptclient.Forbidden, 403, false},
		{decryptclient.KeyNotFound, 404, false},
		{decryptclient.KeyConsumed, 410, false},
		{decryptclient.KeyExpired, 410, false},
		{decryptclient.KeyLost, 410, false},
		{decryptclient.DecryptFailed, 422, false},
		{decryptclient.Internal, 500, false},
		{decryptclient.HSMUnavailable, 503, true},
	}
	for _, tt := range tests {
		t.Run(tt.code, func(t *testing.T) {
			f := &fakeDaemon{answers: []answer{{tt.status, errBody(tt.code, "msg for "+tt.code)}}}
			c := serve(t, f)
			got, err := c.Decrypt(context.Background(), uniqueID, ciphertext)
			var e *decryptclient.Error
			if !errors.As(err, &e) {
				t.Fatalf("Decrypt = %q, %v; want an *Error", got, err)
			}
			if e.Code != tt.code || e.Status != tt.status || e.Message != "msg for "+tt.code || e.Retryable() != tt.retryable {
				t.Errorf("error %+v, retryable %v", e, e.Retryable())
			}
			// Only the retryable error is tried again, Attempts times in all.
			want := 1
			if tt.retryable {
				want = c.Attempts
			}
			if n := f.calls(); n != want {
				t.Errorf("%d requests, want %d", n, want)
			}
		})
	}
}

func TestDecryptRetriesUntilTheTokenIsBack(t *testing.T) {
	f := &fakeDaemon{answers: []answer{
		{503, errBody(decryptclient.HSMUnavailable, "down")},
		{503, errBody(decryptclient.HSMUnavailable, "down")},
		{200, okBody()},
	}}
	c := serve(t, f)
	got, err := c.Decrypt(context.Background(), uniqueID, ciphertext)
	if err != nil || string(got) != string(password) {
		t.Fatalf("Decrypt = %q, %v", got, err)
	}
	if n := f.calls(); n != 3 {
		t.Errorf("%d requests, want 3", n)
	}
	for i, r := range f.requests {
		if r["uniqueId"] != uniqueID || r["ciphertext"] != base64.StdEncoding.EncodeToString(ciphertext) {
			t.Errorf("request %d: %v; every try must send the same body", i, r)
		}
	}
}

func TestDecryptStopsRetryingWhenCancelled(t *testing.T) {
	f := &fakeDaemon{answers: []answer{{503, errBody(decryptclient.HSMUnavailable, "down")}}}
	c := serve(t, f)
	c.Backoff = time.Hour
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := c.Decrypt(ctx, uniqueID, ciphertext)
		done <- err
	}()
	for f.calls() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Decrypt = %v, want context.Canceled", err)
	}
	if n := f.calls(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

func TestUnexpectedAnswers(t *testing.T) {
	tests := []struct {
		name string
		a    answer
	}{
		{"HTML from a proxy", answer{502, "<html>bad gateway</html>"}},
		{"error without a code", answer{400, `{"error":{}}`}},
		// Not the daemon's HSM_UNAVAILABLE: never retried.
		{"503 without a code", answer{503, `{"status":"degraded"}`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeDaemon{answers: []answer{tt.a}}
			c := serve(t, f)
			_, err := c.Decrypt(context.Background(), uniqueID, ciphertext)
			var e *decryptclient.Error
			if !errors.As(err, &e) || e.Code != decryptclient.Internal || e.Status != tt.a.status {
				t.Errorf("Decrypt = %v, want INTERNAL with HTTP %d", err, tt.a.status)
			}
			if n := f.calls(); n != 1 {
				t.Errorf("%d requests, want 1", n)
			}
		})
	}
}

func TestNoDaemon(t *testing.T) {
	c := decryptclient.New(filepath.Join(t.TempDir(), "none.sock"))
	_, err := c.Decrypt(context.Background(), uniqueID, ciphertext)
	var e *decryptclient.Error
	if err == nil || errors.As(err, &e) {
		t.Errorf("Decrypt without a daemon = %v, want a transport error", err)
	}
}

func TestKeyAndHealth(t *testing.T) {
	key := `{"uniqueId":"` + uniqueID + `","state":"consumed","issuedAt":"2030-01-01T00:00:00Z",` +
		`"expiresAt":"2030-01-01T00:10:00Z","closedAt":"2030-01-01T00:01:00Z","consumedAt":"2030-01-01T00:01:00Z"}`
	f := &fakeDaemon{answers: []answer{{200, key}}}
	c := serve(t, f)
	k, err := c.Key(context.Background(), uniqueID)
	if err != nil || k.State != "consumed" || k.ConsumedAt != "2030-01-01T00:01:00Z" || k.UniqueID != uniqueID {
		t.Errorf("Key = %+v, %v", k, err)
	}
	if f.paths[0] != "GET /v1/keys/"+uniqueID {
		t.Errorf("request %s", f.paths[0])
	}

	degraded := `{"status":"degraded","tokenReady":false}`
	c = serve(t, &fakeDaemon{answers: []answer{{503, degraded}}})
	h, err := c.Health(context.Background())
	var e *decryptclient.Error
	if string(h) != degraded || !errors.As(err, &e) || e.Code != decryptclient.HSMUnavailable {
		t.Errorf("Health = %s, %v; want the report and HSM_UNAVAILABLE", h, err)
	}
}
