// Package bolt is the bbolt-backed record store, for one host. Every write
// is an fsync'd transaction (concurrent writes share one commit), and every
// state change is a compare-and-swap.
//
// Two indexes keep background work proportional to what is due: "active"
// orders the records whose key may still exist (issued, consuming) by expiry,
// and "closed" orders finished records by the time they finished, for
// pruning.
package bolt

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

	bbolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/keyissuer/keyissuer/issuer/store"
)

var (
	bucketRecords = []byte("records")
	bucketActive  = []byte("active")
	bucketClosed  = []byte("closed")
)

// Options tune a [Store] store.
type Options struct {
	// CommitDelay is how long a write waits for others to share its
	// commit. Default 0: none, as the writes that arrive while a commit is
	// under way share the next one anyway (see writer).
	CommitDelay time.Duration
}

// Store is the bbolt-backed store. It is safe for concurrent use; one process
// at a time may open a file.
type Store struct {
	db *bbolt.DB
	w  *writer // the one writer: group commits
}

// Open opens or creates the store at path, creating its directory (0700).
// It fails at once if another process holds the file.
func Open(path string, opts Options) (*Store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("failed to create store directory: %w", err)
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{
		Timeout:        time.Second,
		NoFreelistSync: true,
		FreelistType:   bbolt.FreelistMapType,
	})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("store %s is in use by another process", path)
	}
	if err != nil {
		return nil, fmt.Errorf("failed to open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bbolt.Tx) error {
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
	return &Store{db: db, w: startWriter(db, opts.CommitDelay)}, nil
}

// Close commits the writes queued, settled changes included, and closes
// the file.
func (b *Store) Close() error {
	b.w.stop()
	return b.db.Close()
}

// timeKey orders index entries by time, then uniqueId.
func timeKey(t time.Time, id string) []byte {
	k := make([]byte, 8, 8+len(id))
	binary.BigEndian.PutUint64(k, uint64(t.UnixNano()))
	return append(k, id...)
}

func get(tx *bbolt.Tx, id string) (store.Record, error) {
	v := tx.Bucket(bucketRecords).Get([]byte(id))
	if v == nil {
		return store.Record{}, store.ErrNotFound
	}
	var r store.Record
	if err := json.Unmarshal(v, &r); err != nil {
		return store.Record{}, fmt.Errorf("record %s is corrupt: %w", id, err)
	}
	return r, nil
}

func put(tx *bbolt.Tx, r store.Record) error {
	v, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketRecords).Put([]byte(r.UniqueID), v)
}

// index puts r in the index its state belongs to.
func index(tx *bbolt.Tx, r store.Record) error {
	if r.State.Active() {
		return tx.Bucket(bucketActive).Put(timeKey(r.ExpiresAt, r.UniqueID), nil)
	}
	return tx.Bucket(bucketClosed).Put(timeKey(r.ClosedAt, r.UniqueID), nil)
}

func unindex(tx *bbolt.Tx, r store.Record) error {
	if r.State.Active() {
		return tx.Bucket(bucketActive).Delete(timeKey(r.ExpiresAt, r.UniqueID))
	}
	return tx.Bucket(bucketClosed).Delete(timeKey(r.ClosedAt, r.UniqueID))
}

// batch runs fn in a group commit of the writer. fn may run more than once
// (a batch is retried without a failed member), so it must set its results
// afresh; a business outcome is reported through the closure, not as fn's
// error, so it does not cost the batch a retry.
func (b *Store) batch(ctx context.Context, fn func(*bbolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return b.w.do(fn)
}

// Create stores a new record, durably. It fails with store.ErrExists if the
// uniqueId is taken.
func (b *Store) Create(ctx context.Context, r store.Record) error {
	var exists bool
	err := b.batch(ctx, func(tx *bbolt.Tx) error {
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
		return fmt.Errorf("record %s: %w", r.UniqueID, store.ErrExists)
	}
	return nil
}

// Import stores many new records in one durable transaction: a bulk load,
// such as a migration or the benchmark's store of a million records. It is
// all or nothing and fails with store.ErrExists if a uniqueId is taken. Records
// sorted by uniqueId, and by the time of their index, load fastest.
func (b *Store) Import(ctx context.Context, recs []store.Record) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	err := b.db.Update(func(tx *bbolt.Tx) error {
		for _, r := range recs {
			if tx.Bucket(bucketRecords).Get([]byte(r.UniqueID)) != nil {
				return fmt.Errorf("record %s: %w", r.UniqueID, store.ErrExists)
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

// Get returns the record for id, or store.ErrNotFound. It sees settled changes
// that are not committed yet.
func (b *Store) Get(ctx context.Context, id string) (store.Record, error) {
	s, settling := b.w.pending(id) // before the read: see Settle
	var r store.Record
	err := b.db.View(func(tx *bbolt.Tx) error {
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
// sets ClosedAt to at. It returns the new record, store.ErrNotFound, or a
// *store.StateError holding the record as it is.
func (b *Store) Transition(ctx context.Context, id string, from, to store.State, at time.Time) (store.Record, error) {
	var (
		r        store.Record
		conflict bool
		notFound bool
	)
	err := b.batch(ctx, func(tx *bbolt.Tx) error {
		var err error
		r, conflict, notFound, err = move(tx, id, from, to, at)
		return err
	})
	switch {
	case err != nil:
		return store.Record{}, fmt.Errorf("failed to move record %s from %s to %s: %w", id, from, to, err)
	case notFound:
		return store.Record{}, fmt.Errorf("record %s: %w", id, store.ErrNotFound)
	case conflict:
		return r, &store.StateError{Current: r, Want: from}
	}
	return r, nil
}

// move is the compare-and-swap of Transition and Settle, inside tx.
func move(tx *bbolt.Tx, id string, from, to store.State, at time.Time) (r store.Record, conflict, notFound bool, err error) {
	r, err = get(tx, id)
	if errors.Is(err, store.ErrNotFound) {
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
func (b *Store) Settle(id string, from, to store.State, at time.Time) {
	b.w.settle(id, settled{from: from, to: to, at: at}, func(tx *bbolt.Tx) error {
		_, _, _, err := move(tx, id, from, to, at)
		return err
	})
}

// Active returns up to limit records (all if limit <= 0) in an active state
// whose expiry is before the given time, earliest first. Like Get it sees
// settled changes that are not committed yet: a record a settle takes out
// of the active states is not listed.
func (b *Store) Active(ctx context.Context, before time.Time, limit int) ([]store.Record, error) {
	var out []store.Record
	end := timeKey(before, "")
	settling := b.w.pendingAll() // before the read: see Get
	err := b.db.View(func(tx *bbolt.Tx) error {
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
			if s, ok := settling[r.UniqueID]; ok {
				if r = s.applyTo(r); !r.State.Active() {
					continue
				}
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
func (b *Store) Prune(ctx context.Context, before time.Time, limit int) (int, error) {
	var n int
	end := timeKey(before, "")
	err := b.batch(ctx, func(tx *bbolt.Tx) error { // after the queued settles: see Settle
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
