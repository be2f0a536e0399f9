package issuer

import (
	"context"
	"errors"
	"fmt"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// Outstanding-key quotas.
//
// A key is outstanding from the moment an apply reserves it until its
// decrypt claims it, or it expires or is lost: it is a key pair in the token
// that somebody holds a public key for. The issuer counts outstanding keys
// in memory, overall, per client and per customer, next to the map of
// issued keys (Issuer.keys) and under the same lock, so a flood of
// concurrent applies can never take a count past its cap: the check and the
// reservation are one step. Reconcile rebuilds the counts from the adopted
// keys; in session storage none survive a restart.

// Limits caps the keys outstanding at once. Zero means no cap.
type Limits struct {
	Total    int // all keys
	Client   int // keys of one clientID (not applied to an empty clientID)
	Customer int // keys of one customerID (not applied to an empty customerID)
}

// ErrQuota means an apply would take the outstanding keys past a cap; the
// error is a *[QuotaError]. It is retryable once keys are used or expire.
var ErrQuota = errors.New("outstanding-key quota reached")

// QuotaError says which cap an apply hit.
type QuotaError struct {
	Scope string // "total", "client" or "customer"
	Limit int
}

func (e *QuotaError) Error() string {
	return fmt.Sprintf("%s: %d keys outstanding for the %s", ErrQuota, e.Limit, e.Scope)
}

// Unwrap makes errors.Is(err, ErrQuota) true.
func (e *QuotaError) Unwrap() error { return ErrQuota }

// holder is whom an outstanding key was issued to.
type holder struct{ client, customer string }

func holderOf(r store.Record) holder { return holder{client: r.ClientID, customer: r.CustomerID} }

// tally counts outstanding keys. Guarded by Issuer.mu.
type tally struct {
	total      int
	byClient   map[string]int
	byCustomer map[string]int
	holders    map[string]holder // of the keys in Issuer.keys
}

func (t *tally) add(h holder, n int) {
	t.init()
	t.total += n
	for _, c := range []struct {
		m   map[string]int
		key string
	}{{t.byClient, h.client}, {t.byCustomer, h.customer}} {
		if c.key == "" {
			continue
		}
		if c.m[c.key] += n; c.m[c.key] <= 0 {
			delete(c.m, c.key)
		}
	}
}

func (t *tally) init() {
	if t.holders == nil {
		t.byClient, t.byCustomer, t.holders = map[string]int{}, map[string]int{}, map[string]holder{}
	}
}

// reserveLocked counts one more key for h, unless that would pass a cap.
// Call with is.mu held; undo with unreserveLocked, or hand the reservation
// to a key with trackLocked.
func (is *Issuer) reserveLocked(h holder, lim Limits) error {
	t := &is.tally
	switch {
	case lim.Total > 0 && t.total >= lim.Total:
		return &QuotaError{Scope: "total", Limit: lim.Total}
	case lim.Client > 0 && h.client != "" && t.byClient[h.client] >= lim.Client:
		return &QuotaError{Scope: "client", Limit: lim.Client}
	case lim.Customer > 0 && h.customer != "" && t.byCustomer[h.customer] >= lim.Customer:
		return &QuotaError{Scope: "customer", Limit: lim.Customer}
	}
	t.add(h, 1)
	return nil
}

func (is *Issuer) unreserveLocked(h holder) { is.tally.add(h, -1) }

// trackLocked records k as issued to h, taking over a reservation made for
// h with reserveLocked; with reserved false it counts the key itself (an
// adopted or given-back key). Call with is.mu held.
func (is *Issuer) trackLocked(k *hsm.Key, h holder, reserved bool) {
	is.tally.init()
	if !reserved {
		is.tally.add(h, 1)
	}
	is.keys[k.ID] = k
	is.tally.holders[k.ID] = h
}

// untrackLocked forgets the issued key id, if tracked, and uncounts it. It
// returns the key, or nil. Call with is.mu held.
func (is *Issuer) untrackLocked(id string) *hsm.Key {
	k, ok := is.keys[id]
	if !ok {
		return nil
	}
	delete(is.keys, id)
	if h, ok := is.tally.holders[id]; ok {
		delete(is.tally.holders, id)
		is.tally.add(h, -1)
	}
	return k
}

// ApplyWithin is [Issuer.Apply] under outstanding-key caps: it fails with a
// *[QuotaError] (errors.Is ErrQuota) at once, without waiting for the pool,
// when issuing one more key would pass a cap of lim. The reservation holds
// while the apply waits for a key, so concurrent applies never overshoot.
func (is *Issuer) ApplyWithin(ctx context.Context, customerID, clientID string, lim Limits) (Issued, error) {
	h := holder{client: clientID, customer: customerID}
	local := lim
	if is.cfg.Cluster != nil {
		local = Limits{} // the store counts the whole cluster's keys
	}
	is.mu.Lock()
	err := is.reserveLocked(h, local)
	is.mu.Unlock()
	if err != nil {
		return Issued{}, err
	}
	return is.apply(ctx, h, lim)
}
