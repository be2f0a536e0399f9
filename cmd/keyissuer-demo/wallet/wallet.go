// Package wallet is the wallet's side of the checkout demo
// (cmd/keyissuer-demo): its password-decrypt service. It takes the
// {uniqueId, ciphertext} a merchant forwards, has keyissuerd decrypt the
// ciphertext once over the local decrypt socket (server/decryptclient),
// checks the password against the buyer's stored hash (bcrypt), and
// answers with an outcome the merchant can show.
//
// It is reference code for a wallet integrating keyissuer: copy it, and
// replace the single demo buyer with the wallet's account store.
package wallet

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"

	"golang.org/x/crypto/bcrypt"

	"github.com/keyissuer/keyissuer/server/decryptclient"
)

// Decrypter performs a key's one decrypt; [*decryptclient.Client]
// implements it. Its errors are *[decryptclient.Error] when keyissuerd
// answered. Safe for concurrent use.
type Decrypter interface {
	Decrypt(ctx context.Context, uniqueID string, ciphertext []byte) ([]byte, error)
}

var _ Decrypter = (*decryptclient.Client)(nil)

// Outcomes of a password check, as [Answer.Outcome].
const (
	Verified       = "verified"
	WrongPassword  = "wrong_password"
	KeyAlreadyUsed = "key_already_used"
	KeyExpired     = "key_expired"    // unknown, expired or lost: apply again
	DecryptFailed  = "decrypt_failed" // wrong salt or padding; the key is gone
	BadRequest     = "bad_request"
	Unavailable    = "unavailable" // retry later
)

// Request is what the merchant forwards: the key's uniqueId and the
// ciphertext its page made, in standard base64.
type Request struct {
	UniqueID   string `json:"uniqueId"`
	Ciphertext string `json:"ciphertext"`
}

// Answer is the wallet's verdict. Message is for the buyer.
type Answer struct {
	Outcome string `json:"outcome"`
	Message string `json:"message"`
}

// Config wires a Service.
type Config struct {
	Decrypter Decrypter
	// PasswordHash is the buyer's password as [HashPassword] made it.
	PasswordHash []byte
	Log          *slog.Logger
}

// Service answers POST requests carrying a [Request] with an [Answer],
// always HTTP 200 for a well-formed request.
type Service struct {
	cfg Config
}

// New returns the service.
func New(cfg Config) *Service {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Service{cfg: cfg}
}

// HashPassword is how the wallet stores a password: bcrypt, never the
// password itself.
func HashPassword(password string) ([]byte, error) {
	return bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
}

func (s *Service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "use POST", http.StatusMethodNotAllowed)
		return
	}
	var req Request
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 8<<10))
	if err := dec.Decode(&req); err != nil {
		reply(w, http.StatusBadRequest, Answer{BadRequest, "the request is not {uniqueId, ciphertext}"})
		return
	}
	reply(w, http.StatusOK, s.Check(r.Context(), req))
}

// Check decrypts the ciphertext, once, and compares the password with the
// stored hash. The password is wiped as soon as it is compared; it never
// reaches a log or an answer.
func (s *Service) Check(ctx context.Context, req Request) Answer {
	ct, err := base64.StdEncoding.DecodeString(req.Ciphertext)
	if err != nil || req.UniqueID == "" || len(ct) == 0 {
		return Answer{BadRequest, "the request needs a uniqueId and a base64 ciphertext"}
	}
	password, err := s.cfg.Decrypter.Decrypt(ctx, req.UniqueID, ct)
	if err != nil {
		return s.decryptError(req.UniqueID, err)
	}
	defer clear(password)
	if bcrypt.CompareHashAndPassword(s.cfg.PasswordHash, password) != nil {
		s.cfg.Log.Info("password check", "unique_id", req.UniqueID, "outcome", WrongPassword)
		return Answer{WrongPassword, "wrong password"}
	}
	s.cfg.Log.Info("password check", "unique_id", req.UniqueID, "outcome", Verified)
	return Answer{Verified, "verified: the wallet accepted the password"}
}

// decryptError is the one place keyissuerd's decrypt errors become
// outcomes.
func (s *Service) decryptError(uniqueID string, err error) Answer {
	var e *decryptclient.Error
	if !errors.As(err, &e) {
		s.cfg.Log.Error("decrypt failed", "unique_id", uniqueID, "err", err)
		return Answer{Unavailable, "the wallet cannot reach its key service; try again"}
	}
	s.cfg.Log.Info("decrypt refused", "unique_id", uniqueID, "code", e.Code)
	switch e.Code {
	case decryptclient.KeyConsumed:
		return Answer{KeyAlreadyUsed, "key already used: this ciphertext was submitted before"}
	case decryptclient.KeyNotFound, decryptclient.KeyExpired, decryptclient.KeyLost:
		return Answer{KeyExpired, "the key expired; start again"}
	case decryptclient.DecryptFailed:
		return Answer{DecryptFailed, "the ciphertext did not decrypt (wrong salt or padding); start again"}
	case decryptclient.ParamIllegal:
		return Answer{BadRequest, "the ciphertext is malformed"}
	}
	return Answer{Unavailable, "the wallet's key service is unavailable; try again"}
}

func reply(w http.ResponseWriter, status int, a Answer) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(a)
}
