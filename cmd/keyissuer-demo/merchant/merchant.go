// Package merchant is the merchant's side of the checkout demo
// (cmd/keyissuer-demo): a checkout page, served from the binary, on which
// the buyer types a wallet password that only the wallet ever reads; and
// the merchant's backend behind it.
//
// The flow: the page asks the backend for a key (POST /checkout/key); the
// backend calls keyissuerd's applyPublicKey signed with the merchant's key
// (RSA256, the wallet SDKs' header layout, server/apisig), checks the
// answer's signature with keyissuerd's public key, and hands the page
// {uniqueId, salt, publicKey}. The page encrypts the password followed by
// the salt with WebCrypto (RSA-OAEP, SHA-256) and posts {uniqueId,
// ciphertext} (POST /checkout/pay), which the backend forwards to the
// wallet's password-decrypt service and whose verdict it shows.
//
// It is reference code for a merchant integrating keyissuer: copy it.
package merchant

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"time"

	"github.com/keyissuer/keyissuer/server/apisig"
)

//go:embed page
var page embed.FS

// Config wires a Handler.
type Config struct {
	// APIURL is keyissuerd's applyPublicKey URL (its production or its
	// sandbox path).
	APIURL string
	// ClientID, Key and KeyVersion are the merchant's registration in
	// keyissuerd's [[clients]]: requests are signed with Key.
	ClientID   string
	Key        crypto.Signer
	KeyVersion int
	// ServerKey is keyissuerd's response-signing public key
	// (`keyissuer signing-key`): an answer that does not verify with it
	// is refused.
	ServerKey *rsa.PublicKey
	// CustomerID is the buyer's wallet customerId; empty applies without.
	CustomerID string
	// HTTP calls keyissuerd (its TLS trust for HTTPS) and the wallet.
	HTTP *http.Client
	// WalletURL is the wallet's password-check endpoint, which takes
	// {uniqueId, ciphertext} and answers {outcome, message}.
	WalletURL string
	Log       *slog.Logger
}

// Handler serves the page and the backend's two calls.
type Handler struct {
	cfg Config
	mux *http.ServeMux
}

// KeyInfo is what the page needs to encrypt: keyissuerd's publicKeyInfo.
type KeyInfo struct {
	UniqueID  string `json:"uniqueId"`
	Salt      string `json:"salt"`
	PublicKey string `json:"publicKey"` // base64 DER SubjectPublicKeyInfo
}

// Verdict is what the page shows at the end: the wallet's outcome, or the
// backend's own ("error").
type Verdict struct {
	Outcome string `json:"outcome"`
	Message string `json:"message"`
}

// New returns the handler.
func New(cfg Config) *Handler {
	if cfg.HTTP == nil {
		cfg.HTTP = &http.Client{Timeout: 30 * time.Second}
	}
	if cfg.KeyVersion == 0 {
		cfg.KeyVersion = 1
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	h := &Handler{cfg: cfg, mux: http.NewServeMux()}
	static, _ := fs.Sub(page, "page")
	h.mux.Handle("GET /", http.FileServerFS(static))
	h.mux.HandleFunc("POST /checkout/key", h.key)
	h.mux.HandleFunc("POST /checkout/pay", h.pay)
	return h
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
	h.mux.ServeHTTP(w, r)
}

// key applies for a key and hands the page its publicKeyInfo.
func (h *Handler) key(w http.ResponseWriter, r *http.Request) {
	k, err := h.Apply(r.Context())
	if err != nil {
		h.cfg.Log.Error("applyPublicKey failed", "err", err)
		writeJSON(w, http.StatusOK, Verdict{"error", "the merchant could not get a key: " + err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, k)
}

// applyResponse is applyPublicKey's answer.
type applyResponse struct {
	Result struct {
		ResultCode    string `json:"resultCode"`
		ResultStatus  string `json:"resultStatus"`
		ResultMessage string `json:"resultMessage"`
	} `json:"result"`
	PublicKeyInfo *KeyInfo `json:"publicKeyInfo"`
}

// Apply calls applyPublicKey, signed, and checks the answer's signature.
// An answer with resultStatus U (the pool is warming up, a limit) is
// retried for up to ten seconds.
func (h *Handler) Apply(ctx context.Context) (KeyInfo, error) {
	body := []byte(`{}`)
	if h.cfg.CustomerID != "" {
		body, _ = json.Marshal(map[string]string{"customerId": h.cfg.CustomerID})
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		a, err := h.applyOnce(ctx, body)
		if err != nil {
			return KeyInfo{}, err
		}
		switch {
		case a.Result.ResultStatus == "S" && a.PublicKeyInfo != nil:
			return *a.PublicKeyInfo, nil
		case a.Result.ResultStatus != "U":
			return KeyInfo{}, fmt.Errorf("%s: %s", a.Result.ResultCode, a.Result.ResultMessage)
		}
		select {
		case <-ctx.Done():
			return KeyInfo{}, fmt.Errorf("%s: %s (gave up retrying)", a.Result.ResultCode, a.Result.ResultMessage)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func (h *Handler) applyOnce(ctx context.Context, body []byte) (applyResponse, error) {
	var a applyResponse
	u, err := url.Parse(h.cfg.APIURL)
	if err != nil {
		return a, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body))
	if err != nil {
		return a, err
	}
	req.Header.Set("Content-Type", "application/json; charset=UTF-8")
	if err := apisig.SignRequest(req, h.cfg.ClientID, h.cfg.KeyVersion, h.cfg.Key, body, time.Now()); err != nil {
		return a, err
	}
	resp, err := h.cfg.HTTP.Do(req)
	if err != nil {
		return a, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return a, err
	}
	// Nothing in an answer is trusted before its signature verifies, over
	// the path this request used.
	if err := apisig.VerifyResponse(resp.Header, u.EscapedPath(), raw, h.cfg.ServerKey); err != nil {
		return a, fmt.Errorf("keyissuerd's answer (HTTP %d) is not signed by its key: %w", resp.StatusCode, err)
	}
	if err := json.Unmarshal(raw, &a); err != nil {
		return a, fmt.Errorf("keyissuerd's answer is not JSON: %w", err)
	}
	return a, nil
}

// pay forwards the page's {uniqueId, ciphertext} to the wallet and shows
// its verdict. The merchant never sees the password.
func (h *Handler) pay(w http.ResponseWriter, r *http.Request) {
	var p struct {
		UniqueID   string `json:"uniqueId"`
		Ciphertext string `json:"ciphertext"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 8<<10)).Decode(&p); err != nil || p.UniqueID == "" || p.Ciphertext == "" {
		writeJSON(w, http.StatusBadRequest, Verdict{"error", "send {uniqueId, ciphertext}"})
		return
	}
	v, err := h.askWallet(r.Context(), p)
	if err != nil {
		h.cfg.Log.Error("the wallet did not answer", "err", err)
		writeJSON(w, http.StatusOK, Verdict{"error", "the wallet did not answer; try again"})
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (h *Handler) askWallet(ctx context.Context, p any) (Verdict, error) {
	var v Verdict
	b, _ := json.Marshal(p)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.cfg.WalletURL, bytes.NewReader(b))
	if err != nil {
		return v, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.cfg.HTTP.Do(req)
	if err != nil {
		return v, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 8<<10)).Decode(&v); err != nil {
		return v, fmt.Errorf("HTTP %d: %w", resp.StatusCode, err)
	}
	if v.Outcome == "" {
		return v, errors.New("the answer has no outcome")
	}
	return v, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
