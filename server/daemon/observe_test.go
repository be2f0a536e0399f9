package daemon

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/metrics"
	"github.com/keyissuer/keyissuer/server/peercred"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// The socket's refusals are audited with who was refused; malformed
// requests and successes are not; the public API's answers are not audited
// here (it reports its refusals itself: onRefused); a decrypted password is
// never read.
func TestInstrumentAuditsRefusals(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	lg, err := audit.Open(path, audit.Options{Sync: audit.SyncNever})
	if err != nil {
		t.Fatal(err)
	}
	d := &Daemon{log: slog.New(slog.DiscardHandler)}
	d.ops = &ops{audit: lg, metrics: metrics.New(issuerStats{d}, tokenState{d}, "")}

	tests := []struct {
		name     string
		listener string
		path     string
		status   int
		body     string
		refused  bool
	}{
		{"signature", listenerPublic, publicapi.ApplyPath, 200, `{"result":{"resultCode":"INVALID_SIGNATURE","resultStatus":"F","resultMessage":"x"}}`, false},
		{"quota", listenerPublic, publicapi.ApplyPath, 200, `{"result":{"resultCode":"REQUEST_TRAFFIC_EXCEED_LIMIT","resultStatus":"U","resultMessage":"x"}}`, false},
		{"blocked", listenerPublic, publicapi.ApplyPath, 200, `{"result":{"resultCode":"USER_STATUS_ABNORMAL","resultStatus":"F","resultMessage":"x"}}`, false},
		{"param", listenerPublic, publicapi.ApplyPath, 200, `{"result":{"resultCode":"PARAM_ILLEGAL","resultStatus":"F","resultMessage":"x"}}`, false},
		{"retry", listenerPublic, publicapi.ApplyPath, 200, `{"result":{"resultCode":"UNKNOWN_EXCEPTION","resultStatus":"U","resultMessage":"x"}}`, false},
		{"success", listenerPublic, publicapi.ApplyPath, 200, `{"result":{"resultCode":"SUCCESS","resultStatus":"S","resultMessage":"x"}}`, false},
		{"peer", listenerSocket, "/v1/decrypt", 403, `{"error":{"code":"FORBIDDEN","message":"x"}}`, true},
		{"consumed", listenerSocket, "/v1/decrypt", 410, `{"error":{"code":"KEY_CONSUMED","message":"x"}}`, false},
		{"password", listenerSocket, "/v1/decrypt", 200, `{"password":"c2VjcmV0"}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seq, _ := lg.Head()
			h := d.instrument(tt.listener, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tt.status)
				w.Write([]byte(tt.body))
			}))
			req := httptest.NewRequest("POST", tt.path, nil)
			req.Header.Set("Client-Id", "MERCHANT_1")
			req = req.WithContext(peercred.NewContext(req.Context(), peercred.Cred{UID: 1001, GID: 1002, PID: 77}))
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Body.String() != tt.body || rec.Code != tt.status {
				t.Errorf("the answer changed: %d %s", rec.Code, rec.Body)
			}
			after, _ := lg.Head()
			if got := after > seq; got != tt.refused {
				t.Fatalf("audited %v, want %v", got, tt.refused)
			}
		})
	}
	lg.Close()
	b, _ := os.ReadFile(path)
	if bytes.Contains(b, []byte("c2VjcmV0")) {
		t.Error("a password reached the audit trail")
	}
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	var last map[string]any
	json.Unmarshal(lines[len(lines)-1], &last)
	if len(lines) != 1 {
		t.Errorf("%d audit lines, want the socket's one", len(lines))
	}
	if peer, _ := last["peer"].(map[string]any); last["code"] != "FORBIDDEN" || peer["uid"] != float64(1001) || peer["pid"] != float64(77) {
		t.Errorf("socket refusal line %v", last)
	}
}
