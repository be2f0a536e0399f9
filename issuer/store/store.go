// Package store defines keyissuer's records: one per issued key, with its
// salt, state and expiry. The backends live in their own packages and keep
// one contract, which [storetest.Run] checks: bolt (a bbolt file, one host)
// and postgres (PostgreSQL, shared by a cluster). Every state change is a
// compare-and-swap, so two requests can never both move a record out of
// [Issued].
package store

import (
	"errors"
	"fmt"
	"time"
)

// State is where a record is in its life.
type State string

const (
	// Issued: handed to a merchant; the key waits for its one decrypt.
	Issued State = "issued"
	// Consuming: a decrypt claimed the key. It can never decrypt again,
	// whatever happens next; the record becomes Consumed.
	Consuming State = "consuming"
	// Consumed: the one decrypt was attempted and the key destroyed.
	Consumed State = "consumed"
	// Expired: the key outlived its time to live and was destroyed unused.
	Expired State = "expired"
	// Lost: the key's objects vanished from the token (a session died, the
	// daemon restarted in session storage, or the object was removed).
	Lost State = "lost"
)

// Active reports whether a record in state s may still have a key in the
// token.
func (s State) Active() bool { return s == Issued || s == Consuming }

// Record is what keyissuer knows of one issued key. It holds no key material.
type Record struct {
	UniqueID   string    `json:"uniqueId"`
	Salt       string    `json:"salt"`
	CustomerID string    `json:"customerId,omitempty"`
	ClientID   string    `json:"clientId,omitempty"`
	State      State     `json:"state"`
	IssuedAt   time.Time `json:"issuedAt"`
	ExpiresAt  time.Time `json:"expiresAt"`
	// ClosedAt is when the record left the active states: the time of the
	// decrypt for Consumed, of the reaping for Expired, of the discovery for
	// Lost.
	ClosedAt time.Time `json:"closedAt,omitzero"`
}

var (
	// ErrNotFound: no record has that uniqueId.
	ErrNotFound = errors.New("record not found")
	// ErrExists: a record with that uniqueId already exists.
	ErrExists = errors.New("record already exists")
)

// StateError is returned by a store's Transition when the record is not in the
// expected state. Current is the record as it is.
type StateError struct {
	Current Record
	Want    State
}

func (e *StateError) Error() string {
	return fmt.Sprintf("record %s is %s, not %s", e.Current.UniqueID, e.Current.State, e.Want)
}

// ErrUnavailable: the store cannot be reached (a database server down or
// failing over). Nothing was changed, or the change is unknown and the
// caller must treat the record as it would a crash's; retry later.
var ErrUnavailable = errors.New("record store unavailable")

// Caps are outstanding-key caps a store enforces itself, across every
// instance that shares it. Zero means no cap.
type Caps struct {
	Total, Client, Customer int
}

// CapError says which cap refused a record.
type CapError struct {
	Scope string // "total", "client" or "customer"
	Limit int
}

func (e *CapError) Error() string {
	return fmt.Sprintf("%d keys outstanding for the %s", e.Limit, e.Scope)
}

// ErrTakenOver means a neighbour in a cluster took over an instance's
// pooled key (the instance's lease ran out): the key is the neighbour's to
// destroy.
var ErrTakenOver = errors.New("pooled key taken over by another instance")
