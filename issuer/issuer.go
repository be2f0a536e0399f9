// Package issuer runs the life of keyissuer's one-time keys: a pool of
// pre-generated key pairs, a record per issued key, the one decrypt each key
// allows, the reaper that destroys keys nobody used, and the reconciliation
// of token and records at start-up.
//
// # The order of a decrypt
//
// Three promises rest on the order of record transitions, token calls and
// the audit line: a key decrypts at most once, ever (under concurrency,
// across kill -9 at any instant, across restarts); no decrypt is answered
// before its audit line is durable; a crash at any point is finished at the
// next start. A decrypt pays for one durable write before it answers, the
// audit line's fsync, in session storage, and for two in token storage.
// The issuer's part of the audit promise: [EventDecrypt] is emitted
// synchronously, once the record's last move is queued and visible, and
// before Decrypt returns; the daemon's observer appends the line and, with
// audit.fsync = "always", fsyncs it before the answer is written.
//
// Within the process, one request owns a key: the issued keys live in a map
// under the issuer's mutex, and a decrypt claims its key by taking it out of
// the map and noting the claim, in one step under that mutex. From then on a
// concurrent decrypt of the key answers [ErrConsumed], [Issuer.Record]
// reports the record consuming, and neither the reaper's expiry nor a
// session's loss touches the key (they claim a key the same way before they
// move its record). Only the claim's owner gives the key back, when the
// token never saw the ciphertext ([hsm.ErrUnavailable]), by putting it back
// in the map; nothing else ever puts a key of an issued record in the map
// again while the process lives.
//
// Session storage (the default): claim in memory, C_Decrypt, destroy, queue
// the record's move from issued to consumed without waiting for it
// ([Store.Settle]; [Store.Get] sees it at once), then the decrypt event,
// whose audit line is fsync'd before the answer goes out: the one durable
// write. The claim need not be durable before the token call because a
// session object cannot outlive the process that made it: PKCS#11 destroys
// it when its session closes, and no other process can reach it meanwhile
// (a session object is visible to its own application only). So after a
// crash at any point the record may still say issued, but no object
// answers to it, and start-up reconciliation, which never adopts an object
// in session storage, marks it lost: the key cannot decrypt twice. That is
// also why the final move may be lost: a crash between the answer and the
// store's commit leaves an issued record whose audit trail says it
// decrypted, followed by the key.lost of reconciliation; the audit line is
// the authority on what was decrypted. In session storage no write stops
// a second decrypt, in the process or after it: the map does, then the
// object's death. (So the promise holds with audit.fsync = "interval" too,
// where a decrypt waits for no write at all.) An issued record whose key is
// neither in the map nor claimed is one whose last move the store failed to
// commit: it answers [ErrConsumed].
//
// Token storage: the key objects survive a crash, and reconciliation adopts
// the objects of an issued record, so the claim must be durable before the
// token sees the ciphertext: claim in memory, move the record from issued to
// consuming in a durable compare-and-swap, C_Decrypt, destroy, queue the
// move to consumed, audit line, answer. Concurrent decrypts share the claim's
// commit (the store's group commit) and the audit's fsync. Two durable writes
// remain, one before the token call and one after it, and cannot be one: the
// claim must be on disk before C_Decrypt, and the audit line carries the
// outcome, which exists only after C_Decrypt; an audit line written as the
// claim would be a second line all the same (and the issuer knows nothing
// of the audit file, so reconciliation could not read it back). Merging the
// two files into one log would trade the store's compare-and-swap for a
// replay of the log at start-up: not worth one fsync per decrypt in the
// storage that is already the slower one.
//
// After the claim, whatever happens (a crash, a failed destroy), no request
// reaches the key again; the start-up reconciliation and the reaper finish
// what a crash left: a consuming record becomes consumed and its objects are
// destroyed (token storage), an issued record whose key died with the
// process becomes lost (session storage).
package issuer

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/big"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
)

// Token is the part of the PKCS#11 token the issuer uses; [*hsm.Token]
// implements it. Implementations are safe for concurrent use. Calls fail
// with [hsm.ErrUnavailable] when the token is down (retryable, the call did
// nothing), [hsm.ErrKeyLost] when a key's objects are gone, and Decrypt
// with [hsm.ErrDecrypt] for every rejected ciphertext.
//
// Decrypt says whether the token saw the ciphertext: it returns
// [hsm.ErrUnavailable], or the context's error when the caller gave up
// waiting for the token, only when C_Decrypt was never called. Once it
// was, it returns [hsm.ErrDecrypt], [hsm.ErrInterrupted] (the token failed
// and whether it decrypted is unknown) or another error, never
// ErrUnavailable. Generate leaves no object behind that it did not return
// (what a fault keeps it from destroying at once, Check destroys later).
type Token interface {
	Generate(ctx context.Context, id string) (*hsm.Key, error)
	Decrypt(ctx context.Context, k *hsm.Key, p hsm.Padding, ciphertext []byte) ([]byte, error)
	Destroy(ctx context.Context, k *hsm.Key) error
	// List, DestroyObject and Adopt serve start-up reconciliation only.
	List(ctx context.Context) ([]hsm.Object, error)
	DestroyObject(ctx context.Context, o hsm.Object) error
	Adopt(ctx context.Context, objs []hsm.Object) (*hsm.Key, error)
	// SweepHalfMade looks for key objects a crash left half-made (no
	// label, no id, no key: beyond List) and, on a token dedicated to
	// keyissuer, destroys them: see [hsm.Token.SweepHalfMade].
	// Reconciliation calls it; Check goes on with it afterwards.
	SweepHalfMade(ctx context.Context) (hsm.HalfMadeSweep, error)
	// Check finds dead sessions; Ready says whether the token is up.
	Check(ctx context.Context) error
	Ready() bool
}

var _ Token = (*hsm.Token)(nil)

// Store keeps the records; [*bolt.Store] implements it. Writes are durable
// when they return, except Settle's. Transition is a compare-and-swap that
// fails with a *[store.StateError] when the record is not in state from.
// Settle is the same compare-and-swap, queued without waiting for it to be
// durable (a crash may lose it), and seen at once by Get and Transition. Get
// and Transition return [store.ErrNotFound] for an unknown uniqueId.
type Store interface {
	Create(ctx context.Context, r store.Record) error
	Get(ctx context.Context, id string) (store.Record, error)
	Transition(ctx context.Context, id string, from, to store.State, at time.Time) (store.Record, error)
	Settle(id string, from, to store.State, at time.Time)
	Active(ctx context.Context, before time.Time, limit int) ([]store.Record, error)
	Prune(ctx context.Context, before time.Time, limit int) (int, error)
}

var _ Store = (*bolt.Store)(nil)

// Errors callers branch on. Retryable: ErrPoolEmpty and ErrUnavailable.
var (
	ErrPoolEmpty   = errors.New("no key ready: the pool stayed empty for the whole wait")
	ErrUnavailable = errors.New("token unavailable")
	ErrNotFound    = errors.New("unknown uniqueId")
	ErrConsumed    = errors.New("key already used")
	ErrExpired     = errors.New("key expired")
	ErrLost        = errors.New("key lost by the token")
	// ErrAbandoned means the caller gave up (its context ended) after the
	// key was claimed and before the token decrypted anything. Nothing
	// was decrypted, but the key is consumed and destroyed all the same.
	ErrAbandoned = errors.New("decrypt abandoned by the caller before the token decrypted; the key is consumed")
	// ErrDecrypt covers every failed decrypt: bad padding, wrong salt. The
	// key is destroyed all the same.
	ErrDecrypt = errors.New("decryption failed")
	// ErrCiphertext means the ciphertext cannot be for this key: its length
	// is not the modulus size, or its value is not below the modulus. The
	// key is not consumed.
	ErrCiphertext = errors.New("ciphertext cannot be for this key")
	// ErrPadding means a decrypt asked for a padding that is not one of
	// Config.Paddings. The key is not consumed.
	ErrPadding = errors.New("padding not accepted")
	// ErrStoreUnavailable means the record store (PostgreSQL) cannot be
	// reached: nothing was issued, or the key is untouched. Retry.
	ErrStoreUnavailable = errors.New("record store unavailable")
)

// Config wires an Issuer. Zero durations and sizes take the defaults noted.
type Config struct {
	Token   Token
	Store   Store
	Storage hsm.Storage // what reconciliation may expect of the token
	Log     *slog.Logger
	// Cluster, if set, makes the issuer one instance of a cluster sharing
	// the token and the records (cluster.go); it needs token storage and a
	// Token that can find keys by id.
	Cluster Cluster

	// Paddings are the schemes clients may encrypt with, each probed by
	// the token; the first is the default (oaep-sha256).
	Paddings []hsm.Padding
	// Layout says where the salt sits in the plaintext (password-salt).
	Layout Layout

	TTL          time.Duration // a key's time to live once issued (10m)
	PoolSize     int           // keys kept ready (64)
	Generators   int           // concurrent key generations (2)
	ApplyWait    time.Duration // how long Apply waits on an empty pool (2s)
	Retention    time.Duration // how long finished records are kept (720h)
	ReapInterval time.Duration // how often the reaper runs (5s)

	// Now is the clock (time.Now).
	Now func() time.Time
	// AfterClaim, if set, runs after a decrypt has claimed its key (in
	// memory; in token storage also in the record, durably) and before the
	// token decrypts. Tests use it to crash at that instant.
	AfterClaim func(uniqueID string)
	// OnEvent, if set, is told of every [Event]: keys generated, issued,
	// decrypted, expired, lost and destroyed, reaper passes. It is called
	// synchronously, without the issuer's locks, from many goroutines: it
	// must be quick and safe for concurrent use. Metrics and the audit
	// trail hang here.
	OnEvent func(ctx context.Context, e Event)
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.TTL, 10*time.Minute)
	def(&c.ApplyWait, 2*time.Second)
	def(&c.Retention, 30*24*time.Hour)
	def(&c.ReapInterval, 5*time.Second)
	if c.PoolSize == 0 {
		c.PoolSize = 64
	}
	if c.Generators == 0 {
		c.Generators = 2
	}
	if c.Storage == "" {
		c.Storage = hsm.StorageSession
	}
	if len(c.Paddings) == 0 {
		c.Paddings = []hsm.Padding{hsm.OAEPSHA256}
	}
	if c.Layout == "" {
		c.Layout = LayoutPasswordSalt
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Issuer hands out one-time keys and performs their one decrypt. It is safe
// for concurrent use.
type Issuer struct {
	cfg  Config
	log  *slog.Logger
	pool *pool

	mu       sync.Mutex
	keys     map[string]*hsm.Key // issued, not yet claimed
	claims   map[string]keyClaim // keys taken out of keys by their owner
	pending  []pendingDestroy    // destroys to retry
	retrying int                 // pending destroys the reaper is retrying
	tally    tally               // outstanding keys by holder (quota.go)
	lost     []string            // ids reported lost by the token
	kick     chan struct{}       // wakes the maintenance loop
	made     madeKeys            // cluster mode: keys issued here (cluster.go)

	stats stats
}

// New makes an Issuer. Call Run to reconcile, fill the pool and maintain.
func New(cfg Config) (*Issuer, error) {
	cfg.setDefaults()
	switch {
	case cfg.Token == nil || cfg.Store == nil:
		return nil, errors.New("issuer needs a token and a store")
	case cfg.PoolSize < 1 || cfg.Generators < 1:
		return nil, fmt.Errorf("pool size %d and generators %d must be at least 1", cfg.PoolSize, cfg.Generators)
	case cfg.TTL < time.Second:
		return nil, fmt.Errorf("ttl %s is too short", cfg.TTL)
	}
	if cfg.Cluster != nil {
		if _, ok := cfg.Token.(finder); !ok || cfg.Storage != hsm.StorageToken {
			return nil, errors.New("cluster mode needs token storage and a token that finds keys by id")
		}
	}
	if _, err := ParseLayout(string(cfg.Layout)); err != nil {
		return nil, err
	}
	for _, p := range cfg.Paddings {
		if _, err := hsm.ParsePadding(string(p)); err != nil {
			return nil, err
		}
	}
	return &Issuer{
		cfg:    cfg,
		log:    cfg.Log,
		pool:   newPool(cfg.PoolSize),
		keys:   map[string]*hsm.Key{},
		claims: map[string]keyClaim{},
		kick:   make(chan struct{}, 1),
	}, nil
}

// KeysLost is the token's [hsm.Config.OnLost] callback: the keys died with
// their session. Their records are marked lost by the maintenance loop.
func (is *Issuer) KeysLost(ids []string) {
	is.mu.Lock()
	is.lost = append(is.lost, ids...)
	is.mu.Unlock()
	select {
	case is.kick <- struct{}{}:
	default:
	}
}

// Reconcile makes the records and the token agree. Call it once at
// start-up, before Run and before any request.
//
// In session storage every active record is from a previous run, whose keys
// died with it: issued ones become lost, consuming ones consumed. In token
// storage the key objects survive: an issued record whose two halves are
// present is adopted and can still decrypt; any other object under the
// prefix is destroyed, and records whose key is missing become lost.
//
// The token is searched in either mode: a daemon switched from token to
// session storage finds the token objects of its token-storage runs, which
// are leftovers now. Their records are finished as above, then the objects
// destroyed.
func (is *Issuer) Reconcile(ctx context.Context) error {
	if is.cfg.Cluster != nil {
		return is.reconcileCluster(ctx)
	}
	recs, err := is.cfg.Store.Active(ctx, time.Unix(0, math.MaxInt64), 0)
	if err != nil {
		return err
	}
	list, err := is.cfg.Token.List(ctx)
	if err != nil {
		return err
	}
	adopt := is.cfg.Storage == hsm.StorageToken
	objs := map[string][]hsm.Object{}
	for _, o := range list {
		if !adopt && !o.Token {
			continue // a session object of this process: not a leftover
		}
		objs[o.ID] = append(objs[o.ID], o)
	}
	now := is.cfg.Now()
	var adopted, lost, consumed, destroyed int
	for _, r := range recs {
		if r.State == store.Issued {
			if os, ok := objs[r.UniqueID]; ok && adopt {
				k, err := is.cfg.Token.Adopt(ctx, os)
				if err == nil {
					delete(objs, r.UniqueID)
					is.mu.Lock()
					is.trackLocked(k, holderOf(r), false)
					is.mu.Unlock()
					adopted++
					continue
				}
				if !errors.Is(err, hsm.ErrKeyLost) {
					return err
				}
			}
			if _, err := is.cfg.Store.Transition(ctx, r.UniqueID, store.Issued, store.Lost, now); err != nil {
				return err
			}
			is.emit(ctx, Event{Kind: EventLost, UniqueID: r.UniqueID})
			lost++
			continue
		}
		// Consuming: the decrypt may have happened before the crash.
		if _, err := is.cfg.Store.Transition(ctx, r.UniqueID, store.Consuming, store.Consumed, now); err != nil {
			return err
		}
		consumed++
	}
	for id, os := range objs {
		for _, o := range os {
			if err := is.cfg.Token.DestroyObject(ctx, o); err != nil {
				return err
			}
			destroyed++
		}
		is.emit(ctx, Event{Kind: EventDestroyed, UniqueID: id, Reason: ReasonReconciled})
	}
	// In either mode, as for the labelled leftovers: a token-storage run's
	// crash may have left them.
	halfMade := is.reconcileHalfMade(ctx)
	is.log.Info("reconciled token and records", "storage", is.cfg.Storage,
		"adopted", adopted, "lost", lost, "consumed", consumed, "objects_destroyed", destroyed,
		"half_made_destroyed", halfMade.Destroyed, "half_made_left", halfMade.Waiting)
	is.emit(ctx, Event{Kind: EventReconciled, Reconciled: ReconcileCounts{
		Adopted: adopted, Lost: lost, Consumed: consumed, Destroyed: destroyed}})
	return nil
}

// reconcileHalfMadeWait is the longest start-up waits for half-made objects
// to be seen long enough to go; with a longer grace, the token's periodic
// checks destroy them later.
const reconcileHalfMadeWait = 10 * time.Second

// reconcileHalfMade looks for half-made key objects, and looks again once
// the first ones may go if that is soon, so that a lone daemon whose grace
// is short starts with none. A failure is logged, not fatal: the token's
// checks look again.
func (is *Issuer) reconcileHalfMade(ctx context.Context) hsm.HalfMadeSweep {
	var total hsm.HalfMadeSweep
	for look := 0; look < 3; look++ {
		res, err := is.cfg.Token.SweepHalfMade(ctx)
		if err != nil {
			is.log.Warn("failed to clear half-made key objects at start-up; the token's checks will try again", "err", err)
		}
		total.Found = max(total.Found, res.Found)
		total.Destroyed += res.Destroyed
		total.Waiting, total.NextDue = res.Waiting, res.NextDue
		if err != nil || res.Waiting == 0 || res.NextDue == 0 || res.NextDue > reconcileHalfMadeWait {
			break
		}
		select {
		case <-ctx.Done():
			return total
		case <-time.After(res.NextDue):
		}
	}
	return total
}

// Run fills the pool and runs the reaper until ctx is done. Call Reconcile
// first, and serve no request before it returns. On return the pool's keys
// are destroyed and, in session storage, the records of keys that die with
// the daemon are marked lost.
func (is *Issuer) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	for range is.cfg.Generators {
		g.Go(func() error { is.generate(gctx); return nil })
	}
	g.Go(func() error { is.maintain(gctx); return nil })
	g.Wait()

	stop, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	is.drain(stop)
	if is.cfg.Storage == hsm.StorageSession {
		is.mu.Lock()
		ids := make([]string, 0, len(is.keys))
		for id := range is.keys {
			ids = append(ids, id)
		}
		is.mu.Unlock()
		for _, id := range ids {
			is.markLost(stop, id)
		}
	}
	return nil
}

// Issued is a freshly issued key.
type Issued struct {
	UniqueID  string
	Salt      string
	PublicKey []byte // DER SubjectPublicKeyInfo
	ExpiresAt time.Time
}

const (
	uniqueIDLen = hsm.KeyIDLen // the token lists only well-formed ids
	saltLen     = 12
)

// Apply issues a key from the pool, recording it durably before it is
// returned. It fails with ErrPoolEmpty or ErrUnavailable when no key is
// ready within the configured wait. [Issuer.ApplyWithin] adds quotas.
func (is *Issuer) Apply(ctx context.Context, customerID, clientID string) (Issued, error) {
	return is.ApplyWithin(ctx, customerID, clientID, Limits{})
}

// apply issues a key to h, taking over the quota reservation made for h.
func (is *Issuer) apply(ctx context.Context, h holder, lim Limits) (Issued, error) {
	customerID, clientID := h.customer, h.client
	k, err := is.take(ctx, is.cfg.ApplyWait)
	if err != nil {
		is.mu.Lock()
		is.unreserveLocked(h)
		is.mu.Unlock()
		return Issued{}, err
	}
	salt, err := newID(saltLen)
	if err != nil {
		is.mu.Lock()
		is.unreserveLocked(h)
		is.mu.Unlock()
		is.destroy(ctx, k, ReasonUnissued)
		return Issued{}, err
	}
	now := is.cfg.Now().UTC()
	rec := store.Record{
		UniqueID:   k.ID,
		Salt:       salt,
		CustomerID: customerID,
		ClientID:   clientID,
		State:      store.Issued,
		IssuedAt:   now,
		ExpiresAt:  now.Add(is.cfg.TTL),
	}
	is.mu.Lock()
	is.trackLocked(k, h, true)
	is.mu.Unlock()
	if err := is.create(ctx, rec, k, lim); err != nil {
		is.mu.Lock()
		is.untrackLocked(k.ID)
		is.mu.Unlock()
		return Issued{}, err
	}
	if is.cfg.Cluster != nil {
		// Any instance may decrypt or expire it now, so none keeps it:
		// each finds it in the token (cluster.go).
		is.mu.Lock()
		is.untrackLocked(k.ID)
		is.mu.Unlock()
		is.made.put(k, rec.ExpiresAt)
	}
	is.stats.issued.Add(1)
	is.emit(ctx, Event{Kind: EventIssued, UniqueID: k.ID, CustomerID: customerID, ClientID: clientID})
	return Issued{UniqueID: k.ID, Salt: salt, PublicKey: k.PublicDER, ExpiresAt: rec.ExpiresAt}, nil
}

// create records k as issued in rec. On failure k is no longer the
// caller's: back in the pool, destroyed, or (taken over) a neighbour's.
func (is *Issuer) create(ctx context.Context, rec store.Record, k *hsm.Key, lim Limits) error {
	if is.cfg.Cluster == nil {
		err := is.cfg.Store.Create(ctx, rec)
		if err != nil {
			is.destroy(ctx, k, ReasonUnissued)
		}
		return err
	}
	err := is.cfg.Cluster.Issue(ctx, rec, capsOf(lim))
	var ce *store.CapError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ce):
		// Another instance's keys filled the cap: the key goes back to
		// the pool, still recorded as ready there.
		select {
		case <-is.pool.slots:
			is.pool.ready <- k
		default:
			is.destroy(ctx, k, ReasonUnissued)
			is.cfg.Cluster.Forget(ctx, k.ID)
		}
		return &QuotaError{Scope: ce.Scope, Limit: ce.Limit}
	case errors.Is(err, store.ErrUnavailable):
		// Whether the transaction committed is unknown: leave the key
		// alone. If it did, the record owns it; if not, its pool entry
		// does, and this instance's next start-up destroys it.
		return ErrStoreUnavailable
	}
	// Taken over by a neighbour, who destroys it.
	return ErrUnavailable
}

// Record returns the record of uniqueID, or ErrNotFound. A record whose key
// a decrypt has claimed is consuming, even where the store does not say so
// (session storage claims in memory).
func (is *Issuer) Record(ctx context.Context, uniqueID string) (store.Record, error) {
	r, err := is.cfg.Store.Get(ctx, uniqueID)
	if errors.Is(err, store.ErrNotFound) {
		return r, ErrNotFound
	}
	if errors.Is(err, store.ErrUnavailable) {
		return r, fmt.Errorf("%w: %w", ErrStoreUnavailable, err)
	}
	if err == nil && r.State == store.Issued {
		is.mu.Lock()
		c, held := is.claims[uniqueID]
		is.mu.Unlock()
		if held && c.why == ErrConsumed {
			r.State = store.Consuming
		}
	}
	return r, err
}

// Decrypt performs the one decrypt the key of uniqueID allows, with the
// default padding, and returns the password: the plaintext less the salt,
// which must be where Config.Layout puts it. After the first attempt the key
// is destroyed, whether it succeeded or not.
//
// It fails with ErrNotFound, ErrConsumed, ErrExpired or ErrLost when the key
// cannot decrypt; ErrCiphertext (key untouched) when the ciphertext has the
// wrong length or is not below the modulus; ErrUnavailable (key untouched,
// retry) when the token is down before it saw the ciphertext; ErrAbandoned
// (key consumed, nothing decrypted) when ctx ends while the decrypt waits
// for the token; ErrDecrypt when the padding or the salt is wrong,
// whichever it was, or when the token failed once it had the ciphertext.
//
// The password is a sub-slice of a buffer that holds nothing else (the
// rest of the plaintext is zeroed): the caller zeroes it once used.
func (is *Issuer) Decrypt(ctx context.Context, uniqueID string, ciphertext []byte) ([]byte, error) {
	return is.DecryptWithPadding(ctx, uniqueID, ciphertext, "")
}

// DecryptWithPadding is [Issuer.Decrypt] with padding p, which must be one
// of Config.Paddings ("" means the default, the first). Any other fails
// with ErrPadding before the key is touched.
func (is *Issuer) DecryptWithPadding(ctx context.Context, uniqueID string, ciphertext []byte, p hsm.Padding) (_ []byte, err error) {
	defer func() { is.emit(ctx, Event{Kind: EventDecrypt, UniqueID: uniqueID, Err: err}) }()
	if p == "" {
		p = is.cfg.Paddings[0]
	} else if !slices.Contains(is.cfg.Paddings, p) {
		return nil, ErrPadding
	}
	rec, err := is.Record(ctx, uniqueID)
	if err != nil {
		return nil, err
	}
	now := is.cfg.Now()
	if err := stateErr(rec.State); err != nil {
		return nil, err
	}
	switch {
	case rec.State == store.Consuming:
		return nil, ErrConsumed
	case !now.Before(rec.ExpiresAt):
		return nil, is.expire(ctx, rec)
	}
	k, ferr := is.find(ctx, uniqueID)
	switch {
	case errors.Is(ferr, hsm.ErrKeyLost):
		// Not in the token: lost, or a neighbour's decrypt or expiry took
		// it since the record was read.
		return nil, is.missing(ctx, uniqueID)
	case ferr != nil:
		return nil, ErrUnavailable
	case k == nil:
		// An issued record always has its key in the map; the key went
		// after the record was read, to a concurrent claim.
		return nil, is.raced(ctx, uniqueID)
	case !k.Alive():
		is.markLost(ctx, uniqueID)
		return nil, ErrLost
	case len(ciphertext) != k.Size():
		return nil, fmt.Errorf("%w: got %d bytes, want %d", ErrCiphertext, len(ciphertext), k.Size())
	case new(big.Int).SetBytes(ciphertext).Cmp(k.Public.N) >= 0:
		// No encryption under this key gives it. The modulus is public:
		// refusing it before the claim tells nobody anything.
		return nil, fmt.Errorf("%w: not below the modulus", ErrCiphertext)
	case !is.cfg.Token.Ready():
		return nil, ErrUnavailable
	}

	// The claim: from here on the key can never decrypt again. In memory
	// first, which makes this request the key's one owner in the process;
	// in token storage also durably, before the token sees the ciphertext,
	// as the objects would survive a crash (see the package doc).
	// (In token storage the durable claim below is the judge, and the key
	// need not have come from the map: in a cluster it may be a
	// neighbour's, found in the token.)
	if got, ok := is.claimKey(uniqueID, ErrConsumed); !ok || got != k && is.cfg.Storage != hsm.StorageToken {
		if ok {
			is.endClaim(uniqueID, true)
		}
		return nil, is.raced(ctx, uniqueID)
	}
	from := store.Issued // the state the record's last move starts from
	if is.cfg.Storage == hsm.StorageToken {
		if _, err := is.claim(ctx, uniqueID, now); err != nil {
			// The token never saw the ciphertext: the key goes back,
			// unless the record is no longer issued (then it is not ours).
			var se *store.StateError
			is.endClaim(uniqueID, !errors.As(err, &se))
			return nil, transitionErr(err)
		}
		from = store.Consuming
	}
	if is.cfg.AfterClaim != nil {
		is.cfg.AfterClaim(uniqueID)
	}

	pt, derr := is.cfg.Token.Decrypt(ctx, k, p, ciphertext)
	// Only a token that never saw the ciphertext gives the key back. The
	// token's word for it is ErrUnavailable, which it never returns once
	// C_Decrypt was called; ErrInterrupted wins should both be wrapped.
	if errors.Is(derr, hsm.ErrUnavailable) && !errors.Is(derr, hsm.ErrInterrupted) &&
		is.release(ctx, k) {
		return nil, ErrUnavailable
	}
	is.destroy(ctx, k, ReasonConsumed)
	final := store.Consumed
	if errors.Is(derr, hsm.ErrKeyLost) {
		final = store.Lost
	}
	// The answer need not wait for this write to be durable: should a
	// crash lose it, the record stays consuming (token storage), which no
	// request can pass and the next start-up or the reaper makes consumed,
	// or issued without a key (session storage), which the next start-up
	// marks lost. Get sees it at once, so the claim can end.
	is.cfg.Store.Settle(uniqueID, from, final, is.cfg.Now())
	is.endClaim(uniqueID, false)
	is.stats.decrypts.Add(1)
	switch {
	case derr == nil:
	case final == store.Lost:
		return nil, ErrLost
	case errors.Is(derr, context.Canceled), errors.Is(derr, context.DeadlineExceeded):
		// The caller went away while the decrypt waited for a session.
		// The claim stands: the key is destroyed unused.
		is.log.Warn("decrypt abandoned by its caller before the token decrypted; key consumed unused",
			"unique_id", uniqueID, "err", derr)
		return nil, ErrAbandoned
	case errors.Is(derr, hsm.ErrInterrupted):
		is.log.Warn("the token failed during a decrypt; key consumed", "unique_id", uniqueID, "err", derr)
		return nil, ErrDecrypt
	case errors.Is(derr, hsm.ErrDecrypt), errors.Is(derr, hsm.ErrKeySpent), errors.Is(derr, hsm.ErrUnavailable):
		return nil, ErrDecrypt
	default:
		is.log.Error("decrypt failed in the token", "unique_id", uniqueID, "err", derr)
		return nil, ErrDecrypt
	}
	password, ok := is.cfg.Layout.password(pt, rec.Salt)
	if !ok {
		clear(pt)
		return nil, ErrDecrypt
	}
	keepOnly(pt, password)
	return password, nil
}

// claim moves the record from issued to consuming: in a cluster, naming
// this instance as the claimant.
func (is *Issuer) claim(ctx context.Context, id string, now time.Time) (store.Record, error) {
	if is.cfg.Cluster != nil {
		return is.cfg.Cluster.Claim(ctx, id, now)
	}
	return is.cfg.Store.Transition(ctx, id, store.Issued, store.Consuming, now)
}

// keyClaim is a key taken out of Issuer.keys by the one request that owns
// it now: a decrypt, an expiry, a loss.
type keyClaim struct {
	why error    // what a decrypt that races the owner answers
	k   *hsm.Key // the key taken out of the map, if it was there
	h   holder   // whom it was issued to, should it go back
}

// claimKey takes the key of id out of the map of issued keys for the
// caller, in one step under the lock: the step that makes one request the
// owner of a key. It returns the key (nil if the map has none), and false
// if another request holds the claim. A decrypt that races the claim
// answers why.
func (is *Issuer) claimKey(id string, why error) (*hsm.Key, bool) {
	is.mu.Lock()
	defer is.mu.Unlock()
	if _, held := is.claims[id]; held {
		return nil, false
	}
	h := is.tally.holders[id]
	k := is.untrackLocked(id)
	is.claims[id] = keyClaim{why: why, k: k, h: h}
	return k, true
}

// endClaim ends the claim of id. With giveBack, the key it took out of the
// map goes back first, to whom it was issued: its owner did not use it.
func (is *Issuer) endClaim(id string, giveBack bool) {
	is.mu.Lock()
	defer is.mu.Unlock()
	if c, held := is.claims[id]; held && giveBack && c.k != nil {
		is.trackLocked(c.k, c.h, false)
	}
	delete(is.claims, id)
}

// raced says what became of a key that a concurrent request took between
// this one's read of the record and its claim.
func (is *Issuer) raced(ctx context.Context, uniqueID string) error {
	is.mu.Lock()
	c, held := is.claims[uniqueID]
	_, back := is.keys[uniqueID]
	is.mu.Unlock()
	switch {
	case held:
		return c.why
	case back:
		// Claimed, then given back after a token fault: unused, retry.
		return ErrUnavailable
	}
	rec, err := is.Record(ctx, uniqueID)
	switch {
	case err != nil:
		return err
	case rec.State.Active():
		// No key and no claim: a decrypt took the key, and its record's
		// last move was lost (the store failed to commit it).
		return ErrConsumed
	}
	return stateErr(rec.State)
}

// release gives a claimed key back after the token failed before
// decrypting anything. It reports whether the key is issued again.
func (is *Issuer) release(ctx context.Context, k *hsm.Key) bool {
	if is.cfg.Storage == hsm.StorageToken {
		_, err := is.cfg.Store.Transition(context.WithoutCancel(ctx), k.ID, store.Consuming, store.Issued, is.cfg.Now())
		if err != nil {
			return false
		}
	}
	is.endClaim(k.ID, true)
	return true
}

// keepOnly zeroes every byte of buf outside sub, a sub-slice of it, so
// that a caller who zeroes sub leaves nothing of buf behind.
func keepOnly(buf, sub []byte) {
	if len(sub) == 0 {
		clear(buf)
		return
	}
	start := cap(buf) - cap(sub) // sub = buf[start : start+len(sub)]
	clear(buf[:start])
	clear(buf[start+len(sub):])
}

// stripSalt checks, in constant time, that pt ends with salt and returns the
// password before it.
func stripSalt(pt []byte, salt string) ([]byte, bool) {
	n := len(pt) - len(salt)
	if n < 0 {
		return nil, false
	}
	return pt[:n], subtle.ConstantTimeCompare(pt[n:], []byte(salt)) == 1
}

func stateErr(s store.State) error {
	switch s {
	case store.Issued, store.Consuming:
		return nil
	case store.Consumed:
		return ErrConsumed
	case store.Expired:
		return ErrExpired
	case store.Lost:
		return ErrLost
	}
	return fmt.Errorf("record in unknown state %q", s)
}

// transitionErr turns a lost compare-and-swap into what the record is now.
func transitionErr(err error) error {
	var se *store.StateError
	if errors.As(err, &se) {
		if se.Current.State == store.Consuming {
			return ErrConsumed
		}
		return stateErr(se.Current.State)
	}
	if errors.Is(err, store.ErrNotFound) {
		return ErrNotFound
	}
	if errors.Is(err, store.ErrUnavailable) {
		return ErrStoreUnavailable
	}
	return err
}

// expire moves an issued record to expired and destroys its key, unless a
// decrypt or a loss holds the key's claim. It returns what a decrypt of the
// key answers: ErrExpired, or what the record is now.
func (is *Issuer) expire(ctx context.Context, r store.Record) error {
	k, ok := is.claimKey(r.UniqueID, ErrExpired)
	if !ok {
		return is.raced(ctx, r.UniqueID)
	}
	if _, err := is.cfg.Store.Transition(ctx, r.UniqueID, store.Issued, store.Expired, is.cfg.Now()); err != nil {
		is.endClaim(r.UniqueID, true)
		return transitionErr(err)
	}
	is.endClaim(r.UniqueID, false)
	is.emit(ctx, Event{Kind: EventExpired, UniqueID: r.UniqueID})
	switch {
	case k != nil:
		is.destroy(ctx, k, ReasonExpired)
	case is.cfg.Cluster != nil:
		// Issued by a neighbour: the expiry's compare-and-swap made this
		// instance the one that destroys it.
		is.destroyByID(ctx, r.UniqueID, ReasonExpired)
	}
	is.stats.expired.Add(1)
	return ErrExpired
}

// markLost moves an issued record to lost and forgets its key, unless a
// decrypt or an expiry holds the key's claim: then its owner finishes it.
func (is *Issuer) markLost(ctx context.Context, id string) {
	k, ok := is.claimKey(id, ErrLost)
	if !ok {
		return
	}
	if _, err := is.cfg.Store.Transition(ctx, id, store.Issued, store.Lost, is.cfg.Now()); err != nil {
		is.endClaim(id, true) // not issued, or the store failed: the key stays as it was
		return
	}
	is.endClaim(id, false)
	is.emit(ctx, Event{Kind: EventLost, UniqueID: id})
	if k != nil {
		is.destroy(ctx, k, ReasonLost) // the objects may still be there in token storage
	}
	is.stats.lost.Add(1)
}

// pendingDestroy is a destroy that failed, for the reaper to retry.
type pendingDestroy struct {
	k   *hsm.Key
	why string
}

// destroy destroys k, queueing it for the reaper to retry on failure. why
// is a Reason*, for the event.
func (is *Issuer) destroy(ctx context.Context, k *hsm.Key, why string) {
	err := is.cfg.Token.Destroy(context.WithoutCancel(ctx), k)
	if err == nil {
		is.emit(ctx, Event{Kind: EventDestroyed, UniqueID: k.ID, Reason: why})
	}
	if err == nil || errors.Is(err, hsm.ErrKeyLost) {
		return
	}
	is.log.Warn("failed to destroy key, will retry", "unique_id", k.ID, "err", err)
	is.emit(ctx, Event{Kind: EventDestroyFailed, UniqueID: k.ID, Reason: why, Err: err})
	is.mu.Lock()
	is.pending = append(is.pending, pendingDestroy{k, why})
	is.mu.Unlock()
}

// maintain runs the reaper and session checks until ctx is done.
func (is *Issuer) maintain(ctx context.Context) {
	tick := time.NewTicker(is.cfg.ReapInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-is.kick:
			is.accountLost(ctx)
		case <-tick.C:
			if err := is.cfg.Token.Check(ctx); err != nil {
				is.log.Warn("token check found faults", "err", err)
			}
			is.accountLost(ctx)
			is.Reap(ctx)
		}
	}
}

func (is *Issuer) accountLost(ctx context.Context) {
	is.mu.Lock()
	ids := is.lost
	is.lost = nil
	is.mu.Unlock()
	for _, id := range ids {
		is.markLost(ctx, id)
	}
}

// reapBatch bounds one reaper pass; the next tick takes the rest.
const reapBatch = 1000

// Reap destroys the keys of records past expiry, retries failed destroys
// and prunes records past retention; in a cluster it first takes over what
// dead instances left. Its cost follows the number of keys
// due, not the number of records.
func (is *Issuer) Reap(ctx context.Context) {
	start := time.Now()
	defer func() { is.emit(ctx, Event{Kind: EventReaped, Duration: time.Since(start)}) }()
	now := is.cfg.Now()
	if is.cfg.Cluster != nil {
		is.takeOver(ctx)
		is.made.prune(now)
	}
	due, err := is.cfg.Store.Active(ctx, now, reapBatch)
	if err != nil {
		is.log.Error("reaper failed to scan records", "err", err)
	}
	for _, r := range due {
		if r.State == store.Issued {
			is.expire(ctx, r)
			continue
		}
		// Consuming past expiry: a decrypt whose final write failed,
		// unless the decrypt still holds its claim. In a cluster its claimant
		// may have been unable to destroy the key.
		is.mu.Lock()
		_, held := is.claims[r.UniqueID]
		is.mu.Unlock()
		if !held && (is.cfg.Cluster == nil || is.destroyByID(ctx, r.UniqueID, ReasonConsumed)) {
			is.cfg.Store.Transition(ctx, r.UniqueID, store.Consuming, store.Consumed, now)
		}
	}

	// While the token is down every retry would fail again, each with a
	// warning and an audit event, on every pass of a long outage: the
	// retries wait for the token to come back.
	ready := is.cfg.Token.Ready()
	is.mu.Lock()
	var retry []pendingDestroy
	if ready {
		retry = is.pending
		is.pending = nil
	}
	is.retrying += len(retry) // still pending while they are retried
	is.mu.Unlock()
	for _, p := range retry {
		is.destroy(ctx, p.k, p.why)
		is.mu.Lock()
		is.retrying--
		is.mu.Unlock()
	}

	if n, err := is.cfg.Store.Prune(ctx, now.Add(-is.cfg.Retention), reapBatch); err != nil {
		is.log.Error("reaper failed to prune records", "err", err)
	} else if n > 0 {
		is.log.Debug("pruned records", "count", n)
	}
}

// Stats is a snapshot of the issuer's state, for health and status.
type Stats struct {
	PoolReady, PoolSize int
	Outstanding         int // issued keys not yet claimed
	PendingDestroys     int
	TokenReady          bool
	Generated, GenerateErrors,
	Issued, Decrypts, Expired, Lost int64
	GenerateTime time.Duration // total time spent generating keys
}

// Stats returns a snapshot.
func (is *Issuer) Stats() Stats {
	is.mu.Lock()
	out, pend := len(is.keys), len(is.pending)+is.retrying
	is.mu.Unlock()
	return Stats{
		PoolReady:       len(is.pool.ready),
		PoolSize:        is.cfg.PoolSize,
		Outstanding:     out,
		PendingDestroys: pend,
		TokenReady:      is.cfg.Token.Ready(),
		Generated:       is.stats.generatedN.Load(),
		GenerateErrors:  is.stats.genErrors.Load(),
		Issued:          is.stats.issued.Load(),
		Decrypts:        is.stats.decrypts.Load(),
		Expired:         is.stats.expired.Load(),
		Lost:            is.stats.lost.Load(),
		GenerateTime:    time.Duration(is.stats.genNanos.Load()),
	}
}

type stats struct {
	generatedN, genErrors, genNanos atomic.Int64
	issued, decrypts, expired, lost atomic.Int64
}

func (s *stats) generated(d time.Duration, err error) {
	if err != nil {
		s.genErrors.Add(1)
		return
	}
	s.generatedN.Add(1)
	s.genNanos.Add(int64(d))
}

const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// newID returns n characters of [A-Za-z0-9] from crypto/rand, without
// modulo bias.
func newID(n int) (string, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, n+n/4+8)
	for len(out) < n {
		if _, err := rand.Read(buf); err != nil {
			return "", fmt.Errorf("failed to read random bytes: %w", err)
		}
		for _, b := range buf {
			if b < 248 && len(out) < n { // 248 = 4*62
				out = append(out, alphabet[b%62])
			}
		}
	}
	return string(out), nil
}
