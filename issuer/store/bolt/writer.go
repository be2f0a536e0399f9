package bolt

import (
	"errors"
	"maps"
	"sync"
	"time"

	bbolt "go.etcd.io/bbolt"

	"github.com/keyissuer/keyissuer/issuer/store"
)

// errClosed is returned by writes to a closed store.
var errClosed = errors.New("store closed")

const (
	// maxBatch bounds the writes of one commit.
	maxBatch = 1024
	// settleDelay is how long a settled change (see [Store.Settle]) may
	// wait to share a commit with a durable write before it is committed
	// on its own.
	settleDelay = 20 * time.Millisecond
)

// writer is the store's one writer. Writes are queued to it and it commits
// them in groups: a write that arrives while the writer is idle is
// committed at once, and the writes that arrive while a commit is under way
// (its two fsyncs) share the next one. So a lone request pays for one
// commit and no wait, and concurrent requests share their fsyncs, where
// bbolt's own Batch makes every write wait out a fixed delay first.
//
// Settled changes, which nobody waits for, are held until a durable write
// comes to share its commit, or for settleDelay at most.
type writer struct {
	db    *bbolt.DB
	delay time.Duration // extra wait for company before a commit (0: none)
	in    chan *write   // unbuffered: a sender waits until the writer takes it
	kick  chan struct{} // a settle was queued
	quit  chan struct{}
	done  chan struct{}

	mu       sync.Mutex
	closed   bool
	settles  []*write           // queued settles, in order
	settling map[string]settled // uncommitted settled changes, by uniqueId
	seq      uint64
}

// write is one queued write. fn may run more than once (a batch is retried
// without a failed member), so it must set its results afresh.
type write struct {
	fn  func(*bbolt.Tx) error
	res chan error // nil for a settle
	id  string     // a settle's uniqueId
	seq uint64     // a settle's sequence number
}

// settled is a change made by Settle and not committed yet.
type settled struct {
	from, to store.State
	at       time.Time
	seq      uint64
}

// applyTo returns r as it is once the change is committed.
func (s settled) applyTo(r store.Record) store.Record {
	if r.State != s.from {
		return r
	}
	r.State = s.to
	if !s.to.Active() {
		r.ClosedAt = s.at.UTC()
	}
	return r
}

func startWriter(db *bbolt.DB, delay time.Duration) *writer {
	w := &writer{
		db:       db,
		delay:    delay,
		in:       make(chan *write),
		kick:     make(chan struct{}, 1),
		quit:     make(chan struct{}),
		done:     make(chan struct{}),
		settling: map[string]settled{},
	}
	go w.run()
	return w
}

// do commits fn durably and returns its error.
func (w *writer) do(fn func(*bbolt.Tx) error) error {
	wr := &write{fn: fn, res: make(chan error, 1)}
	select {
	case w.in <- wr:
	case <-w.done:
		return errClosed
	}
	return <-wr.res
}

// settle queues fn, the change s of record id, without waiting for it.
func (w *writer) settle(id string, s settled, fn func(*bbolt.Tx) error) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return // as after a crash: the record stays in s.from
	}
	w.seq++
	s.seq = w.seq
	w.settling[id] = s
	w.settles = append(w.settles, &write{fn: fn, id: id, seq: s.seq})
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// pending returns the uncommitted settled change of id, if any.
func (w *writer) pending(id string) (settled, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s, ok := w.settling[id]
	return s, ok
}

// pendingAll returns a copy of every uncommitted settled change, by id.
func (w *writer) pendingAll() map[string]settled {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.settling)
}

// stop commits what is queued and stops the writer. Later writes fail with
// errClosed; later settles are dropped.
func (w *writer) stop() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		<-w.done
		return
	}
	w.closed = true
	w.mu.Unlock()
	close(w.quit)
	<-w.done
}

func (w *writer) run() {
	defer close(w.done)
	var (
		timer *time.Timer
		held  <-chan time.Time // settles are waiting for company
	)
	release := func() {
		if timer != nil {
			timer.Stop()
		}
		timer, held = nil, nil
	}
	for {
		var batch []*write
		select {
		case wr := <-w.in:
			batch = w.gather(append(batch, wr))
		case <-w.kick:
			if held == nil {
				timer = time.NewTimer(settleDelay)
				held = timer.C
			}
			continue
		case <-held:
		case <-w.quit:
			release()
			// Senders waiting now are served; later ones see done.
			for more := true; more; {
				select {
				case wr := <-w.in:
					batch = append(batch, wr)
				default:
					more = false
				}
			}
			w.commit(append(w.takeSettles(), batch...))
			return
		}
		release()
		// Settles queued before a write was sent go in before it.
		w.commit(append(w.takeSettles(), batch...))
	}
}

// gather adds to batch the writes waiting to be taken and, with a commit
// delay, those that arrive within it.
func (w *writer) gather(batch []*write) []*write {
	var deadline <-chan time.Time
	if w.delay > 0 {
		t := time.NewTimer(w.delay)
		defer t.Stop()
		deadline = t.C
	}
	for len(batch) < maxBatch {
		select {
		case wr := <-w.in:
			batch = append(batch, wr)
			continue
		default:
		}
		if deadline == nil {
			break
		}
		select {
		case wr := <-w.in:
			batch = append(batch, wr)
		case <-deadline:
			deadline = nil
		}
	}
	return batch
}

func (w *writer) takeSettles() []*write {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.settles
	w.settles = nil
	return s
}

// commit runs ws in one transaction. When one fails, it gets its error and
// the others are committed without it, as bbolt's Batch does.
func (w *writer) commit(ws []*write) {
	for len(ws) > 0 {
		failed := -1
		err := w.db.Update(func(tx *bbolt.Tx) error {
			for i, wr := range ws {
				if err := wr.fn(tx); err != nil {
					failed = i
					return err
				}
			}
			return nil
		})
		if failed < 0 {
			for _, wr := range ws {
				w.finish(wr, err)
			}
			return
		}
		w.finish(ws[failed], err)
		ws = append(ws[:failed:failed], ws[failed+1:]...)
	}
}

func (w *writer) finish(wr *write, err error) {
	if wr.res != nil {
		wr.res <- err
		return
	}
	// A settle is visible in the file now, or failed and is dropped (the
	// record stays in its from state, as after a crash).
	w.mu.Lock()
	if s, ok := w.settling[wr.id]; ok && s.seq == wr.seq {
		delete(w.settling, wr.id)
	}
	w.mu.Unlock()
}
