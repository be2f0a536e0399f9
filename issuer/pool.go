package issuer

import (
	"context"
	"errors"
	"runtime"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// pool holds pre-generated key pairs, because a key costs 100–200 ms of
// token time and Apply must not wait for one. The number of keys in the
// pool and being generated never exceeds its size: a generator takes a slot
// before it generates, and Apply gives the slot back.
type pool struct {
	ready chan *hsm.Key
	slots chan struct{}
}

func newPool(size int) *pool {
	p := &pool{ready: make(chan *hsm.Key, size), slots: make(chan struct{}, size)}
	for range size {
		p.slots <- struct{}{}
	}
	return p
}

// generate keeps the pool full until ctx is done.
//
// Refilling is background work, and on a software token such as SoftHSM it
// burns the CPU that requests need (a key is 100–200 ms of it): so each
// generator keeps an OS thread of its own, which the token's calls run on,
// at a lower scheduling priority. Requests then go first, and the pool
// fills with the CPU they leave; an idle machine fills it as fast as
// before. The thread ends with the goroutine, never unlocked, so no other
// goroutine inherits its priority.
func (is *Issuer) generate(ctx context.Context) {
	runtime.LockOSThread()
	lowerThreadPriority()
	var backoff time.Duration
	for {
		select {
		case <-is.pool.slots:
		case <-ctx.Done():
			return
		}
		id, err := newID(uniqueIDLen)
		if err == nil && is.cfg.Cluster != nil {
			// Recorded before it exists: see Cluster.
			err = is.cfg.Cluster.Generating(ctx, id)
		}
		var k *hsm.Key
		if err == nil {
			start := time.Now()
			k, err = is.cfg.Token.Generate(ctx, id)
			is.stats.generated(time.Since(start), err)
			is.emit(ctx, Event{Kind: EventGenerated, Duration: time.Since(start), Err: err})
			if err == nil && is.cfg.Cluster != nil {
				if perr := is.cfg.Cluster.Pooled(ctx, id); perr != nil {
					// Not a key to hand out. Taken over meanwhile: the
					// neighbour destroys it. Else (the store is down, or
					// the daemon stopping) it is destroyed here; should
					// that fail, its pool entry still owns it.
					err = perr
					if !errors.Is(perr, store.ErrTakenOver) {
						bg := context.WithoutCancel(ctx)
						if is.cfg.Token.Destroy(bg, k) == nil {
							is.cfg.Cluster.Forget(bg, id)
						}
					}
				}
			} else if err != nil && is.cfg.Cluster != nil && !errors.Is(err, hsm.ErrUnavailable) {
				is.cfg.Cluster.Forget(context.WithoutCancel(ctx), id)
			}
		}
		if err != nil {
			is.pool.slots <- struct{}{}
			if ctx.Err() != nil {
				return
			}
			backoff = min(max(2*backoff, 100*time.Millisecond), 5*time.Second)
			is.log.Warn("key generation failed", "err", err, "retry_in", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return
			}
			continue
		}
		backoff = 0
		is.pool.ready <- k // never blocks: the slot reserved room
	}
}

// take hands out a pooled key, waiting up to wait for one. Keys whose
// session died while they waited are dropped. While the token is down no
// key is handed out: its decrypt could not happen until the token is back.
func (is *Issuer) take(ctx context.Context, wait time.Duration) (*hsm.Key, error) {
	if !is.cfg.Token.Ready() {
		return nil, ErrUnavailable
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case k := <-is.pool.ready:
			is.pool.slots <- struct{}{}
			if !k.Alive() {
				continue
			}
			return k, nil
		case <-timer.C:
			if !is.cfg.Token.Ready() {
				return nil, ErrUnavailable
			}
			return nil, ErrPoolEmpty
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// drain destroys the keys left in the pool. Call it once the generators
// have stopped.
func (is *Issuer) drain(ctx context.Context) {
	n := 0
	defer func() { is.emit(ctx, Event{Kind: EventDrained, Count: n}) }()
	for {
		select {
		case k := <-is.pool.ready:
			if err := is.cfg.Token.Destroy(ctx, k); err != nil && !errors.Is(err, hsm.ErrKeyLost) {
				is.log.Warn("failed to destroy pooled key", "err", err)
			} else {
				if err == nil {
					n++
				}
				if is.cfg.Cluster != nil {
					is.cfg.Cluster.Forget(ctx, k.ID)
				}
			}
		default:
			return
		}
	}
}
