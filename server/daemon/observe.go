package daemon

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/metrics"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// Which listener a request came in on.
const (
	listenerPublic = "public"
	listenerSocket = "socket"
)

// instrument wraps a listener's handler: it times each request, reads the
// wire result code the client saw, counts both, audits the socket's
// refusals, and puts the caller's address in the request's context for the
// issuer's events. The public API reports its refusals itself
// (onRefused), as it alone knows whether the caller proved who it is.
// It reads only what the client reads: result codes from the public API's
// bodies, error codes from the socket's error bodies; never a decrypted
// password (a 200 from the socket is not read).
func (d *Daemon) instrument(listener string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		api := apiOf(listener, r.URL.Path)
		rw := &sniffer{ResponseWriter: w, keep: listener == listenerPublic}
		ctx := r.Context()
		if listener == listenerPublic {
			ctx = context.WithValue(ctx, remoteKey{}, r.RemoteAddr)
		}
		h.ServeHTTP(rw, r.WithContext(ctx))
		code, _ := rw.code()
		d.ops.metrics.Request(api, code, time.Since(start))
		if listener == listenerSocket && refused(code) {
			d.record(audit.Event{Type: audit.RequestRefused, API: api, Code: code, Peer: peerFrom(ctx)})
		}
	})
}

func apiOf(listener, path string) string {
	if listener == listenerPublic {
		if path == publicapi.ApplyPath || path == publicapi.SandboxApplyPath {
			return metrics.APIApply
		}
		return metrics.APIOther
	}
	switch {
	case path == "/v1/decrypt":
		return metrics.APIDecrypt
	case strings.HasPrefix(path, "/v1/keys/"):
		return metrics.APIKey
	case path == "/v1/health":
		return metrics.APIHealth
	}
	return metrics.APIOther
}

// refused says whether a socket answer turned a caller away for who it is
// (peer credentials), as opposed to a success, a malformed request or a
// retryable failure.
func refused(code string) bool { return code == "FORBIDDEN" }

// sniffBytes bounds what is kept of a body to read its code.
const sniffBytes = 8 << 10

// sniffer records the status and, when asked to or for an error, the start
// of the body.
type sniffer struct {
	http.ResponseWriter
	keep   bool // keep the body whatever the status
	status int
	body   []byte
}

func (s *sniffer) WriteHeader(status int) {
	if s.status == 0 {
		s.status = status
	}
	s.ResponseWriter.WriteHeader(status)
}

func (s *sniffer) Write(p []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	if (s.keep || s.status != http.StatusOK) && len(s.body) < sniffBytes {
		s.body = append(s.body, p[:min(len(p), sniffBytes-len(s.body))]...)
	}
	return s.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the real writer.
func (s *sniffer) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// code returns the answer's wire code and, for the public API, its
// resultStatus.
func (s *sniffer) code() (code, status string) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	if s.keep {
		var v struct {
			Result struct {
				ResultCode   string `json:"resultCode"`
				ResultStatus string `json:"resultStatus"`
			} `json:"result"`
		}
		if json.Unmarshal(s.body, &v) != nil || v.Result.ResultCode == "" {
			return "OTHER", ""
		}
		return v.Result.ResultCode, v.Result.ResultStatus
	}
	if s.status == http.StatusOK {
		return "OK", ""
	}
	var v struct {
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	if json.Unmarshal(s.body, &v) != nil || v.Error.Code == "" {
		return "OTHER", ""
	}
	return v.Error.Code, ""
}
