package issuer

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// Cluster is what an issuer needs to share its token and records with
// other instances; [*postgres.Cluster] implements it. Set Config.Cluster
// to run as one instance of a cluster; nil runs alone. Its methods are
// safe for concurrent use and fail with [store.ErrUnavailable] when the
// shared store is down.
//
// The rules that keep the token and the records in step across instances:
// a pooled key is recorded (Generating) before the token makes it, so no
// neighbour's reconciliation takes it for a leak; it becomes a record in
// the same transaction that removes it from the pool (Issue), within caps
// counted over the cluster; a decrypt's claim names its instance (Claim),
// so a neighbour finishes it should the instance die; and what a dead
// instance leaves is handed to one survivor (TakeOver) to destroy.
type Cluster interface {
	ID() string
	Generating(ctx context.Context, id string) error
	Pooled(ctx context.Context, id string) error // ErrTakenOver-like error: the key is no longer ours
	Forget(ctx context.Context, id string) error
	Issue(ctx context.Context, r store.Record, caps store.Caps) error // *store.CapError
	Claim(ctx context.Context, id string, at time.Time) (store.Record, error)
	Owned(ctx context.Context, ids []string) (map[string]bool, error)
	Reclaim(ctx context.Context) (pooled, claims []string, err error)
	TakeOver(ctx context.Context) (pooled, claims []string, err error)
}

// finder finds a key by id in a token shared with other processes;
// [*hsm.Token] implements it. Cluster mode needs it.
type finder interface {
	Find(ctx context.Context, id string) (*hsm.Key, error)
}

// find returns the key of uniqueID: from this instance's map, else (in a
// cluster) from the keys this instance issued, else from the token, where
// a neighbour made it.
func (is *Issuer) find(ctx context.Context, id string) (*hsm.Key, error) {
	is.mu.Lock()
	k := is.keys[id]
	is.mu.Unlock()
	if k != nil || is.cfg.Cluster == nil {
		return k, nil
	}
	if k := is.made.take(id); k != nil {
		return k, nil
	}
	return is.findShared(ctx, id)
}

// madeKeys are the keys this instance issued in a cluster, kept so that
// its own decrypts find them without searching the shared token
// (C_FindObjects costs SoftHSM milliseconds, BENCHMARKS.md row 8). An
// entry grants nothing: any instance may still decrypt or expire the key,
// and the durable claim (Cluster.Claim) judges, as for a key found in the
// token; a handle is only used once the claim has made the key this
// request's, and no instance destroys the objects of a record it has not
// moved out of issued. A decrypt takes its key's entry out, so that only
// one request holds the pointer; the reaper drops the entries of keys past
// expiry, which a neighbour decrypted or expired meanwhile. The zero value
// is empty and ready.
type madeKeys struct {
	mu sync.Mutex
	m  map[string]madeKey
}

type madeKey struct {
	k       *hsm.Key
	expires time.Time
}

// put keeps k, issued until expires.
func (mk *madeKeys) put(k *hsm.Key, expires time.Time) {
	mk.mu.Lock()
	defer mk.mu.Unlock()
	if mk.m == nil {
		mk.m = map[string]madeKey{}
	}
	mk.m[k.ID] = madeKey{k: k, expires: expires}
}

// take removes the key of id and returns it, or nil.
func (mk *madeKeys) take(id string) *hsm.Key {
	mk.mu.Lock()
	defer mk.mu.Unlock()
	e, ok := mk.m[id]
	if !ok {
		return nil
	}
	delete(mk.m, id)
	return e.k
}

// prune drops the keys whose expiry is not after now.
func (mk *madeKeys) prune(now time.Time) {
	mk.mu.Lock()
	defer mk.mu.Unlock()
	for id, e := range mk.m {
		if !now.Before(e.expires) {
			delete(mk.m, id)
		}
	}
}

// findRetries are the waits before the searches made again for a key that
// a neighbour made and this process does not see; after the last, the
// token is rescanned (see hsm.Token.Rescan) and searched once more.
// SoftHSM's file store, shared by processes, now and then leaves a
// process's view of the token without an object another process made; a
// network HSM has no such lag. The searches stop as soon as the record is
// no longer issued: then a neighbour took the key.
var findRetries = []time.Duration{50 * time.Millisecond, 200 * time.Millisecond, 500 * time.Millisecond}

// rescanner re-reads a shared token's objects; [*hsm.Token] implements it.
type rescanner interface {
	Rescan(ctx context.Context) error
}

// findShared finds a key in the shared token, searching again while its
// record is issued and the key is not in view.
func (is *Issuer) findShared(ctx context.Context, id string) (*hsm.Key, error) {
	return is.findAgain(ctx, id, func() bool {
		r, err := is.cfg.Store.Get(ctx, id)
		return err == nil && r.State == store.Issued
	})
}

// findAgain finds key id in the token; while it is not in view and
// wanted() says it must exist, it searches again, and at last rescans.
func (is *Issuer) findAgain(ctx context.Context, id string, wanted func() bool) (*hsm.Key, error) {
	f := is.cfg.Token.(finder)
	k, err := f.Find(ctx, id)
	for i := 0; i <= len(findRetries) && errors.Is(err, hsm.ErrKeyLost) && wanted(); i++ {
		if i < len(findRetries) {
			select {
			case <-time.After(findRetries[i]):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		} else if r, ok := is.cfg.Token.(rescanner); !ok {
			break
		} else if rerr := r.Rescan(ctx); rerr != nil {
			return nil, rerr
		}
		if k, err = f.Find(ctx, id); err == nil {
			is.log.Info("found a neighbour's key on a later search", "unique_id", id, "search", i+2)
		}
	}
	return k, err
}

// reconcileCluster is Reconcile for an instance of a cluster. It touches
// no neighbour's keys: it finishes what this instance's previous run left
// (its pooled keys, its claims), and destroys only objects under the
// prefix that no record and no pool entry of any instance owns. The token
// is listed before the owners are read, so an object made after the
// listing is not judged, and one listed has its owner recorded already
// (pool entries are written before the token makes the key).
func (is *Issuer) reconcileCluster(ctx context.Context) error {
	pooled, claims, err := is.cfg.Cluster.Reclaim(ctx)
	if err != nil {
		return err
	}
	is.finish(ctx, pooled, claims)
	list, err := is.cfg.Token.List(ctx)
	if err != nil {
		return err
	}
	objs := map[string][]hsm.Object{}
	ids := []string{}
	for _, o := range list {
		if _, ok := objs[o.ID]; !ok {
			ids = append(ids, o.ID)
		}
		objs[o.ID] = append(objs[o.ID], o)
	}
	owned, err := is.cfg.Cluster.Owned(ctx, ids)
	if err != nil {
		return err
	}
	destroyed := 0
	for id, os := range objs {
		if owned[id] {
			continue
		}
		for _, o := range os {
			if err := is.cfg.Token.DestroyObject(ctx, o); err != nil {
				return err
			}
			destroyed++
		}
		is.emit(ctx, Event{Kind: EventDestroyed, UniqueID: id, Reason: ReasonReconciled})
	}
	is.log.Info("reconciled token and records with the cluster", "instance", is.cfg.Cluster.ID(),
		"pooled_reclaimed", len(pooled), "claims_finished", len(claims), "objects_destroyed", destroyed)
	is.emit(ctx, Event{Kind: EventReconciled, Reconciled: ReconcileCounts{Consumed: len(claims), Destroyed: destroyed}})
	return nil
}

// takeOver destroys what dead instances left: their pooled keys and the
// objects of their claims in flight, whose records become consumed.
func (is *Issuer) takeOver(ctx context.Context) {
	pooled, claims, err := is.cfg.Cluster.TakeOver(ctx)
	if err != nil {
		if ctx.Err() == nil {
			is.log.Warn("failed to look for dead instances", "err", err)
		}
		return
	}
	if len(pooled)+len(claims) > 0 {
		is.log.Info("taking over a dead instance's keys", "pooled", len(pooled), "claims", len(claims))
	}
	is.finish(ctx, pooled, claims)
}

// finish destroys pooled keys handed to this instance and finishes claims:
// objects destroyed, records consumed. A key the token cannot destroy now
// stays recorded (pool entry, or the claim) for the next pass.
func (is *Issuer) finish(ctx context.Context, pooled, claims []string) {
	for _, id := range pooled {
		if is.destroyByID(ctx, id, ReasonUnissued) {
			is.cfg.Cluster.Forget(ctx, id)
		}
	}
	for _, id := range claims {
		if is.destroyByID(ctx, id, ReasonConsumed) {
			is.cfg.Store.Transition(ctx, id, store.Consuming, store.Consumed, is.cfg.Now())
		}
	}
}

// destroyByID destroys the objects of id, found in the token, and reports
// whether none are left.
func (is *Issuer) destroyByID(ctx context.Context, id, why string) bool {
	// Not in view: look again before the key's record or pool entry is
	// let go of.
	k, err := is.findAgain(ctx, id, func() bool { return true })
	if errors.Is(err, hsm.ErrKeyLost) {
		return true // never made, or destroyed already
	}
	if err == nil {
		err = is.cfg.Token.Destroy(ctx, k)
	}
	if err != nil && !errors.Is(err, hsm.ErrKeyLost) {
		is.log.Warn("failed to destroy a key taken over, will retry", "unique_id", id, "err", err)
		return false
	}
	is.emit(ctx, Event{Kind: EventDestroyed, UniqueID: id, Reason: why})
	return true
}

// missing says what became of an issued key whose objects a cluster
// instance did not find: a neighbour that claimed or expired it in the
// meantime destroyed them, else the key is lost.
func (is *Issuer) missing(ctx context.Context, id string) error {
	_, err := is.cfg.Store.Transition(ctx, id, store.Issued, store.Lost, is.cfg.Now())
	if err != nil {
		return transitionErr(err)
	}
	is.emit(ctx, Event{Kind: EventLost, UniqueID: id})
	is.stats.lost.Add(1)
	return ErrLost
}

// capsOf turns quota limits into the store's caps.
func capsOf(lim Limits) store.Caps {
	return store.Caps{Total: lim.Total, Client: lim.Client, Customer: lim.Customer}
}
