// Package decryptapi serves the local decrypt API that the wallet's
// password-decrypt service calls over a Unix socket: HTTP/1.1 and JSON, so
// that curl --unix-socket works. Errors are {"error": {"code", "message"}}
// with a stable code per outcome.
//
// Every request is checked against a [peercred.Policy] with the identity
// the kernel gives for the connection's peer, which the server puts in the
// request's context with [peercred.ConnContext]; a peer that is not allowed,
// or whose identity is unknown, gets 403 FORBIDDEN and a log line.
package decryptapi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"path"
	"strconv"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/jsonbody"
	"github.com/keyissuer/keyissuer/server/peercred"
)

// Issuer performs the one decrypt of a key; [*issuer.Issuer] implements it.
// Its methods are safe for concurrent use and return the issuer package's
// sentinel errors.
type Issuer interface {
	// DecryptWithPadding decrypts with padding p, "" for the default.
	DecryptWithPadding(ctx context.Context, uniqueID string, ciphertext []byte, p hsm.Padding) ([]byte, error)
	Record(ctx context.Context, uniqueID string) (store.Record, error)
	Stats() issuer.Stats
}

var _ Issuer = (*issuer.Issuer)(nil)

// Error codes.
const (
	CodeParamIllegal  = "PARAM_ILLEGAL"
	CodeKeyNotFound   = "KEY_NOT_FOUND"
	CodeKeyConsumed   = "KEY_CONSUMED"
	CodeKeyExpired    = "KEY_EXPIRED"
	CodeKeyLost       = "KEY_LOST"
	CodeDecryptFailed = "DECRYPT_FAILED"
	// CodeDecryptAbandoned: the caller gave up while its decrypt waited
	// for the token; nothing was decrypted, but the key is consumed.
	CodeDecryptAbandoned = "DECRYPT_ABANDONED"
	CodeHSMUnavailable   = "HSM_UNAVAILABLE"
	CodeForbidden        = "FORBIDDEN"
	CodeInternal         = "INTERNAL"
	CodeNotFound         = "NOT_FOUND"
	CodeMethod           = "METHOD_NOT_ALLOWED"
)

// maxBody bounds a request: a 4096-bit ciphertext is 684 base64 bytes.
const maxBody = 8 << 10

// Config sets up a Handler.
type Config struct {
	Log *slog.Logger
	// Peers says who may call. Its zero value allows only the daemon's
	// own user and root.
	Peers peercred.Policy
	// AllowClientPadding lets a decrypt name its padding in a "padding"
	// field, one of those the issuer accepts. Without it the field is
	// refused and the issuer's default padding applies.
	AllowClientPadding bool
}

// Handler serves the decrypt API.
type Handler struct {
	issuer Issuer
	cfg    Config
	log    *slog.Logger
	mux    *http.ServeMux
}

// New returns the handler.
func New(is Issuer, cfg Config) *Handler {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	h := &Handler{issuer: is, cfg: cfg, log: cfg.Log, mux: http.NewServeMux()}
	h.mux.HandleFunc("/v1/decrypt", only(http.MethodPost, h.decrypt))
	h.mux.HandleFunc("/v1/keys/{uniqueId}", only(http.MethodGet, h.key))
	h.mux.HandleFunc("/v1/health", only(http.MethodGet, h.health))
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, CodeNotFound, "no such endpoint")
	})
	return h
}

// only answers other methods with a JSON 405, as every error here is JSON.
func only(method string, fn http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != method {
			w.Header().Set("Allow", method)
			writeError(w, http.StatusMethodNotAllowed, CodeMethod, "use "+method)
			return
		}
		fn(w, r)
	}
}

// ServeHTTP implements http.Handler. Untidy paths get a JSON 404 here,
// where ServeMux would redirect with an HTML body.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !h.allowed(r) {
		writeError(w, http.StatusForbidden, CodeForbidden, "this user may not use the decrypt socket")
		return
	}
	if p := r.URL.Path; p == "" || path.Clean(p) != p {
		writeError(w, http.StatusNotFound, CodeNotFound, "no such endpoint")
		return
	}
	h.mux.ServeHTTP(w, r)
}

// allowed checks the peer before anything else is looked at, and logs a
// refusal with the peer's ids: the audit trail of who knocked.
func (h *Handler) allowed(r *http.Request) bool {
	c, err := peercred.FromContext(r.Context())
	if err != nil {
		h.log.Warn("decrypt socket: refused a request from an unknown peer", "err", err,
			"method", r.Method, "path", r.URL.Path)
		return false
	}
	if !h.cfg.Peers.Allows(c) {
		h.log.Warn("decrypt socket: refused a peer", "uid", c.UID, "gid", c.GID, "pid", c.PID,
			"groups", c.Groups, "method", r.Method, "path", r.URL.Path)
		return false
	}
	return true
}

// DecryptResponse is the answer to a successful decrypt.
type DecryptResponse struct {
	Password string `json:"password"` // standard base64 of the password bytes
}

func (h *Handler) decrypt(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		writeError(w, http.StatusBadRequest, CodeParamIllegal, "the body is too large or could not be read")
		return
	}
	f, err := jsonbody.Parse(body, "uniqueId", "ciphertext", "padding")
	if err != nil {
		writeError(w, http.StatusBadRequest, CodeParamIllegal, err.Error())
		return
	}
	id, ctB64 := f["uniqueId"], f["ciphertext"]
	if err := ValidUniqueID(id); err != nil {
		writeError(w, http.StatusBadRequest, CodeParamIllegal, err.Error())
		return
	}
	if ctB64 == "" {
		writeError(w, http.StatusBadRequest, CodeParamIllegal, "ciphertext is missing or empty")
		return
	}
	ct, err := base64.StdEncoding.Strict().DecodeString(ctB64)
	if err != nil {
		writeError(w, http.StatusBadRequest, CodeParamIllegal, "ciphertext is not valid standard base64")
		return
	}
	padding, named := f["padding"]
	switch {
	case named && !h.cfg.AllowClientPadding:
		writeError(w, http.StatusBadRequest, CodeParamIllegal, "padding may not be chosen by the caller here (decrypt.allow_client_padding is off); leave it out")
		return
	case named && padding == "":
		writeError(w, http.StatusBadRequest, CodeParamIllegal, "padding is empty; name one or leave it out")
		return
	}
	pw, err := h.issuer.DecryptWithPadding(r.Context(), id, ct, hsm.Padding(padding))
	if err != nil {
		status, code, msg := h.mapError(err, id)
		writeError(w, status, code, msg)
		return
	}
	buf := passwordBody(pw)
	clear(pw)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Length", strconv.Itoa(len(buf)))
	w.WriteHeader(http.StatusOK)
	w.Write(buf)
	clear(buf) // net/http's own write buffer keeps a copy: see README, "Security model"
}

// passwordBody returns {"password":"<base64 of pw>"}, encoded straight into
// one buffer that the caller zeroes once written: the password's only
// copies in keyissuer's own code are pw and this buffer.
func passwordBody(pw []byte) []byte {
	const head, tail = `{"password":"`, `"}`
	buf := make([]byte, len(head)+base64.StdEncoding.EncodedLen(len(pw))+len(tail))
	n := copy(buf, head)
	base64.StdEncoding.Encode(buf[n:], pw)
	copy(buf[len(buf)-len(tail):], tail)
	return buf
}

// mapError is the one place issuer errors become codes and statuses.
func (h *Handler) mapError(err error, id string) (int, string, string) {
	switch {
	case errors.Is(err, issuer.ErrNotFound):
		return http.StatusNotFound, CodeKeyNotFound, "no key with this uniqueId"
	case errors.Is(err, issuer.ErrConsumed):
		return http.StatusGone, CodeKeyConsumed, "the key was already used for a decrypt"
	case errors.Is(err, issuer.ErrExpired):
		return http.StatusGone, CodeKeyExpired, "the key expired before it was used"
	case errors.Is(err, issuer.ErrLost):
		return http.StatusGone, CodeKeyLost, "the key was lost by the token (it restarted or failed); the merchant must apply again"
	case errors.Is(err, issuer.ErrDecrypt):
		return http.StatusUnprocessableEntity, CodeDecryptFailed, "decryption failed; the key is destroyed"
	case errors.Is(err, issuer.ErrAbandoned):
		return http.StatusGone, CodeDecryptAbandoned, "the request was cancelled while the decrypt waited for the token: nothing was decrypted, but the key is consumed and destroyed; the merchant must apply again"
	case errors.Is(err, issuer.ErrPadding):
		return http.StatusBadRequest, CodeParamIllegal, "padding is not one the daemon accepts (keys.paddings); the key was not used"
	case errors.Is(err, issuer.ErrCiphertext):
		return http.StatusBadRequest, CodeParamIllegal, "the ciphertext cannot be for this key (its length is not the key's size, or it is not below the modulus); the key was not used"
	case errors.Is(err, issuer.ErrUnavailable):
		return http.StatusServiceUnavailable, CodeHSMUnavailable, "the token is unavailable; the key was not used, retry"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return http.StatusServiceUnavailable, CodeHSMUnavailable, "the request was cancelled; retry"
	}
	h.log.Error("decrypt failed", "unique_id", id, "err", err)
	return http.StatusInternalServerError, CodeInternal, "internal error"
}

// KeyResponse is the state of a key, for support and audit. It holds
// neither the salt nor key material.
type KeyResponse struct {
	UniqueID   string `json:"uniqueId"`
	State      string `json:"state"`
	CustomerID string `json:"customerId,omitempty"`
	ClientID   string `json:"clientId,omitempty"`
	IssuedAt   string `json:"issuedAt"`
	ExpiresAt  string `json:"expiresAt"`
	ClosedAt   string `json:"closedAt,omitempty"`   // when it was consumed, expired or lost
	ConsumedAt string `json:"consumedAt,omitempty"` // when its one decrypt finished
}

func (h *Handler) key(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("uniqueId")
	if err := ValidUniqueID(id); err != nil {
		writeError(w, http.StatusBadRequest, CodeParamIllegal, err.Error())
		return
	}
	rec, err := h.issuer.Record(r.Context(), id)
	if err != nil {
		status, code, msg := h.mapError(err, id)
		writeError(w, status, code, msg)
		return
	}
	resp := KeyResponse{
		UniqueID:   rec.UniqueID,
		State:      string(rec.State),
		CustomerID: rec.CustomerID,
		ClientID:   rec.ClientID,
		IssuedAt:   rec.IssuedAt.UTC().Format(time.RFC3339Nano),
		ExpiresAt:  rec.ExpiresAt.UTC().Format(time.RFC3339Nano),
	}
	if !rec.ClosedAt.IsZero() {
		resp.ClosedAt = rec.ClosedAt.UTC().Format(time.RFC3339Nano)
		if rec.State == store.Consumed {
			resp.ConsumedAt = resp.ClosedAt
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

// HealthResponse reports the daemon's state.
type HealthResponse struct {
	Status          string `json:"status"` // ok, or degraded when the token is down
	TokenReady      bool   `json:"tokenReady"`
	PoolReady       int    `json:"poolReady"`
	PoolSize        int    `json:"poolSize"`
	OutstandingKeys int    `json:"outstandingKeys"` // issued, unused key pairs in the token
	PendingDestroys int    `json:"pendingDestroys"`
}

func (h *Handler) health(w http.ResponseWriter, r *http.Request) {
	s := h.issuer.Stats()
	resp := HealthResponse{
		Status:          "ok",
		TokenReady:      s.TokenReady,
		PoolReady:       s.PoolReady,
		PoolSize:        s.PoolSize,
		OutstandingKeys: s.Outstanding,
		PendingDestroys: s.PendingDestroys,
	}
	status := http.StatusOK
	if !s.TokenReady {
		resp.Status, status = "degraded", http.StatusServiceUnavailable
	}
	writeJSON(w, status, resp)
}

// ValidUniqueID checks the shape of a uniqueId: 32 characters of
// [A-Za-z0-9] ([hsm.ValidKeyID]).
func ValidUniqueID(id string) error {
	if !hsm.ValidKeyID(id) {
		return errors.New("uniqueId must be 32 characters of A-Z, a-z, 0-9")
	}
	return nil
}

// ErrorResponse is the body of every error.
type ErrorResponse struct {
	Error ErrorBody `json:"error"`
}

// ErrorBody is a code and a message safe to show.
type ErrorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, ErrorResponse{Error: ErrorBody{Code: code, Message: msg}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(b)
}
