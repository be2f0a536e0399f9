package hsm

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

func TestMain(m *testing.M) { hsmtest.Main(m) }

// The package's tests share one token (hsmtest.Shared); each keeps to its
// own label prefix.
func softToken(t testing.TB) hsmtest.Token { return hsmtest.Shared(t) }

func openToken(t testing.TB, storage Storage, mutate ...func(*Config)) *Token {
	t.Helper()
	return openTokenOn(t, softToken(t), storage, mutate...)
}

// openTokenOn opens st for the test, its objects under a label prefix of
// the test's own.
func openTokenOn(t testing.TB, st hsmtest.Token, storage Storage, mutate ...func(*Config)) *Token {
	t.Helper()
	cfg := Config{
		Module:      st.Module,
		TokenLabel:  st.Label,
		PIN:         st.PIN,
		Storage:     storage,
		LabelPrefix: st.Prefix + "t-" + strings.NewReplacer("/", "-", " ", "-").Replace(t.Name()) + ":",
		Sessions:    4,
		Paddings:    Paddings(),
		Log:         slog.New(slog.DiscardHandler),
	}
	for _, m := range mutate {
		m(&cfg)
	}
	tok, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { tok.Close() })
	return tok
}

func listIDs(t testing.TB, tok *Token) map[string]int {
	t.Helper()
	objs, err := tok.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	ids := map[string]int{}
	for _, o := range objs {
		ids[o.ID]++
	}
	return ids
}

var storages = []Storage{StorageSession, StorageToken}

func TestGeneratedKeyAttributes(t *testing.T) { hsmtest.ForEach(t, testGeneratedKeyAttributes) }

func testGeneratedKeyAttributes(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			tok := openTokenOn(t, tk, storage)
			k, err := tok.Generate(ctx, testID("attrs"))
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Destroy(ctx, k)
			if k.Public.N.BitLen() != 2048 || k.Public.E != 65537 {
				t.Errorf("public key: %d bits, e=%d", k.Public.N.BitLen(), k.Public.E)
			}
			if pub, err := x509.ParsePKIXPublicKey(k.PublicDER); err != nil || !k.Public.Equal(pub) {
				t.Errorf("PublicDER does not parse to Public: %v", err)
			}
			wantToken := storage == StorageToken
			label := []byte(tok.cfg.LabelPrefix + testID("attrs"))
			privWant := map[uint]any{
				pkcs11.CKA_TOKEN: wantToken, pkcs11.CKA_PRIVATE: true,
				pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_ALWAYS_SENSITIVE: true,
				pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_NEVER_EXTRACTABLE: true,
				pkcs11.CKA_DECRYPT: true, pkcs11.CKA_SIGN: false, pkcs11.CKA_SIGN_RECOVER: false,
				pkcs11.CKA_UNWRAP: false, pkcs11.CKA_DERIVE: false,
				pkcs11.CKA_LABEL: label, pkcs11.CKA_ID: label,
			}
			pubWant := map[uint]any{
				pkcs11.CKA_TOKEN: wantToken, pkcs11.CKA_ENCRYPT: true, pkcs11.CKA_VERIFY: false,
				pkcs11.CKA_WRAP: false, pkcs11.CKA_LABEL: label, pkcs11.CKA_ID: label,
			}
			tok.do(ctx, func(s *session) error {
				checkAttrs(t, tok, s, k.priv, privWant)
				checkAttrs(t, tok, s, k.pub, pubWant)
				// The private exponent and primes can never be read.
				for _, a := range []uint{pkcs11.CKA_PRIVATE_EXPONENT, pkcs11.CKA_PRIME_1, pkcs11.CKA_PRIME_2} {
					_, err := tok.mod.ctx.GetAttributeValue(s.h, k.priv, []*pkcs11.Attribute{pkcs11.NewAttribute(a, nil)})
					if !isRV(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
						t.Errorf("reading private attribute %#x: got %v, want CKR_ATTRIBUTE_SENSITIVE", a, err)
					}
				}
				// Nobody may flip the private key to extractable.
				err := tok.mod.ctx.SetAttributeValue(s.h, k.priv, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true)})
				if err == nil {
					t.Error("setting CKA_EXTRACTABLE to true succeeded")
				}
				return nil
			})
		})
	}
}

func checkAttrs(t *testing.T, tok *Token, s *session, h pkcs11.ObjectHandle, want map[uint]any) {
	t.Helper()
	for typ, w := range want {
		attrs, err := tok.mod.ctx.GetAttributeValue(s.h, h, []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
		if err != nil {
			t.Errorf("attribute %#x: %v", typ, err)
			continue
		}
		var wantBytes []byte
		switch w := w.(type) {
		case bool:
			wantBytes = []byte{0}
			if w {
				wantBytes = []byte{1}
			}
		case []byte:
			wantBytes = w
		}
		if !bytes.Equal(attrs[0].Value, wantBytes) {
			t.Errorf("attribute %#x = %x, want %x", typ, attrs[0].Value, wantBytes)
		}
	}
}

func TestDecryptEachPaddingOnceThenDestroy(t *testing.T) {
	hsmtest.ForEach(t, testDecryptEachPaddingOnceThenDestroy)
}

func testDecryptEachPaddingOnceThenDestroy(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			tok := openTokenOn(t, tk, storage)
			t.Logf("methods: %v", tok.Info().Methods)
			for _, p := range Paddings() {
				t.Run(string(p), func(t *testing.T) {
					id := testID("dec-" + string(p))
					k, err := tok.Generate(ctx, id)
					if err != nil {
						t.Fatal(err)
					}
					msg := []byte("hunter2\x00ünïcode salt")
					ct, err := Encrypt(k.Public, p, msg)
					if err != nil {
						t.Fatal(err)
					}
					got, err := tok.Decrypt(ctx, k, p, ct)
					if err != nil || !bytes.Equal(got, msg) {
						t.Fatalf("Decrypt = %q, %v; want %q", got, err, msg)
					}
					if _, err := tok.Decrypt(ctx, k, p, ct); !errors.Is(err, ErrKeySpent) {
						t.Errorf("second Decrypt: %v, want ErrKeySpent", err)
					}
					if n := listIDs(t, tok)[id]; n != 2 {
						t.Errorf("before Destroy: %d objects, want 2", n)
					}
					if err := tok.Destroy(ctx, k); err != nil {
						t.Fatal(err)
					}
					if n := listIDs(t, tok)[id]; n != 0 {
						t.Errorf("after Destroy: %d objects, want 0", n)
					}
					if err := tok.Destroy(ctx, k); err != nil {
						t.Errorf("second Destroy: %v", err)
					}
				})
			}
		})
	}
}

func TestDecryptRejectsBadCiphertexts(t *testing.T) {
	hsmtest.ForEach(t, testDecryptRejectsBadCiphertexts)
}

func testDecryptRejectsBadCiphertexts(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	tok := openTokenOn(t, tk, StorageSession)
	for _, p := range Paddings() {
		other, err := tok.Generate(ctx, testID("other-"+string(p)))
		if err != nil {
			t.Fatal(err)
		}
		tests := []struct {
			name string
			ct   func(k *Key) []byte
		}{
			{"zeros", func(k *Key) []byte { return make([]byte, k.Size()) }},
			{"all ff (above the modulus)", func(k *Key) []byte { return bytes.Repeat([]byte{0xff}, k.Size()) }},
			{"short", func(k *Key) []byte { return []byte("short") }},
			{"for another key", func(k *Key) []byte {
				ct, _ := Encrypt(other.Public, p, []byte("x"))
				return ct
			}},
			{"random", func(k *Key) []byte {
				ct, _ := Encrypt(k.Public, p, []byte("x"))
				ct[len(ct)/2] ^= 0x40
				return ct
			}},
		}
		for _, tt := range tests {
			t.Run(string(p)+"/"+tt.name, func(t *testing.T) {
				k, err := tok.Generate(ctx, testID("bad"))
				if err != nil {
					t.Fatal(err)
				}
				defer tok.Destroy(ctx, k)
				if _, err := tok.Decrypt(ctx, k, p, tt.ct(k)); !errors.Is(err, ErrDecrypt) {
					t.Errorf("Decrypt: %v, want ErrDecrypt", err)
				}
			})
		}
		tok.Destroy(ctx, other)
	}
}

// A session that dies takes its session objects with it: the Token must
// notice, report the keys lost, and give out a working session again.
func TestDeadSessionReportsItsKeysLost(t *testing.T) {
	hsmtest.ForEach(t, testDeadSessionReportsItsKeysLost)
}

func testDeadSessionReportsItsKeysLost(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	var (
		mu   sync.Mutex
		lost []string
	)
	tok := openTokenOn(t, tk, StorageSession, func(c *Config) {
		c.OnLost = func(ids []string) { mu.Lock(); lost = append(lost, ids...); mu.Unlock() }
	})
	k, err := tok.Generate(ctx, testID("doomed"))
	if err != nil {
		t.Fatal(err)
	}
	// Kill the key's session behind the Token's back.
	killSession(t, tok, func(s *session) bool { return s.owner == k.owner })
	if err := tok.Check(ctx); err != nil {
		t.Errorf("Check did not recover the session: %v", err)
	}
	mu.Lock()
	if len(lost) != 1 || lost[0] != testID("doomed") {
		t.Errorf("lost = %v, want [doomed]", lost)
	}
	mu.Unlock()
	if k.Alive() {
		t.Error("key still alive")
	}
	ct, _ := Encrypt(k.Public, OAEPSHA1, []byte("x"))
	if _, err := tok.Decrypt(ctx, k, OAEPSHA1, ct); !errors.Is(err, ErrKeyLost) {
		t.Errorf("Decrypt: %v, want ErrKeyLost", err)
	}
	if err := tok.Destroy(ctx, k); err != nil {
		t.Errorf("Destroy of a lost key: %v", err)
	}
	// The Token replaced the session and works.
	k2, err := tok.Generate(ctx, testID("after"))
	if err != nil {
		t.Fatal(err)
	}
	tok.Destroy(ctx, k2)
	if !tok.Ready() {
		t.Error("token not ready after the session was replaced")
	}
}

// After a token reset every session is dead. Each call replaces the dead
// session it drew and retries once, so callers see no error, and the key
// (a token object) still decrypts once.
func TestDeadSessionsAreReplaced(t *testing.T) { hsmtest.ForEach(t, testDeadSessionsAreReplaced) }

func testDeadSessionsAreReplaced(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	tok := openTokenOn(t, tk, StorageToken)
	k, err := tok.Generate(ctx, testID("retry"))
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Destroy(ctx, k)
	killSession(t, tok, func(*session) bool { return true })
	ct, _ := Encrypt(k.Public, OAEPSHA1, []byte("pw"))
	got, err := tok.Decrypt(ctx, k, OAEPSHA1, ct)
	if err != nil || string(got) != "pw" {
		t.Fatalf("Decrypt after the sessions died: %q, %v", got, err)
	}
	if err := tok.Check(ctx); err != nil {
		t.Errorf("Check: %v", err)
	}
	if !tok.Ready() {
		t.Error("token not ready")
	}
}

func killSession(t testing.TB, tok *Token, match func(*session) bool) {
	t.Helper()
	var all []*session
	for range tok.cfg.Sessions {
		all = append(all, <-tok.idle)
	}
	for _, s := range all {
		if s.owner != nil && match(s) {
			if err := tok.mod.ctx.CloseSession(s.h); err != nil {
				t.Fatalf("CloseSession: %v", err)
			}
		}
		tok.idle <- s
	}
}

func TestDownTokenFailsFast(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageSession)
	tok.mu.Lock()
	tok.down, tok.retryAt = true, time.Now().Add(time.Hour)
	tok.mu.Unlock()
	start := time.Now()
	_, err := tok.Generate(ctx, testID("x"))
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Generate while down: %v, want ErrUnavailable", err)
	}
	if tok.Ready() {
		t.Error("Ready while down")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Generate while down took %s", d)
	}
	tok.mu.Lock()
	tok.retryAt = time.Now()
	tok.mu.Unlock()
	k, err := tok.Generate(ctx, testID("x"))
	if err != nil {
		t.Fatalf("Generate after the backoff: %v", err)
	}
	tok.Destroy(ctx, k)
}

func TestListAdoptTokenObjects(t *testing.T) { hsmtest.ForEach(t, testListAdoptTokenObjects) }

func testListAdoptTokenObjects(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	tok := openTokenOn(t, tk, StorageToken)
	k, err := tok.Generate(ctx, testID("kept"))
	if err != nil {
		t.Fatal(err)
	}
	tok.Close()

	// A new Token, as after a restart, finds and adopts the pair.
	tok2 := openTokenOn(t, tk, StorageToken)
	objs, err := tok2.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var mine []Object
	for _, o := range objs {
		if o.ID == testID("kept") {
			mine = append(mine, o)
			if !o.Token {
				t.Error("object is not a token object")
			}
		}
	}
	if len(mine) != 2 {
		t.Fatalf("found %d objects for the key, want 2", len(mine))
	}
	k2, err := tok2.Adopt(ctx, mine)
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Public.Equal(k.Public) {
		t.Error("adopted key has another public key")
	}
	ct, _ := Encrypt(k2.Public, OAEPSHA256, []byte("after restart"))
	if got, err := tok2.Decrypt(ctx, k2, OAEPSHA256, ct); err != nil || string(got) != "after restart" {
		t.Fatalf("Decrypt adopted: %q, %v", got, err)
	}
	if err := tok2.Destroy(ctx, k2); err != nil {
		t.Fatal(err)
	}
	if _, err := tok2.Adopt(ctx, mine[:1]); !errors.Is(err, ErrKeyLost) {
		t.Errorf("Adopt of half a pair: %v, want ErrKeyLost", err)
	}
}

func TestListIgnoresOtherPrefixes(t *testing.T) {
	ctx := context.Background()
	a := openToken(t, StorageToken, func(c *Config) { c.LabelPrefix = "list-a:" })
	ka, err := a.Generate(ctx, testID("x"))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Destroy(ctx, ka)
	b := openToken(t, StorageToken, func(c *Config) { c.LabelPrefix = "list-b:" })
	if ids := listIDs(t, b); len(ids) != 0 {
		t.Errorf("prefix list-b sees %v", ids)
	}
}

func TestOpenErrors(t *testing.T) {
	st := softToken(t)
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr string
	}{
		{"wrong PIN", func(c *Config) { c.PIN = "not-the-pin-4711" }, "wrong PIN"},
		{"unknown label", func(c *Config) { c.TokenLabel = "no-such-token" }, `no token with label "no-such-token"`},
		{"label and serial", func(c *Config) { c.TokenSerial = "1" }, "exactly one of label or serial"},
		{"1024-bit keys", func(c *Config) { c.KeyBits = 1024 }, "1024 bits not allowed"},
		{"unknown padding", func(c *Config) { c.Paddings = []Padding{"oaep-md5"} }, `unknown padding "oaep-md5"`},
		{"unknown storage", func(c *Config) { c.Storage = "disk" }, `unknown storage "disk"`},
		{"missing module", func(c *Config) { c.Module = "/nonexistent/libnothing.so" }, "failed to load PKCS#11 module"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{Module: st.Module, TokenLabel: st.Label, PIN: st.PIN, Sessions: 2}
			tt.mutate(&cfg)
			tok, err := Open(context.Background(), cfg)
			if err == nil {
				tok.Close()
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
			for _, secret := range []string{st.PIN, cfg.PIN} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error %q contains the PIN", err)
				}
			}
		})
	}
}

func TestConcurrentGenerateDecryptDestroy(t *testing.T) {
	hsmtest.ForEach(t, testConcurrentGenerateDecryptDestroy)
}

func testConcurrentGenerateDecryptDestroy(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	tok := openTokenOn(t, tk, StorageSession)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k, err := tok.Generate(ctx, testID("c"+string(rune('a'+i))))
			if err != nil {
				errs <- err
				return
			}
			ct, _ := Encrypt(k.Public, OAEPSHA256, []byte("pw"))
			if got, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); err != nil || string(got) != "pw" {
				errs <- errors.Join(err, errors.New("wrong plaintext"))
			}
			if err := tok.Destroy(ctx, k); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if ids := listIDs(t, tok); len(ids) != 0 {
		t.Errorf("objects left: %v", ids)
	}
}

// waitReady runs Check until the token has recovered.
func waitReady(t testing.TB, tok *Token) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if tok.Check(context.Background()) == nil && tok.Ready() {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("the token did not recover within 30s")
}

// A real outage on SoftHSM: the token directory disappears under an open
// Token. Calls fail with ErrUnavailable (fast, once the token is known to
// be down) and a key caught in a decrypt is not spent; when the directory
// returns, the Token recovers by itself and the key decrypts, once.
func TestTokenOutageAndRecovery(t *testing.T) {
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			ctx := context.Background()
			tok := openToken(t, storage)
			k, err := tok.Generate(ctx, testID("outage"))
			if err != nil {
				t.Fatal(err)
			}
			ct, _ := Encrypt(k.Public, OAEPSHA256, []byte("pw"))
			restore := hsmtest.MoveTokenDir(t)

			if err := tok.Check(ctx); !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Check during the outage: %v, want ErrUnavailable", err)
			}
			if tok.Ready() {
				t.Error("Ready during the outage")
			}
			if _, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); !errors.Is(err, ErrUnavailable) {
				t.Errorf("Decrypt during the outage: %v, want ErrUnavailable", err)
			}
			if _, err := tok.Generate(ctx, testID("during")); !errors.Is(err, ErrUnavailable) {
				t.Errorf("Generate during the outage: %v, want ErrUnavailable", err)
			}

			restore()
			waitReady(t, tok)
			got, err := tok.Decrypt(ctx, k, OAEPSHA256, ct)
			switch {
			case storage == StorageSession:
				// The module was reset: session objects are gone, and
				// OnLost said so (see TestDeadSessionReportsItsKeysLost).
				if !errors.Is(err, ErrKeyLost) {
					t.Errorf("Decrypt after recovery: %q, %v; want ErrKeyLost", got, err)
				}
			case err != nil || string(got) != "pw":
				t.Fatalf("Decrypt after recovery: %q, %v", got, err)
			default:
				if _, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); !errors.Is(err, ErrKeySpent) {
					t.Errorf("second Decrypt: %v, want ErrKeySpent", err)
				}
			}
			if err := tok.Destroy(ctx, k); err != nil {
				t.Fatal(err)
			}
			k2, err := tok.Generate(ctx, testID("after"))
			if err != nil {
				t.Fatalf("Generate after recovery: %v", err)
			}
			tok.Destroy(ctx, k2)
			if ids := listIDs(t, tok); len(ids) != 0 {
				t.Errorf("objects left: %v", ids)
			}
		})
	}
}

// An outage that strikes while the token is believed up: the failing call
// itself finds out, through the token's health, and answers ErrUnavailable
// rather than calling the key lost or the ciphertext bad.
func TestOutageFoundByACall(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageToken)
	k, err := tok.Generate(ctx, testID("call"))
	if err != nil {
		t.Fatal(err)
	}
	ct, _ := Encrypt(k.Public, OAEPSHA1, []byte("pw"))
	restore := hsmtest.MoveTokenDir(t)
	if _, err := tok.Decrypt(ctx, k, OAEPSHA1, ct); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Decrypt: %v, want ErrUnavailable", err)
	}
	restore()
	waitReady(t, tok)
	if got, err := tok.Decrypt(ctx, k, OAEPSHA1, ct); err != nil || string(got) != "pw" {
		t.Errorf("Decrypt after recovery: %q, %v", got, err)
	}
	tok.Destroy(ctx, k)
}
