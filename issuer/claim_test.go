package issuer

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// The order of a decrypt (see the package doc): a claim in memory, in token
// storage also a durable one, the token, the destroy, the record's last move
// queued, the decrypt event (the audit line), the answer.

var bothStorages = []hsm.Storage{hsm.StorageSession, hsm.StorageToken}

// pausedClaim returns a harness in storage whose first decrypt, once it has
// claimed its key, closes claimed and waits for resume to be closed before
// it asks the token.
func pausedClaim(t *testing.T, storage hsm.Storage, mod func(*Config)) (h *harness, claimed, resume chan struct{}) {
	t.Helper()
	claimed, resume = make(chan struct{}), make(chan struct{})
	var once sync.Once
	h = newHarness(t, func(c *Config) {
		c.Storage = storage
		c.AfterClaim = func(string) {
			once.Do(func() {
				close(claimed)
				<-resume
			})
		}
		if mod != nil {
			mod(c)
		}
	})
	return h, claimed, resume
}

// What a decrypt writes to the store before it answers. Session storage:
// nothing durable, only the queued last move from issued; token storage:
// the claim's commit, then the queued move from consuming. Either way the
// record is final when the decrypt event (the daemon's audit line) comes.
func TestDecryptStoreWrites(t *testing.T) {
	tests := []struct {
		storage         hsm.Storage
		wantTransitions int64
		wantSettle      [2]store.State
	}{
		{hsm.StorageSession, 0, [2]store.State{store.Issued, store.Consumed}},
		{hsm.StorageToken, 1, [2]store.State{store.Consuming, store.Consumed}},
	}
	for _, tt := range tests {
		t.Run(string(tt.storage), func(t *testing.T) {
			var (
				h       *harness
				mu      sync.Mutex
				atEvent []store.State
			)
			h = newHarness(t, func(c *Config) {
				c.Storage = tt.storage
				c.OnEvent = func(ctx context.Context, e Event) {
					if e.Kind != EventDecrypt {
						return
					}
					r, err := h.st.Store.Get(ctx, e.UniqueID)
					if err != nil {
						t.Errorf("Get at the decrypt event: %v", err)
					}
					mu.Lock()
					atEvent = append(atEvent, r.State)
					mu.Unlock()
				}
			})
			h.start(t)
			iss := h.apply(t)
			n0 := h.st.transitions.Load()
			pw, err := h.is.Decrypt(context.Background(), iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt))
			if err != nil || string(pw) != "pw" {
				t.Fatalf("Decrypt() = %q, %v; want pw", pw, err)
			}
			if n := h.st.transitions.Load() - n0; n != tt.wantTransitions {
				t.Errorf("the decrypt made %d durable transitions, want %d", n, tt.wantTransitions)
			}
			h.st.mu.Lock()
			settles := slices.Clone(h.st.settles)
			h.st.mu.Unlock()
			if len(settles) != 1 || settles[0] != tt.wantSettle {
				t.Errorf("settles = %v, want one %v", settles, tt.wantSettle)
			}
			mu.Lock()
			defer mu.Unlock()
			if !slices.Equal(atEvent, []store.State{store.Consumed}) {
				t.Errorf("the record at the decrypt event: %v, want consumed", atEvent)
			}
		})
	}
}

// While a decrypt holds its claim, before the token call: the record reads
// consuming (in session storage the store still says issued), concurrent
// decrypts answer ErrConsumed, not ErrUnavailable, and neither the reaper
// past the key's expiry nor a report of the key's loss touches it. Then the
// owner decrypts, once.
func TestDecryptClaimHeld(t *testing.T) {
	for _, storage := range bothStorages {
		t.Run(string(storage), func(t *testing.T) {
			ctx := context.Background()
			var log eventLog
			h, claimed, resume := pausedClaim(t, storage, func(c *Config) { c.OnEvent = log.add })
			h.start(t)
			iss := h.apply(t)
			ct := seal(t, iss.PublicKey, "pw", iss.Salt)
			owner := make(chan error, 1)
			go func() {
				pw, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
				if err == nil && string(pw) != "pw" {
					err = errors.New("wrong password " + string(pw))
				}
				owner <- err
			}()
			<-claimed

			if r, err := h.is.Record(ctx, iss.UniqueID); err != nil || r.State != store.Consuming {
				t.Errorf("Record() while claimed = %s, %v; want consuming", r.State, err)
			}
			if storage == hsm.StorageSession {
				if r := h.record(t, iss.UniqueID); r.State != store.Issued {
					t.Errorf("the store says %s while claimed in memory, want issued (nothing durable yet)", r.State)
				}
			}
			const n = 16
			errs := make(chan error, n)
			var wg sync.WaitGroup
			for range n {
				wg.Go(func() {
					_, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
					errs <- err
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if !errors.Is(err, ErrConsumed) {
					t.Errorf("a decrypt racing the claim: %v, want ErrConsumed", err)
				}
			}

			// The reaper past the key's expiry, and the key reported lost.
			h.clock.Advance(time.Hour)
			h.is.Reap(ctx)
			h.is.KeysLost([]string{iss.UniqueID})
			h.is.accountLost(ctx)
			if es := append(log.of(EventExpired, iss.UniqueID), log.of(EventLost, iss.UniqueID)...); len(es) != 0 {
				t.Errorf("events for the claimed key: %+v, want none", es)
			}
			if !h.tok.has(iss.UniqueID) {
				t.Error("the claimed key was destroyed before its decrypt")
			}

			close(resume)
			if err := <-owner; err != nil {
				t.Fatalf("the owner's Decrypt() = %v, want the password", err)
			}
			h.wantState(t, iss.UniqueID, store.Consumed)
			if c := h.tok.decryptCount(); c != 1 {
				t.Errorf("the token decrypted %d times, want 1", c)
			}
			if _, err := h.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, ErrConsumed) {
				t.Errorf("Decrypt() after the owner's: %v, want ErrConsumed", err)
			}
			h.is.mu.Lock()
			defer h.is.mu.Unlock()
			if len(h.is.claims) != 0 {
				t.Errorf("claims left: %v", h.is.claims)
			}
		})
	}
}

// A key given back before C_Decrypt: in session storage without a store
// write, to whom it was issued (the quota's count is back), and a decrypt
// racing the claim answers ErrConsumed meanwhile; the retry decrypts.
func TestDecryptGiveBackInMemory(t *testing.T) {
	ctx := context.Background()
	h, claimed, resume := pausedClaim(t, hsm.StorageSession, nil)
	h.start(t)
	iss := h.apply(t)
	ct := seal(t, iss.PublicKey, "pw", iss.Salt)
	h.tok.set(func(f *fakeToken) { f.failDecrypt = hsm.ErrUnavailable })
	n0 := h.st.transitions.Load()
	owner := make(chan error, 1)
	go func() {
		_, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
		owner <- err
	}()
	<-claimed
	if got := h.is.Stats().Outstanding; got != 0 {
		t.Errorf("outstanding while claimed: %d, want 0", got)
	}
	if _, err := h.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, ErrConsumed) {
		t.Errorf("a decrypt racing the claim: %v, want ErrConsumed", err)
	}
	close(resume)
	if err := <-owner; !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Decrypt() = %v, want ErrUnavailable", err)
	}
	if n := h.st.transitions.Load() - n0; n != 0 {
		t.Errorf("claim and give-back made %d store transitions, want 0", n)
	}
	h.st.mu.Lock()
	settles := len(h.st.settles)
	h.st.mu.Unlock()
	if settles != 0 {
		t.Errorf("%d settles for a key given back, want 0", settles)
	}
	h.wantState(t, iss.UniqueID, store.Issued)
	h.is.mu.Lock()
	out, claims := h.is.tally.byClient["client-1"], len(h.is.claims)
	h.is.mu.Unlock()
	if out != 1 || claims != 0 {
		t.Errorf("after the give-back: client-1 holds %d keys, %d claims; want 1 and 0", out, claims)
	}
	h.tok.set(func(f *fakeToken) { f.failDecrypt = nil })
	if pw, err := h.is.Decrypt(ctx, iss.UniqueID, ct); err != nil || string(pw) != "pw" {
		t.Errorf("retry: Decrypt() = %q, %v; want pw", pw, err)
	}
	h.wantState(t, iss.UniqueID, store.Consumed)
}

// Token storage: a durable claim that fails gives the key back (the token
// never saw the ciphertext), and the retry decrypts.
func TestDecryptDurableClaimFails(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, func(c *Config) { c.Storage = hsm.StorageToken })
	h.start(t)
	iss := h.apply(t)
	ct := seal(t, iss.PublicKey, "pw", iss.Salt)
	broken := errors.New("disk full")
	h.st.mu.Lock()
	h.st.failTo = map[store.State]error{store.Consuming: broken}
	h.st.mu.Unlock()
	if _, err := h.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, broken) {
		t.Fatalf("Decrypt() = %v, want the store's error", err)
	}
	if c := h.tok.decryptCount(); c != 0 {
		t.Fatalf("the token decrypted %d times without a durable claim", c)
	}
	h.wantState(t, iss.UniqueID, store.Issued)
	if pw, err := h.is.Decrypt(ctx, iss.UniqueID, ct); err != nil || string(pw) != "pw" {
		t.Errorf("retry: Decrypt() = %q, %v; want pw", pw, err)
	}
}

// The reaper's expiry claims a key the same way: a decrypt that comes while
// the expiry holds the key answers ErrExpired and never reaches the token.
func TestDecryptRacingExpiry(t *testing.T) {
	for _, storage := range bothStorages {
		t.Run(string(storage), func(t *testing.T) {
			ctx := context.Background()
			h := newHarness(t, func(c *Config) { c.Storage = storage })
			h.start(t)
			iss := h.apply(t)
			ct := seal(t, iss.PublicKey, "pw", iss.Salt)
			inside, leave := make(chan struct{}), make(chan struct{})
			h.st.mu.Lock()
			h.st.beforeTo = map[store.State]func(){store.Expired: func() {
				close(inside)
				<-leave
			}}
			h.st.mu.Unlock()
			expired := make(chan error, 1)
			go func() { expired <- h.is.expire(ctx, h.record(t, iss.UniqueID)) }()
			<-inside // the expiry holds the key, its commit not yet made
			if _, err := h.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, ErrExpired) {
				t.Errorf("a decrypt racing the expiry: %v, want ErrExpired", err)
			}
			close(leave)
			if err := <-expired; !errors.Is(err, ErrExpired) {
				t.Errorf("expire() = %v", err)
			}
			h.wantState(t, iss.UniqueID, store.Expired)
			if c := h.tok.decryptCount(); c != 0 {
				t.Errorf("the token decrypted %d times", c)
			}
			if !h.tok.wasDestroyed(iss.UniqueID) {
				t.Error("the expired key was not destroyed")
			}
		})
	}
}
