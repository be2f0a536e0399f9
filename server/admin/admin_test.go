package admin

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
)

type fakeSource struct{ rd Readiness }

func (f *fakeSource) Readiness(context.Context) Readiness { return f.rd }
func (f *fakeSource) Status(context.Context) Status {
	return Status{Version: "v1", Token: Token{Label: "t", Ready: f.rd.Token}}
}

func TestHandler(t *testing.T) {
	src := &fakeSource{rd: Readiness{Ready: true, Token: true, Store: true, PoolReady: 3}}
	metrics := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("m 1\n")) })
	h := New(src, metrics)
	get := func(method, path string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(method, path, nil))
		return rec
	}
	tests := []struct {
		name       string
		method     string
		path       string
		ready      bool
		wantStatus int
	}{
		{"healthz", "GET", HealthzPath, true, 200},
		{"healthz while not ready", "GET", HealthzPath, false, 200},
		{"readyz", "GET", ReadyzPath, true, 200},
		{"readyz not ready", "GET", ReadyzPath, false, 503},
		{"status", "GET", StatusPath, true, 200},
		{"metrics", "GET", MetricsPath, true, 200},
		{"post", "POST", StatusPath, true, 405},
		{"unknown", "GET", "/debug/pprof/", true, 404},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src.rd.Ready, src.rd.Token = tt.ready, tt.ready
			if rec := get(tt.method, tt.path); rec.Code != tt.wantStatus {
				t.Errorf("%s %s = %d, want %d", tt.method, tt.path, rec.Code, tt.wantStatus)
			}
		})
	}
	src.rd.Ready, src.rd.Token = true, true
	var s Status
	if err := json.NewDecoder(get("GET", StatusPath).Body).Decode(&s); err != nil || s.Version != "v1" || !s.Token.Ready {
		t.Errorf("status %+v, %v", s, err)
	}
	var rd Readiness
	if err := json.NewDecoder(get("GET", ReadyzPath).Body).Decode(&rd); err != nil || rd.PoolReady != 3 {
		t.Errorf("readiness %+v, %v", rd, err)
	}
}
