// Package store keeps keyissuer's records: one per issued key, with its salt,
// state and expiry, in a bbolt file. Every write is an fsync'd transaction
// (concurrent writes share one commit), and every state change is a
// compare-and-swap, so two requests can never both move a record out of
// [Issued].
//
// Two indexes keep background work proportional to what is due: "active"
// orders the records whose key may still exist (issued, consuming) by expiry,
// and "closed" orders finished records by the time they finished, for
// pruning.
package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
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

// StateError is returned by [Bolt.Transition] when the record is not in the
// expected state. Current is the record as it is.
type StateError struct {
	Current Record
	Want    State
}

func (e *StateError) Error() string {
	return fmt.Sprintf("record %s is %s, not %s", e.Current.UniqueID, e.Current.State, e.Want)
}

var (
	bucketRecords = []byte("records")
	bucketActive  = []byte("active")
	bucketClosed  = []byte("closed")
)

// Options tune a [Bolt] store.
type Options struct {
	// CommitDelay is how long a write waits for others to share its
	// commit. Default 0: none, as the writes that arrive while a commit is
	// under way share the next one anyway (see writer).
	CommitDelay time.Duration
}

// Bolt is the bbolt-backed store. It is safe for concurrent use; one process
// at a time may open a file.
type Bolt struct {
	db *bolt.DB
	w  *writer // the one writer: group commits
}

// Open opens or creates the store at path, creating its directory (0700).
// It fails at once if another process holds the file.
func Open(path string, opts Options) (*Bolt, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("failed to create store directory: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:        time.Second,
		NoFreelistSync: true,
		FreelistType:   bolt.FreelistMapType,
	})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("store %s is in use by another process", path)
	}
	if err != nil {
		return nil, fmt.Errorf("failed to open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketRecords, bucketActive, bucketClosed} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("failed to initialise store %s: %w", path, err)
	}
	return &Bolt{db: db, w: startWriter(db, opts.CommitDelay)}, nil
}

// Close commits the writes queued, settled changes included, and closes
// the file.
func (b *Bolt) Close() error {
	b.w.stop()
	return b.db.Close()
}

// timeKey orders index entries by time, then uniqueId.
func timeKey(t time.Time, id string) []byte {
	k := make([]byte, 8, 8+len(id))
	binary.BigEndian.PutUint64(k, uint64(t.UnixNano()))
	return append(k, id...)
}

func get(tx *bolt.Tx, id string) (Record, error) {
	v := tx.Bucket(bucketRecords).Get([]byte(id))
	if v == nil {
		return Record{}, ErrNotFound
	}
	var r Record
	if err := json.Unmarshal(v, &r); err != nil {
		return Record{}, fmt.Errorf("record %s is corrupt: %w", id, err)
	}
	return r, nil
}

func put(tx *bolt.Tx, r Record) error {
	v, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketRecords).Put([]byte(r.UniqueID), v)
}

// index puts r in the index its state belongs to.
func index(tx *bolt.Tx, r Record) error {
	if r.State.Active() {
		return tx.Bucket(bucketActive).Put(timeKey(r.ExpiresAt, r.UniqueID), nil)
	}
	return tx.Bucket(bucketClosed).Put(timeKey(r.ClosedAt, r.UniqueID), nil)
}

func unindex(tx *bolt.Tx, r Record) error {
	if r.State.Active() {
		return tx.Bucket(bucketActive).Delete(timeKey(r.ExpiresAt, r.UniqueID))
	}
	return tx.Bucket(bucketClosed).Delete(timeKey(r.ClosedAt, r.UniqueID))
}

// batch runs fn in a group commit of the writer. fn may run more than once
// (a batch is retried without a failed member), so it must set its results
// afresh; a business outcome is reported through the closure, not as fn's
// error, so it does not cost the batch a retry.
func (b *Bolt) batch(ctx context.Context, fn func(*bolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.w.do(fn)
}

// Create stores a new record, durably. It fails with ErrExists if the
// uniqueId is taken.
func (b *Bolt) Create(ctx context.Context, r Record) error {
	var exists bool
	err := b.batch(ctx, func(tx *bolt.Tx) error {
		exists = tx.Bucket(bucketRecords).Get([]byte(r.UniqueID)) != nil
		if exists {
			return nil
		}
		if err := put(tx, r); err != nil {
			return err
		}
		return index(tx, r)
	})
	if err != nil {
		return fmt.Errorf("failed to create record %s: %w", r.UniqueID, err)
	}
	if exists {
		return fmt.Errorf("record %s: %w", r.UniqueID, ErrExists)
	}
	return nil
}

// Import stores many new records in one durable transaction: a bulk load,
// such as a migration or the benchmark's store of a million records. It is
// all or nothing and fails with ErrExists if a uniqueId is taken. Records
// sorted by uniqueId, and by the time of their index, load fastest.
func (b *Bolt) Import(ctx context.Context, recs []Record) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	err := b.db.Update(func(tx *bolt.Tx) error {
		for _, r := range recs {
			if tx.Bucket(bucketRecords).Get([]byte(r.UniqueID)) != nil {
				return fmt.Errorf("record %s: %w", r.UniqueID, ErrExists)
			}
			if err := put(tx, r); err != nil {
				return err
			}
			if err := index(tx, r); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("failed to import %d records: %w", len(recs), err)
	}
	return nil
}

// Get returns the record for id, or ErrNotFound. It sees settled changes
// that are not committed yet.
func (b *Bolt) Get(ctx context.Context, id string) (Record, error) {
	s, settling := b.w.pending(id) // before the read: see Settle
	var r Record
	err := b.db.View(func(tx *bolt.Tx) error {
		var err error
		r, err = get(tx, id)
		return err
	})
	if err == nil && settling {
		r = s.applyTo(r)
	}
	return r, err
}

// Transition moves record id from state from to state to, durably, if and
// only if it is in state from: a compare-and-swap. Leaving the active states
// sets ClosedAt to at. It returns the new record, ErrNotFound, or a
// *StateError holding the record as it is.
func (b *Bolt) Transition(ctx context.Context, id string, from, to State, at time.Time) (Record, error) {
	var (
		r        Record
		conflict bool
		notFound bool
	)
	err := b.batch(ctx, func(tx *bolt.Tx) error {
		var err error
		r, conflict, notFound, err = move(tx, id, from, to, at)
		return err
	})
	switch {
	case err != nil:
		return Record{}, fmt.Errorf("failed to move record %s from %s to %s: %w", id, from, to, err)
	case notFound:
		return Record{}, fmt.Errorf("record %s: %w", id, ErrNotFound)
	case conflict:
		return r, &StateError{Current: r, Want: from}
	}
	return r, nil
}

// move is the compare-and-swap of Transition and Settle, inside tx.
func move(tx *bolt.Tx, id string, from, to State, at time.Time) (r Record, conflict, notFound bool, err error) {
	r, err = get(tx, id)
	if errors.Is(err, ErrNotFound) {
		return r, false, true, nil
	}
	if err != nil {
		return r, false, false, err
	}
	if r.State != from {
		return r, true, false, nil
	}
	if err := unindex(tx, r); err != nil {
		return r, false, false, err
	}
	r.State = to
	if !to.Active() {
		r.ClosedAt = at.UTC()
	}
	if err := put(tx, r); err != nil {
		return r, false, false, err
	}
	return r, false, false, index(tx, r)
}

// Settle is Transition for a record's last move, the one nothing waits on:
// it queues the compare-and-swap and returns at once. The change is
// committed with the next durable write, or within a few milliseconds;
// Get sees it at once. A crash before that commit loses it, and the record
// stays in state from: use Settle only where that is safe, as for a
// decrypt's consuming → consumed, which start-up reconciliation finishes.
// If the record is not in state from when the change is committed, nothing
// changes.
func (b *Bolt) Settle(id string, from, to State, at time.Time) {
	b.w.settle(id, settled{from: from, to: to, at: at}, func(tx *bolt.Tx) error {
		_, _, _, err := move(tx, id, from, to, at)
		return err
	})
}

// Active returns up to limit records (all if limit <= 0) in an active state
// whose expiry is before the given time, earliest first.
func (b *Bolt) Active(ctx context.Context, before time.Time, limit int) ([]Record, error) {
	var out []Record
	end := timeKey(before, "")
	err := b.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketActive).Cursor()
		for k, _ := c.First(); k != nil && bytes.Compare(k, end) < 0; k, _ = c.Next() {
			if limit > 0 && len(out) >= limit {
				break
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			r, err := get(tx, string(k[8:]))
			if err != nil {
				return err
			}
			out = append(out, r)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("failed to scan active records: %w", err)
	}
	return out, nil
}

// Prune deletes up to limit (all if limit <= 0) finished records that
// closed before the given time, and returns how many it deleted.
func (b *Bolt) Prune(ctx context.Context, before time.Time, limit int) (int, error) {
	var n int
	end := timeKey(before, "")
	err := b.db.Update(func(tx *bolt.Tx) error {
		n = 0
		idx := tx.Bucket(bucketClosed)
		recs := tx.Bucket(bucketRecords)
		c := idx.Cursor()
		for k, _ := c.First(); k != nil && bytes.Compare(k, end) < 0 && (limit <= 0 || n < limit); k, _ = c.First() {
			if err := recs.Delete(k[8:]); err != nil {
				return err
			}
			if err := c.Delete(); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("failed to prune records: %w", err)
	}
	return n, nil
}
