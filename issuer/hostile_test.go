package issuer

import (
	"bytes"
	"context"
	"errors"
	"math/big"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// Hostile ciphertexts and plaintexts: what an attacker who can reach the
// decrypt socket, or encrypt whatever they like under a key, can send.

// Regression: a ciphertext of the right length but not below the modulus
// used to be claimed and sent to the token, which refused it: the key was
// consumed (DECRYPT_FAILED) by an input that can never be a ciphertext for
// it. Found by the reliability suite's hostile-input table.
func TestDecryptRefusesCiphertextNotBelowModulus(t *testing.T) {
	h := newHarness(t, nil)
	h.start(t)
	iss := h.apply(t)
	n := parsePublic(t, iss.PublicKey).N
	size := (n.BitLen() + 7) / 8
	tests := []struct {
		name string
		ct   []byte
	}{
		{"the modulus", n.FillBytes(make([]byte, size))},
		{"the modulus plus one", new(big.Int).Add(n, big.NewInt(1)).FillBytes(make([]byte, size))},
		{"all ones", bytes.Repeat([]byte{0xff}, size)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := h.is.Decrypt(context.Background(), iss.UniqueID, tt.ct)
			if !errors.Is(err, ErrCiphertext) {
				t.Errorf("Decrypt = %v, want ErrCiphertext", err)
			}
			h.wantState(t, iss.UniqueID, store.Issued)
		})
	}
	if n := h.tok.decryptCount(); n != 0 {
		t.Errorf("%d decrypts reached the token", n)
	}
	// The key is untouched: the one real decrypt still works.
	pw, err := h.is.Decrypt(context.Background(), iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt))
	if err != nil || string(pw) != "pw" {
		t.Errorf("Decrypt after the refusals = %q, %v", pw, err)
	}
	// One below the modulus is a ciphertext like any other: it consumes
	// the key it fails on.
	iss = h.apply(t)
	n = parsePublic(t, iss.PublicKey).N
	below := new(big.Int).Sub(n, big.NewInt(1)).FillBytes(make([]byte, size))
	if _, err := h.is.Decrypt(context.Background(), iss.UniqueID, below); !errors.Is(err, ErrDecrypt) {
		t.Errorf("Decrypt(n-1) = %v, want ErrDecrypt", err)
	}
	h.wantState(t, iss.UniqueID, store.Consumed)
}

// FuzzDecryptCiphertext sends arbitrary bytes as the ciphertext of an issued
// key. Whatever they are: no panic; a ciphertext that cannot be for the key
// (wrong length, not below the modulus) leaves it issued; anything else
// consumes it, and the token sees at most one decrypt of it.
func FuzzDecryptCiphertext(f *testing.F) {
	h := newHarness(f, nil)
	// Records in memory: the fuzzer's time goes to ciphertexts, not fsyncs.
	mem := &memStore{recs: map[string]store.Record{}}
	h.st.Store = mem
	h.is.cfg.Store = h.st
	h.start(f)
	probe := h.apply(f)
	n := parsePublic(f, probe.PublicKey).N
	size := (n.BitLen() + 7) / 8
	f.Add([]byte{})
	f.Add([]byte{0})
	f.Add(make([]byte, size))
	f.Add(n.FillBytes(make([]byte, size)))
	f.Add(bytes.Repeat([]byte{0xff}, size))
	f.Add(bytes.Repeat([]byte{0x7f}, size))
	f.Add(make([]byte, size+1))
	f.Add(seal(f, probe.PublicKey, "pw", probe.Salt)) // for another key: fails
	// A key serves until a ciphertext consumes it: most inputs are
	// malformed and leave it issued, so the fuzzer need not wait for the
	// pool.
	var (
		mu  sync.Mutex
		cur *Issued
	)
	f.Fuzz(func(t *testing.T, ct []byte) {
		mu.Lock()
		defer mu.Unlock()
		if cur == nil {
			iss := h.apply(t)
			cur = &iss
		}
		iss := *cur
		before := h.tok.decryptCount()
		pw, err := h.is.Decrypt(context.Background(), iss.UniqueID, ct)
		key := parsePublic(t, iss.PublicKey)
		malformed := len(ct) != size || new(big.Int).SetBytes(ct).Cmp(key.N) >= 0
		switch {
		case malformed:
			if !errors.Is(err, ErrCiphertext) {
				t.Fatalf("Decrypt of %d malformed bytes = %q, %v; want ErrCiphertext", len(ct), pw, err)
			}
			h.wantState(t, iss.UniqueID, store.Issued)
			if got := h.tok.decryptCount(); got != before {
				t.Fatal("a malformed ciphertext reached the token")
			}
		case err == nil || errors.Is(err, ErrDecrypt):
			cur = nil
			h.wantState(t, iss.UniqueID, store.Consumed)
			if got := h.tok.decryptCount(); got > before+1 {
				t.Fatalf("%d decrypts reached the token for one request", got-before)
			}
			if _, err := h.is.Decrypt(context.Background(), iss.UniqueID, ct); !errors.Is(err, ErrConsumed) {
				t.Fatalf("a second decrypt of the key = %v, want ErrConsumed", err)
			}
		default:
			t.Fatalf("Decrypt = %v; want ErrDecrypt or a password", err)
		}
	})
}

// FuzzLayoutPassword hands every layout an arbitrary plaintext, as an
// attacker who encrypts whatever they like under the key can: no panic, and
// a plaintext accepted is exactly the layout of the password it yields.
func FuzzLayoutPassword(f *testing.F) {
	f.Add([]byte("correct horseAbCdEfGhIjKl"), "AbCdEfGhIjKl")
	f.Add([]byte("AbCdEfGhIjKlcorrect horse"), "AbCdEfGhIjKl")
	f.Add([]byte("a|b|AbCdEfGhIjKl"), "AbCdEfGhIjKl")
	f.Add([]byte(""), "AbCdEfGhIjKl")
	f.Add([]byte("|"), "")
	f.Add([]byte("short"), "AbCdEfGhIjKl")
	f.Fuzz(func(t *testing.T, pt []byte, salt string) {
		for _, l := range Layouts() {
			in := bytes.Clone(pt)
			pw, ok := l.password(in, salt)
			if !ok {
				continue
			}
			if l == LayoutNone {
				if !bytes.Equal(pw, pt) {
					t.Fatalf("%s: password %q from %q", l, pw, pt)
				}
				continue
			}
			if got := l.Plaintext(pw, salt); !bytes.Equal(got, pt) {
				t.Fatalf("%s: %q accepted with salt %q, password %q, which lays out as %q", l, pt, salt, pw, got)
			}
		}
	})
}

// memStore is a [Store] in memory, with the same compare-and-swap
// transitions as the real one, for fuzzing.
type memStore struct {
	mu   sync.Mutex
	recs map[string]store.Record
}

func (m *memStore) Create(_ context.Context, r store.Record) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.recs[r.UniqueID]; ok {
		return store.ErrExists
	}
	m.recs[r.UniqueID] = r
	return nil
}

func (m *memStore) Get(_ context.Context, id string) (store.Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.recs[id]
	if !ok {
		return store.Record{}, store.ErrNotFound
	}
	return r, nil
}

func (m *memStore) Transition(_ context.Context, id string, from, to store.State, at time.Time) (store.Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.recs[id]
	switch {
	case !ok:
		return store.Record{}, store.ErrNotFound
	case r.State != from:
		return r, &store.StateError{Current: r, Want: from}
	}
	r.State = to
	if !to.Active() {
		r.ClosedAt = at
	}
	m.recs[id] = r
	return r, nil
}

func (m *memStore) Active(_ context.Context, before time.Time, limit int) ([]store.Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []store.Record
	for _, r := range m.recs {
		if r.State.Active() && r.ExpiresAt.Before(before) && (limit <= 0 || len(out) < limit) {
			out = append(out, r)
		}
	}
	return out, nil
}

func (m *memStore) Prune(context.Context, time.Time, int) (int, error) { return 0, nil }

func (m *memStore) Settle(id string, from, to store.State, at time.Time) {
	m.Transition(context.Background(), id, from, to, at)
}

// destroyProbe runs during, if set, inside every Destroy, before the
// fake's.
type destroyProbe struct {
	*fakeToken
	mu     sync.Mutex
	during func()
}

func (d *destroyProbe) Destroy(ctx context.Context, k *hsm.Key) error {
	d.mu.Lock()
	if d.during != nil {
		d.during()
	}
	d.mu.Unlock()
	return d.fakeToken.Destroy(ctx, k)
}

// Regression: while the reaper retried the failed destroys it had taken
// off the queue, Stats (health's pendingDestroys, the metrics) said none
// was pending. Found by the reliability suite's outage test, which saw 0
// pending destroys while one was failing every reaper pass.
func TestPendingDestroysCountedWhileRetried(t *testing.T) {
	h := newHarness(t, nil)
	probe := &destroyProbe{fakeToken: h.tok}
	h.is.cfg.Token = probe
	h.start(t)
	iss := h.apply(t)
	h.tok.set(func(f *fakeToken) { f.failDestroy = errors.New("injected") })
	if _, err := h.is.Decrypt(context.Background(), iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt)); err != nil {
		t.Fatal(err)
	}
	if n := h.is.Stats().PendingDestroys; n != 1 {
		t.Fatalf("after a failed destroy: %d pending, want 1", n)
	}
	var during []int
	probe.mu.Lock()
	probe.during = func() { during = append(during, h.is.Stats().PendingDestroys) }
	probe.mu.Unlock()
	h.is.Reap(context.Background()) // fails again
	h.tok.set(func(f *fakeToken) { f.failDestroy = nil })
	h.is.Reap(context.Background()) // succeeds
	probe.mu.Lock()
	defer probe.mu.Unlock()
	probe.during = nil
	if len(during) != 2 || during[0] != 1 || during[1] != 1 {
		t.Errorf("pending destroys seen during the retries: %v, want [1 1]", during)
	}
	if n := h.is.Stats().PendingDestroys; n != 0 {
		t.Errorf("after the retry succeeded: %d pending, want 0", n)
	}
}
