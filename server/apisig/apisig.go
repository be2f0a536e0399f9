// Package apisig implements the message header of the wallet API family:
// the Client-Id, Request-Time, Response-Time and Signature headers, the
// content a signature covers, and RSA256 (SHA256withRSA, PKCS #1 v1.5)
// signing and verification.
//
// A request is signed over
//
//	POST <path>\n<Client-Id>.<Request-Time>.<exact body bytes>
//
// and a response over the same with Response-Time and the response body. The
// Signature header reads
//
//	algorithm=RSA256,keyVersion=1,signature=<URL-encoded standard base64>
//
// in that order: the wallet SDKs split a response's header on commas and take
// the third item as the signature.
//
// The parsers take untrusted input, are strict about what they accept, and
// return errors whose messages are safe to show the caller: they never echo
// the input.
package apisig

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// Header names. HTTP header names are case-insensitive; net/http
// canonicalises them, so these also find "client-id" or "SIGNATURE".
const (
	HeaderClientID     = "Client-Id"
	HeaderRequestTime  = "Request-Time"
	HeaderResponseTime = "Response-Time"
	HeaderSignature    = "Signature"
)

// AlgorithmRSA256 is SHA256withRSA: RSASSA-PKCS1-v1_5 over SHA-256. It is
// the only algorithm the API family defines.
const AlgorithmRSA256 = "RSA256"

// Bounds on header values. An RSA-4096 signature is 684 base64 characters,
// under 1000 once URL-encoded.
const (
	maxClientID    = 64
	maxRequestTime = 40
	maxSignature   = 2048
	maxKeyVersion  = 9
)

// Error is a malformed header. Its message is safe to return to a caller.
type Error struct{ Msg string }

func (e *Error) Error() string { return e.Msg }

func errorf(format string, args ...any) error { return &Error{Msg: fmt.Sprintf(format, args...)} }

// ParseClientID checks a Client-Id: 1 to 64 characters of [A-Za-z0-9_-]. A
// dot is refused because it separates the fields of the signed content.
func ParseClientID(s string) (string, error) {
	if s == "" {
		return "", errorf("the Client-Id header is empty")
	}
	if len(s) > maxClientID {
		return "", errorf("the Client-Id header is longer than %d characters", maxClientID)
	}
	if !ValidClientID(s) {
		return "", errorf("the Client-Id header may contain only letters, digits, '_' and '-'")
	}
	return s, nil
}

// ValidClientID reports whether s is a well-formed client id.
func ValidClientID(s string) bool {
	if s == "" || len(s) > maxClientID {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// ParseRequestTime parses a Request-Time: epoch milliseconds ("1685599933871")
// or ISO 8601 date and time with an offset ("2019-05-28T12:12:12+08:00",
// "2019-05-28T12:12:12.253Z", "2019-05-28T12:12:12+0800"). The signature
// covers the header's exact string, not this parsed value.
func ParseRequestTime(s string) (time.Time, error) {
	switch {
	case s == "":
		return time.Time{}, errorf("the Request-Time header is empty")
	case len(s) > maxRequestTime:
		return time.Time{}, errorf("the Request-Time header is longer than %d characters", maxRequestTime)
	}
	if allDigits(s) {
		// 13 digits reach the year 2286; more is a mistake, such as
		// microseconds.
		if len(s) > 13 {
			return time.Time{}, errorf("the Request-Time header has too many digits for epoch milliseconds")
		}
		ms, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return time.Time{}, errorf("the Request-Time header is not a valid number of milliseconds")
		}
		return time.UnixMilli(ms), nil
	}
	// Parsing also accepts a fractional second after the seconds.
	for _, layout := range []string{time.RFC3339, "2006-01-02T15:04:05Z0700"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, errorf("the Request-Time header is neither epoch milliseconds nor ISO 8601 with an offset (2019-05-28T12:12:12+08:00)")
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// Signature is a parsed Signature header.
type Signature struct {
	Algorithm string
	// KeyVersion is the signer's key version; 0 when the header has none,
	// which means the client's latest key.
	KeyVersion int
	// Value is the signature itself, decoded.
	Value []byte
}

// ParseSignature parses a Signature header:
// "algorithm=RSA256,keyVersion=1,signature=<URL-encoded base64>". Spaces
// around the items are tolerated, the items may come in any order, and
// keyVersion may be left out. The signature may be URL-encoded or not (a
// '+' stays a '+'); once decoded it must be standard base64 with padding.
func ParseSignature(h string) (Signature, error) {
	switch {
	case strings.TrimSpace(h) == "":
		return Signature{}, errorf("the Signature header is empty")
	case len(h) > maxSignature:
		return Signature{}, errorf("the Signature header is longer than %d characters", maxSignature)
	}
	var sig Signature
	var haveAlg, haveVersion, haveValue bool
	for item := range strings.SplitSeq(h, ",") {
		item = strings.Trim(item, " \t")
		key, value, ok := strings.Cut(item, "=")
		if !ok || key == "" {
			return Signature{}, errorf("the Signature header must read algorithm=RSA256,keyVersion=<n>,signature=<value>")
		}
		switch key {
		case "algorithm":
			if haveAlg {
				return Signature{}, errorf("the Signature header has algorithm twice")
			}
			haveAlg = true
			if value != AlgorithmRSA256 {
				return Signature{}, errorf("the Signature header's algorithm must be %s", AlgorithmRSA256)
			}
			sig.Algorithm = value
		case "keyVersion":
			if haveVersion {
				return Signature{}, errorf("the Signature header has keyVersion twice")
			}
			haveVersion = true
			v, err := ParseKeyVersion(value)
			if err != nil {
				return Signature{}, errorf("the Signature header's keyVersion must be a positive integer")
			}
			sig.KeyVersion = v
		case "signature":
			if haveValue {
				return Signature{}, errorf("the Signature header has signature twice")
			}
			haveValue = true
			// PathUnescape, not QueryUnescape: it leaves a literal '+'
			// alone, so an unencoded base64 value decodes too.
			unescaped, err := url.PathUnescape(value)
			if err != nil {
				return Signature{}, errorf("the Signature header's signature is not valid URL encoding")
			}
			b, err := base64.StdEncoding.Strict().DecodeString(unescaped)
			if err != nil || len(b) == 0 {
				return Signature{}, errorf("the Signature header's signature is not standard base64")
			}
			sig.Value = b
		default:
			// Unknown items are tolerated, as unknown JSON fields are.
		}
	}
	switch {
	case !haveAlg:
		return Signature{}, errorf("the Signature header has no algorithm")
	case !haveValue:
		return Signature{}, errorf("the Signature header has no signature")
	}
	return sig, nil
}

// ParseKeyVersion parses a key version: a decimal integer from 1 to
// 999999999, without sign or leading zeros.
func ParseKeyVersion(s string) (int, error) {
	if !allDigits(s) || len(s) > maxKeyVersion || s[0] == '0' {
		return 0, errors.New("not a positive integer of at most 9 digits")
	}
	return strconv.Atoi(s)
}

// String formats the header, fields in the order the SDKs expect:
// algorithm, keyVersion, signature. The signature is standard base64,
// URL-encoded.
func (s Signature) String() string {
	alg := s.Algorithm
	if alg == "" {
		alg = AlgorithmRSA256
	}
	v := s.KeyVersion
	if v == 0 {
		v = 1
	}
	return "algorithm=" + alg + ",keyVersion=" + strconv.Itoa(v) +
		",signature=" + url.QueryEscape(base64.StdEncoding.EncodeToString(s.Value))
}

// Content is what a signature covers: "<method> <path>\n<clientID>.<time>.<body>".
func Content(method, path, clientID, timestamp string, body []byte) []byte {
	b := make([]byte, 0, len(method)+len(path)+len(clientID)+len(timestamp)+len(body)+4)
	b = append(b, method...)
	b = append(b, ' ')
	b = append(b, path...)
	b = append(b, '\n')
	b = append(b, clientID...)
	b = append(b, '.')
	b = append(b, timestamp...)
	b = append(b, '.')
	return append(b, body...)
}

// Sign signs content with key, RSA256. key is an *rsa.PrivateKey or any
// crypto.Signer of an RSA key that takes a SHA-256 digest.
func Sign(key crypto.Signer, content []byte) ([]byte, error) {
	digest := sha256.Sum256(content)
	return key.Sign(rand.Reader, digest[:], crypto.SHA256)
}

// ErrVerify means a signature does not match the content and key.
var ErrVerify = errors.New("signature verification failed")

// Verify checks an RSA256 signature of content.
func Verify(pub *rsa.PublicKey, content, sig []byte) error {
	digest := sha256.Sum256(content)
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
		return ErrVerify
	}
	return nil
}

// FormatTime formats a Response-Time (or a Request-Time): ISO 8601 in UTC
// with milliseconds, "2019-05-28T04:12:12.253Z".
func FormatTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z07:00")
}

// MinKeyBits is the smallest RSA key accepted for signatures.
const MinKeyBits = 2048

// ParsePublicKey reads an RSA public key written as PEM ("PUBLIC KEY", an
// X.509 SubjectPublicKeyInfo, or "RSA PUBLIC KEY", PKCS #1) or as the
// standard base64 of a DER SubjectPublicKeyInfo, the form merchant
// dashboards show. Keys under [MinKeyBits] are refused.
func ParsePublicKey(s string) (*rsa.PublicKey, error) {
	s = strings.TrimSpace(s)
	var der []byte
	pkcs1 := false
	if strings.HasPrefix(s, "-----BEGIN") {
		block, rest := pem.Decode([]byte(s))
		if block == nil || strings.TrimSpace(string(rest)) != "" {
			return nil, errors.New("not a single PEM block")
		}
		switch block.Type {
		case "PUBLIC KEY":
		case "RSA PUBLIC KEY":
			pkcs1 = true
		default:
			return nil, fmt.Errorf("PEM block %q is not a public key", block.Type)
		}
		der = block.Bytes
	} else {
		b, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(s), ""))
		if err != nil {
			return nil, errors.New("neither PEM nor standard base64")
		}
		der = b
	}
	var pub *rsa.PublicKey
	if pkcs1 {
		k, err := x509.ParsePKCS1PublicKey(der)
		if err != nil {
			return nil, fmt.Errorf("not a PKCS #1 RSA public key: %w", err)
		}
		pub = k
	} else {
		k, err := x509.ParsePKIXPublicKey(der)
		if err != nil {
			return nil, fmt.Errorf("not an X.509 public key: %w", err)
		}
		rk, ok := k.(*rsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("a %T, not an RSA public key", k)
		}
		pub = rk
	}
	if pub.N.BitLen() < MinKeyBits {
		return nil, fmt.Errorf("a %d-bit RSA key; at least %d bits are required", pub.N.BitLen(), MinKeyBits)
	}
	return pub, nil
}

// SignRequest sets the Client-Id, Request-Time (epoch milliseconds) and
// Signature headers of a request whose body is body, as the wallet SDKs do.
// The path signed is req.URL's.
func SignRequest(req *http.Request, clientID string, keyVersion int, key crypto.Signer, body []byte, now time.Time) error {
	reqTime := strconv.FormatInt(now.UnixMilli(), 10)
	sig, err := Sign(key, Content(req.Method, req.URL.EscapedPath(), clientID, reqTime, body))
	if err != nil {
		return fmt.Errorf("failed to sign the request: %w", err)
	}
	req.Header.Set(HeaderClientID, clientID)
	req.Header.Set(HeaderRequestTime, reqTime)
	req.Header.Set(HeaderSignature, Signature{Algorithm: AlgorithmRSA256, KeyVersion: keyVersion, Value: sig}.String())
	return nil
}

// VerifyResponse checks the Signature of a response to POST path, whose
// body is body, with keyissuer's response-signing key pub.
func VerifyResponse(h http.Header, path string, body []byte, pub *rsa.PublicKey) error {
	sigs := h.Values(HeaderSignature)
	if len(sigs) != 1 {
		return fmt.Errorf("the response has %d Signature headers, want 1", len(sigs))
	}
	sig, err := ParseSignature(sigs[0])
	if err != nil {
		return err
	}
	content := Content(http.MethodPost, path, h.Get(HeaderClientID), h.Get(HeaderResponseTime), body)
	return Verify(pub, content, sig.Value)
}

// ReadPublicKey reads an RSA public key file, PEM or base64 DER, as
// `keyissuer signing-key` prints it ([ParsePublicKey]). A client checks
// keyissuerd's answers with it.
func ReadPublicKey(path string) (*rsa.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pub, err := ParsePublicKey(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return pub, nil
}

// ReadPrivateKey reads an RSA private key, PEM: PKCS #8 ("PRIVATE KEY", as
// `openssl genpkey` writes) or PKCS #1 ("RSA PRIVATE KEY"). Errors never
// quote the file. A client signs its requests with it.
func ReadPrivateKey(path string) (*rsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, fmt.Errorf("%s holds no PEM block", path)
	}
	var key any
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("%s holds a %q PEM block, not an RSA private key", path, block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: not a valid private key", path)
	}
	rk, ok := key.(*rsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: a %T, not an RSA key", path, key)
	}
	return rk, nil
}
