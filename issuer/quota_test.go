package issuer

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// count returns the tally of outstanding keys: total, for client and for
// customer.
func (h *harness) count(client, customer string) (total, byClient, byCustomer int) {
	h.is.mu.Lock()
	defer h.is.mu.Unlock()
	return h.is.tally.total, h.is.tally.byClient[client], h.is.tally.byCustomer[customer]
}

func wantQuota(t testing.TB, err error, scope string) {
	t.Helper()
	var qe *QuotaError
	if !errors.Is(err, ErrQuota) || !errors.As(err, &qe) || qe.Scope != scope {
		t.Fatalf("ApplyWithin() = %v, want a %s *QuotaError", err, scope)
	}
}

func TestApplyWithinCaps(t *testing.T) {
	tests := []struct {
		name      string
		lim       Limits
		first     [2]string // customer, client of the keys that fill the cap
		other     [2]string // still allowed
		wantScope string
	}{
		{name: "total", lim: Limits{Total: 2}, first: [2]string{"c1", "app"}, wantScope: "total"},
		{name: "client", lim: Limits{Client: 2}, first: [2]string{"c1", "app"}, other: [2]string{"c1", "app2"}, wantScope: "client"},
		{name: "customer", lim: Limits{Customer: 2}, first: [2]string{"c1", "app"}, other: [2]string{"c2", "app"}, wantScope: "customer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			h := newHarness(t, nil)
			h.start(t)
			var keys []Issued
			for range 2 {
				iss, err := h.is.ApplyWithin(ctx, tt.first[0], tt.first[1], tt.lim)
				if err != nil {
					t.Fatalf("ApplyWithin() = %v", err)
				}
				keys = append(keys, iss)
			}
			_, err := h.is.ApplyWithin(ctx, tt.first[0], tt.first[1], tt.lim)
			wantQuota(t, err, tt.wantScope)
			if tt.other[0] != "" {
				if _, err := h.is.ApplyWithin(ctx, tt.other[0], tt.other[1], tt.lim); err != nil {
					t.Errorf("ApplyWithin() for another holder = %v, want a key", err)
				}
			}
			// Applying without a holder id is capped only by the total.
			if tt.wantScope != "total" {
				if _, err := h.is.ApplyWithin(ctx, "", "", tt.lim); err != nil {
					t.Errorf("ApplyWithin() without ids = %v, want a key", err)
				}
			}

			// A decrypt frees a place.
			if _, err := h.is.Decrypt(ctx, keys[0].UniqueID, seal(t, keys[0].PublicKey, "pw", keys[0].Salt)); err != nil {
				t.Fatalf("Decrypt() = %v", err)
			}
			if _, err := h.is.ApplyWithin(ctx, tt.first[0], tt.first[1], tt.lim); err != nil {
				t.Errorf("ApplyWithin() after a decrypt = %v, want a key", err)
			}
			_, err = h.is.ApplyWithin(ctx, tt.first[0], tt.first[1], tt.lim)
			wantQuota(t, err, tt.wantScope)
		})
	}
}

// TestApplyWithinReleases checks every way a key stops being outstanding,
// and that a failed apply gives its reservation back.
func TestApplyWithinReleases(t *testing.T) {
	ctx := context.Background()
	lim := Limits{Total: 1, Client: 1, Customer: 1}
	h := newHarness(t, nil)
	h.start(t)
	apply := func() Issued {
		t.Helper()
		iss, err := h.is.ApplyWithin(ctx, "cust", "app", lim)
		if err != nil {
			t.Fatalf("ApplyWithin() = %v", err)
		}
		_, err = h.is.ApplyWithin(ctx, "cust", "app", lim)
		wantQuota(t, err, "total")
		return iss
	}
	wantCount := func(want int) {
		t.Helper()
		total, c, u := h.count("app", "cust")
		if total != want || c != want || u != want {
			t.Fatalf("outstanding = %d total, %d client, %d customer; want %d", total, c, u, want)
		}
	}

	// Expiry.
	iss := apply()
	wantCount(1)
	h.clock.Advance(11 * time.Minute)
	h.is.Reap(ctx)
	h.wantState(t, iss.UniqueID, store.Expired)
	wantCount(0)

	// A failed decrypt consumes the key all the same.
	iss = apply()
	if _, err := h.is.Decrypt(ctx, iss.UniqueID, seal(t, iss.PublicKey, "pw", "wrong-salt00")); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("Decrypt() = %v, want ErrDecrypt", err)
	}
	wantCount(0)

	// A token fault before the decrypt gives the key back: still outstanding.
	iss = apply()
	h.tok.set(func(f *fakeToken) { f.failDecrypt = hsm.ErrUnavailable })
	if _, err := h.is.Decrypt(ctx, iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Decrypt() = %v, want ErrUnavailable", err)
	}
	h.tok.set(func(f *fakeToken) { f.failDecrypt = nil })
	wantCount(1)

	// Lost with its session.
	h.is.KeysLost([]string{iss.UniqueID})
	h.is.accountLost(ctx)
	h.wantState(t, iss.UniqueID, store.Lost)
	wantCount(0)

	// An apply that finds no key gives its reservation back.
	h.tok.set(func(f *fakeToken) { f.failGenerate = true })
	h.is.drain(ctx)
	if _, err := h.is.ApplyWithin(ctx, "cust", "app", lim); !errors.Is(err, ErrPoolEmpty) {
		t.Fatalf("ApplyWithin() on an empty pool = %v, want ErrPoolEmpty", err)
	}
	wantCount(0)
}

// TestApplyWithinConcurrent floods ApplyWithin: the cap is never passed,
// and every apply either gets a key or a quota error.
func TestApplyWithinConcurrent(t *testing.T) {
	const capacity, workers, perWorker = 5, 8, 10
	h := newHarness(t, func(c *Config) { c.PoolSize = 8; c.ApplyWait = time.Minute })
	h.start(t)
	var (
		mu     sync.Mutex
		issued int
		wg     sync.WaitGroup
	)
	for range workers {
		wg.Go(func() {
			for range perWorker {
				_, err := h.is.ApplyWithin(context.Background(), "cust", "app", Limits{Total: capacity})
				switch {
				case err == nil:
					mu.Lock()
					issued++
					mu.Unlock()
				case !errors.Is(err, ErrQuota):
					t.Errorf("ApplyWithin() = %v, want a key or ErrQuota", err)
				}
				if s := h.is.Stats(); s.Outstanding > capacity {
					t.Errorf("%d keys outstanding, cap %d", s.Outstanding, capacity)
				}
			}
		})
	}
	wg.Wait()
	if issued != capacity {
		t.Errorf("%d keys issued, want exactly the cap %d (none was used)", issued, capacity)
	}
	if total, _, _ := h.count("app", "cust"); total != capacity {
		t.Errorf("tally = %d, want %d", total, capacity)
	}
}

func TestReconcileCountsAdopted(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, func(c *Config) { c.Storage = hsm.StorageToken })
	r := createRecord(t, h, "adopt", store.Issued)
	h.tok.plant("adopt", true, true)
	if err := h.is.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if total, c, u := h.count(r.ClientID, r.CustomerID); total != 1 || c != 0 || u != 0 {
		t.Errorf("after Reconcile: %d total, %d client, %d customer; want 1, 0, 0 (no ids)", total, c, u)
	}
	h.start(t)
	if _, err := h.is.ApplyWithin(ctx, "", "", Limits{Total: 1}); !errors.Is(err, ErrQuota) {
		t.Errorf("ApplyWithin() = %v, want ErrQuota: the adopted key counts", err)
	}
}
