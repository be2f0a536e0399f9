package publicapi_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

func TestMain(m *testing.M) { hsmtest.Main(m) }

// fakeIssuer records what ApplyWithin was asked and answers with issued or
// err; panics if panicking is set.
type fakeIssuer struct {
	issued issuer.Issued
	err    error
	panics bool

	mu          sync.Mutex
	calls       int
	customerIDs []string
	clientIDs   []string
	limits      []issuer.Limits
}

var _ publicapi.Issuer = (*fakeIssuer)(nil)

func (f *fakeIssuer) ApplyWithin(ctx context.Context, customerID, clientID string, lim issuer.Limits) (issuer.Issued, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.customerIDs = append(f.customerIDs, customerID)
	f.clientIDs = append(f.clientIDs, clientID)
	f.limits = append(f.limits, lim)
	if f.panics {
		panic("fake issuer bug")
	}
	if f.err != nil {
		return issuer.Issued{}, f.err
	}
	return f.issued, nil
}

// testPublicKey stands in for a DER SubjectPublicKeyInfo; bytes that base64
// to '+' and '/' show the encoding is the standard one.
var testPublicKey = []byte{0x30, 0x82, 0x01, 0x22, 0xfb, 0xff, 0xbf, 0x00, 0x3e, 0x3f}

func newIssued() issuer.Issued {
	return issuer.Issued{
		UniqueID:  "AbCdEfGhIjKlMnOpQrStUvWxYz012345",
		Salt:      "s4lt0123abcd",
		PublicKey: testPublicKey,
		ExpiresAt: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

// Keys of the test: two of the merchant's, by keyVersion, a stranger's, and
// keyissuer's response-signing key (in memory here; sdk_test.go keeps it in
// SoftHSM).
var testKeys = sync.OnceValue(func() map[string]*rsa.PrivateKey {
	keys := map[string]*rsa.PrivateKey{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, name := range []string{"v1", "v2", "stranger", "server"} {
		wg.Go(func() {
			k, err := rsa.GenerateKey(rand.Reader, 2048)
			if err != nil {
				panic(err)
			}
			mu.Lock()
			keys[name] = k
			mu.Unlock()
		})
	}
	wg.Wait()
	return keys
})

// memSigner is a [publicapi.Signer] with an in-memory key.
type memSigner struct{ key *rsa.PrivateKey }

func (s memSigner) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	return rsa.SignPKCS1v15(nil, s.key, crypto.SHA256, d[:])
}

type failingSigner struct{}

func (failingSigner) Sign(context.Context, []byte) ([]byte, error) {
	return nil, errors.New("token down")
}

type blocklist map[string]bool

func (b blocklist) Contains(id string) bool { return b[id] }

const (
	maxBody     = 4096
	clientID    = "SANDBOX_5Y3A3N2YEA4Y02222"
	disabledID  = "DISABLED_CLIENT"
	limitedID   = "LIMITED_CLIENT"
	blockedCust = "2188000000000666"
	jsonType    = "application/json"
	defaultBody = `{"customerId":"2188000123456789"}`
)

// baseConfig is the handler of the conformance tests: signed requests only,
// three registered clients, a blocklist, limits, signed answers.
func baseConfig(is publicapi.Issuer) publicapi.Config {
	k := testKeys()
	return publicapi.Config{
		Issuer:  is,
		Log:     slog.New(slog.DiscardHandler),
		MaxBody: maxBody,
		Clients: []publicapi.Client{
			{ID: clientID, Keys: map[int]*rsa.PublicKey{1: &k["v1"].PublicKey, 2: &k["v2"].PublicKey}, MaxOutstanding: 7},
			{ID: disabledID, Disabled: true, Keys: map[int]*rsa.PublicKey{1: &k["v1"].PublicKey}},
			// Burst 1 and a token a century: the second request is over.
			{ID: limitedID, Keys: map[int]*rsa.PublicKey{1: &k["v1"].PublicKey}, Rate: rate.Every(100 * 365 * 24 * time.Hour), Burst: 1},
		},
		ClockSkew:        5 * time.Minute,
		Signer:           memSigner{k["server"]},
		SignerKeyVersion: 1,
		Blocklist:        blocklist{blockedCust: true},
		Limits:           issuer.Limits{Total: 100, Customer: 3},
	}
}

// request is one applyPublicKey request, signed as the wallet SDKs sign.
type request struct {
	method, path, contentType string // POST, ApplyPath, jsonType; contentType "-" for none
	body                      string

	clientID    string // the Client-Id header; "-" for none
	requestTime string // the Request-Time header; "" for now in epoch millis, "-" for none
	unsigned    bool   // no Signature header
	key         string // which test key signs: "v1" unless set
	keyVersion  string // in the Signature header: "1" unless set; "-" for none
	// signature replaces the whole Signature header when set.
	signature string
	// What the signature covers, when it must differ from the request.
	signMethod, signPath, signClientID, signTime, signBody *string
	sep                                                    string // between header items: ","
	encode                                                 func(b64 string) string
	header                                                 func(h http.Header) // last word on the headers
}

func (rq *request) defaults() {
	def := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	def(&rq.method, http.MethodPost)
	def(&rq.path, publicapi.ApplyPath)
	def(&rq.contentType, jsonType)
	def(&rq.clientID, clientID)
	def(&rq.requestTime, strconv.FormatInt(time.Now().UnixMilli(), 10))
	def(&rq.key, "v1")
	def(&rq.keyVersion, "1")
	def(&rq.sep, ",")
	if rq.encode == nil {
		rq.encode = url.QueryEscape // Java's URLEncoder.encode
	}
}

// sdkSignature signs as the wallet SDKs do, independently of apisig:
// "<METHOD> <path>\n<clientId>.<requestTime>.<body>", SHA256withRSA,
// standard base64, URL-encoded.
func sdkSignature(key *rsa.PrivateKey, method, path, clientID, reqTime, body string) string {
	content := method + " " + path + "\n" + clientID + "." + reqTime + "." + body
	d := sha256.Sum256([]byte(content))
	sig, err := rsa.SignPKCS1v15(nil, key, crypto.SHA256, d[:])
	if err != nil {
		panic(err)
	}
	return base64.StdEncoding.EncodeToString(sig)
}

// build makes the HTTP request for srv. Header names are written as given:
// the Go client does not canonicalise keys set directly in the map.
func (rq request) build(tb testing.TB, srv string) *http.Request {
	tb.Helper()
	rq.defaults()
	r, err := http.NewRequest(rq.method, srv+rq.path, strings.NewReader(rq.body))
	if err != nil {
		tb.Fatal(err)
	}
	if rq.contentType != "-" {
		r.Header.Set("Content-Type", rq.contentType)
	}
	if rq.clientID != "-" {
		r.Header["Client-Id"] = []string{rq.clientID}
	}
	if rq.requestTime != "-" {
		r.Header["Request-Time"] = []string{rq.requestTime}
	}
	if !rq.unsigned {
		pick := func(p *string, v string) string {
			if p != nil {
				return *p
			}
			return v
		}
		sig := sdkSignature(testKeys()[rq.key],
			pick(rq.signMethod, rq.method), pick(rq.signPath, rq.path), pick(rq.signClientID, rq.clientID),
			pick(rq.signTime, rq.requestTime), pick(rq.signBody, rq.body))
		items := []string{"algorithm=RSA256"}
		if rq.keyVersion != "-" {
			items = append(items, "keyVersion="+rq.keyVersion)
		}
		items = append(items, "signature="+rq.encode(sig))
		h := strings.Join(items, rq.sep)
		if rq.signature != "" {
			h = rq.signature
		}
		r.Header["Signature"] = []string{h}
	}
	if rq.header != nil {
		rq.header(r.Header)
	}
	return r
}

// answer is a decoded applyPublicKey response.
type answer struct {
	status int
	header http.Header
	raw    []byte
	resp   publicapi.Response
}

func send(tb testing.TB, c *http.Client, r *http.Request) answer {
	tb.Helper()
	resp, err := c.Do(r)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	a := answer{status: resp.StatusCode, header: resp.Header, raw: raw}
	if err := json.Unmarshal(raw, &a.resp); err != nil {
		tb.Fatalf("%s %s: body %q is not a response: %v", r.Method, r.URL.Path, raw, err)
	}
	return a
}

// sdkVerify checks a response signature as the wallet SDKs do: split the
// Signature header on commas, take the third item, the value after its
// '=', URL-decode it, base64-decode it, and verify SHA256withRSA over
// "<METHOD> <path>\n<Client-Id>.<Response-Time>.<body>".
func sdkVerify(pub *rsa.PublicKey, method, path string, h http.Header, body []byte) error {
	items := strings.Split(h.Get("Signature"), ",")
	if len(items) != 3 || !strings.HasPrefix(items[0], "algorithm=RSA256") || !strings.HasPrefix(items[1], "keyVersion=") {
		return fmt.Errorf("Signature header %q is not algorithm=RSA256,keyVersion=...,signature=...", h.Get("Signature"))
	}
	kv := strings.Split(items[2], "=")
	if len(kv) != 2 || kv[0] != "signature" {
		return fmt.Errorf("third item %q is not signature=<url-encoded>", items[2])
	}
	b64, err := url.QueryUnescape(kv[1]) // URLDecoder.decode: '+' would become ' '
	if err != nil {
		return err
	}
	sig, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return err
	}
	if h.Get("Response-Time") == "" {
		return errors.New("no Response-Time")
	}
	content := method + " " + path + "\n" + h.Get("Client-Id") + "." + h.Get("Response-Time") + "." + string(body)
	d := sha256.Sum256([]byte(content))
	return rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig)
}

// passedAuth says whether an answer's request got through authentication,
// the rate limits and the replay check: answers to the others are not
// signed.
func passedAuth(res publicapi.Result) bool {
	switch res.ResultCode {
	case publicapi.CodeInvalidClient, publicapi.CodeInvalidSignature, publicapi.CodeMethod,
		publicapi.CodeMediaType, publicapi.CodeInvalidAPI:
		return false
	case publicapi.CodeTrafficLimit:
		// A rate limit comes before the replay check; a quota after.
		return strings.Contains(res.ResultMessage, "outstanding")
	case publicapi.CodeParamIllegal:
		// The body's size and the Request-Time are checked first.
		return !strings.Contains(res.ResultMessage, "Request-Time") && !strings.Contains(res.ResultMessage, "limit") &&
			!strings.Contains(res.ResultMessage, "could not be read")
	}
	return true
}

// checkAllStrings checks that every value in body, at any depth, is a JSON
// string, as the wallet API family requires.
func checkAllStrings(tb testing.TB, body []byte) {
	tb.Helper()
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		tb.Fatalf("body %q is not JSON: %v", body, err)
	}
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, e := range v {
				walk(path+"."+k, e)
			}
		case string:
		default:
			tb.Errorf("%s is %T (%v), want a string; body %s", path, v, v, body)
		}
	}
	m, ok := v.(map[string]any)
	if !ok {
		tb.Fatalf("body %s is not a JSON object", body)
	}
	walk("$", m)
}

func ptr(s string) *string { return &s }

// padTo returns prefix + 'x'... + suffix of exactly n bytes.
func padTo(prefix, suffix string, n int) string {
	return prefix + strings.Repeat("x", n-len(prefix)-len(suffix)) + suffix
}

func isoTime(t time.Time, layout string) string { return t.Format(layout) }

// TestConformance is the contract of applyPublicKey, row by row: every
// result code, and every malformed header and body, over a real connection.
func TestConformance(t *testing.T) {
	now := time.Now()
	tests := []struct {
		name      string
		req       request
		cfg       func(*publicapi.Config)
		issuerErr error
		panics    bool
		warmup    int // identical requests sent first

		wantHTTP     int // 200 if zero
		wantCode     string
		wantStatus   string
		wantMessage  string  // a substring of resultMessage
		wantCustomer *string // the customerId the issuer got; nil: not called
		wantClient   string  // the clientId the issuer got
		wantAllow    string
		unsigned     bool // the answer is not signed
	}{
		// SUCCESS.
		{name: "signed", wantCode: "SUCCESS", wantStatus: "S", wantMessage: "success.", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "keyVersion 2", req: request{key: "v2", keyVersion: "2"}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "no keyVersion means the latest", req: request{key: "v2", keyVersion: "-"}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "spaces after commas", req: request{sep: ", "}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "signature not URL-encoded", req: request{encode: func(s string) string { return s }}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "signature items in another order", req: request{header: func(h http.Header) {
			it := strings.Split(h.Get("Signature"), ",")
			h.Set("Signature", it[2]+","+it[0]+","+it[1])
		}}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "unknown signature item ignored", req: request{header: func(h http.Header) { h.Set("Signature", h.Get("Signature")+",charset=UTF-8") }},
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "lower-case header names", req: request{header: func(h http.Header) {
			for _, k := range []string{"Client-Id", "Request-Time", "Signature", "Content-Type"} {
				h[strings.ToLower(k)] = h[k]
				delete(h, k)
			}
		}}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "upper-case header names", req: request{header: func(h http.Header) {
			for _, k := range []string{"Client-Id", "Request-Time", "Signature"} {
				h[strings.ToUpper(k)] = h[k]
				delete(h, k)
			}
		}}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "Request-Time ISO 8601 with offset", req: request{requestTime: isoTime(now.In(time.FixedZone("", 8*3600)), "2006-01-02T15:04:05-07:00")},
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "Request-Time ISO 8601 UTC with milliseconds", req: request{requestTime: isoTime(now.UTC(), "2006-01-02T15:04:05.000Z")},
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "Request-Time ISO 8601 basic offset", req: request{requestTime: isoTime(now.In(time.FixedZone("", -5*3600)), "2006-01-02T15:04:05-0700")},
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "Request-Time 4 minutes behind", req: request{requestTime: strconv.FormatInt(now.Add(-4*time.Minute).UnixMilli(), 10)},
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "customerId absent", req: request{body: `{}`}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr(""), wantClient: clientID},
		{name: "customerId of 13 digits", req: request{body: `{"customerId":"2188000123456"}`}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456"), wantClient: clientID},
		{name: "customerId of 19 digits", req: request{body: `{"customerId":"2188000123456789012"}`}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789012"), wantClient: clientID},
		{name: "customerId of 32 digits", req: request{body: `{"customerId":"21` + strings.Repeat("0", 30) + `"}`}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("21" + strings.Repeat("0", 30)), wantClient: clientID},
		{name: "unknown fields ignored", req: request{body: `{"extendInfo":{"a":1},"amount":12,"customerId":"2188000123456789","flag":true}`},
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "charset parameter", req: request{contentType: "application/json; charset=UTF-8"}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "media type case", req: request{contentType: "Application/JSON;charset=utf-8"}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "body of exactly the limit", req: request{body: padTo(`{"customerId":"2188000123456789","pad":"`, `"}`, maxBody)},
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "unsigned allowed, anonymous", req: request{clientID: "-", requestTime: "-", unsigned: true}, cfg: allowUnsigned,
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: ""},
		{name: "unsigned allowed, named client", req: request{unsigned: true}, cfg: allowUnsigned,
			wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "blocklisted customer absent from the body", req: request{body: `{}`}, wantCode: "SUCCESS", wantStatus: "S", wantCustomer: ptr(""), wantClient: clientID},

		// PARAM_ILLEGAL: the body.
		{name: "customerId as number", req: request{body: `{"customerId":2188000123456789}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "customerId"},
		{name: "customerId as boolean", req: request{body: `{"customerId":true}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "string"},
		{name: "customerId as object", req: request{body: `{"customerId":{"id":"2188000123456789"}}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "string"},
		{name: "customerId as array", req: request{body: `{"customerId":["2188000123456789"]}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "string"},
		{name: "customerId null", req: request{body: `{"customerId":null}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "customerId"},
		{name: "customerId empty", req: request{body: `{"customerId":""}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "empty"},
		{name: "customerId not starting with 21", req: request{body: `{"customerId":"3188000123456789"}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "21"},
		{name: "customerId with letters", req: request{body: `{"customerId":"21880001234567ab"}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "digits"},
		{name: "customerId with non-ASCII digits", req: request{body: `{"customerId":"21٣"}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "digits"},
		{name: "customerId of 33 characters", req: request{body: `{"customerId":"21` + strings.Repeat("0", 31) + `"}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "32"},
		{name: "customerId with spaces", req: request{body: `{"customerId":" 2188000123456789"}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F"},
		{name: "invalid JSON", req: request{body: `{"customerId":`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F"},
		{name: "trailing comma", req: request{body: `{"customerId":"2188000123456789",}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F"},
		{name: "duplicate keys", req: request{body: `{"customerId":"2188000123456789","customerId":"2188000123456780"}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "duplicate"},
		{name: "empty body", req: request{body: ``}, wantCode: "PARAM_ILLEGAL", wantStatus: "F"},
		{name: "top-level array", req: request{body: `[{"customerId":"2188000123456789"}]`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F"},
		{name: "top-level string", req: request{body: `"2188000123456789"`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F"},
		{name: "two objects", req: request{body: `{}{}`}, wantCode: "PARAM_ILLEGAL", wantStatus: "F"},
		{name: "invalid UTF-8", req: request{body: "{\"customerId\":\"2188000123456789\",\"x\":\"\xff\"}"}, wantCode: "PARAM_ILLEGAL", wantStatus: "F"},
		{name: "body one byte over the limit", req: request{body: padTo(`{"customerId":"2188000123456789","pad":"`, `"}`, maxBody+1)},
			wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "limit"},
		{name: "body far over the limit", req: request{body: padTo(`{"pad":"`, `"}`, 1<<20)}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "limit"},

		// PARAM_ILLEGAL: Request-Time.
		{name: "Request-Time missing", req: request{requestTime: "-"}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "Request-Time"},
		{name: "Request-Time empty", req: request{header: func(h http.Header) { h["Request-Time"] = []string{""} }}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "Request-Time"},
		{name: "Request-Time twice", req: request{header: func(h http.Header) { h["Request-Time"] = append(h["Request-Time"], h["Request-Time"]...) }},
			wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "Request-Time"},
		{name: "Request-Time not a time", req: request{requestTime: "yesterday"}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "Request-Time"},
		{name: "Request-Time in microseconds", req: request{requestTime: strconv.FormatInt(now.UnixMicro(), 10)}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "Request-Time"},
		{name: "Request-Time ISO 8601 without offset", req: request{requestTime: now.Format("2006-01-02T15:04:05")}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "Request-Time"},
		{name: "Request-Time negative", req: request{requestTime: "-1685599933871"}, wantCode: "PARAM_ILLEGAL", wantStatus: "F", wantMessage: "Request-Time"},

		// INVALID_SIGNATURE.
		{name: "Signature missing", req: request{unsigned: true}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "missing"},
		{name: "Signature empty", req: request{header: func(h http.Header) { h["Signature"] = []string{""} }}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "Signature twice", req: request{header: func(h http.Header) { h["Signature"] = append(h["Signature"], h["Signature"]...) }},
			wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "more than one"},
		{name: "signature bad base64", req: request{signature: "algorithm=RSA256,keyVersion=1,signature=not*base64"}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "base64"},
		{name: "signature URL-safe base64", req: request{encode: func(s string) string {
			return strings.NewReplacer("+", "-", "/", "_").Replace(s) + "-_"
		}}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "base64"},
		{name: "signature without padding", req: request{encode: func(s string) string { return strings.TrimRight(s, "=") + "A" }},
			wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "signature bad URL encoding", req: request{encode: func(s string) string { return s + "%zz" }}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "URL"},
		{name: "signature empty value", req: request{signature: "algorithm=RSA256,keyVersion=1,signature="}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "signature item missing", req: request{signature: "algorithm=RSA256,keyVersion=1"}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "no signature"},
		{name: "algorithm missing", req: request{header: func(h http.Header) {
			h.Set("Signature", strings.TrimPrefix(h.Get("Signature"), "algorithm=RSA256,"))
		}}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "algorithm"},
		{name: "algorithm RSA", req: request{header: func(h http.Header) { h.Set("Signature", strings.Replace(h.Get("Signature"), "RSA256", "RSA", 1)) }},
			wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "algorithm"},
		{name: "algorithm SHA256withRSA", req: request{header: func(h http.Header) {
			h.Set("Signature", strings.Replace(h.Get("Signature"), "RSA256", "SHA256withRSA", 1))
		}}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "algorithm"},
		{name: "algorithm twice", req: request{header: func(h http.Header) { h.Set("Signature", "algorithm=RSA256,"+h.Get("Signature")) }},
			wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "twice"},
		{name: "trailing comma in Signature", req: request{header: func(h http.Header) { h.Set("Signature", h.Get("Signature")+",") }},
			wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "semicolons in Signature", req: request{sep: ";"}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "item without '='", req: request{header: func(h http.Header) { h.Set("Signature", h.Get("Signature")+",RSA256") }},
			wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "keyVersion not a number", req: request{keyVersion: "one"}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "keyVersion"},
		{name: "keyVersion 0", req: request{keyVersion: "0"}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "keyVersion"},
		{name: "keyVersion not registered", req: request{keyVersion: "3"}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "keyVersion 3"},
		{name: "keyVersion of another key", req: request{key: "v1", keyVersion: "2"}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "does not verify"},
		{name: "signed by a stranger", req: request{key: "stranger"}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "does not verify"},
		{name: "wrong path in the signed content", req: request{signPath: ptr("/ams/api/v1/payments/pay")}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "wrong method in the signed content", req: request{signMethod: ptr("GET")}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "other body signed", req: request{signBody: ptr(`{"customerId":"2188000123456780"}`)}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "body with a trailing newline not signed", req: request{body: defaultBody + "\n", signBody: ptr(defaultBody)}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "other Client-Id signed", req: request{signClientID: ptr(limitedID)}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "other Request-Time signed", req: request{signTime: ptr(strconv.FormatInt(now.Add(-time.Second).UnixMilli(), 10))}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "Request-Time 6 minutes behind", req: request{requestTime: strconv.FormatInt(now.Add(-6*time.Minute).UnixMilli(), 10)},
			wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "clock"},
		{name: "Request-Time 6 minutes ahead", req: request{requestTime: isoTime(now.Add(6*time.Minute).UTC(), time.RFC3339)},
			wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "clock"},
		{name: "Request-Time in epoch seconds", req: request{requestTime: strconv.FormatInt(now.Unix(), 10)}, wantCode: "INVALID_SIGNATURE", wantStatus: "F", wantMessage: "clock"},
		{name: "RSA-PSS signature", req: request{header: func(h http.Header) {
			k := testKeys()["v1"]
			d := sha256.Sum256([]byte("POST " + publicapi.ApplyPath + "\n" + clientID + "." + h.Get("Request-Time") + "." + defaultBody))
			sig, _ := rsa.SignPSS(rand.Reader, k, crypto.SHA256, d[:], nil)
			h.Set("Signature", "algorithm=RSA256,keyVersion=1,signature="+url.QueryEscape(base64.StdEncoding.EncodeToString(sig)))
		}}, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "bad signature with unsigned allowed", req: request{key: "stranger"}, cfg: allowUnsigned, wantCode: "INVALID_SIGNATURE", wantStatus: "F"},
		{name: "Signature without Client-Id, unsigned allowed", req: request{clientID: "-"}, cfg: allowUnsigned, wantCode: "INVALID_CLIENT", wantStatus: "F"},

		// INVALID_CLIENT.
		{name: "Client-Id missing", req: request{clientID: "-"}, wantCode: "INVALID_CLIENT", wantStatus: "F", wantMessage: "missing"},
		{name: "no header at all", req: request{clientID: "-", requestTime: "-", unsigned: true}, wantCode: "INVALID_CLIENT", wantStatus: "F", wantMessage: "missing"},
		{name: "Client-Id empty", req: request{header: func(h http.Header) { h["Client-Id"] = []string{""} }}, wantCode: "INVALID_CLIENT", wantStatus: "F"},
		{name: "Client-Id unknown", req: request{clientID: "SANDBOX_UNKNOWN"}, wantCode: "INVALID_CLIENT", wantStatus: "F", wantMessage: "unknown"},
		{name: "Client-Id of another case", req: request{clientID: strings.ToLower(clientID)}, wantCode: "INVALID_CLIENT", wantStatus: "F", wantMessage: "unknown"},
		{name: "Client-Id disabled", req: request{clientID: disabledID}, wantCode: "INVALID_CLIENT", wantStatus: "F", wantMessage: "disabled"},
		{name: "Client-Id with a dot", req: request{clientID: "SANDBOX.1"}, wantCode: "INVALID_CLIENT", wantStatus: "F"},
		{name: "Client-Id too long", req: request{clientID: strings.Repeat("A", 65)}, wantCode: "INVALID_CLIENT", wantStatus: "F"},
		{name: "Client-Id twice", req: request{header: func(h http.Header) { h["Client-Id"] = []string{clientID, clientID} }}, wantCode: "INVALID_CLIENT", wantStatus: "F"},
		{name: "unknown client with a bad body", req: request{clientID: "SANDBOX_UNKNOWN", body: `{"customerId":1}`}, wantCode: "INVALID_CLIENT", wantStatus: "F"},
		{name: "unsigned allowed, unknown client", req: request{clientID: "SANDBOX_UNKNOWN", unsigned: true}, cfg: allowUnsigned, wantCode: "INVALID_CLIENT", wantStatus: "F"},
		{name: "unsigned allowed, disabled client", req: request{clientID: disabledID, unsigned: true}, cfg: allowUnsigned, wantCode: "INVALID_CLIENT", wantStatus: "F"},

		// USER_STATUS_ABNORMAL.
		{name: "blocklisted customer", req: request{body: `{"customerId":"` + blockedCust + `"}`}, wantCode: "USER_STATUS_ABNORMAL", wantStatus: "F"},
		{name: "blocklisted customer, unsigned", req: request{body: `{"customerId":"` + blockedCust + `"}`, unsigned: true, clientID: "-"}, cfg: allowUnsigned,
			wantCode: "USER_STATUS_ABNORMAL", wantStatus: "F"},

		// REQUEST_TRAFFIC_EXCEED_LIMIT.
		{name: "client rate limit", req: request{clientID: limitedID}, warmup: 1, wantCode: "REQUEST_TRAFFIC_EXCEED_LIMIT", wantStatus: "U", wantMessage: "retry"},
		{name: "global rate limit", cfg: func(c *publicapi.Config) { c.Rate, c.Burst = rate.Every(100*365*24*time.Hour), 2 }, warmup: 2,
			wantCode: "REQUEST_TRAFFIC_EXCEED_LIMIT", wantStatus: "U"},
		{name: "global rate limit, unsigned", req: request{clientID: "-", requestTime: "-", unsigned: true},
			cfg: func(c *publicapi.Config) { allowUnsigned(c); c.Rate, c.Burst = rate.Every(100*365*24*time.Hour), 1 }, warmup: 1,
			wantCode: "REQUEST_TRAFFIC_EXCEED_LIMIT", wantStatus: "U"},
		{name: "total outstanding cap", issuerErr: &issuer.QuotaError{Scope: "total", Limit: 100},
			wantCode: "REQUEST_TRAFFIC_EXCEED_LIMIT", wantStatus: "U", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "client outstanding cap", issuerErr: fmt.Errorf("apply: %w", &issuer.QuotaError{Scope: "client", Limit: 7}),
			wantCode: "REQUEST_TRAFFIC_EXCEED_LIMIT", wantStatus: "U", wantMessage: "client", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "customer outstanding cap", issuerErr: &issuer.QuotaError{Scope: "customer", Limit: 3},
			wantCode: "REQUEST_TRAFFIC_EXCEED_LIMIT", wantStatus: "U", wantMessage: "customer", wantCustomer: ptr("2188000123456789"), wantClient: clientID},

		// UNKNOWN_EXCEPTION.
		{name: "pool empty", issuerErr: fmt.Errorf("apply: %w", issuer.ErrPoolEmpty), wantCode: "UNKNOWN_EXCEPTION", wantStatus: "U", wantMessage: "retry",
			wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "token unavailable", issuerErr: issuer.ErrUnavailable, wantCode: "UNKNOWN_EXCEPTION", wantStatus: "U", wantMessage: "retry",
			wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "request cancelled", issuerErr: context.Canceled, wantCode: "UNKNOWN_EXCEPTION", wantStatus: "U", wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "store failure", issuerErr: errors.New("store exploded: secret-cause"), wantCode: "UNKNOWN_EXCEPTION", wantStatus: "U",
			wantCustomer: ptr("2188000123456789"), wantClient: clientID},
		{name: "answer cannot be signed", cfg: func(c *publicapi.Config) { c.Signer = failingSigner{} }, wantCode: "UNKNOWN_EXCEPTION", wantStatus: "U",
			wantMessage: "signed", wantCustomer: ptr("2188000123456789"), wantClient: clientID, unsigned: true},

		// PROCESS_FAIL.
		{name: "a bug", panics: true, wantCode: "PROCESS_FAIL", wantStatus: "F", wantCustomer: ptr("2188000123456789"), wantClient: clientID},

		// Protocol errors.
		{name: "GET", req: request{method: http.MethodGet, contentType: "-"}, wantHTTP: 405, wantCode: "METHOD_NOT_SUPPORTED", wantStatus: "F", wantAllow: "POST"},
		{name: "PUT", req: request{method: http.MethodPut, body: defaultBody}, wantHTTP: 405, wantCode: "METHOD_NOT_SUPPORTED", wantStatus: "F", wantAllow: "POST"},
		{name: "text/plain", req: request{contentType: "text/plain"}, wantHTTP: 415, wantCode: "MEDIA_TYPE_NOT_ACCEPTABLE", wantStatus: "F"},
		{name: "no Content-Type", req: request{contentType: "-"}, wantHTTP: 415, wantCode: "MEDIA_TYPE_NOT_ACCEPTABLE", wantStatus: "F"},
		{name: "form Content-Type", req: request{contentType: "application/x-www-form-urlencoded", body: "customerId=2188000123456789"},
			wantHTTP: 415, wantCode: "MEDIA_TYPE_NOT_ACCEPTABLE", wantStatus: "F"},
		{name: "malformed Content-Type", req: request{contentType: "application/json; charset"}, wantHTTP: 415, wantCode: "MEDIA_TYPE_NOT_ACCEPTABLE", wantStatus: "F"},
		{name: "unknown path", req: request{path: "/ams/api/v1/customer/applyPrivateKey"}, wantHTTP: 404, wantCode: "INVALID_API", wantStatus: "F"},
		{name: "path with trailing slash", req: request{path: publicapi.ApplyPath + "/"}, wantHTTP: 404, wantCode: "INVALID_API", wantStatus: "F"},
		{name: "unknown path with GET", req: request{method: http.MethodGet, path: "/ams/api/", contentType: "-"}, wantHTTP: 404, wantCode: "INVALID_API", wantStatus: "F"},
	}
	for _, tt := range tests {
		if tt.req.body == "" && !strings.Contains(tt.name, "empty body") && tt.req.method != http.MethodGet {
			tt.req.body = defaultBody
		}
		t.Run(tt.name, func(t *testing.T) {
			fake := &fakeIssuer{issued: newIssued(), err: tt.issuerErr, panics: tt.panics}
			cfg := baseConfig(fake)
			if tt.cfg != nil {
				tt.cfg(&cfg)
			}
			srv := httptest.NewServer(publicapi.New(cfg))
			defer srv.Close()
			for range tt.warmup {
				send(t, srv.Client(), tt.req.build(t, srv.URL))
			}
			fake.mu.Lock()
			warmCalls := fake.calls
			fake.mu.Unlock()

			r := tt.req.build(t, srv.URL)
			a := send(t, srv.Client(), r)

			wantHTTP := tt.wantHTTP
			if wantHTTP == 0 {
				wantHTTP = http.StatusOK
			}
			if a.status != wantHTTP {
				t.Errorf("HTTP status = %d, want %d; body %s", a.status, wantHTTP, a.raw)
			}
			if got := a.header.Get("Content-Type"); got != "application/json; charset=UTF-8" {
				t.Errorf("Content-Type = %q, want application/json; charset=UTF-8", got)
			}
			if got := a.header.Get("Allow"); got != tt.wantAllow {
				t.Errorf("Allow = %q, want %q", got, tt.wantAllow)
			}
			checkAllStrings(t, a.raw)
			res := a.resp.Result
			if res.ResultCode != tt.wantCode || res.ResultStatus != tt.wantStatus {
				t.Errorf("result = %s/%s (%q), want %s/%s", res.ResultCode, res.ResultStatus, res.ResultMessage, tt.wantCode, tt.wantStatus)
			}
			if res.ResultMessage == "" || !strings.Contains(res.ResultMessage, tt.wantMessage) {
				t.Errorf("resultMessage = %q, want it to contain %q", res.ResultMessage, tt.wantMessage)
			}
			if bytes.Contains(a.raw, []byte("secret-cause")) {
				t.Errorf("body leaks the issuer error's text: %s", a.raw)
			}
			if tt.wantCode == "SUCCESS" {
				checkPublicKeyInfo(t, a)
			} else if a.resp.PublicKeyInfo != nil || bytes.Contains(a.raw, []byte("publicKeyInfo")) {
				t.Errorf("a %s answer carries publicKeyInfo: %s", tt.wantCode, a.raw)
			}

			// Every answer to a request that passed authentication is
			// signed as the SDKs expect, over the path asked; no other is.
			if tt.unsigned || !passedAuth(res) {
				if a.header.Get("Signature") != "" {
					t.Errorf("answer signed: %q", a.header.Get("Signature"))
				}
			} else if err := sdkVerify(&testKeys()["server"].PublicKey, r.Method, r.URL.Path, a.header, a.raw); err != nil {
				t.Errorf("the answer's signature does not verify: %v (headers %v)", err, a.header)
			}
			if id := r.Header.Get("Client-Id"); len(r.Header.Values("Client-Id")) == 1 && id != "" && len(id) <= 64 && !strings.Contains(id, ".") {
				if got := a.header.Get("Client-Id"); got != id {
					t.Errorf("answer's Client-Id = %q, want %q", got, id)
				}
			}

			fake.mu.Lock()
			defer fake.mu.Unlock()
			calls := fake.calls - warmCalls
			if tt.wantCustomer == nil {
				if calls != 0 {
					t.Errorf("ApplyWithin called %d times, want none", calls)
				}
				return
			}
			if calls != 1 {
				t.Fatalf("ApplyWithin called %d times, want once", calls)
			}
			if got := fake.customerIDs[warmCalls]; got != *tt.wantCustomer {
				t.Errorf("ApplyWithin got customerId %q, want %q", got, *tt.wantCustomer)
			}
			if got := fake.clientIDs[warmCalls]; got != tt.wantClient {
				t.Errorf("ApplyWithin got clientId %q, want %q", got, tt.wantClient)
			}
			wantLim := issuer.Limits{Total: 100, Customer: 3}
			if tt.wantClient == clientID {
				wantLim.Client = 7
			}
			if got := fake.limits[warmCalls]; got != wantLim {
				t.Errorf("ApplyWithin got limits %+v, want %+v", got, wantLim)
			}
		})
	}
}

func allowUnsigned(c *publicapi.Config) { c.AllowUnsigned = true }

func checkPublicKeyInfo(tb testing.TB, a answer) {
	tb.Helper()
	pki := a.resp.PublicKeyInfo
	if pki == nil {
		tb.Fatalf("no publicKeyInfo in %s", a.raw)
	}
	want := newIssued()
	if pki.UniqueID != want.UniqueID || pki.Salt != want.Salt {
		tb.Errorf("publicKeyInfo = %+v, want uniqueId %q salt %q", pki, want.UniqueID, want.Salt)
	}
	der, err := base64.StdEncoding.Strict().DecodeString(pki.PublicKey)
	if err != nil {
		tb.Fatalf("publicKey %q is not standard base64: %v", pki.PublicKey, err)
	}
	if !bytes.Equal(der, want.PublicKey) {
		tb.Errorf("publicKey decodes to %x, want %x", der, want.PublicKey)
	}
	if got := a.header.Get("Cache-Control"); got != "no-store" {
		tb.Errorf("Cache-Control = %q, want no-store", got)
	}
}

// TestRateLimitRefunds checks that a request the global bucket refuses
// does not use up its client's token.
func TestRateLimitRefunds(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	fake := &fakeIssuer{issued: newIssued()}
	cfg := baseConfig(fake)
	cfg.Rate, cfg.Burst, cfg.Now = 1, 1, clock // one a second
	srv := httptest.NewServer(publicapi.New(cfg))
	defer srv.Close()
	code := func(rq request) string {
		t.Helper()
		rq.body = defaultBody
		return send(t, srv.Client(), rq.build(t, srv.URL)).resp.Result.ResultCode
	}
	if c := code(request{}); c != "SUCCESS" {
		t.Fatalf("first request: %s", c)
	}
	// The global bucket is empty: the limited client is refused...
	if c := code(request{clientID: limitedID}); c != "REQUEST_TRAFFIC_EXCEED_LIMIT" {
		t.Fatalf("limited client, global bucket empty: %s, want REQUEST_TRAFFIC_EXCEED_LIMIT", c)
	}
	// ...and still has its one token once the global bucket refills.
	mu.Lock()
	now = now.Add(time.Second)
	mu.Unlock()
	if c := code(request{clientID: limitedID}); c != "SUCCESS" {
		t.Fatalf("limited client, a second later: %s, want SUCCESS", c)
	}
	if c := code(request{clientID: limitedID}); c != "REQUEST_TRAFFIC_EXCEED_LIMIT" {
		t.Fatalf("limited client, its token spent: %s, want REQUEST_TRAFFIC_EXCEED_LIMIT", c)
	}
}

// FuzzApplyBody sends arbitrary bodies, unsigned: the handler never panics,
// and always answers HTTP 200 with a result whose status is S, F or U,
// every value a string.
func FuzzApplyBody(f *testing.F) {
	f.Add([]byte(defaultBody))
	f.Fuzz(func(t *testing.T, body []byte) {
		fake := &fakeIssuer{issued: newIssued()}
		cfg := baseConfig(fake)
		cfg.AllowUnsigned, cfg.Signer, cfg.Blocklist = true, nil, nil
		req := httptest.NewRequest(http.MethodPost, publicapi.ApplyPath, bytes.NewReader(body))
		req.Header.Set("Content-Type", jsonType)
		rec := httptest.NewRecorder()
		publicapi.New(cfg).ServeHTTP(rec, req)
		if rec.Code != http.StatusOK {
			t.Fatalf("HTTP status = %d, want 200; body %s", rec.Code, rec.Body)
		}
		raw := rec.Body.Bytes()
		checkAllStrings(t, raw)
		var a publicapi.Response
		if err := json.Unmarshal(raw, &a); err != nil {
			t.Fatal(err)
		}
		r := a.Result
		switch {
		case r.ResultStatus == "S" && r.ResultCode == "SUCCESS":
			if a.PublicKeyInfo == nil {
				t.Fatalf("SUCCESS without publicKeyInfo: %s", raw)
			}
		case r.ResultStatus == "F" && r.ResultCode == "PARAM_ILLEGAL":
			if a.PublicKeyInfo != nil {
				t.Fatalf("PARAM_ILLEGAL with publicKeyInfo: %s", raw)
			}
		default:
			t.Fatalf("result %s/%s, want SUCCESS/S or PARAM_ILLEGAL/F; body %s", r.ResultCode, r.ResultStatus, raw)
		}
		if r.ResultMessage == "" {
			t.Fatalf("empty resultMessage: %s", raw)
		}
		fake.mu.Lock()
		defer fake.mu.Unlock()
		if r.ResultStatus == "S" {
			if fake.calls != 1 {
				t.Fatalf("SUCCESS after %d ApplyWithin calls", fake.calls)
			}
			id := fake.customerIDs[0]
			if id != "" && (len(id) > 32 || !strings.HasPrefix(id, "21") || strings.Trim(id, "0123456789") != "") {
				t.Fatalf("ApplyWithin got invalid customerId %q", id)
			}
		} else if fake.calls != 0 {
			t.Fatalf("ApplyWithin called for a rejected body")
		}
	})
}
