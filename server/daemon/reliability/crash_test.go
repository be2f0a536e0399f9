package reliability

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// The crash harness: keyissuerd in token storage under concurrent applies
// and decrypts, killed with SIGKILL at a random instant or inside a chosen
// operation, restarted, and checked after every kill:
//
//  1. no key decrypts twice: neither in the answers the clients got, nor in
//     the ledger of decrypts that reached the token, kept across all runs;
//  2. no object leaks: whatever the kill left in the token (the pool's keys,
//     a claimed key's objects, half a destroyed pair, an object SoftHSM was
//     still making) is gone once the next daemon has started, and after
//     the last, orderly stop the token holds exactly the keys of issued
//     records;
//  3. no record is lost or corrupted: the store opens after every kill,
//     every uniqueId a client was given is there in a valid state with its
//     salt, a key whose decrypt succeeded is never issued again, and an
//     issued key still has both halves in the token.

// crashPoints are where a planned kill lands, with the longest jitter
// after reaching the point: the kill comes while the operation runs. The
// aimed phase takes them in this order, each until it fires, with no
// jitter: "claim" and "decrypt" kill after a claim, before the token
// decrypts, so the next start's reconciliation commits "to-consumed" and
// destroys the key's objects ("reconcile"); by "to-expired" keys abandoned
// in earlier cycles are past their TTL.
var crashPoints = []struct {
	point  string
	jitter time.Duration
}{
	{"random", 0},                             // the parent kills at a random instant
	{"generate", 250 * time.Millisecond},      // inside C_GenerateKeyPair
	{"create", 3 * time.Millisecond},          // inside the commit of a new record
	{"to-consuming", 3 * time.Millisecond},    // inside the claim's commit
	{"claim", 2 * time.Millisecond},           // between the claim and the token's decrypt
	{"to-consumed", 3 * time.Millisecond},     // inside start-up reconciliation's or the reaper's commit
	{"decrypt", 3 * time.Millisecond},         // inside the token's decrypt
	{"reconcile", 2 * time.Millisecond},       // inside start-up reconciliation's destroy
	{"decrypted", 0},                          // decrypted, not yet destroyed or answered
	{"destroy", 3 * time.Millisecond},         // inside the destroy of the two halves
	{"destroyed", 0},                          // destroyed, record not yet consumed
	{"settle-consumed", 5 * time.Millisecond}, // around the final, queued commit
	{"to-expired", 3 * time.Millisecond},      // inside the reaper's commit
}

// setup is, for a point that only the next start reaches, the aimed kill
// that leaves it something to do: a claimed key whose record is consuming
// and whose objects are whole. A miss of the point runs its setup again.
var setup = map[string]string{
	"to-consumed": "claim",
	"reconcile":   "decrypt",
}

// The floors of a run of the crash harness: a run that issued fewer keys
// than cycles/minIssuedDiv, or saw fewer successful decrypts than
// cycles/minDecryptedDiv, did not exercise what it claims to, and fails.
// The aimed phase's kills come at the first visit of their point and do
// little else; a random cycle issues some 2 keys (the pool, refilled at the
// token's pace) and decrypts 1 or 2 on 2 busy cores: a run of 30 cycles
// issues some 50 keys and decrypts some 30.
const (
	minIssuedDiv    = 2
	minDecryptedDiv = 4
)

// aimTries is how many cycles the aimed phase gives a point to fire, and
// aimLimit how long each drives the daemon waiting for it.
const (
	aimTries = 3
	aimLimit = 30 * time.Second
)

// crashKey is a key the harness holds, and what it knows of its fate.
type crashKey struct {
	keyInfo
	password string
	// attempted: a decrypt was sent and its answer lost to a kill, or a
	// wrong ciphertext was sent: the key may be consumed.
	attempted bool
	done      bool // its one decrypt was answered: consumed or refused
	succeeded bool
	queued    bool // in crashRun.pending
}

// crashRun is the state of the harness across cycles.
type crashRun struct {
	t   *testing.T
	f   *fixture
	rng *rand.Rand
	ttl time.Duration

	mu         sync.Mutex
	keys       map[string]*crashKey
	pending    []string // keys that may still decrypt
	successes  map[string]int
	mustVanish map[string]bool // objects a kill left that the next start must destroy
	halfMade   int             // objects a kill left half-made (no label nor id): the same
	seeded     bool            // the first kill's half-made objects were made sure of

	// figures
	plan                        string         // the crash point of the current cycle
	kills                       map[string]int // planned kills that fired, by point; "random": the parent's
	missed                      map[string]int // planned kills whose point did not come up
	aimed                       map[string]int // cycles of the aimed phase, by point
	applies, applyRefusals      int
	decryptOK, decryptRefused   int
	halfDestroyed, claimsCut    int
	halfMadeSeen                int // half-made objects kills left (each destroyed by the next start)
	orphans, interruptedReplies int
	expiredSeen, abandoned      int
	unavailable                 int
	doubles, leaked, lost       int // what the checks found: each also fails the test
}

func TestCrashCycles(t *testing.T) {
	cycles := 30 // 12 aimed, then random
	if v := os.Getenv("SOAK_CYCLES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("SOAK_CYCLES=%q: want a positive number", v)
		}
		cycles = n
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("CRASH_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("CRASH_SEED=%q: %v", v, err)
		}
		seed = n
	}
	t.Logf("CRASH_SEED=%d SOAK_CYCLES=%d", seed, cycles)

	const ttl = 10 * time.Second // the shortest the config allows: keys expire under the harness too
	f := newFixture(t, fixtureConfig{
		storage: "token", poolSize: 2, generators: 1,
		ttl: ttl.String(), reap: "200ms", applyWait: "300ms",
		dedicated: true, // one daemon at a time: half-made objects go at start-up
	})
	r := &crashRun{
		t: t, f: f, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), ttl: ttl,
		keys: map[string]*crashKey{}, successes: map[string]int{}, mustVanish: map[string]bool{},
		kills: map[string]int{}, missed: map[string]int{}, aimed: map[string]int{},
	}
	start := time.Now()
	// The aimed phase: every point in turn, each until it fires (at most
	// aimTries cycles); then random points until the run has its cycles.
	var queue []string
	for _, cp := range crashPoints[1:] {
		queue = append(queue, cp.point)
	}
	cycle := 0
	for ; cycle < cycles || len(queue) > 0; cycle++ {
		if len(queue) > 0 {
			point := queue[0]
			r.aimed[point]++
			switch fired := r.cycle(cycle+1, point, 0, true); {
			case fired || r.aimed[point] == aimTries:
				queue = queue[1:]
			case setup[point] != "":
				queue = append([]string{setup[point]}, queue...)
			}
		} else {
			cp := crashPoints[r.rng.IntN(len(crashPoints))]
			var jitter time.Duration
			if cp.jitter > 0 {
				jitter = time.Duration(r.rng.Int64N(int64(cp.jitter)))
			}
			r.cycle(cycle+1, cp.point, jitter, false)
		}
		if t.Failed() {
			t.Fatalf("cycle %d failed, its crash point %s (CRASH_SEED=%d)", cycle+1, r.plan, seed)
		}
		if (cycle+1)%50 == 0 {
			t.Logf("%d cycles in %s; kills by point %v", cycle+1, time.Since(start).Round(time.Second), r.kills)
		}
	}
	r.finish()
	if t.Failed() {
		t.Fatalf("the last restart or the orderly stop failed (CRASH_SEED=%d)", seed)
	}
	// Every point fired, and the run did enough to mean something.
	for _, cp := range crashPoints[1:] {
		if r.kills[cp.point] == 0 {
			t.Errorf("UNREACHED: the crash point %q never fired (aimed at it in %d cycles)", cp.point, r.aimed[cp.point])
		}
	}
	if r.applies < cycle/minIssuedDiv {
		t.Errorf("UNEXERCISED: %d keys issued in %d cycles; the floor is %d", r.applies, cycle, cycle/minIssuedDiv)
	}
	if r.halfMadeSeen < 3 {
		t.Errorf("UNEXERCISED: kills left %d half-made objects; the first alone is made to leave 3", r.halfMadeSeen)
	}
	if r.decryptOK < cycle/minDecryptedDiv {
		t.Errorf("UNEXERCISED: %d decrypts succeeded in %d cycles; the floor is %d", r.decryptOK, cycle, cycle/minDecryptedDiv)
	}
	t.Logf("crash harness: %d cycles in %s; kills by point %v; planned points not reached (the parent killed instead) %v; %d keys issued (%d left to expire), %d applies refused (pool empty); "+
		"%d decrypts succeeded, %d refused; after kills: %d orphaned pool keys, %d claims cut short, "+
		"%d half-destroyed pairs, %d half-made objects, %d answers lost; %d answered KEY_EXPIRED, %d HSM_UNAVAILABLE; %d double decrypts, %d leaked objects, %d lost records (CRASH_SEED=%d)",
		cycle, time.Since(start).Round(time.Second), r.kills, r.missed, r.applies, r.abandoned, r.applyRefusals,
		r.decryptOK, r.decryptRefused, r.orphans, r.claimsCut, r.halfDestroyed, r.halfMadeSeen, r.interruptedReplies, r.expiredSeen, r.unavailable,
		r.doubles, r.leaked, r.lost, seed)
}

// cycle starts the daemon with a crash planned at point (or none, for
// "random"), drives it until it dies or the parent kills it, checks the
// promises, and reports whether the planned kill fired. In the random
// phase the parent kills after a random window, the plan come up or not;
// an aimed cycle drives the daemon until its point fires, or fails the
// point after aimLimit.
func (r *crashRun) cycle(n int, point string, jitter time.Duration, aimed bool) (fired bool) {
	t := r.t
	r.plan = point
	var env []string
	nth := 1
	if !aimed {
		nth += r.rng.IntN(2)
	}
	if point != "random" {
		env = append(env, fmt.Sprintf("%s=%s:%d:%s", crashEnv, point, nth, jitter))
	}
	p, err := r.f.start(env...)
	switch {
	case errors.Is(err, errExited) && r.planned(p):
		r.kills[point]++ // killed as it started: reconciliation, the first generations
		r.afterKill(p)
		return true
	case err != nil:
		t.Fatalf("cycle %d: %v\n%s", n, err, p.stderr.String())
	}
	r.checkVanished(n)
	// A full pool, so that applies succeed: a pool does not survive a
	// restart, and fills at the token's pace. A planned kill may come
	// first.
	waitFor(t, fmt.Sprintf("cycle %d: a full pool", n), func() bool {
		h, _, err := p.health()
		return !p.alive() || err == nil && h.PoolReady >= h.PoolSize
	})
	if p.alive() {
		p.scrapeAdmin() // the secret scans see the metrics of a daemon about to be killed
	}

	// Drive the daemon; the plan may kill it meanwhile.
	window := time.Duration(200+r.rng.IntN(600)) * time.Millisecond
	if aimed {
		window = aimLimit
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		rng := rand.New(rand.NewPCG(r.rng.Uint64(), uint64(w)))
		wg.Go(func() { r.work(p, rng, stop) })
	}
	select {
	case <-p.exited:
	case <-time.After(window):
	}
	switch {
	case !p.alive() && r.planned(p):
		r.kills[point]++
		fired = true
	case !p.alive():
		t.Errorf("cycle %d: the daemon died unplanned: %v\n%s", n, p.err, p.stderr.String())
	case point == "random":
		r.kills["random"]++
		fired = true
	case aimed:
		r.missed[point]++
		t.Logf("cycle %d: the crash point %q did not fire within %s; killing", n, point, aimLimit)
	default:
		r.missed[point]++
		r.kills["random"]++ // the plan did not come up: a kill at a random instant
	}
	p.kill()
	close(stop)
	wg.Wait()
	r.afterKill(p)
	return fired
}

// planned waits for the daemon's death and reports whether it announced
// it: a planned crash.
func (r *crashRun) planned(p *proc) bool {
	<-p.exited
	return p.crashed.Load()
}

// work is one client: applies, decrypts right and wrong, and repeats, until
// stop or the daemon's death.
func (r *crashRun) work(p *proc, rng *rand.Rand, stop chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case <-p.exited:
			return
		default:
		}
		if rng.IntN(10) < 4 {
			r.apply(p, rng)
			continue
		}
		id, ok := r.take(rng)
		if !ok {
			r.apply(p, rng)
			continue
		}
		switch x := rng.IntN(20); {
		case x < 2:
			r.decryptWrong(p, id)
		case x < 5:
			r.decryptConcurrently(p, id, 3)
		default:
			r.decryptRight(p, id)
		}
		if rng.IntN(10) == 0 {
			r.decryptAgain(p)
		}
	}
}

func (r *crashRun) apply(p *proc, rng *rand.Rand) {
	res, err := p.apply("")
	if err != nil {
		if !p.dies() {
			r.t.Errorf("apply: %v", err)
		}
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case res.status == http.StatusOK && res.code == "SUCCESS":
		k := &crashKey{keyInfo: res.key, password: r.f.password()}
		r.keys[k.UniqueID] = k
		r.applies++
		if rng.IntN(8) == 0 {
			r.abandoned++ // never used: the reaper expires it
			break
		}
		k.queued = true
		r.pending = append(r.pending, k.UniqueID)
	case res.status == http.StatusOK && res.resultStatus == "U":
		r.applyRefusals++ // the pool is empty: retry later
	default:
		r.t.Errorf("apply: HTTP %d %s/%s", res.status, res.code, res.resultStatus)
	}
}

// take removes a random key that may still decrypt from the pending list.
func (r *crashRun) take(rng *rand.Rand) (string, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.pending) == 0 {
		return "", false
	}
	i := rng.IntN(len(r.pending))
	id := r.pending[i]
	r.keys[id].queued = false
	r.pending[i] = r.pending[len(r.pending)-1]
	r.pending = r.pending[:len(r.pending)-1]
	return id, true
}

// decryptRight sends the right ciphertext and judges the answer by what
// the harness knows of the key.
func (r *crashRun) decryptRight(p *proc, id string) {
	r.mu.Lock()
	k := r.keys[id]
	r.mu.Unlock()
	res, err := p.decrypt(id, seal(r.t, k.keyInfo, k.password))
	r.judge(p, k, res, err, false)
}

// decryptWrong sends a ciphertext with the wrong salt: it must consume the
// key and fail.
func (r *crashRun) decryptWrong(p *proc, id string) {
	r.mu.Lock()
	k := r.keys[id]
	r.mu.Unlock()
	bad := k.keyInfo
	bad.Salt = "WRONGSALT000"
	res, err := p.decrypt(id, seal(r.t, bad, k.password))
	r.judge(p, k, res, err, true)
}

// decryptConcurrently sends the right ciphertext n times at once: at most
// one succeeds, and unless the daemon dies, exactly one.
func (r *crashRun) decryptConcurrently(p *proc, id string, n int) {
	r.mu.Lock()
	k := r.keys[id]
	fresh := !k.attempted
	k.attempted = true // the siblings consume it
	r.mu.Unlock()
	ct := seal(r.t, k.keyInfo, k.password)
	var (
		wg             sync.WaitGroup
		mu             sync.Mutex
		ok, lost, gone int
	)
	for range n {
		wg.Go(func() {
			res, err := p.decrypt(id, ct)
			r.judge(p, k, res, err, false)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil, res.status == http.StatusServiceUnavailable:
				lost++ // no answer, or the key is untouched
			case res.status == http.StatusOK:
				ok++
			case res.code == "KEY_EXPIRED":
				gone++
			}
		})
	}
	wg.Wait()
	if fresh && lost == 0 && gone == 0 && ok != 1 {
		r.t.Errorf("%d concurrent decrypts of %s: %d succeeded, want exactly 1", n, id, ok)
	}
}

// decryptAgain retries a key whose decrypt succeeded: always refused.
func (r *crashRun) decryptAgain(p *proc) {
	r.mu.Lock()
	var k *crashKey
	for _, c := range r.keys {
		if c.succeeded {
			k = c
			break
		}
	}
	r.mu.Unlock()
	if k == nil {
		return
	}
	res, err := p.decrypt(k.UniqueID, seal(r.t, k.keyInfo, k.password))
	if err != nil {
		return // the daemon died meanwhile
	}
	if res.status != http.StatusGone || res.code != "KEY_CONSUMED" {
		r.t.Errorf("decrypt of %s after its success: %d %s %q; want 410 KEY_CONSUMED", k.UniqueID, res.status, res.code, res.password)
	}
}

// judge checks one decrypt answer against the key's history.
func (r *crashRun) judge(p *proc, k *crashKey, res decryptResult, err error, wrong bool) {
	if err != nil && !p.dies() {
		r.t.Errorf("decrypt %s: %v", k.UniqueID, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.t
	id := k.UniqueID
	// The daemon set the key's expiry after the apply was sent: a key
	// answered KEY_EXPIRED before asked+ttl was not expired.
	expired := !time.Now().Before(k.asked.Add(r.ttl))
	switch {
	case err != nil:
		// The answer was lost to the kill: the decrypt may or may not
		// have claimed the key. Try again later.
		r.interruptedReplies++
		k.attempted = true
		if !k.done && !k.queued {
			k.queued = true
			r.pending = append(r.pending, id)
		}
	case res.status == http.StatusOK:
		r.successes[id]++
		if r.successes[id] > 1 {
			r.doubles++
			t.Errorf("DOUBLE DECRYPT: %s succeeded %d times", id, r.successes[id])
		}
		if wrong || res.password != k.password {
			t.Errorf("decrypt %s answered 200 with the wrong password (wrong ciphertext sent: %v)", id, wrong)
		}
		k.done, k.succeeded = true, true
		r.decryptOK++
	case res.status == http.StatusGone && res.code == "KEY_CONSUMED":
		// Only a decrypt the harness sent can consume a key: one whose
		// answer a kill cut short, or a concurrent one.
		if !k.attempted && !k.done {
			t.Errorf("decrypt %s: KEY_CONSUMED, and no decrypt of it was ever answered or cut short", id)
		}
		k.done = true
		r.decryptRefused++
	case res.status == http.StatusGone && res.code == "KEY_EXPIRED":
		if !expired {
			t.Errorf("decrypt %s: KEY_EXPIRED %s after it was asked for, ttl %s", id, time.Since(k.asked), r.ttl)
		}
		k.done = true
		r.expiredSeen++
	case res.status == http.StatusServiceUnavailable && res.code == "HSM_UNAVAILABLE":
		// The key is untouched: try again later. (The harness lists the
		// token while a daemon runs, which can cost SoftHSM a short false
		// outage: see RELIABILITY.md.)
		r.unavailable++
		if !k.queued {
			k.queued = true
			r.pending = append(r.pending, id)
		}
	case res.status == http.StatusUnprocessableEntity && res.code == "DECRYPT_FAILED" && wrong:
		k.done = true
		r.decryptRefused++
	default:
		t.Errorf("decrypt %s (wrong ciphertext: %v): %d %s; the key must decrypt once, or be refused as consumed or expired",
			id, wrong, res.status, res.code)
		k.done = true
	}
	if wrong && res.status != http.StatusServiceUnavailable {
		k.attempted = true
	}
}

// afterKill checks the store, the token and the ledger with the daemon
// dead, and notes what the next start must clean up.
func (r *crashRun) afterKill(p *proc) {
	t := r.t
	<-p.exited
	r.mu.Lock()
	defer r.mu.Unlock()

	ids := slices.Collect(maps.Keys(r.keys))
	recs, active := r.f.records(ids) // the store opens after the kill
	if !r.seeded {
		// A kill lands inside SoftHSM's writes of a new object only now
		// and then: the first kill of every run leaves one object of each
		// half-made shape for certain, exactly as such a kill would.
		for _, shape := range []hsmtest.HalfMade{hsmtest.HalfMadeClassless, hsmtest.HalfMadePublic, hsmtest.HalfMadePrivate} {
			hsmtest.LeaveHalfMade(t, r.f.soft, shape)
		}
		r.seeded = true
	}
	objs := r.f.tokenObjects()
	r.halfMade = r.f.halfMadeLeft
	r.halfMadeSeen += r.halfMade

	for _, id := range ids {
		k := r.keys[id]
		rec, ok := recs[id]
		switch {
		case !ok:
			r.lost++
			t.Errorf("LOST RECORD: %s was issued, and the store does not have it", id)
			continue
		case rec.Salt != k.Salt || rec.UniqueID != id:
			t.Errorf("CORRUPT RECORD: %s: %+v, issued with salt %s", id, rec, k.Salt)
		}
		switch rec.State {
		case store.Issued:
			if k.succeeded {
				t.Errorf("DOUBLE DECRYPT RISK: %s decrypted, and its record is issued again", id)
			}
			if objs[id] != 2 {
				r.lost++
				t.Errorf("LOST KEY: %s is issued, and the token has %d of its 2 objects", id, objs[id])
			}
		case store.Consuming, store.Consumed, store.Expired:
		case store.Lost:
			r.lost++
			t.Errorf("LOST KEY: %s is marked lost; in token storage no key is lost to a crash", id)
		default:
			t.Errorf("CORRUPT RECORD: %s in unknown state %q", id, rec.State)
		}
	}
	issued := map[string]bool{}
	for _, rec := range active {
		if rec.State == store.Issued {
			issued[rec.UniqueID] = true
		}
		if rec.State == store.Consuming {
			r.claimsCut++
		}
	}
	for id, n := range objs {
		if issued[id] {
			continue
		}
		// Left by the kill: the next start must destroy it.
		r.mustVanish[id] = true
		if _, known := recs[id]; !known && !r.known(id, active) {
			r.orphans++
		}
		if n == 1 {
			r.halfDestroyed++
		}
	}
	// The ledger, re-read after every kill, against what the clients saw.
	r.doubles += r.f.checkLedger()
}

func (r *crashRun) known(id string, active []store.Record) bool {
	for _, rec := range active {
		if rec.UniqueID == id {
			return true
		}
	}
	return false
}

// checkVanished checks, once a daemon serves, that its start-up destroyed
// what the last kill left in the token.
func (r *crashRun) checkVanished(cycle int) {
	objs := r.f.tokenObjects()
	r.mu.Lock()
	defer r.mu.Unlock()
	for id := range r.mustVanish {
		if objs[id] > 0 {
			r.leaked++
			r.t.Errorf("LEAKED OBJECTS: cycle %d: %d objects of %s survived the restart", cycle, objs[id], id)
		}
	}
	clear(r.mustVanish)
	// Half-made objects have no id to find them by: the daemon that now
	// serves must say it destroyed exactly as many at start-up, and left
	// none (its own generations since make a live count meaningless).
	r.f.mu.Lock()
	p := r.f.procs[len(r.f.procs)-1]
	r.f.mu.Unlock()
	destroyed, left, ok := p.reconciled()
	switch {
	case !ok:
		r.t.Errorf("cycle %d: the daemon logged no reconciliation with its half-made objects", cycle)
	case destroyed != r.halfMade || left != 0:
		r.leaked += max(r.halfMade-destroyed, left, 1)
		r.t.Errorf("LEAKED OBJECTS: cycle %d: the kill left %d half-made objects (no label nor id); the next start destroyed %d and left %d",
			cycle, r.halfMade, destroyed, left)
	}
	r.halfMade = 0
}

// finish starts a last daemon, decrypts what can still decrypt, stops it
// in order and checks that the token holds exactly the issued keys.
func (r *crashRun) finish() {
	t := r.t
	p := r.f.mustStart()
	r.checkVanished(0)
	for {
		id, ok := r.take(rand.New(rand.NewPCG(1, 2)))
		if !ok {
			break
		}
		r.decryptRight(p, id)
	}
	// What expired before cut is destroyed once a reaper pass has started
	// after cut: two passes end after it, the second began after the first.
	cut := time.Now()
	var first time.Time
	waitFor(t, "two reaper passes after the last decrypt", func() bool {
		last := p.lastReap()
		if first.IsZero() && last.After(cut) {
			first = last
		}
		return !first.IsZero() && last.After(first)
	})
	p.stop()

	r.mu.Lock()
	defer r.mu.Unlock()
	_, active := r.f.records(nil)
	objs := r.f.tokenObjects()
	issued := map[string]bool{}
	for _, rec := range active {
		switch rec.State {
		case store.Issued:
			issued[rec.UniqueID] = true
			if objs[rec.UniqueID] != 2 {
				t.Errorf("LOST KEY: %s is issued and has %d objects", rec.UniqueID, objs[rec.UniqueID])
			}
			if rec.ExpiresAt.Before(cut) {
				t.Errorf("%s expired at %s and was not reaped by the passes after %s", rec.UniqueID, rec.ExpiresAt, cut)
			}
		case store.Consuming:
			t.Errorf("%s is still consuming after a restart and an orderly stop", rec.UniqueID)
		}
	}
	var leaked []string
	for id := range objs {
		if !issued[id] {
			leaked = append(leaked, id)
		}
	}
	sort.Strings(leaked)
	if len(leaked) > 0 {
		r.leaked += len(leaked)
		t.Errorf("LEAKED OBJECTS after the orderly stop: %v", leaked)
	}
	for id, n := range r.successes {
		if n > 1 {
			r.doubles++
			t.Errorf("DOUBLE DECRYPT: %s", id)
		}
	}
	// The ledger again, after the last daemon's decrypts.
	r.doubles += r.f.checkLedger()
}
