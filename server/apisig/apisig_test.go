package apisig

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

func TestParseSignature(t *testing.T) {
	raw := []byte{0xfb, 0xff, 0xbf, 0x00, 0x3e, 0x3f, 0x01} // base64 "+/+/AD4/AQ=="
	b64 := base64.StdEncoding.EncodeToString(raw)
	enc := "%2B%2F%2B%2FAD4%2FAQ%3D%3D"
	tests := []struct {
		name    string
		in      string
		want    Signature
		wantErr string
	}{
		{name: "SDK form", in: "algorithm=RSA256,keyVersion=1,signature=" + enc, want: Signature{AlgorithmRSA256, 1, raw}},
		{name: "spaces after commas", in: "algorithm=RSA256, keyVersion=2, signature=" + enc, want: Signature{AlgorithmRSA256, 2, raw}},
		{name: "tabs and spaces around", in: " algorithm=RSA256 ,\tkeyVersion=2\t, signature=" + enc + " ", want: Signature{AlgorithmRSA256, 2, raw}},
		{name: "not URL-encoded", in: "algorithm=RSA256,keyVersion=1,signature=" + b64, want: Signature{AlgorithmRSA256, 1, raw}},
		{name: "lower-case escapes", in: "algorithm=RSA256,keyVersion=1,signature=" + strings.ToLower(enc[:3]) + enc[3:], want: Signature{AlgorithmRSA256, 1, raw}},
		{name: "any order", in: "signature=" + enc + ",keyVersion=7,algorithm=RSA256", want: Signature{AlgorithmRSA256, 7, raw}},
		{name: "no keyVersion", in: "algorithm=RSA256,signature=" + enc, want: Signature{AlgorithmRSA256, 0, raw}},
		{name: "unknown item", in: "algorithm=RSA256,keyVersion=1,signature=" + enc + ",extra=1", want: Signature{AlgorithmRSA256, 1, raw}},
		{name: "empty", in: "", wantErr: "empty"},
		{name: "blank", in: "   ", wantErr: "empty"},
		{name: "no algorithm", in: "keyVersion=1,signature=" + enc, wantErr: "no algorithm"},
		{name: "no signature", in: "algorithm=RSA256,keyVersion=1", wantErr: "no signature"},
		{name: "algorithm RSA2048", in: "algorithm=RSA2048,keyVersion=1,signature=" + enc, wantErr: "algorithm"},
		{name: "algorithm lower case", in: "algorithm=rsa256,keyVersion=1,signature=" + enc, wantErr: "algorithm"},
		{name: "key names are case-sensitive", in: "Algorithm=RSA256,keyVersion=1,signature=" + enc, wantErr: "no algorithm"},
		{name: "keyVersion empty", in: "algorithm=RSA256,keyVersion=,signature=" + enc, wantErr: "keyVersion"},
		{name: "keyVersion negative", in: "algorithm=RSA256,keyVersion=-1,signature=" + enc, wantErr: "keyVersion"},
		{name: "keyVersion leading zero", in: "algorithm=RSA256,keyVersion=01,signature=" + enc, wantErr: "keyVersion"},
		{name: "keyVersion too long", in: "algorithm=RSA256,keyVersion=1234567890,signature=" + enc, wantErr: "keyVersion"},
		{name: "keyVersion with a plus", in: "algorithm=RSA256,keyVersion=+1,signature=" + enc, wantErr: "keyVersion"},
		{name: "duplicate algorithm", in: "algorithm=RSA256,algorithm=RSA256,signature=" + enc, wantErr: "twice"},
		{name: "duplicate keyVersion", in: "algorithm=RSA256,keyVersion=1,keyVersion=1,signature=" + enc, wantErr: "twice"},
		{name: "duplicate signature", in: "algorithm=RSA256,signature=" + enc + ",signature=" + enc, wantErr: "twice"},
		{name: "trailing comma", in: "algorithm=RSA256,keyVersion=1,signature=" + enc + ",", wantErr: "must read"},
		{name: "leading comma", in: ",algorithm=RSA256,keyVersion=1,signature=" + enc, wantErr: "must read"},
		{name: "item without '='", in: "algorithm=RSA256,keyVersion=1,signature=" + enc + ",junk", wantErr: "must read"},
		{name: "semicolons", in: "algorithm=RSA256;keyVersion=1;signature=" + enc, wantErr: "algorithm"},
		{name: "bad escape", in: "algorithm=RSA256,signature=%G1" + enc, wantErr: "URL"},
		{name: "bad base64", in: "algorithm=RSA256,signature=abc$", wantErr: "base64"},
		{name: "URL-safe base64", in: "algorithm=RSA256,signature=-_-_AD4_AQ==", wantErr: "base64"},
		{name: "unpadded base64", in: "algorithm=RSA256,signature=-_-_AD4_AQ", wantErr: "base64"},
		{name: "base64 with a space", in: "algorithm=RSA256,signature=AD4 AQ==", wantErr: "base64"},
		{name: "base64 with a newline", in: "algorithm=RSA256,signature=AD4%0AAQ==", wantErr: "base64"},
		{name: "QueryUnescape's plus", in: "algorithm=RSA256,signature=AA+A", want: Signature{AlgorithmRSA256, 0, []byte{0, 15, 128}}},
		{name: "empty signature", in: "algorithm=RSA256,signature=", wantErr: "base64"},
		{name: "too long", in: "algorithm=RSA256,signature=" + strings.Repeat("A", 3000), wantErr: "longer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSignature(tt.in)
			if tt.wantErr != "" {
				var e *Error
				if err == nil || !errors.As(err, &e) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseSignature(%q) = %+v, %v; want an *Error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseSignature(%q) = %v", tt.in, err)
			}
			if got.Algorithm != tt.want.Algorithm || got.KeyVersion != tt.want.KeyVersion || !bytes.Equal(got.Value, tt.want.Value) {
				t.Errorf("ParseSignature(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func TestSignatureString(t *testing.T) {
	s := Signature{Algorithm: AlgorithmRSA256, KeyVersion: 3, Value: []byte{0xfb, 0xff, 0xbf, 0x00, 0x3e, 0x3f, 0x01}}
	const want = "algorithm=RSA256,keyVersion=3,signature=%2B%2F%2B%2FAD4%2FAQ%3D%3D"
	if got := s.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	// The SDKs take the third comma-separated item.
	if items := strings.Split(s.String(), ","); len(items) != 3 || !strings.HasPrefix(items[2], "signature=") {
		t.Errorf("items %q", items)
	}
}

func TestParseRequestTime(t *testing.T) {
	tests := []struct {
		in      string
		want    time.Time
		wantErr bool
	}{
		{in: "1685599933871", want: time.UnixMilli(1685599933871)},
		{in: "0", want: time.UnixMilli(0)},
		{in: "9999999999999", want: time.UnixMilli(9999999999999)},
		{in: "2019-05-28T12:12:12+08:00", want: time.Date(2019, 5, 28, 4, 12, 12, 0, time.UTC)},
		{in: "2019-05-28T12:12:12.253+08:00", want: time.Date(2019, 5, 28, 4, 12, 12, 253e6, time.UTC)},
		{in: "2019-05-28T04:12:12Z", want: time.Date(2019, 5, 28, 4, 12, 12, 0, time.UTC)},
		{in: "2019-05-28T04:12:12.1Z", want: time.Date(2019, 5, 28, 4, 12, 12, 100e6, time.UTC)},
		{in: "2019-05-28T12:12:12+0800", want: time.Date(2019, 5, 28, 4, 12, 12, 0, time.UTC)},
		{in: "2019-05-28T12:12:12.253-0330", want: time.Date(2019, 5, 28, 15, 42, 12, 253e6, time.UTC)},
		{in: "", wantErr: true},
		{in: "16855999338710", wantErr: true}, // 14 digits: microseconds / 100?
		{in: "1685599933871000", wantErr: true},
		{in: "-1685599933871", wantErr: true},
		{in: "+1685599933871", wantErr: true},
		{in: "1685599933871.5", wantErr: true},
		{in: "1e12", wantErr: true},
		{in: " 1685599933871", wantErr: true},
		{in: "2019-05-28T12:12:12", wantErr: true},
		{in: "2019-05-28 12:12:12+08:00", wantErr: true},
		{in: "2019-05-28", wantErr: true},
		{in: "2019-13-28T12:12:12Z", wantErr: true},
		{in: "2019-05-28T12:12:12+08", wantErr: true},
		{in: "Tue, 28 May 2019 12:12:12 GMT", wantErr: true},
		{in: "2019-05-28T12:12:12.2530000000000000000000000000000+08:00", wantErr: true},
	}
	for _, tt := range tests {
		got, err := ParseRequestTime(tt.in)
		if tt.wantErr {
			if err == nil {
				t.Errorf("ParseRequestTime(%q) = %v, want an error", tt.in, got)
			}
			continue
		}
		if err != nil || !got.Equal(tt.want) {
			t.Errorf("ParseRequestTime(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
}

func TestParseClientID(t *testing.T) {
	for in, ok := range map[string]bool{
		"SANDBOX_5Y3A3N2YEA4Y02222": true, "T_111": true, "a-b": true, strings.Repeat("x", 64): true,
		"": false, strings.Repeat("x", 65): false, "a.b": false, "a b": false, "a\tb": false, "é": false, "a/b": false,
	} {
		if _, err := ParseClientID(in); (err == nil) != ok {
			t.Errorf("ParseClientID(%q) = %v, want ok %v", in, err, ok)
		}
	}
}

var testKey = sync.OnceValue(func() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
})

func TestParsePublicKey(t *testing.T) {
	k := testKey()
	der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	b64 := base64.StdEncoding.EncodeToString(der)
	pemPKIX := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	pemPKCS1 := string(pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: x509.MarshalPKCS1PublicKey(&k.PublicKey)}))
	for name, in := range map[string]string{
		"base64": b64, "base64 folded": b64[:64] + "\n" + b64[64:], "PEM": pemPKIX, "PEM with blanks": "\n  " + pemPKIX + "\n", "PKCS #1 PEM": pemPKCS1,
	} {
		pub, err := ParsePublicKey(in)
		if err != nil || !pub.Equal(&k.PublicKey) {
			t.Errorf("%s: ParsePublicKey = %v", name, err)
		}
	}
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	smallDER, _ := x509.MarshalPKIXPublicKey(&small.PublicKey)
	for name, in := range map[string]string{
		"empty": "", "junk": "not a key", "1024 bits": base64.StdEncoding.EncodeToString(smallDER),
		"two PEM blocks":  pemPKIX + pemPKIX,
		"private key PEM": string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
		"truncated":       b64[:100],
	} {
		if _, err := ParsePublicKey(in); err == nil {
			t.Errorf("%s: ParsePublicKey succeeded", name)
		}
	}
}

func TestSignRequestVerifyResponse(t *testing.T) {
	k := testKey()
	body := []byte(`{"customerId":"2188000123456789"}`)
	req, _ := http.NewRequest(http.MethodPost, "http://x/ams/api/v1/customer/applyPublicKey", bytes.NewReader(body))
	now := time.UnixMilli(1685599933871)
	if err := SignRequest(req, "C1", 2, k, body, now); err != nil {
		t.Fatal(err)
	}
	if got := req.Header.Get(HeaderRequestTime); got != "1685599933871" {
		t.Errorf("Request-Time = %q", got)
	}
	sig, err := ParseSignature(req.Header.Get(HeaderSignature))
	if err != nil || sig.KeyVersion != 2 {
		t.Fatalf("Signature %q: %v", req.Header.Get(HeaderSignature), err)
	}
	content := []byte("POST /ams/api/v1/customer/applyPublicKey\nC1.1685599933871." + string(body))
	if err := Verify(&k.PublicKey, content, sig.Value); err != nil {
		t.Errorf("request signature does not verify: %v", err)
	}

	// A response, signed as keyissuer signs it.
	h := http.Header{}
	h.Set(HeaderClientID, "C1")
	h.Set(HeaderResponseTime, FormatTime(now))
	rs, _ := Sign(k, Content("POST", "/p", "C1", h.Get(HeaderResponseTime), body))
	h.Set(HeaderSignature, Signature{Algorithm: AlgorithmRSA256, KeyVersion: 1, Value: rs}.String())
	if err := VerifyResponse(h, "/p", body, &k.PublicKey); err != nil {
		t.Errorf("VerifyResponse = %v", err)
	}
	if err := VerifyResponse(h, "/q", body, &k.PublicKey); !errors.Is(err, ErrVerify) {
		t.Errorf("VerifyResponse of another path = %v, want ErrVerify", err)
	}
	h.Del(HeaderSignature)
	if err := VerifyResponse(h, "/p", body, &k.PublicKey); err == nil {
		t.Error("VerifyResponse without a signature succeeded")
	}
}

// FuzzParseSignature: no panic; every error is an *Error; an accepted
// header formats back to one that parses to the same signature.
func FuzzParseSignature(f *testing.F) {
	f.Add("algorithm=RSA256,keyVersion=1,signature=%2B%2F%2B%2FAD4%2FAQ%3D%3D")
	f.Fuzz(func(t *testing.T, h string) {
		s, err := ParseSignature(h)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v is not an *Error", err)
			}
			return
		}
		if s.Algorithm != AlgorithmRSA256 || len(s.Value) == 0 || s.KeyVersion < 0 {
			t.Fatalf("accepted %q as %+v", h, s)
		}
		again, err := ParseSignature(s.String())
		if err != nil {
			t.Fatalf("String() %q of an accepted header does not parse: %v", s.String(), err)
		}
		if s.KeyVersion != 0 && again.KeyVersion != s.KeyVersion || !bytes.Equal(again.Value, s.Value) {
			t.Fatalf("round trip: %+v then %+v", s, again)
		}
	})
}

// FuzzParseRequestTime: no panic; epoch milliseconds are read as such.
func FuzzParseRequestTime(f *testing.F) {
	f.Add("1685599933871")
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseRequestTime(s)
		if err != nil {
			return
		}
		if len(s) > maxRequestTime {
			t.Fatalf("accepted %d characters", len(s))
		}
		if allDigits(s) && got.UnixMilli() <= 0 && strings.Trim(s, "0") != "" {
			t.Fatalf("%q read as %v", s, got)
		}
		if !utf8.ValidString(s) {
			t.Fatalf("accepted invalid UTF-8 %q", s)
		}
	})
}

var clientIDRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// FuzzParseClientID: accepted exactly when it matches [A-Za-z0-9_-]{1,64}.
func FuzzParseClientID(f *testing.F) {
	f.Add("SANDBOX_5Y3A3N2YEA4Y02222")
	f.Fuzz(func(t *testing.T, s string) {
		_, err := ParseClientID(s)
		if (err == nil) != clientIDRE.MatchString(s) {
			t.Fatalf("ParseClientID(%q) = %v", s, err)
		}
	})
}
