package issuer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// A key goes back to issued only when the token never saw the ciphertext.
// Once it did, whatever it answered, the key is consumed and destroyed, and
// a retry finds it consumed.
func TestDecryptAfterTheTokenSawItConsumes(t *testing.T) {
	interrupted := fmt.Errorf("failed to decrypt with key: %w: CKR_DEVICE_ERROR", hsm.ErrInterrupted)
	tests := []struct {
		name    string
		fault   func(f *fakeToken)
		wantErr error
	}{
		{"fault after a decrypt that succeeded", func(f *fakeToken) { f.failAfterDecrypt = interrupted }, ErrDecrypt},
		{"fault after a decrypt that failed", func(f *fakeToken) { f.failDecrypt = interrupted }, ErrDecrypt},
		// A wrapper that wraps both: ErrInterrupted wins.
		{"interrupted and unavailable", func(f *fakeToken) {
			f.failAfterDecrypt = errors.Join(hsm.ErrUnavailable, interrupted)
		}, ErrDecrypt},
		{"bad padding", func(f *fakeToken) { f.failDecrypt = hsm.ErrDecrypt }, ErrDecrypt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			h := newHarness(t, nil)
			h.start(t)
			iss := h.apply(t)
			ct := seal(t, iss.PublicKey, "pw", iss.Salt)
			h.tok.set(tt.fault)
			if got, err := h.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, tt.wantErr) || errors.Is(err, ErrUnavailable) {
				t.Fatalf("Decrypt() = %q, %v; want %v", got, err, tt.wantErr)
			}
			h.wantState(t, iss.UniqueID, store.Consumed)
			if !h.tok.wasDestroyed(iss.UniqueID) {
				t.Error("the key was not destroyed")
			}
			h.tok.set(func(f *fakeToken) { f.failDecrypt, f.failAfterDecrypt = nil, nil })
			if got, err := h.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, ErrConsumed) {
				t.Errorf("retry: Decrypt() = %q, %v; want ErrConsumed", got, err)
			}
			if n := h.tok.decryptCount(); n > 1 {
				t.Errorf("the token decrypted %d times", n)
			}
		})
	}
}

// A caller that gives up after the claim, while the decrypt waits for the
// token: the claim stands (the key is consumed and destroyed, never given
// back), nothing is decrypted, and the answer and the event say
// ErrAbandoned rather than ErrDecrypt.
func TestDecryptAbandoned(t *testing.T) {
	var log eventLog
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h := newHarness(t, func(c *Config) {
		c.OnEvent = log.add
		c.AfterClaim = func(string) { cancel() }
	})
	h.start(t)
	iss := h.apply(t)
	ct := seal(t, iss.PublicKey, "pw", iss.Salt)
	got, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
	if !errors.Is(err, ErrAbandoned) || errors.Is(err, ErrDecrypt) {
		t.Fatalf("Decrypt() = %q, %v; want ErrAbandoned", got, err)
	}
	h.wantState(t, iss.UniqueID, store.Consumed)
	if !h.tok.wasDestroyed(iss.UniqueID) {
		t.Error("the key was not destroyed")
	}
	if n := h.tok.decryptCount(); n != 0 {
		t.Errorf("the token decrypted %d times, want 0", n)
	}
	es := log.of(EventDecrypt, iss.UniqueID)
	if len(es) != 1 || !errors.Is(es[0].Err, ErrAbandoned) {
		t.Errorf("decrypt events = %+v, want one with ErrAbandoned", es)
	}
	if _, err := h.is.Decrypt(context.Background(), iss.UniqueID, ct); !errors.Is(err, ErrConsumed) {
		t.Errorf("retry: Decrypt() = %v, want ErrConsumed", err)
	}
}

// The token's context errors, whichever, mean the same.
func TestDecryptAbandonedByDeadline(t *testing.T) {
	h := newHarness(t, nil)
	h.start(t)
	iss := h.apply(t)
	h.tok.set(func(f *fakeToken) { f.failDecrypt = fmt.Errorf("waiting for a session: %w", context.DeadlineExceeded) })
	if _, err := h.is.Decrypt(context.Background(), iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt)); !errors.Is(err, ErrAbandoned) {
		t.Fatalf("Decrypt() = %v, want ErrAbandoned", err)
	}
	h.wantState(t, iss.UniqueID, store.Consumed)
}

// The issuer zeroes every byte of the token's plaintext that it does not
// hand on (the salt), and all of it when the salt is wrong; the caller
// zeroes the password it gets.
func TestDecryptZeroesThePlaintext(t *testing.T) {
	for _, layout := range Layouts() {
		t.Run(string(layout), func(t *testing.T) {
			ctx := context.Background()
			h := newHarness(t, func(c *Config) { c.Layout = layout })
			h.start(t)
			for _, wrong := range []bool{false, true} {
				iss := h.apply(t)
				salt := iss.Salt
				if wrong {
					salt = "WRONGSALT000"
				}
				ct := sealLayout(t, iss.PublicKey, layout, "hunter2", salt)
				pw, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
				h.tok.mu.Lock()
				pt := h.tok.plaintexts[len(h.tok.plaintexts)-1]
				h.tok.mu.Unlock()
				switch {
				case wrong && layout != LayoutNone:
					if !errors.Is(err, ErrDecrypt) {
						t.Fatalf("wrong salt: Decrypt() = %q, %v; want ErrDecrypt", pw, err)
					}
				case err != nil || string(pw) != "hunter2":
					t.Fatalf("Decrypt() = %q, %v; want hunter2", pw, err)
				default:
					clear(pw) // what the caller does
				}
				if !bytes.Equal(pt, make([]byte, len(pt))) {
					t.Errorf("wrong salt %v: the plaintext buffer holds %q after use, want zeros", wrong, pt)
				}
			}
		})
	}
}

func sealLayout(t testing.TB, der []byte, l Layout, password, salt string) []byte {
	t.Helper()
	return seal(t, der, string(l.Plaintext([]byte(password), salt)), "")
}
