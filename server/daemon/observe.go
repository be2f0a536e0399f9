package daemon

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
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
// wire result code the client saw, counts both, audits refusals, and puts
// the caller's address in the request's context for the issuer's events.
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
		code, status := rw.code()
		d.ops.metrics.Request(api, code, time.Since(start))
		if refused(listener, code, status) {
			e := audit.Event{Type: audit.RequestRefused, API: api, Code: code}
			if listener == listenerPublic {
				e.Remote = r.RemoteAddr
				if id := r.Header.Get("Client-Id"); clientIDRE.MatchString(id) {
					e.ClientID = id
				}
			} else {
				e.Peer = peerFrom(ctx)
			}
			d.record(e)
		}
	})
}

var clientIDRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

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

// refused says whether an answer turned a caller away for who it is or how
// much it asks (signature, client, quota, blocklist, peer credentials), as
// opposed to a success, a malformed request or a retryable failure.
func refused(listener, code, status string) bool {
	if listener == listenerSocket {
		return code == "FORBIDDEN"
	}
	switch code {
	case publicapi.CodeSuccess, publicapi.CodeUnknown, "OTHER",
		publicapi.CodeParamIllegal, publicapi.CodeMethod, publicapi.CodeMediaType, publicapi.CodeInvalidAPI:
		return false
	}
	return true
}

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
