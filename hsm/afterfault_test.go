package hsm

import (
	"bytes"
	"context"
	"errors"
	"math/big"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"
)

// These tests fail PKCS#11 calls *after* the token did their work, through
// Config.AfterCall: a network HSM that decrypts and then drops the
// connection, a generation whose answer is lost. Whatever the token did,
// a key must decrypt at most once, and no object may be left unrecorded.

// deviceError is the fault injected: the token or the link to it failed.
var deviceError = pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)

// injector is a Config.AfterCall that counts calls and fails the next calls
// of an op with planned errors.
type injector struct {
	mu    sync.Mutex
	calls map[Op]int
	byKey map[string]map[Op]int
	plan  map[Op][]error
}

func newInjector() *injector {
	return &injector{calls: map[Op]int{}, byKey: map[string]map[Op]int{}, plan: map[Op][]error{}}
}

func (in *injector) hook(op Op, id string, err error) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.calls[op]++
	if id != "" {
		if in.byKey[id] == nil {
			in.byKey[id] = map[Op]int{}
		}
		in.byKey[id][op]++
	}
	if q := in.plan[op]; len(q) > 0 {
		in.plan[op] = q[1:]
		if q[0] != nil {
			return q[0]
		}
	}
	return err
}

// failNext makes the next len(errs) calls of op return errs, in order,
// whatever the token answered (a nil entry lets a call's own answer
// through).
func (in *injector) failNext(op Op, errs ...error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.plan[op] = append(in.plan[op], errs...)
}

// reset forgets the plan and the counts.
func (in *injector) reset() {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.calls, in.byKey, in.plan = map[Op]int{}, map[string]map[Op]int{}, map[Op][]error{}
}

func (in *injector) keyCalls(id string, op Op) int {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.byKey[id][op]
}

func (in *injector) count(op Op) int {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.calls[op]
}

// total is the number of PKCS#11 calls seen.
func (in *injector) total() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	n := 0
	for _, c := range in.calls {
		n += c
	}
	return n
}

func openInjected(t testing.TB, storage Storage) (*Token, *injector) {
	t.Helper()
	in := newInjector()
	tok := openToken(t, storage, func(c *Config) { c.AfterCall = in.hook })
	in.reset() // the probe's calls
	return tok, in
}

// badPadding returns a ciphertext below k's modulus that no encryption
// under k gives (with overwhelming probability): its padding is bad.
func badPadding(k *Key) []byte {
	ct := bytes.Repeat([]byte{0x5a}, k.Size())
	ct[0] = 0x01
	if new(big.Int).SetBytes(ct).Cmp(k.Public.N) >= 0 {
		panic("test ciphertext not below the modulus")
	}
	return ct
}

// A device error after C_Decrypt did its work: the call is not tried again
// (that would decrypt a second time), the answer is not "unavailable"
// (that would give the key back), and the key is spent.
func TestFaultAfterDecryptSpendsTheKey(t *testing.T) {
	ctx := context.Background()
	for _, storage := range storages {
		for _, p := range []Padding{OAEPSHA1, OAEPSHA256} { // native and raw on SoftHSM
			t.Run(string(storage)+"/"+string(p), func(t *testing.T) {
				tok, in := openInjected(t, storage)
				k, err := tok.Generate(ctx, testID("after-decrypt"))
				if err != nil {
					t.Fatal(err)
				}
				ct, _ := Encrypt(k.Public, p, []byte("pw"))
				in.failNext(OpDecrypt, deviceError)
				got, err := tok.Decrypt(ctx, k, p, ct)
				if got != nil || !errors.Is(err, ErrInterrupted) || errors.Is(err, ErrUnavailable) {
					t.Errorf("Decrypt with a fault after C_Decrypt = %q, %v; want ErrInterrupted, not ErrUnavailable", got, err)
				}
				if n := in.keyCalls(k.ID, OpDecrypt); n != 1 {
					t.Errorf("C_Decrypt was called %d times for the key, want 1", n)
				}
				if _, err := tok.Decrypt(ctx, k, p, ct); !errors.Is(err, ErrKeySpent) && !errors.Is(err, ErrKeyLost) {
					t.Errorf("second Decrypt: %v, want ErrKeySpent (or ErrKeyLost: its session died)", err)
				}
				if n := in.keyCalls(k.ID, OpDecrypt); n != 1 {
					t.Errorf("after a second try C_Decrypt was called %d times for the key, want 1", n)
				}
				if err := tok.Destroy(ctx, k); err != nil {
					t.Fatal(err)
				}
				if ids := listIDs(t, tok); len(ids) != 0 {
					t.Errorf("objects left: %v", ids)
				}
			})
		}
	}
}

// Bad padding is CKR_GENERAL_ERROR on SoftHSM with a native mechanism,
// which is also how SoftHSM reports a missing token. Whatever the token's
// health says afterwards, the key is spent: C_Decrypt saw a ciphertext. And
// no health check follows a C_Decrypt, so bad padding costs the same token
// calls as a good ciphertext (see TestFailurePathsCostTheSameTokenCalls).
func TestFailedDecryptThenUnhealthyTokenSpendsTheKey(t *testing.T) {
	ctx := context.Background()
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			tok, in := openInjected(t, storage)
			if m := tok.Info().Methods[OAEPSHA1]; m != Native {
				t.Fatalf("SoftHSM does OAEP-SHA-1 %s; this test needs it native", m)
			}
			k, err := tok.Generate(ctx, testID("bad-then-down"))
			if err != nil {
				t.Fatal(err)
			}
			// The health check after the failure would find the token gone.
			in.failNext(OpGetTokenInfo, deviceError, deviceError, deviceError)
			if _, err := tok.Decrypt(ctx, k, OAEPSHA1, badPadding(k)); !errors.Is(err, ErrDecrypt) {
				t.Errorf("Decrypt of bad padding: %v, want ErrDecrypt", err)
			}
			if n := in.count(OpGetTokenInfo); n != 0 {
				t.Errorf("%d health checks after a C_Decrypt, want none", n)
			}
			in.reset()
			good, _ := Encrypt(k.Public, OAEPSHA1, []byte("pw"))
			if got, err := tok.Decrypt(ctx, k, OAEPSHA1, good); !errors.Is(err, ErrKeySpent) {
				t.Errorf("second Decrypt, with a good ciphertext: %q, %v; want ErrKeySpent", got, err)
			}
			if err := tok.Destroy(ctx, k); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A device error after a C_Decrypt that failed: still one call, the key
// spent.
func TestFaultAfterFailedDecryptSpendsTheKey(t *testing.T) {
	ctx := context.Background()
	tok, in := openInjected(t, StorageToken)
	k, err := tok.Generate(ctx, testID("failed-then-fault"))
	if err != nil {
		t.Fatal(err)
	}
	in.failNext(OpDecrypt, deviceError)
	if _, err := tok.Decrypt(ctx, k, OAEPSHA1, badPadding(k)); !errors.Is(err, ErrInterrupted) || errors.Is(err, ErrUnavailable) {
		t.Errorf("Decrypt: %v, want ErrInterrupted, not ErrUnavailable", err)
	}
	if n := in.keyCalls(k.ID, OpDecrypt); n != 1 {
		t.Errorf("C_Decrypt was called %d times, want 1", n)
	}
	good, _ := Encrypt(k.Public, OAEPSHA1, []byte("pw"))
	if _, err := tok.Decrypt(ctx, k, OAEPSHA1, good); !errors.Is(err, ErrKeySpent) {
		t.Errorf("second Decrypt: %v, want ErrKeySpent", err)
	}
	if err := tok.Destroy(ctx, k); err != nil {
		t.Fatal(err)
	}
}

// A fault before C_Decrypt (here C_DecryptInit) did nothing: the call is
// tried again on a fresh session, and the key decrypts once.
func TestFaultBeforeDecryptIsRetried(t *testing.T) {
	ctx := context.Background()
	tok, in := openInjected(t, StorageToken)
	k, err := tok.Generate(ctx, testID("before-decrypt"))
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Destroy(ctx, k)
	ct, _ := Encrypt(k.Public, OAEPSHA1, []byte("pw"))
	in.failNext(OpDecryptInit, deviceError)
	if got, err := tok.Decrypt(ctx, k, OAEPSHA1, ct); err != nil || string(got) != "pw" {
		t.Errorf("Decrypt after a fault in C_DecryptInit = %q, %v; want pw", got, err)
	}
	if n := in.keyCalls(k.ID, OpDecrypt); n != 1 {
		t.Errorf("C_Decrypt was called %d times, want 1", n)
	}
}

// A fault after C_GenerateKeyPair (or after the read of the new public
// key, or with the clean-up's destroys failing too) leaves the token
// holding a pair nobody knows of. It is found by its CKA_ID and destroyed
// before the generation is tried again: the token ends with exactly the one
// pair Generate returned, never two under one CKA_ID, or with nothing.
func TestFaultAfterGenerateLeavesNoObject(t *testing.T) {
	ctx := context.Background()
	plans := []struct {
		name string
		plan func(in *injector)
	}{
		{"after C_GenerateKeyPair", func(in *injector) { in.failNext(OpGenerateKeyPair, deviceError) }},
		{"after reading the public key with destroys failing", func(in *injector) {
			in.failNext(OpGetAttributeValue, deviceError)
			in.failNext(OpDestroyObject, deviceError, deviceError)
		}},
		{"after both tries", func(in *injector) { in.failNext(OpGenerateKeyPair, deviceError, deviceError) }},
	}
	for _, storage := range storages {
		for _, tt := range plans {
			t.Run(string(storage)+"/"+tt.name, func(t *testing.T) {
				tok, in := openInjected(t, storage)
				tt.plan(in)
				k, err := tok.Generate(ctx, testID("gen"))
				in.reset()
				n := listIDs(t, tok)[testID("gen")]
				switch {
				case err == nil && n != 2:
					t.Errorf("Generate succeeded and the token holds %d objects under its id, want 2", n)
				case err != nil && n != 0:
					t.Errorf("Generate failed (%v) and the token holds %d objects under its id, want 0", err, n)
				}
				if err != nil {
					return
				}
				ct, _ := Encrypt(k.Public, OAEPSHA1, []byte("pw"))
				if got, err := tok.Decrypt(ctx, k, OAEPSHA1, ct); err != nil || string(got) != "pw" {
					t.Errorf("Decrypt with the generated key = %q, %v", got, err)
				}
				if err := tok.Destroy(ctx, k); err != nil {
					t.Fatal(err)
				}
				if ids := listIDs(t, tok); len(ids) != 0 {
					t.Errorf("objects left: %v", ids)
				}
			})
		}
	}
}

// When the clean-up after an ambiguous generation cannot reach the token
// either, the id is remembered and Check destroys what it finds under it
// once the token answers.
func TestGenerateOrphansAreSweptByCheck(t *testing.T) {
	ctx := context.Background()
	tok, in := openInjected(t, StorageToken)
	in.failNext(OpGenerateKeyPair, deviceError)
	in.failNext(OpFindObjectsInit, deviceError, deviceError)
	if k, err := tok.Generate(ctx, testID("orphan")); err == nil {
		t.Fatalf("Generate = %v, nil; want an error (the clean-up failed)", k.ID)
	}
	in.reset()
	if err := tok.Check(ctx); err != nil {
		t.Fatalf("Check: %v", err)
	}
	if n := listIDs(t, tok)[testID("orphan")]; n != 0 {
		t.Errorf("after Check the token holds %d objects of the failed generation, want 0", n)
	}
}

// A fault after C_DestroyObject did its work: the destroy is finished (or
// fails and can be retried), and the key never decrypts again.
func TestFaultAfterDestroyLeavesNoObject(t *testing.T) {
	ctx := context.Background()
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			tok, in := openInjected(t, storage)
			k, err := tok.Generate(ctx, testID("after-destroy"))
			if err != nil {
				t.Fatal(err)
			}
			in.failNext(OpDestroyObject, deviceError)
			if err := tok.Destroy(ctx, k); err != nil {
				if err := tok.Destroy(ctx, k); err != nil {
					t.Fatalf("Destroy retried: %v", err)
				}
			}
			ct, _ := Encrypt(k.Public, OAEPSHA1, []byte("pw"))
			if _, err := tok.Decrypt(ctx, k, OAEPSHA1, ct); !errors.Is(err, ErrKeySpent) && !errors.Is(err, ErrKeyLost) {
				t.Errorf("Decrypt after Destroy: %v, want ErrKeySpent or ErrKeyLost", err)
			}
			if in.keyCalls(k.ID, OpDecrypt) != 0 {
				t.Error("a destroyed key reached C_Decrypt")
			}
			if ids := listIDs(t, tok); len(ids) != 0 {
				t.Errorf("objects left: %v", ids)
			}
		})
	}
}

// A caller that gives up while every session is busy never reaches
// C_Decrypt, and is told so by the context's error, not ErrDecrypt.
func TestDecryptAbandonedWaitingForASession(t *testing.T) {
	ctx := context.Background()
	tok, in := openInjected(t, StorageToken)
	k, err := tok.Generate(ctx, testID("abandoned"))
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Destroy(ctx, k)
	var held []*session
	for range tok.cfg.Sessions {
		held = append(held, <-tok.idle)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	ct, _ := Encrypt(k.Public, OAEPSHA1, []byte("pw"))
	_, err = tok.Decrypt(cctx, k, OAEPSHA1, ct)
	for _, s := range held {
		tok.idle <- s
	}
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrDecrypt) || errors.Is(err, ErrUnavailable) {
		t.Errorf("Decrypt abandoned while waiting for a session: %v, want context.Canceled alone", err)
	}
	if n := in.keyCalls(k.ID, OpDecrypt); n != 0 {
		t.Errorf("C_Decrypt was called %d times, want 0", n)
	}
}

// Item 7 of the security review: with a native padding, bad padding used
// to cost a health check (C_GetTokenInfo) that a good ciphertext did not,
// one bit of timing per key. Both must make the same token calls.
func TestFailurePathsCostTheSameTokenCalls(t *testing.T) {
	ctx := context.Background()
	for _, p := range []Padding{OAEPSHA1, PKCS1v15, OAEPSHA256} {
		t.Run(string(p), func(t *testing.T) {
			tok, in := openInjected(t, StorageSession)
			calls := map[string]int{}
			for _, name := range []string{"good", "bad padding"} {
				k, err := tok.Generate(ctx, testID("cost"))
				if err != nil {
					t.Fatal(err)
				}
				ct, _ := Encrypt(k.Public, p, []byte("pw"))
				if name == "bad padding" {
					ct = badPadding(k)
				}
				in.reset()
				_, derr := tok.Decrypt(ctx, k, p, ct)
				if err := tok.Destroy(ctx, k); err != nil {
					t.Fatal(err)
				}
				calls[name] = in.total()
				t.Logf("%s: %v; %d token calls", name, derr, calls[name])
			}
			if calls["good"] != calls["bad padding"] {
				t.Errorf("token calls: %v; want the same for both", calls)
			}
		})
	}
}
