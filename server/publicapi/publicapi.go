// Package publicapi serves the merchant-facing applyPublicKey endpoint in
// the wallet API family's format: JSON where every field is a string, and a
// result object with resultCode, resultStatus (S, F or U) and resultMessage
// in every answer. Every business outcome is HTTP 200; the HTTP status
// changes only for protocol errors (wrong method, media type or path).
package publicapi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strings"

	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/jsonbody"
)

// ApplyPath is the applyPublicKey endpoint.
const ApplyPath = "/ams/api/v1/customer/applyPublicKey"

// Issuer issues keys; [*issuer.Issuer] implements it. Apply is safe for
// concurrent use and fails with [issuer.ErrPoolEmpty] or
// [issuer.ErrUnavailable] when the caller should retry.
type Issuer interface {
	Apply(ctx context.Context, customerID, clientID string) (issuer.Issued, error)
}

var _ Issuer = (*issuer.Issuer)(nil)

// Result is the result object of every answer.
type Result struct {
	ResultCode    string `json:"resultCode"`
	ResultStatus  string `json:"resultStatus"`
	ResultMessage string `json:"resultMessage"`
}

// PublicKeyInfo is what a merchant needs to encrypt a password.
type PublicKeyInfo struct {
	UniqueID  string `json:"uniqueId"`
	Salt      string `json:"salt"`
	PublicKey string `json:"publicKey"` // standard base64 of the DER SubjectPublicKeyInfo
}

// Response is the applyPublicKey answer; PublicKeyInfo only on SUCCESS.
type Response struct {
	Result        Result         `json:"result"`
	PublicKeyInfo *PublicKeyInfo `json:"publicKeyInfo,omitempty"`
}

// Result codes.
const (
	CodeSuccess         = "SUCCESS"
	CodeParamIllegal    = "PARAM_ILLEGAL"
	CodeUnknown         = "UNKNOWN_EXCEPTION"
	CodeMethod          = "METHOD_NOT_SUPPORTED"
	CodeMediaType       = "MEDIA_TYPE_NOT_ACCEPTABLE"
	CodeInvalidAPI      = "INVALID_API"
	CodeProcessFail     = "PROCESS_FAIL"
	maxCustomerIDLength = 32
)

// Handler serves /ams/api/.
type Handler struct {
	issuer  Issuer
	log     *slog.Logger
	maxBody int64
}

// New returns the handler. maxBody caps request bodies.
func New(is Issuer, log *slog.Logger, maxBody int64) *Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Handler{issuer: is, log: log, maxBody: maxBody}
}

// ServeHTTP routes /ams/api/ requests.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != ApplyPath {
		writeResult(w, http.StatusNotFound, CodeInvalidAPI, "F", "no such API: "+printable(r.URL.Path))
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeResult(w, http.StatusMethodNotAllowed, CodeMethod, "F", "use POST")
		return
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		writeResult(w, http.StatusUnsupportedMediaType, CodeMediaType, "F", "Content-Type must be application/json")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.maxBody))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeResult(w, http.StatusOK, CodeParamIllegal, "F", "the body is larger than the limit")
			return
		}
		writeResult(w, http.StatusOK, CodeParamIllegal, "F", "the body could not be read")
		return
	}
	req, err := parseApply(body)
	if err != nil {
		writeResult(w, http.StatusOK, CodeParamIllegal, "F", err.Error())
		return
	}
	issued, err := h.issuer.Apply(r.Context(), req.customerID, "")
	if err != nil {
		code, status, msg := h.mapError(err)
		writeResult(w, http.StatusOK, code, status, msg)
		return
	}
	writeJSON(w, http.StatusOK, Response{
		Result: Result{ResultCode: CodeSuccess, ResultStatus: "S", ResultMessage: "success."},
		PublicKeyInfo: &PublicKeyInfo{
			UniqueID:  issued.UniqueID,
			Salt:      issued.Salt,
			PublicKey: base64.StdEncoding.EncodeToString(issued.PublicKey),
		},
	})
}

// mapError is the one place issuer errors become result codes. The cause
// goes to the log; the caller gets a safe message.
func (h *Handler) mapError(err error) (code, status, msg string) {
	switch {
	case errors.Is(err, issuer.ErrPoolEmpty):
		return CodeUnknown, "U", "no key is ready; retry shortly"
	case errors.Is(err, issuer.ErrUnavailable):
		return CodeUnknown, "U", "the key service is temporarily unavailable; retry shortly"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return CodeUnknown, "U", "the request was cancelled; retry"
	}
	h.log.Error("apply failed", "err", err)
	return CodeUnknown, "U", "internal error; retry shortly"
}

type applyRequest struct {
	customerID string
}

func parseApply(body []byte) (applyRequest, error) {
	f, err := jsonbody.Parse(body, "customerId")
	if err != nil {
		return applyRequest{}, err
	}
	id, ok := f["customerId"]
	if ok {
		if err := validCustomerID(id); err != nil {
			return applyRequest{}, err
		}
	}
	return applyRequest{customerID: id}, nil
}

// validCustomerID: the wallet's customer ids are digits starting with 21.
// The documentation says 16 digits but its own examples have 13 and 19, so
// any length up to 32 is accepted.
func validCustomerID(id string) error {
	switch {
	case id == "":
		return errors.New("customerId is empty")
	case len(id) > maxCustomerIDLength:
		return errors.New("customerId is longer than 32 characters")
	case !strings.HasPrefix(id, "21"):
		return errors.New("customerId must start with 21")
	}
	for _, c := range id {
		if c < '0' || c > '9' {
			return errors.New("customerId must contain digits only")
		}
	}
	return nil
}

func writeResult(w http.ResponseWriter, httpStatus int, code, status, msg string) {
	writeJSON(w, httpStatus, Response{Result: Result{ResultCode: code, ResultStatus: status, ResultMessage: msg}})
}

func writeJSON(w http.ResponseWriter, httpStatus int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=UTF-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(httpStatus)
	w.Write(b)
}

func printable(s string) string {
	if len(s) > 128 {
		s = s[:128] + "..."
	}
	return strings.ToValidUTF8(s, "?")
}
