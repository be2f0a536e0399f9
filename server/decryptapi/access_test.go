package decryptapi_test

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/decryptapi"
	"github.com/keyissuer/keyissuer/server/peercred"
)

// lockedBuffer is a log sink for concurrent handlers.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestPeerAccess(t *testing.T) {
	const stranger = 64123
	policy := peercred.Policy{UIDs: []uint32{64001}, GIDs: []uint32{64002}}
	tests := []struct {
		name   string
		peer   *peercred.Cred
		policy peercred.Policy
		want   bool
	}{
		{"self, default policy", &self, peercred.Policy{}, true},
		{"root, default policy", &peercred.Cred{UID: 0, GID: 0, PID: 1}, peercred.Policy{}, true},
		{"stranger, default policy", &peercred.Cred{UID: stranger, GID: stranger, PID: 4242}, peercred.Policy{}, false},
		{"listed uid", &peercred.Cred{UID: 64001, GID: stranger, PID: 4242}, policy, true},
		{"listed gid", &peercred.Cred{UID: stranger, GID: 64002, PID: 4242}, policy, true},
		{"listed supplementary gid", &peercred.Cred{UID: stranger, GID: stranger, Groups: []uint32{64002}, PID: 4242}, policy, true},
		{"stranger", &peercred.Cred{UID: stranger, GID: stranger, Groups: []uint32{64003}, PID: 4242}, policy, false},
		{"unknown peer", nil, policy, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if self.UID == stranger {
				// Never in CI, which runs as root; a gap there.
				if os.Getenv("CI") == "true" {
					t.Fatalf("the test runs as uid %d, the stranger's", stranger)
				}
				t.Skipf("the test runs as uid %d, the stranger's (never in CI, which runs as root)", stranger)
			}
			var logs lockedBuffer
			fake := &fakeIssuer{password: testPassword, record: newRecord(), stats: issuer.Stats{TokenReady: true}}
			h := decryptapi.New(fake, decryptapi.Config{
				Log:   slog.New(slog.NewJSONHandler(&logs, nil)),
				Peers: tt.policy,
			})
			requests := []struct{ method, path string }{
				{http.MethodPost, "/v1/decrypt"},
				{http.MethodGet, "/v1/keys/" + testID},
				{http.MethodGet, "/v1/health"},
				{http.MethodGet, "/nowhere"},
			}
			for _, rq := range requests {
				a := doAs(t, h, tt.peer, rq.method, rq.path, decryptBody(testID, testCTB64))
				if !tt.want {
					if a.status != http.StatusForbidden {
						t.Errorf("%s %s: HTTP %d, want 403; body %s", rq.method, rq.path, a.status, a.raw)
					}
					if code, _ := errorCode(t, a); code != decryptapi.CodeForbidden {
						t.Errorf("%s %s: code %s, want FORBIDDEN", rq.method, rq.path, code)
					}
					continue
				}
				if a.status == http.StatusForbidden {
					t.Errorf("%s %s: refused an allowed peer: %s", rq.method, rq.path, a.raw)
				}
			}
			fake.mu.Lock()
			calls, records := fake.calls, len(fake.recordIDs)
			fake.mu.Unlock()
			if !tt.want && (calls != 0 || records != 0) {
				t.Errorf("a refused peer reached the issuer: %d decrypts, %d record reads", calls, records)
			}
			if tt.want {
				if strings.Contains(logs.String(), "refused") {
					t.Errorf("an allowed peer was logged as refused:\n%s", logs.String())
				}
				return
			}
			// One audit line per refusal, with the peer's ids.
			lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
			if len(lines) != len(requests) {
				t.Fatalf("%d log lines for %d refusals:\n%s", len(lines), len(requests), logs.String())
			}
			var rec map[string]any
			if err := json.Unmarshal([]byte(lines[0]), &rec); err != nil {
				t.Fatal(err)
			}
			if tt.peer != nil && (rec["uid"] != float64(tt.peer.UID) || rec["gid"] != float64(tt.peer.GID) || rec["pid"] != float64(tt.peer.PID)) {
				t.Errorf("log line %s lacks the peer's uid, gid and pid", lines[0])
			}
			if rec["level"] != "WARN" {
				t.Errorf("log line %s: level %v, want WARN", lines[0], rec["level"])
			}
		})
	}
}

func TestDecryptPadding(t *testing.T) {
	body := func(padding string) []byte {
		b, _ := json.Marshal(map[string]string{"uniqueId": testID, "ciphertext": testCTB64, "padding": padding})
		return b
	}
	tests := []struct {
		name        string
		allow       bool
		body        []byte
		wantHTTP    int
		wantPadding hsm.Padding // passed to the issuer, when it is called
	}{
		{"no padding field, not allowed", false, decryptBody(testID, testCTB64), http.StatusOK, ""},
		{"no padding field, allowed", true, decryptBody(testID, testCTB64), http.StatusOK, ""},
		{"padding named, allowed", true, body("pkcs1v15"), http.StatusOK, hsm.PKCS1v15},
		{"unknown padding passed on for the issuer to refuse", true, body("oaep-md5"), http.StatusOK, "oaep-md5"},
		{"padding named, not allowed", false, body("oaep-sha256"), http.StatusBadRequest, ""},
		{"empty padding", true, body(""), http.StatusBadRequest, ""},
		{"padding not a string", true, []byte(`{"uniqueId":"` + testID + `","ciphertext":"` + testCTB64 + `","padding":1}`), http.StatusBadRequest, ""},
		{"duplicate padding", true, []byte(`{"uniqueId":"` + testID + `","ciphertext":"` + testCTB64 + `","padding":"oaep-sha1","padding":"oaep-sha1"}`), http.StatusBadRequest, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeIssuer{password: testPassword}
			h := decryptapi.New(fake, decryptapi.Config{AllowClientPadding: tt.allow})
			a := do(t, h, http.MethodPost, "/v1/decrypt", tt.body)
			if a.status != tt.wantHTTP {
				t.Fatalf("HTTP %d, want %d; body %s", a.status, tt.wantHTTP, a.raw)
			}
			fake.mu.Lock()
			defer fake.mu.Unlock()
			if tt.wantHTTP != http.StatusOK {
				if code, _ := errorCode(t, a); code != decryptapi.CodeParamIllegal {
					t.Errorf("code %s, want PARAM_ILLEGAL", code)
				}
				if fake.calls != 0 {
					t.Errorf("the issuer was called for a refused padding")
				}
				return
			}
			if fake.calls != 1 || fake.paddings[0] != tt.wantPadding {
				t.Errorf("issuer called %d times with paddings %q, want once with %q", fake.calls, fake.paddings, tt.wantPadding)
			}
		})
	}
}
