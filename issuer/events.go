package issuer

import (
	"context"
	"time"
)

// EventKind says what an [Event] reports.
type EventKind int

const (
	// EventGenerated: a key generation finished, in Duration; Err if it
	// failed.
	EventGenerated EventKind = iota + 1
	// EventIssued: Apply recorded a key for CustomerID and ClientID.
	EventIssued
	// EventDecrypt: a decrypt of UniqueID finished; Err is its outcome
	// (nil for success, else one of the package's sentinel errors).
	// ErrAbandoned is its own outcome: the caller gave up before the
	// token decrypted, and the key is consumed unused.
	EventDecrypt
	// EventExpired: the record of UniqueID moved to expired.
	EventExpired
	// EventLost: the record of UniqueID moved to lost.
	EventLost
	// EventDestroyed: the token destroyed the objects of UniqueID, for
	// Reason.
	EventDestroyed
	// EventDestroyFailed: destroying UniqueID failed with Err; the reaper
	// retries it.
	EventDestroyFailed
	// EventReaped: a reaper pass finished, in Duration.
	EventReaped
	// EventReconciled: start-up reconciliation finished; see Reconciled.
	EventReconciled
	// EventDrained: at shutdown, Count pooled keys were destroyed.
	EventDrained
)

// Reasons a key's objects are destroyed.
const (
	ReasonConsumed   = "consumed"   // its one decrypt was attempted
	ReasonExpired    = "expired"    // its time to live ran out
	ReasonLost       = "lost"       // its record was marked lost
	ReasonReconciled = "reconciled" // found at start-up without a live record
	ReasonUnissued   = "unissued"   // taken from the pool by an apply that failed
)

// Event is one step in the life of keys or of the issuer, reported through
// [Config.OnEvent] for metrics and the audit trail. It holds no secret: no
// salt, plaintext or key material.
type Event struct {
	Kind       EventKind
	UniqueID   string
	CustomerID string // EventIssued
	ClientID   string // EventIssued
	Reason     string // EventDestroyed
	Err        error
	Duration   time.Duration
	Count      int             // EventDrained
	Reconciled ReconcileCounts // EventReconciled
}

// ReconcileCounts is what start-up reconciliation did.
type ReconcileCounts struct {
	Adopted   int // issued keys found in the token and kept (token storage)
	Lost      int // issued records whose key is gone
	Consumed  int // decrypts a crash interrupted, closed as consumed
	Destroyed int // objects without a live record, destroyed
}

// emit reports e to Config.OnEvent. ctx is the request's, for a hook that
// wants to know who asked (the remote address, the socket peer); it is
// never held after the call.
func (is *Issuer) emit(ctx context.Context, e Event) {
	if is.cfg.OnEvent != nil {
		is.cfg.OnEvent(ctx, e)
	}
}
