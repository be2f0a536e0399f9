// Package publicapi serves the merchant-facing applyPublicKey endpoint in
// the wallet API family's format: JSON where every field is a string, and a
// result object with resultCode, resultStatus (S, F or U) and resultMessage
// in every answer. Every business outcome is HTTP 200; the HTTP status
// changes only for protocol errors (wrong method, media type or path).
//
// Requests are signed by registered clients and answers are signed by
// keyissuer, in the family's message header (package [apisig]). A request
// goes through, in order: the [Gate] (limits before authentication); path,
// method and media type; the body's size; the client and its signature;
// the rate limits; the [ReplayGuard]; the body's fields; the blocklist;
// the outstanding-key quotas; and only then the issuer. Only the answers
// to requests that got past the replay check are signed: nobody can make
// the token sign without a fresh request signed by a client.
package publicapi

import (
	"context"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"mime"
	"net/http"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"golang.org/x/time/rate"

	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/apisig"
	"github.com/keyissuer/keyissuer/server/jsonbody"
)

// ApplyPath is the applyPublicKey endpoint. SandboxApplyPath is where the
// wallet SDKs send a sandbox client's requests (sandbox mode on, Client-Id
// SANDBOX_...); it is served the same way. Either way the answer's
// signature covers the path the request used, as the SDKs check it.
const (
	ApplyPath        = "/ams/api/v1/customer/applyPublicKey"
	SandboxApplyPath = "/ams/sandbox/api/v1/customer/applyPublicKey"
)

// Issuer issues keys; [*issuer.Issuer] implements it. ApplyWithin is safe
// for concurrent use. It fails with a *[issuer.QuotaError] (errors.Is
// [issuer.ErrQuota]) when a cap of lim would be passed, and with
// [issuer.ErrPoolEmpty] or [issuer.ErrUnavailable] when the caller should
// retry.
type Issuer interface {
	ApplyWithin(ctx context.Context, customerID, clientID string, lim issuer.Limits) (issuer.Issued, error)
}

var _ Issuer = (*issuer.Issuer)(nil)

// Signer signs answers, RSA256 (SHA256withRSA); [*hsm.Signer] implements
// it with a key inside the token. Safe for concurrent use.
type Signer interface {
	Sign(ctx context.Context, msg []byte) ([]byte, error)
}

// Blocklist says whether a customerId is blocked; [*blocklist.List]
// implements it. Safe for concurrent use.
type Blocklist interface {
	Contains(customerID string) bool
}

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
	CodeSuccess            = "SUCCESS"
	CodeParamIllegal       = "PARAM_ILLEGAL"
	CodeUserStatusAbnormal = "USER_STATUS_ABNORMAL"
	CodeProcessFail        = "PROCESS_FAIL"
	CodeUnknown            = "UNKNOWN_EXCEPTION"
	CodeInvalidSignature   = "INVALID_SIGNATURE"
	CodeInvalidClient      = "INVALID_CLIENT"
	CodeTrafficLimit       = "REQUEST_TRAFFIC_EXCEED_LIMIT"
	CodeMethod             = "METHOD_NOT_SUPPORTED"
	CodeMediaType          = "MEDIA_TYPE_NOT_ACCEPTABLE"
	CodeInvalidAPI         = "INVALID_API"
	// CodeRepeatRequest answers a signed request whose signature was
	// accepted before, within the clock-skew window: a replay, or a
	// retry that was not signed afresh.
	CodeRepeatRequest = "REPEAT_REQUEST"

	maxCustomerIDLength = 32
)

// Client is a registered merchant application.
type Client struct {
	ID       string
	Disabled bool
	// Keys are its public keys by keyVersion; a signature without a
	// keyVersion is checked with the highest.
	Keys map[int]*rsa.PublicKey
	// Rate and Burst are its token bucket; a zero Rate means no limit.
	Rate  rate.Limit
	Burst int
	// MaxOutstanding caps its outstanding keys; zero means no cap.
	MaxOutstanding int
}

// Config wires a Handler. Zero values take the defaults noted.
type Config struct {
	Issuer  Issuer
	Log     *slog.Logger
	MaxBody int64 // request body limit (4096)

	Clients []Client
	// AllowUnsigned accepts requests without a Signature header: from the
	// client their Client-Id names, or anonymous without one. A request
	// with a Signature is always verified.
	AllowUnsigned bool
	// ClockSkew bounds |Request-Time - now| of signed requests (5m).
	ClockSkew time.Duration

	// Signer signs answers with keyVersion SignerKeyVersion (1); nil
	// leaves them unsigned.
	Signer           Signer
	SignerKeyVersion int

	Blocklist Blocklist // nil: nobody is blocked

	// Rate and Burst are the token bucket of all requests together; a
	// zero Rate means no limit.
	Rate  rate.Limit
	Burst int
	// Limits caps outstanding keys in total and per customer; the
	// per-client cap is each Client's MaxOutstanding.
	Limits issuer.Limits

	// Gate, if set, limits every request before it is authenticated
	// (see [Gate]); share one across the handlers of reloads.
	Gate *Gate
	// OnRefused, if set, is told of every refused request, synchronously:
	// for metrics and the audit trail.
	OnRefused func(r *http.Request, f Refusal)
	// Replay remembers the signatures of accepted requests for the
	// clock-skew window, so that each is accepted once; nil: no replay
	// check. Share one across the handlers of reloads (and, in a cluster,
	// across the instances).
	Replay ReplayGuard

	Now func() time.Time // the clock (time.Now)
}

// Refusal describes a refused request to [Config.OnRefused].
type Refusal struct {
	Code   string // the wire result code
	Reason string // one of the Reason constants: a fixed set
	// ClientID is the request's Client-Id header when well formed; it is
	// who sent the request only when Verified.
	ClientID string
	// Verified says the request's signature verified (or, with
	// AllowUnsigned, that it was let in without one), it passed the rate
	// limits and it was not a replay: it comes from the client. Answers to
	// verified requests are signed; the others are not.
	Verified bool
}

// Reasons of refusals. Those before [ReasonRateLimit] come before or
// during authentication.
const (
	ReasonGateAddress      = "gate_address"    // the source address's pre-authentication bucket
	ReasonGateUnverified   = "gate_unverified" // the pre-authentication bucket of unverified addresses
	ReasonInvalidAPI       = "invalid_api"     // unknown path
	ReasonMethod           = "method"          // not POST
	ReasonMediaType        = "media_type"      // not application/json
	ReasonMalformed        = "malformed"       // an unreadable or oversized body, a bad Request-Time
	ReasonInvalidClient    = "invalid_client"
	ReasonInvalidSignature = "invalid_signature"
	ReasonRateLimit        = "rate_limit" // the client's or the global bucket
	ReasonReplay           = "replay"     // a signature accepted before
	ReasonReplayCheck      = "replay_check_failed"
	ReasonParam            = "param" // a bad body field
	ReasonBlocklist        = "blocklist"
	ReasonQuota            = "quota" // an outstanding-key cap
)

// Reasons lists every Reason constant, for metrics.
var Reasons = []string{ReasonGateAddress, ReasonGateUnverified, ReasonInvalidAPI, ReasonMethod, ReasonMediaType,
	ReasonMalformed, ReasonInvalidClient, ReasonInvalidSignature, ReasonRateLimit, ReasonReplay, ReasonReplayCheck, ReasonParam,
	ReasonBlocklist, ReasonQuota}

// Handler serves /ams/api/ and /ams/sandbox/api/.
type Handler struct {
	cfg     Config
	log     *slog.Logger
	clients map[string]*client
	global  *rate.Limiter // nil: no limit
}

type client struct {
	Client
	latest  int           // highest keyVersion
	limiter *rate.Limiter // nil: no limit
}

// New returns the handler.
func New(cfg Config) *Handler {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxBody == 0 {
		cfg.MaxBody = 4096
	}
	if cfg.ClockSkew == 0 {
		cfg.ClockSkew = 5 * time.Minute
	}
	if cfg.SignerKeyVersion == 0 {
		cfg.SignerKeyVersion = 1
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	h := &Handler{cfg: cfg, log: cfg.Log, clients: map[string]*client{}}
	if cfg.Rate > 0 {
		h.global = rate.NewLimiter(cfg.Rate, max(cfg.Burst, 1))
	}
	for _, c := range cfg.Clients {
		cl := &client{Client: c}
		if vs := slices.Collect(maps.Keys(c.Keys)); len(vs) > 0 {
			cl.latest = slices.Max(vs)
		}
		if c.Rate > 0 {
			cl.limiter = rate.NewLimiter(c.Rate, max(c.Burst, 1))
		}
		h.clients[c.ID] = cl
	}
	return h
}

// outcome is a failed request's answer.
type outcome struct {
	http              int
	code, status, msg string
	reason            string // a Reason constant
	allow             string // the Allow header, for 405
	logMsg            string // why, for the log; never a secret
	logLevel          slog.Level
}

func fail(code, status, reason, msg string) *outcome {
	return &outcome{http: http.StatusOK, code: code, status: status, reason: reason, msg: msg}
}

// state is what ServeHTTP learns of a request on the way.
type state struct {
	// verified: the request passed authentication, the rate limits and
	// the replay check, so its answer is signed. Nothing is signed for a
	// caller who did not prove who it is: a token signature costs a
	// session of the token, which a flood of junk (or of replays) must not
	// be able to spend.
	verified bool
}

// ServeHTTP answers one request; signed when the request was verified
// (see state).
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// The answer names the caller's Client-Id when it is well formed: the
	// wallet SDKs check the response signature with their own.
	clientID := ""
	if ids := r.Header.Values(apisig.HeaderClientID); len(ids) == 1 && apisig.ValidClientID(ids[0]) {
		clientID = ids[0]
	}
	var st state
	defer func() {
		// A bug must not leave the caller without an answer. Retrying
		// would meet the same bug: PROCESS_FAIL, not UNKNOWN_EXCEPTION.
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			h.log.Error("applyPublicKey panicked", "panic", p, "stack", string(debug.Stack()))
			h.reply(w, r, clientID, st.verified, http.StatusOK, Response{Result: Result{ResultCode: CodeProcessFail, ResultStatus: "F", ResultMessage: "internal error"}})
		}
	}()
	resp, o := h.serve(w, r, &st)
	if o != nil {
		if o.allow != "" {
			w.Header().Set("Allow", o.allow)
		}
		if o.logMsg != "" {
			idKey := "client_id"
			if !st.verified {
				idKey = "client_id_unverified"
			}
			h.log.Log(r.Context(), o.logLevel, "applyPublicKey refused", "code", o.code, "reason", o.logMsg,
				idKey, clientID, "remote", r.RemoteAddr)
		}
		if o.reason != "" && h.cfg.OnRefused != nil {
			h.cfg.OnRefused(r, Refusal{Code: o.code, Reason: o.reason, ClientID: clientID, Verified: st.verified})
		}
		resp = Response{Result: Result{ResultCode: o.code, ResultStatus: o.status, ResultMessage: o.msg}}
		h.reply(w, r, clientID, st.verified, o.http, resp)
		return
	}
	h.reply(w, r, clientID, st.verified, http.StatusOK, resp)
}

func (h *Handler) serve(w http.ResponseWriter, r *http.Request, st *state) (Response, *outcome) {
	if g := h.cfg.Gate; g != nil {
		switch g.Allow(r.RemoteAddr) {
		case GateAddress:
			return Response{}, fail(CodeTrafficLimit, "U", ReasonGateAddress, "too many requests from this address; retry later")
		case GateUnverified:
			return Response{}, fail(CodeTrafficLimit, "U", ReasonGateUnverified, "too many requests; retry later")
		}
	}
	if r.URL.Path != ApplyPath && r.URL.Path != SandboxApplyPath {
		return Response{}, &outcome{http: http.StatusNotFound, code: CodeInvalidAPI, status: "F", reason: ReasonInvalidAPI, msg: "no such API: " + printable(r.URL.Path)}
	}
	if r.Method != http.MethodPost {
		return Response{}, &outcome{http: http.StatusMethodNotAllowed, code: CodeMethod, status: "F", reason: ReasonMethod, msg: "use POST", allow: http.MethodPost}
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return Response{}, &outcome{http: http.StatusUnsupportedMediaType, code: CodeMediaType, status: "F", reason: ReasonMediaType, msg: "Content-Type must be application/json"}
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.cfg.MaxBody))
	if err != nil {
		if tooBig := (*http.MaxBytesError)(nil); errors.As(err, &tooBig) {
			return Response{}, fail(CodeParamIllegal, "F", ReasonMalformed, "the body is larger than the limit")
		}
		return Response{}, fail(CodeParamIllegal, "F", ReasonMalformed, "the body could not be read")
	}
	a, o := h.authenticate(r, body)
	if o != nil {
		return Response{}, o
	}
	cl := a.client
	undo, ok := h.allow(cl)
	if !ok {
		return Response{}, &outcome{http: http.StatusOK, code: CodeTrafficLimit, status: "U", reason: ReasonRateLimit,
			msg: "too many requests; retry later", logMsg: "rate limit", logLevel: slog.LevelDebug}
	}
	// Recorded only past the rate limits, so that no more signatures are
	// remembered than the limits let through; a replay gives its tokens
	// back, so that replaying a client's request does not use up its rate.
	if a.signed && h.cfg.Replay != nil {
		first, err := h.cfg.Replay.FirstUse(r.Context(), replayDigest(cl.ID, a.sig), a.time.Add(h.cfg.ClockSkew))
		if err != nil {
			undo()
			h.log.Error("the replay check failed", "err", err)
			return Response{}, fail(CodeUnknown, "U", ReasonReplayCheck, "the request could not be checked; retry shortly")
		}
		if !first {
			undo()
			// U, not F: two requests with the same body signed in the
			// same millisecond have the same signature, and the second
			// must be free to retry, signed afresh.
			return Response{}, &outcome{http: http.StatusOK, code: CodeRepeatRequest, status: "U", reason: ReasonReplay,
				msg:    "this signed request was accepted before; retry signed afresh, with a new Request-Time",
				logMsg: "replayed signature", logLevel: slog.LevelDebug}
		}
	}
	st.verified = true
	if a.signed && h.cfg.Gate != nil {
		h.cfg.Gate.Verified(r.RemoteAddr)
	}
	req, err := parseApply(body)
	if err != nil {
		return Response{}, fail(CodeParamIllegal, "F", ReasonParam, err.Error())
	}
	if req.customerID != "" && h.cfg.Blocklist != nil && h.cfg.Blocklist.Contains(req.customerID) {
		return Response{}, &outcome{http: http.StatusOK, code: CodeUserStatusAbnormal, status: "F", reason: ReasonBlocklist,
			msg: "the customer's status is abnormal", logMsg: "blocklisted customer " + req.customerID, logLevel: slog.LevelInfo}
	}
	lim := h.cfg.Limits
	lim.Client = 0
	clientID := ""
	if cl != nil {
		lim.Client, clientID = cl.MaxOutstanding, cl.ID
	}
	issued, err := h.cfg.Issuer.ApplyWithin(r.Context(), req.customerID, clientID, lim)
	if err != nil {
		return Response{}, h.mapError(err)
	}
	return Response{
		Result: Result{ResultCode: CodeSuccess, ResultStatus: "S", ResultMessage: "success."},
		PublicKeyInfo: &PublicKeyInfo{
			UniqueID:  issued.UniqueID,
			Salt:      issued.Salt,
			PublicKey: base64.StdEncoding.EncodeToString(issued.PublicKey),
		},
	}, nil
}

// auth is who authenticate found.
type auth struct {
	client *client // nil: anonymous (AllowUnsigned)
	signed bool    // the signature below verified
	sig    []byte
	time   time.Time // the Request-Time
}

// authenticate finds the caller: a registered, enabled client whose
// signature verifies (signed); or, with AllowUnsigned and no Signature
// header, the client its Client-Id names, or nobody (nil) without one.
func (h *Handler) authenticate(r *http.Request, body []byte) (auth, *outcome) {
	// The caller gets the reason; the log only at debug level, so that a
	// flood of bad requests cannot flood it.
	invalidClient := func(msg string) *outcome {
		return &outcome{http: http.StatusOK, code: CodeInvalidClient, status: "F", reason: ReasonInvalidClient, msg: msg, logMsg: msg, logLevel: slog.LevelDebug}
	}
	invalidSig := func(msg string) *outcome {
		return &outcome{http: http.StatusOK, code: CodeInvalidSignature, status: "F", reason: ReasonInvalidSignature, msg: msg, logMsg: msg, logLevel: slog.LevelDebug}
	}
	ids := r.Header.Values(apisig.HeaderClientID)
	sigs := r.Header.Values(apisig.HeaderSignature)
	if len(sigs) == 0 && h.cfg.AllowUnsigned && len(ids) == 0 {
		return auth{}, nil
	}

	switch len(ids) {
	case 0:
		return auth{}, invalidClient("the Client-Id header is missing")
	case 1:
	default:
		return auth{}, invalidClient("more than one Client-Id header")
	}
	id, err := apisig.ParseClientID(ids[0])
	if err != nil {
		return auth{}, invalidClient(err.Error())
	}
	cl := h.clients[id]
	switch {
	case cl == nil:
		return auth{}, invalidClient("unknown Client-Id")
	case cl.Disabled:
		return auth{}, invalidClient("the client is disabled")
	case len(sigs) == 0 && h.cfg.AllowUnsigned:
		return auth{client: cl}, nil
	case len(sigs) == 0:
		return auth{}, invalidSig("the Signature header is missing")
	case len(sigs) > 1:
		return auth{}, invalidSig("more than one Signature header")
	}
	sig, err := apisig.ParseSignature(sigs[0])
	if err != nil {
		return auth{}, invalidSig(err.Error())
	}
	version := sig.KeyVersion
	if version == 0 {
		version = cl.latest
	}
	pub := cl.Keys[version]
	if pub == nil {
		return auth{}, invalidSig(fmt.Sprintf("no key of keyVersion %d is registered for the client", version))
	}

	times := r.Header.Values(apisig.HeaderRequestTime)
	switch len(times) {
	case 0:
		return auth{}, fail(CodeParamIllegal, "F", ReasonMalformed, "the Request-Time header is missing")
	case 1:
	default:
		return auth{}, fail(CodeParamIllegal, "F", ReasonMalformed, "more than one Request-Time header")
	}
	t, err := apisig.ParseRequestTime(times[0])
	if err != nil {
		return auth{}, fail(CodeParamIllegal, "F", ReasonMalformed, err.Error())
	}
	if skew := h.cfg.Now().Sub(t).Abs(); skew > h.cfg.ClockSkew {
		return auth{}, invalidSig(fmt.Sprintf("the Request-Time is %s away from the server's clock, more than the %s allowed; check the clock",
			skew.Round(time.Second), h.cfg.ClockSkew))
	}
	content := apisig.Content(http.MethodPost, r.URL.EscapedPath(), ids[0], times[0], body)
	if err := apisig.Verify(pub, content, sig.Value); err != nil {
		return auth{}, invalidSig(fmt.Sprintf("the signature does not verify with the client's key of keyVersion %d", version))
	}
	return auth{client: cl, signed: true, sig: sig.Value, time: t}, nil
}

// allow takes a token from the client's bucket and the global one, or from
// neither; undo gives them back.
func (h *Handler) allow(cl *client) (undo func(), ok bool) {
	now := h.cfg.Now()
	var rs []*rate.Reservation
	undo = func() {
		for _, r := range rs {
			r.CancelAt(now)
		}
	}
	for _, l := range []*rate.Limiter{cl.limiterOrNil(), h.global} {
		if l == nil {
			continue
		}
		r := l.ReserveN(now, 1)
		if !r.OK() || r.DelayFrom(now) > 0 {
			r.CancelAt(now)
			undo()
			return nil, false
		}
		rs = append(rs, r)
	}
	return undo, true
}

func (c *client) limiterOrNil() *rate.Limiter {
	if c == nil {
		return nil
	}
	return c.limiter
}

// mapError is the one place issuer errors become result codes. The cause
// goes to the log; the caller gets a safe message.
func (h *Handler) mapError(err error) *outcome {
	var qe *issuer.QuotaError
	switch {
	case errors.As(err, &qe):
		msg := "too many keys are outstanding; retry later"
		switch qe.Scope {
		case "client":
			msg = "the client holds too many outstanding keys; retry once some are used or expire"
		case "customer":
			msg = "the customer holds too many outstanding keys; retry once some are used or expire"
		}
		h.log.Debug("applyPublicKey refused", "code", CodeTrafficLimit, "reason", err)
		return fail(CodeTrafficLimit, "U", ReasonQuota, msg)
	case errors.Is(err, issuer.ErrPoolEmpty):
		return fail(CodeUnknown, "U", "", "no key is ready; retry shortly")
	case errors.Is(err, issuer.ErrUnavailable):
		return fail(CodeUnknown, "U", "", "the key service is temporarily unavailable; retry shortly")
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fail(CodeUnknown, "U", "", "the request was cancelled; retry")
	}
	h.log.Error("apply failed", "err", err)
	return fail(CodeUnknown, "U", "", "internal error; retry shortly")
}

// reply writes resp, with Client-Id and Response-Time; and when sign and
// there is a Signer, a Signature over "<method> <path>\n<Client-Id>.<Response-Time>.<body>".
// The wallet SDKs check an answer's signature only when the answer has a
// Signature header (and a Response-Time); without one they take the answer
// as it is, so an unsigned refusal reads the same to them.
func (h *Handler) reply(w http.ResponseWriter, r *http.Request, clientID string, sign bool, httpStatus int, resp Response) {
	body, err := json.Marshal(resp)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	hdr := w.Header()
	hdr.Set("Content-Type", "application/json; charset=UTF-8")
	hdr.Set("Cache-Control", "no-store")
	if clientID != "" {
		hdr.Set(apisig.HeaderClientID, clientID)
	}
	respTime := apisig.FormatTime(h.cfg.Now())
	hdr.Set(apisig.HeaderResponseTime, respTime)
	if sign && h.cfg.Signer != nil {
		sig, err := h.cfg.Signer.Sign(r.Context(), apisig.Content(r.Method, r.URL.EscapedPath(), clientID, respTime, body))
		if err != nil {
			// An unsigned answer is all that is left; the SDKs will
			// reject it, and the caller retries. An issued key expires
			// unused.
			h.log.Error("failed to sign the answer", "result", resp.Result.ResultCode, "err", err)
			body, _ = json.Marshal(Response{Result: Result{ResultCode: CodeUnknown, ResultStatus: "U",
				ResultMessage: "the answer could not be signed; retry shortly"}})
			httpStatus = http.StatusOK
		} else {
			hdr.Set(apisig.HeaderSignature, apisig.Signature{
				Algorithm: apisig.AlgorithmRSA256, KeyVersion: h.cfg.SignerKeyVersion, Value: sig}.String())
		}
	}
	w.WriteHeader(httpStatus)
	w.Write(body)
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

func printable(s string) string {
	if len(s) > 128 {
		s = s[:128] + "..."
	}
	return strings.ToValidUTF8(s, "?")
}
