// Package admin serves keyissuerd's admin listener: Prometheus metrics,
// liveness and readiness probes, and the status `keyissuer status` prints.
// It holds no secret and changes nothing; it is unauthenticated, so it
// belongs on loopback or a management network.
package admin

import (
	"context"
	"encoding/json"
	"net/http"
	"time"
)

// Paths served.
const (
	MetricsPath = "/metrics"
	HealthzPath = "/healthz" // the process is up
	ReadyzPath  = "/readyz"  // the daemon can issue and decrypt
	StatusPath  = "/v1/status"
)

// Readiness is the /readyz answer: 200 when Ready, else 503.
type Readiness struct {
	Ready bool `json:"ready"`
	// Token: logged in and answering. Store: the record store answers.
	// PoolReady: keys waiting in the pool; 0 means an apply would wait.
	Token     bool `json:"token"`
	Store     bool `json:"store"`
	PoolReady int  `json:"poolReady"`
}

// Status is the /v1/status answer.
type Status struct {
	Version   string    `json:"version"`
	StartedAt time.Time `json:"startedAt"`
	Token     Token     `json:"token"`
	Pool      Pool      `json:"pool"`
	Keys      Keys      `json:"keys"`
	Records   Records   `json:"records"`
	Reaper    Reaper    `json:"reaper"`
	Audit     Audit     `json:"audit"`
	Config    Config    `json:"config"`
	Listeners Listeners `json:"listeners"`
}

// Token describes the token.
type Token struct {
	Label        string            `json:"label"`
	Serial       string            `json:"serial"`
	Model        string            `json:"model"`
	Manufacturer string            `json:"manufacturer"`
	Ready        bool              `json:"ready"`
	Storage      string            `json:"storage"`
	KeyBits      int               `json:"keyBits"`
	Paddings     map[string]string `json:"paddings"` // padding → how the token does it
	// Signing is how the token signs answers: sha256-rsa-pkcs
	// (CKM_SHA256_RSA_PKCS), rsa-pkcs-digestinfo (SHA-256 in keyissuer,
	// CKM_RSA_PKCS in the token), or "" when answers are not signed.
	Signing    string `json:"signing"`
	Faults     uint64 `json:"faults"` // times found down
	Recoveries uint64 `json:"recoveries"`
}

// Pool describes the key pool.
type Pool struct {
	Ready          int     `json:"ready"`
	Target         int     `json:"target"`
	Generated      int64   `json:"generated"`
	GenerateErrors int64   `json:"generateErrors"`
	AvgGenerateSec float64 `json:"avgGenerateSeconds"` // token time per key
}

// Keys describes the keys in the token.
type Keys struct {
	Outstanding     int `json:"outstanding"` // issued, waiting for their decrypt
	PendingDestroys int `json:"pendingDestroys"`
	// OldestActiveIssuedAt is the issue time of the active (issued or
	// consuming) record that expires first; zero when there is none.
	OldestActiveIssuedAt time.Time `json:"oldestActiveIssuedAt,omitzero"`
	OldestActiveAgeSec   float64   `json:"oldestActiveAgeSeconds"`
}

// Records counts record state changes. Counting the store's records by
// state would read every record, too slow on a large store for a status
// call, so these are this process's counts since it started.
type Records struct {
	Scope    string `json:"scope"` // "since start"
	Issued   int64  `json:"issued"`
	Decrypts int64  `json:"decrypts"` // consumed
	Expired  int64  `json:"expired"`
	Lost     int64  `json:"lost"`
}

// Reaper says when the reaper last ran.
type Reaper struct {
	LastRun  time.Time `json:"lastRun,omitzero"`
	Interval string    `json:"interval"`
}

// Audit locates the head of the audit trail: anchor Seq and Head somewhere
// the host cannot rewrite, and a truncated trail shows.
type Audit struct {
	Path string `json:"path"`
	Seq  uint64 `json:"seq"`
	Head string `json:"head"`
}

// Config says what the configuration is and when it was last reloaded.
type Config struct {
	Path           string    `json:"path,omitempty"`
	LogLevel       string    `json:"logLevel"`
	LastReload     time.Time `json:"lastReload,omitzero"`
	LastReloadErr  string    `json:"lastReloadError,omitempty"`
	RestartPending []string  `json:"restartPending,omitempty"` // changed keys a reload cannot apply
}

// Listeners are the addresses served.
type Listeners struct {
	API     string `json:"api"`
	Decrypt string `json:"decrypt"`
	Admin   string `json:"admin"`
}

// Source is what the handler reports on; the daemon implements it. Its
// methods are safe for concurrent use.
type Source interface {
	Readiness(ctx context.Context) Readiness
	Status(ctx context.Context) Status
}

// New returns the admin handler. metrics serves /metrics.
func New(src Source, metrics http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET "+MetricsPath, metrics)
	mux.HandleFunc("GET "+HealthzPath, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET "+ReadyzPath, func(w http.ResponseWriter, r *http.Request) {
		rd := src.Readiness(r.Context())
		status := http.StatusOK
		if !rd.Ready {
			status = http.StatusServiceUnavailable
		}
		writeJSON(w, status, rd)
	})
	mux.HandleFunc("GET "+StatusPath, func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, src.Status(r.Context()))
	})
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}
