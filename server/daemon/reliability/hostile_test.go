package reliability

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/server/apisig"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// The hostile-input table: malformed requests to the running daemon, over
// the public API and the decrypt socket. Each gets its documented code and
// HTTP status; none gets a 500 or a panic, none hangs, and none consumes a
// key it should not: the victim key goes through every non-consuming case
// and still decrypts, once, at the end.

// apiCase is one malformed applyPublicKey request. Requests are signed as
// the fixture's client unless unsigned is set; then mod may change them.
type apiCase struct {
	name     string
	method   string // POST if empty
	path     string // the apply path if empty
	ctype    string // application/json if empty; "-" for none
	body     string
	unsigned bool
	signOver string // sign this body instead of body
	mod      func(*http.Request)

	status        int // HTTP
	code, rstatus string
}

func apiCases(clientKey *rsa.PrivateKey) []apiCase {
	const ok = `{"customerId":"2188000000000001"}`
	deep := `{"x":` + strings.Repeat("[", 2000) + `1` + `}`
	tooBig := `{"customerId":"2188000000000001","pad":"` + strings.Repeat("a", 4096) + `"}`
	param := func(name, body string) apiCase {
		return apiCase{name: name, body: body, status: 200, code: "PARAM_ILLEGAL", rstatus: "F"}
	}
	invalidClient := func(name string, mod func(*http.Request)) apiCase {
		return apiCase{name: name, body: ok, mod: mod, status: 200, code: "INVALID_CLIENT", rstatus: "F"}
	}
	invalidSig := func(name string, mod func(*http.Request)) apiCase {
		return apiCase{name: name, body: ok, mod: mod, status: 200, code: "INVALID_SIGNATURE", rstatus: "F"}
	}
	header := func(name, value string) func(*http.Request) {
		return func(r *http.Request) { r.Header.Set(name, value) }
	}
	return []apiCase{
		// The body.
		param("empty body", ""),
		param("whitespace", " \t\r\n "),
		param("null", "null"),
		param("array", "[]"),
		param("string", `"2188000000000001"`),
		param("number", "123"),
		param("truncated object", "{"),
		param("missing value", `{"customerId":}`),
		param("customerId a number", `{"customerId":2188000000000001}`),
		param("customerId a huge number", `{"customerId":1e999999}`),
		param("customerId null", `{"customerId":null}`),
		param("customerId true", `{"customerId":true}`),
		param("customerId an array", `{"customerId":["2188000000000001"]}`),
		param("customerId an object", `{"customerId":{"id":"2188000000000001"}}`),
		param("duplicate key", `{"customerId":"2188000000000001","customerId":"2188000000000002"}`),
		param("duplicate key, escaped", `{"customerId":"2188000000000001","customer\u0049d":"2188000000000002"}`),
		param("invalid UTF-8 in a value", "{\"customerId\":\"21\xff88\"}"),
		param("invalid UTF-8 in an unknown key", "{\"\xc3\x28\":1,\"customerId\":\"2188000000000001\"}"),
		param("lone surrogate", `{"customerId":"21\ud800"}`),
		param("escaped NUL in customerId", `{"customerId":"2188\u0000"}`),
		param("raw NUL in the body", "{\"customerId\":\"2188000000000001\"}\x00"),
		param("customerId letters", `{"customerId":"21abc"}`),
		param("customerId 33 digits", `{"customerId":"21`+strings.Repeat("0", 31)+`"}`),
		param("customerId not starting with 21", `{"customerId":"1188000000000001"}`),
		param("customerId empty", `{"customerId":""}`),
		param("customerId in fullwidth digits", `{"customerId":"２１８８"}`),
		param("customerId with a sign", `{"customerId":"+2188000000000001"}`),
		param("deep nesting, unterminated", deep),
		param("trailing garbage", ok+" x"),
		param("two objects", ok+ok),
		param("trailing comma", `{"customerId":"2188000000000001",}`),
		param("byte order mark", "\xef\xbb\xbf"+ok),
		param("single quotes", `{'customerId':'2188000000000001'}`),
		param("comment", `{/* hi */"customerId":"2188000000000001"}`),
		param("over max_body_bytes", tooBig),
		param("64 KiB", `{"x":"`+strings.Repeat("A", 64<<10)+`"}`),
		// The protocol.
		{name: "text/plain", ctype: "text/plain", body: ok, status: 415, code: "MEDIA_TYPE_NOT_ACCEPTABLE", rstatus: "F"},
		{name: "no Content-Type", ctype: "-", body: ok, status: 415, code: "MEDIA_TYPE_NOT_ACCEPTABLE", rstatus: "F"},
		{name: "application/jsonx", ctype: "application/jsonx", body: ok, status: 415, code: "MEDIA_TYPE_NOT_ACCEPTABLE", rstatus: "F"},
		{name: "malformed Content-Type", ctype: "application/json;;;=", body: ok, status: 415, code: "MEDIA_TYPE_NOT_ACCEPTABLE", rstatus: "F"},
		{name: "GET", method: "GET", status: 405, code: "METHOD_NOT_SUPPORTED", rstatus: "F"},
		{name: "PUT", method: "PUT", body: ok, status: 405, code: "METHOD_NOT_SUPPORTED", rstatus: "F"},
		{name: "DELETE", method: "DELETE", status: 405, code: "METHOD_NOT_SUPPORTED", rstatus: "F"},
		{name: "unknown path", path: publicapi.ApplyPath + "X", body: ok, status: 404, code: "INVALID_API", rstatus: "F"},
		{name: "dot segments", path: "/ams/api/v1/customer/../customer/applyPublicKey", body: ok, status: 404, code: "INVALID_API", rstatus: "F"},
		{name: "encoded dots", path: "/ams/api/v1/customer/%2e%2e/customer/applyPublicKey", body: ok, status: 404, code: "INVALID_API", rstatus: "F"},
		{name: "invalid UTF-8 in the path", path: "/ams/%ff%fe", body: ok, status: 404, code: "INVALID_API", rstatus: "F"},
		{name: "path of 8 KiB", path: "/" + strings.Repeat("a", 8<<10), body: ok, status: 404, code: "INVALID_API", rstatus: "F"},
		// The message header.
		{name: "unsigned", unsigned: true, body: ok, status: 200, code: "INVALID_CLIENT", rstatus: "F"},
		invalidClient("unknown Client-Id", header("Client-Id", "nobody")),
		invalidClient("Client-Id with a dot", header("Client-Id", "reli.ability")),
		invalidClient("Client-Id of 65 characters", header("Client-Id", strings.Repeat("a", 65))),
		invalidClient("Client-Id empty", header("Client-Id", "")),
		invalidClient("Client-Id not ASCII", header("Client-Id", "réliability")),
		invalidClient("two Client-Id headers", func(r *http.Request) { r.Header.Add("Client-Id", clientID) }),
		invalidSig("no Signature", func(r *http.Request) { r.Header.Del("Signature") }),
		invalidSig("Signature garbage", header("Signature", "garbage")),
		invalidSig("Signature empty", header("Signature", "")),
		invalidSig("Signature RSA512", func(r *http.Request) {
			r.Header.Set("Signature", strings.Replace(r.Header.Get("Signature"), "RSA256", "RSA512", 1))
		}),
		invalidSig("Signature keyVersion 7", func(r *http.Request) {
			r.Header.Set("Signature", strings.Replace(r.Header.Get("Signature"), "keyVersion=1", "keyVersion=7", 1))
		}),
		invalidSig("Signature keyVersion huge", func(r *http.Request) {
			r.Header.Set("Signature", strings.Replace(r.Header.Get("Signature"), "keyVersion=1", "keyVersion=99999999999999999999", 1))
		}),
		invalidSig("Signature not base64", header("Signature", "algorithm=RSA256,keyVersion=1,signature=%%%")),
		invalidSig("Signature of 3000 characters", header("Signature", "algorithm=RSA256,keyVersion=1,signature="+strings.Repeat("A", 3000))),
		invalidSig("Signature twice", func(r *http.Request) { r.Header.Add("Signature", r.Header.Get("Signature")) }),
		invalidSig("Signature by another key", func(r *http.Request) {
			other := rsaKey()
			sig, _ := apisig.Sign(other, apisig.Content("POST", r.URL.EscapedPath(), clientID, r.Header.Get("Request-Time"), []byte(ok)))
			r.Header.Set("Signature", apisig.Signature{Algorithm: "RSA256", KeyVersion: 1, Value: sig}.String())
		}),
		{name: "signature over another body", body: ok, signOver: `{"customerId":"2188000000000002"}`, status: 200, code: "INVALID_SIGNATURE", rstatus: "F"},
		{name: "Request-Time an hour ago", body: ok, status: 200, code: "INVALID_SIGNATURE", rstatus: "F", mod: func(r *http.Request) {
			r.Header.Del("Signature")
			apisig.SignRequest(r, clientID, 1, clientKey, []byte(ok), time.Now().Add(-time.Hour))
		}},
		{name: "Request-Time missing", body: ok, status: 200, code: "PARAM_ILLEGAL", rstatus: "F", mod: func(r *http.Request) { r.Header.Del("Request-Time") }},
		{name: "Request-Time garbage", body: ok, status: 200, code: "PARAM_ILLEGAL", rstatus: "F", mod: header("Request-Time", "yesterday")},
		{name: "Request-Time of 30 digits", body: ok, status: 200, code: "PARAM_ILLEGAL", rstatus: "F", mod: header("Request-Time", strings.Repeat("9", 30))},
		{name: "Request-Time twice", body: ok, status: 200, code: "PARAM_ILLEGAL", rstatus: "F", mod: func(r *http.Request) {
			r.Header.Add("Request-Time", r.Header.Get("Request-Time"))
		}},
		{name: "header of 64 KiB", body: ok, status: 431, mod: header("X-Junk", strings.Repeat("j", 64<<10))},
	}
}

// rsaKey is a key no key id has, made once.
var rsaKey = sync.OnceValue(func() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
})

// socketCase is one malformed request to the decrypt socket. body builds
// the request from the victim key and a valid ciphertext for it.
type socketCase struct {
	name     string
	method   string // POST if empty
	path     string // /v1/decrypt if empty
	body     func(v keyInfo, ct []byte) string
	status   int
	code     string
	consumes bool // documented to consume the key: run on a key of its own
}

// socketCases are the socket's cases; other is a key of no key id.
func socketCases(other *rsa.PublicKey) []socketCase {
	b64 := base64.StdEncoding.EncodeToString
	req := func(id, ct string) string { return fmt.Sprintf(`{"uniqueId":%q,"ciphertext":%q}`, id, ct) }
	param := func(name string, body func(v keyInfo, ct []byte) string) socketCase {
		return socketCase{name: name, body: body, status: 400, code: "PARAM_ILLEGAL"}
	}
	fixed := func(s string) func(keyInfo, []byte) string { return func(keyInfo, []byte) string { return s } }
	withCT := func(ct func(v keyInfo, ct []byte) string) func(v keyInfo, ct []byte) string {
		return func(v keyInfo, c []byte) string { return req(v.UniqueID, ct(v, c)) }
	}
	withID := func(id string) func(v keyInfo, ct []byte) string {
		return func(v keyInfo, c []byte) string { return req(id, b64(c)) }
	}
	raw := func(format string) func(v keyInfo, ct []byte) string {
		return func(v keyInfo, c []byte) string { return fmt.Sprintf(format, v.UniqueID, b64(c)) }
	}
	stdPlus := bytes.Repeat([]byte{0xfb, 0xef, 0xbe}, 86)[:256] // "++++" in base64
	return []socketCase{
		param("empty body", fixed("")),
		param("empty object", fixed("{}")),
		param("null", fixed("null")),
		param("array", fixed("[]")),
		param("no ciphertext", func(v keyInfo, _ []byte) string { return fmt.Sprintf(`{"uniqueId":%q}`, v.UniqueID) }),
		param("no uniqueId", func(_ keyInfo, c []byte) string { return fmt.Sprintf(`{"ciphertext":%q}`, b64(c)) }),
		param("uniqueId of 31 characters", func(v keyInfo, c []byte) string { return req(v.UniqueID[:31], b64(c)) }),
		param("uniqueId of 33 characters", func(v keyInfo, c []byte) string { return req(v.UniqueID+"A", b64(c)) }),
		param("uniqueId with a dash", func(v keyInfo, c []byte) string { return req(v.UniqueID[:31]+"-", b64(c)) }),
		param("uniqueId with NUL", func(v keyInfo, c []byte) string { return req(v.UniqueID[:31]+"\x00", b64(c)) }),
		param("uniqueId not ASCII", withID(strings.Repeat("é", 16))),
		param("uniqueId a number", raw(`{"uniqueId":1%.0s,"ciphertext":%q}`)),
		param("uniqueId null", raw(`{"uniqueId":null%.0s,"ciphertext":%q}`)),
		param("uniqueId an array", raw(`{"uniqueId":[%q],"ciphertext":%q}`)),
		param("ciphertext empty", withCT(func(keyInfo, []byte) string { return "" })),
		param("ciphertext not base64", withCT(func(keyInfo, []byte) string { return "!!!!" })),
		param("ciphertext URL-safe base64", withCT(func(keyInfo, []byte) string {
			return base64.URLEncoding.EncodeToString(stdPlus)
		})),
		param("ciphertext unpadded", withCT(func(_ keyInfo, c []byte) string { return strings.TrimRight(b64(c), "=") })),
		param("ciphertext with a space", withCT(func(_ keyInfo, c []byte) string { s := b64(c); return s[:64] + " " + s[64:] })),
		param("ciphertext with trailing bits", withCT(func(_ keyInfo, c []byte) string {
			s := []byte(b64(c)) // 256 bytes: "xy==" at the end, y carries 4 unused bits
			s[len(s)-3] = 'B'
			return string(s)
		})),
		param("ciphertext a number", raw(`{"uniqueId":%q,"ciphertext":1%.0s}`)),
		param("ciphertext an object", raw(`{"uniqueId":%q,"ciphertext":{"b64":%q}}`)),
		param("ciphertext of 1 byte", withCT(func(keyInfo, []byte) string { return "AA==" })),
		param("ciphertext of 255 bytes", withCT(func(_ keyInfo, c []byte) string { return b64(c[1:]) })),
		param("ciphertext of 257 bytes", withCT(func(_ keyInfo, c []byte) string { return b64(append([]byte{0}, c...)) })),
		param("ciphertext of 512 bytes (a 4096-bit key's)", withCT(func(_ keyInfo, c []byte) string { return b64(append(c, c...)) })),
		param("ciphertext equal to the modulus", withCT(func(v keyInfo, _ []byte) string { return b64(v.pub.N.FillBytes(make([]byte, 256))) })),
		param("ciphertext above the modulus", withCT(func(keyInfo, []byte) string { return b64(bytes.Repeat([]byte{0xff}, 256)) })),
		param("body over 8 KiB", withCT(func(_ keyInfo, c []byte) string { return strings.Repeat(b64(c), 25) })),
		param("duplicate uniqueId", raw(`{"uniqueId":%[1]q,"uniqueId":%[1]q,"ciphertext":%[2]q}`)),
		param("duplicate ciphertext, escaped", raw(`{"uniqueId":%q,"ciphertext":%[2]q,"cipher\u0074ext":%[2]q}`)),
		param("invalid UTF-8", raw("{\"uniqueId\":%q,\"ciphertext\":%q,\"x\":\"\xff\"}")),
		param("trailing data", raw(`{"uniqueId":%q,"ciphertext":%q} {}`)),
		param("byte order mark", raw("\xef\xbb\xbf{\"uniqueId\":%q,\"ciphertext\":%q}")),
		param("deep nesting, unterminated", raw(`{"uniqueId":%q,"ciphertext":%q,"x":`+strings.Repeat("[", 3000)+`}`)),
		param("deep nesting, and a wrong length", func(v keyInfo, _ []byte) string {
			return fmt.Sprintf(`{"x":%s1%s,"uniqueId":%q,"ciphertext":"AA=="}`, strings.Repeat("[", 1000), strings.Repeat("]", 1000), v.UniqueID)
		}),
		param("a huge number, and a wrong length", func(v keyInfo, _ []byte) string {
			return fmt.Sprintf(`{"x":1e99999999999,"uniqueId":%q,"ciphertext":"AA=="}`, v.UniqueID)
		}),
		param("padding named (not allowed here)", raw(`{"uniqueId":%q,"ciphertext":%q,"padding":"oaep-sha256"}`)),
		param("padding empty", raw(`{"uniqueId":%q,"ciphertext":%q,"padding":""}`)),
		{name: "unknown uniqueId", body: withID("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), status: 404, code: "KEY_NOT_FOUND"},
		{name: "GET /v1/decrypt", method: "GET", status: 405, code: "METHOD_NOT_ALLOWED"},
		{name: "PUT /v1/decrypt", method: "PUT", body: raw(`{"uniqueId":%q,"ciphertext":%q}`), status: 405, code: "METHOD_NOT_ALLOWED"},
		{name: "POST /v1/keys", method: "POST", path: "/v1/keys/{id}", status: 405, code: "METHOD_NOT_ALLOWED"},
		{name: "GET /v1/keys of a bad uniqueId", method: "GET", path: "/v1/keys/short", status: 400, code: "PARAM_ILLEGAL"},
		{name: "GET /v1/keys of an unknown uniqueId", method: "GET", path: "/v1/keys/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", status: 404, code: "KEY_NOT_FOUND"},
		{name: "GET /v1/keys/{id}/more", method: "GET", path: "/v1/keys/{id}/more", status: 404, code: "NOT_FOUND"},
		{name: "dot segments", method: "GET", path: "/v1/keys/../health", status: 404, code: "NOT_FOUND"},
		{name: "encoded slash", method: "GET", path: "/v1/keys/%2e%2e%2fhealth", status: 404, code: "NOT_FOUND"},
		{name: "double slash", method: "GET", path: "//v1/health", status: 404, code: "NOT_FOUND"},
		{name: "unknown path", path: "/v2/decrypt", body: raw(`{"uniqueId":%q,"ciphertext":%q}`), status: 404, code: "NOT_FOUND"},
		// These consume the key, as documented: one key each.
		{name: "ciphertext wrapped in lines, as MIME base64 (accepted)", body: withCT(func(_ keyInfo, c []byte) string {
			s := b64(c)
			return s[:76] + "\r\n" + s[76:152] + "\n" + s[152:]
		}), status: 200, consumes: true},
		{name: "all-zero ciphertext", body: withCT(func(keyInfo, []byte) string { return b64(make([]byte, 256)) }), status: 422, code: "DECRYPT_FAILED", consumes: true},
		{name: "ciphertext for another key", body: withCT(func(v keyInfo, _ []byte) string {
			// It must be below this key's modulus, or the daemon refuses
			// it before the claim (PARAM_ILLEGAL). OAEP is randomised, and
			// each try is below with a chance over one half.
			for range 64 {
				c, err := hsm.Encrypt(other, hsm.OAEPSHA256, []byte("not for this key"))
				if err == nil && new(big.Int).SetBytes(c).Cmp(v.pub.N) < 0 {
					return b64(c)
				}
			}
			panic("no ciphertext under the other key is below this key's modulus")
		}), status: 422, code: "DECRYPT_FAILED", consumes: true},
		{name: "a flipped bit", body: withCT(func(_ keyInfo, c []byte) string {
			c = bytes.Clone(c)
			c[100] ^= 1
			return b64(c)
		}), status: 422, code: "DECRYPT_FAILED", consumes: true},
	}
}

func TestHostileInput(t *testing.T) {
	f := newFixture(t, fixtureConfig{
		storage: "token", poolSize: 4, generators: 1,
		ttl: "2m", reap: "1s", applyWait: "30s",
		api:    fmt.Sprintf("read_timeout = %q\nwrite_timeout = \"2s\"", apiReadTimeout),
		extra:  "[limits]\nrate = 100000.0\nburst = 100000\naddress_rate = 100000.0\nunverified_rate = 100000.0\n",
		signed: true,
	})
	p := f.mustStart()
	other := &rsaKey().PublicKey
	newKey := func() (keyInfo, string) {
		t.Helper()
		r, err := p.apply("")
		if err != nil || r.code != "SUCCESS" {
			t.Fatalf("apply: %+v, %v", r, err)
		}
		return r.key, f.password()
	}
	victim, victimPW := newKey()
	// Slow and raw connections run alongside the table.
	var (
		slow  sync.WaitGroup
		tried int
	)
	slow.Go(func() { tried = slowClients(t, p) })

	base := strings.TrimSuffix(p.api, publicapi.ApplyPath)
	t.Run("api", func(t *testing.T) {
		for _, tc := range apiCases(f.clientKey) {
			t.Run(tc.name, func(t *testing.T) {
				method, path, ctype := tc.method, tc.path, tc.ctype
				if method == "" {
					method = "POST"
				}
				if path == "" {
					path = publicapi.ApplyPath
				}
				req, err := http.NewRequest(method, base+path, strings.NewReader(tc.body))
				if err != nil {
					t.Fatal(err)
				}
				switch ctype {
				case "":
					req.Header.Set("Content-Type", "application/json")
				case "-":
				default:
					req.Header.Set("Content-Type", ctype)
				}
				if !tc.unsigned {
					over := tc.body
					if tc.signOver != "" {
						over = tc.signOver
					}
					if err := apisig.SignRequest(req, clientID, 1, f.clientKey, []byte(over), time.Now()); err != nil {
						t.Fatal(err)
					}
				}
				if tc.mod != nil {
					tc.mod(req)
				}
				status, code, rstatus, raw := rawApply(t, p, req)
				if status != tc.status || code != tc.code || rstatus != tc.rstatus {
					t.Errorf("HTTP %d %s/%s, want %d %s/%s; body %.300s", status, code, rstatus, tc.status, tc.code, tc.rstatus, raw)
				}
			})
		}
	})

	t.Run("socket", func(t *testing.T) {
		ct := seal(t, victim, victimPW)
		for _, tc := range socketCases(other) {
			t.Run(tc.name, func(t *testing.T) {
				k, pw := victim, victimPW
				c := ct
				if tc.consumes {
					k, pw = newKey()
					c = seal(t, k, pw)
				}
				method, path := tc.method, tc.path
				if method == "" {
					method = "POST"
				}
				if path == "" {
					path = "/v1/decrypt"
				}
				path = strings.ReplaceAll(path, "{id}", k.UniqueID)
				var body io.Reader
				if tc.body != nil {
					body = strings.NewReader(tc.body(k, c))
				}
				req, err := http.NewRequest(method, "http://keyissuer"+path, body)
				if err != nil {
					t.Fatal(err)
				}
				if tc.consumes {
					// Refused after its claim: the token may have
					// decrypted a plaintext the daemon then refused.
					f.mayHaveDecrypted(k.UniqueID)
				}
				resp, err := p.sockClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				var out struct {
					Error struct{ Code, Message string }
				}
				if err := json.Unmarshal(raw, &out); err != nil {
					t.Errorf("body is not JSON: %q", raw)
				}
				if resp.StatusCode != tc.status || out.Error.Code != tc.code {
					t.Errorf("HTTP %d %s, want %d %s; body %.300s", resp.StatusCode, out.Error.Code, tc.status, tc.code, raw)
				}
				st, err := p.state(k.UniqueID)
				switch {
				case err != nil:
					t.Error(err)
				case tc.consumes && st != "consumed":
					t.Errorf("the key is %s, want consumed", st)
				case !tc.consumes && st != "issued":
					t.Errorf("KEY CONSUMED by a malformed request: the victim key is %s", st)
				}
			})
		}
	})
	slow.Wait()
	tried += len(apiCases(f.clientKey)) + len(socketCases(other))

	// The victim went through every case and still decrypts, once.
	if res, err := p.decrypt(victim.UniqueID, seal(t, victim, victimPW)); err != nil || res.status != 200 || res.password != victimPW {
		t.Errorf("the victim key after the table: %+v, %v; want its password", res, err)
	}
	if res, err := p.decrypt(victim.UniqueID, seal(t, victim, victimPW)); err != nil || res.status != 410 || res.code != "KEY_CONSUMED" {
		t.Errorf("the victim key again: %+v, %v; want 410 KEY_CONSUMED", res, err)
	}
	// No hostile apply got a key: the only outstanding keys are none.
	if h, st, err := p.health(); err != nil || st != 200 || h.OutstandingKeys != 0 {
		t.Errorf("health after the table: %d %+v %v; want no key outstanding", st, h, err)
	}
	p.stop()
	logs := p.stderr.String()
	for _, bad := range []string{"panic", `"code":"INTERNAL"`, "PROCESS_FAIL"} {
		if strings.Contains(logs, bad) {
			t.Errorf("the daemon's log has %q", bad)
		}
	}
	t.Logf("%d malformed inputs tried", tried)
}

// rawApply sends req and returns the HTTP status and, for a JSON body, the
// result code and status.
func rawApply(t *testing.T, p *proc, req *http.Request) (status int, code, rstatus string, raw []byte) {
	t.Helper()
	resp, err := p.apiClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ = io.ReadAll(resp.Body)
	var out struct {
		Result        struct{ ResultCode, ResultStatus string }
		PublicKeyInfo *keyInfo
	}
	if json.Unmarshal(raw, &out) == nil {
		if out.PublicKeyInfo != nil {
			t.Errorf("a key was issued: %s", raw)
		}
		return resp.StatusCode, out.Result.ResultCode, out.Result.ResultStatus, raw
	}
	if resp.StatusCode == 200 {
		t.Errorf("HTTP 200 and a body that is not JSON: %q", raw)
	}
	return resp.StatusCode, "", "", raw
}

// The timeouts that close a slow client's connection: the public API's
// api.read_timeout as TestHostileInput configures it, and the decrypt
// socket's fixed ReadHeaderTimeout (server/daemon/daemon.go). A slow
// client must see its connection answered or closed by the daemon within
// them plus closeMargin, a bound on scheduling on a busy machine; its own
// deadline, the one that ends a hang, is that sum, so a daemon that
// leaves it hanging fails the case.
const (
	apiReadTimeout      = time.Second
	socketHeaderTimeout = 5 * time.Second
	closeMargin         = 10 * time.Second
)

// slowClients attacks both listeners with slow and malformed connections,
// and returns how many inputs it tried. Each must be answered with a
// client error or closed by the daemon's timeouts, never left hanging,
// and the daemon keeps serving others meanwhile.
func slowClients(t *testing.T, p *proc) int {
	apiAddr := strings.TrimPrefix(strings.TrimSuffix(p.api, publicapi.ApplyPath), "http://")
	dialAPI := func() (net.Conn, error) { return net.Dial("tcp", apiAddr) }
	dialSock := func() (net.Conn, error) { return net.Dial("unix", p.socket) }
	const applyHead = "POST " + publicapi.ApplyPath + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
	const decryptHead = "POST /v1/decrypt HTTP/1.1\r\nHost: x\r\n"
	cases := []struct {
		name   string
		dial   func() (net.Conn, error)
		send   string        // sent at once
		drip   string        // then sent a byte at a time...
		every  time.Duration // ...this often
		status []int         // acceptable answers; a dripping client may also be hung up on
		limit  time.Duration // the daemon's timeout that applies
	}{
		{"api: garbage request line", dialAPI, "HELLO\r\n\r\n", "", 0, []int{400}, apiReadTimeout},
		{"api: NUL in a header", dialAPI, applyHead + "X-Bad: a\x00b\r\nContent-Length: 2\r\n\r\n{}", "", 0, []int{400}, apiReadTimeout},
		{"api: two Content-Lengths", dialAPI, applyHead + "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "", 0, []int{400}, apiReadTimeout},
		{"api: negative Content-Length", dialAPI, applyHead + "Content-Length: -1\r\n\r\n", "", 0, []int{400}, apiReadTimeout},
		{"api: bad chunk size", dialAPI, applyHead + "Transfer-Encoding: chunked\r\n\r\nzz\r\n", "", 0, []int{200, 400}, apiReadTimeout},
		{"api: request line of 1 MiB", dialAPI, "GET /" + strings.Repeat("a", 1<<20) + " HTTP/1.1\r\nHost: x\r\n\r\n", "", 0, []int{414, 431, 400}, apiReadTimeout},
		{"api: slow headers (slowloris)", dialAPI, "POST " + publicapi.ApplyPath + " HTTP/1.1\r\n", "Host: x\r\nX-A: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n", 100 * time.Millisecond, []int{400, 408}, apiReadTimeout},
		{"api: slow body", dialAPI, applyHead + "Content-Length: 40\r\n\r\n", `{"customerId":"2188000000000001"}      `, 150 * time.Millisecond, []int{200, 408}, apiReadTimeout},
		{"api: body shorter than its Content-Length", dialAPI, applyHead + "Content-Length: 100\r\n\r\n{}", "", 0, []int{200, 408}, apiReadTimeout},
		{"socket: garbage request line", dialSock, "HELLO\r\n\r\n", "", 0, []int{400}, socketHeaderTimeout},
		{"socket: two Content-Lengths", dialSock, decryptHead + "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "", 0, []int{400}, socketHeaderTimeout},
		{"socket: bad chunk size", dialSock, decryptHead + "Transfer-Encoding: chunked\r\n\r\nzz\r\n", "", 0, []int{400}, socketHeaderTimeout},
		{"socket: slow headers (slowloris)", dialSock, "POST /v1/decrypt HTTP/1.1\r\n", "Host: x\r\nX-A: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n", 100 * time.Millisecond, []int{400, 408}, socketHeaderTimeout},
	}
	var wg sync.WaitGroup
	for _, tc := range cases {
		wg.Go(func() {
			c, err := tc.dial()
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
				return
			}
			defer c.Close()
			start := time.Now()
			bound := tc.limit + closeMargin
			c.SetDeadline(start.Add(bound))
			if _, err := io.WriteString(c, tc.send); err != nil {
				t.Errorf("%s: %v", tc.name, err)
				return
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go func() { // drip until the daemon hangs up
				for i := 0; i < len(tc.drip) && ctx.Err() == nil; i++ {
					if _, err := c.Write([]byte{tc.drip[i]}); err != nil {
						return
					}
					time.Sleep(tc.every)
				}
			}()
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				t.Errorf("%s: HUNG: neither answered nor closed by the daemon within %s (its timeout %s + %s)",
					tc.name, bound, tc.limit, closeMargin)
			case err != nil && tc.drip != "":
				// Closed by the daemon's timeouts, as it should.
			case err != nil:
				t.Errorf("%s: no answer, %v after %s; want HTTP %v", tc.name, err, time.Since(start), tc.status)
			default:
				resp.Body.Close()
				if !containsInt(tc.status, resp.StatusCode) {
					t.Errorf("%s: HTTP %d, want %v", tc.name, resp.StatusCode, tc.status)
				}
			}
		})
	}
	// The daemon serves others meanwhile.
	for range 5 {
		if _, st, err := p.health(); err != nil || st != 200 {
			t.Errorf("health during the slow clients: %d %v", st, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	wg.Wait()
	return len(cases)
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
