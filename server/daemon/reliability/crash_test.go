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

	"github.com/keyissuer/keyissuer/issuer/store"
)

// The crash harness: keyissuerd in token storage under concurrent applies
// and decrypts, killed with SIGKILL at a random instant or inside a chosen
// operation, restarted, and checked after every kill:
//
//  1. no key decrypts twice: neither in the answers the clients got, nor in
//     the ledger of decrypts that reached the token, kept across all runs;
//  2. no object leaks: whatever the kill left in the token (the pool's keys,
//     a claimed key's objects, half a destroyed pair) is gone once the next
//     daemon has started, and after the last, orderly stop the token holds
//     exactly the keys of issued records;
//  3. no record is lost or corrupted: the store opens after every kill,
//     every uniqueId a client was given is there in a valid state with its
//     salt, a key whose decrypt succeeded is never issued again, and an
//     issued key still has both halves in the token.

// crashPoints are where a planned kill lands, with the longest jitter
// after reaching the point: the kill comes while the operation runs.
var crashPoints = []struct {
	point  string
	jitter time.Duration
}{
	{"random", 0},                             // the parent kills at a random instant
	{"generate", 250 * time.Millisecond},      // inside C_GenerateKeyPair
	{"create", 3 * time.Millisecond},          // inside the commit of a new record
	{"to-consuming", 3 * time.Millisecond},    // inside the claim's commit
	{"claim", 2 * time.Millisecond},           // between the claim and the token's decrypt
	{"decrypt", 3 * time.Millisecond},         // inside the token's decrypt
	{"decrypted", 0},                          // decrypted, not yet destroyed or answered
	{"destroy", 3 * time.Millisecond},         // inside the destroy of the two halves
	{"destroyed", 0},                          // destroyed, record not yet consumed
	{"settle-consumed", 5 * time.Millisecond}, // around the final, queued commit
	{"audited", 0},                            // the decrypt's audit line durable, the answer not written
	{"to-consumed", 3 * time.Millisecond},     // inside start-up reconciliation's or the reaper's commit
	{"to-expired", 3 * time.Millisecond},      // inside the reaper's commit
	{"reconcile", 2 * time.Millisecond},       // inside start-up reconciliation
}

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

	// figures
	kills                       map[string]int
	applies, applyRefusals      int
	decryptOK, decryptRefused   int
	halfDestroyed, claimsCut    int
	orphans, interruptedReplies int
	expiredSeen, abandoned      int
	unavailable                 int
}

func TestCrashCycles(t *testing.T) {
	cycles := 20
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
	})
	r := &crashRun{
		t: t, f: f, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), ttl: ttl,
		keys: map[string]*crashKey{}, successes: map[string]int{}, mustVanish: map[string]bool{},
		kills: map[string]int{},
	}
	start := time.Now()
	for cycle := 1; cycle <= cycles; cycle++ {
		r.cycle(cycle)
		if t.Failed() {
			t.Fatalf("cycle %d failed (CRASH_SEED=%d)", cycle, seed)
		}
		if cycle%50 == 0 {
			t.Logf("%d cycles in %s; kills by point %v", cycle, time.Since(start).Round(time.Second), r.kills)
		}
	}
	r.finish()
	if t.Failed() {
		t.Fatalf("the last restart or the orderly stop failed (CRASH_SEED=%d)", seed)
	}
	t.Logf("crash harness: %d cycles in %s; kills by point %v; %d keys issued (%d left to expire), %d applies refused (pool empty); "+
		"%d decrypts succeeded, %d refused; after kills: %d orphaned pool keys, %d claims cut short, "+
		"%d half-destroyed pairs, %d answers lost; %d answered KEY_EXPIRED, %d HSM_UNAVAILABLE; 0 double decrypts, 0 leaked objects, 0 lost records",
		cycles, time.Since(start).Round(time.Second), r.kills, r.applies, r.abandoned, r.applyRefusals,
		r.decryptOK, r.decryptRefused, r.orphans, r.claimsCut, r.halfDestroyed, r.interruptedReplies, r.expiredSeen, r.unavailable)
}

// cycle starts the daemon with a crash planned, drives it until it dies
// (or kills it), and checks the promises.
func (r *crashRun) cycle(n int) {
	t := r.t
	cp := crashPoints[r.rng.IntN(len(crashPoints))]
	plan := cp.point
	var env []string
	if cp.point != "random" {
		jitter := time.Duration(0)
		if cp.jitter > 0 {
			jitter = time.Duration(r.rng.Int64N(int64(cp.jitter)))
		}
		env = append(env, fmt.Sprintf("%s=%s:%d:%s", crashEnv, cp.point, 1+r.rng.IntN(2), jitter))
	}
	p, err := r.f.start(env...)
	switch {
	case errors.Is(err, errExited) && r.planned(p):
		r.kills[plan]++ // killed as it started: reconciliation, the first generations
		r.afterKill(p)
		return
	case err != nil:
		t.Fatalf("cycle %d: %v\n%s", n, err, p.stderr.String())
	}
	r.checkVanished(n)
	// A full pool, so that applies succeed: a pool does not survive a
	// restart, and fills at the token's pace.
	for deadline := time.Now().Add(hangLimit); p.alive() && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if h, _, err := p.health(); err == nil && h.PoolReady >= h.PoolSize {
			break
		}
	}

	// Drive the daemon for a while; the plan may kill it meanwhile.
	window := time.Duration(200+r.rng.IntN(600)) * time.Millisecond
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
	if !p.alive() && r.planned(p) {
		r.kills[plan]++
	} else if !p.alive() {
		t.Errorf("cycle %d: the daemon died unplanned: %v\n%s", n, p.err, p.stderr.String())
	} else {
		r.kills["random"]++ // the plan did not come up: a kill at a random instant
	}
	p.kill()
	close(stop)
	wg.Wait()
	r.afterKill(p)
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
	expired := time.Since(k.got) > r.ttl-time.Second
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
			t.Errorf("decrypt %s: KEY_EXPIRED %s after it was issued, ttl %s", id, time.Since(k.got), r.ttl)
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
	objs := r.f.tokenObjects()

	for _, id := range ids {
		k := r.keys[id]
		rec, ok := recs[id]
		switch {
		case !ok:
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
				t.Errorf("LOST KEY: %s is issued, and the token has %d of its 2 objects", id, objs[id])
			}
		case store.Consuming, store.Consumed, store.Expired:
		case store.Lost:
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
	attempts, oks := r.f.decryptLedger()
	for id, n := range attempts {
		if n > 1 || oks[id] > 1 {
			t.Errorf("DOUBLE DECRYPT: %s reached the token's decrypt %d times (%d succeeded)", id, n, oks[id])
		}
	}
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
			r.t.Errorf("LEAKED OBJECTS: cycle %d: %d objects of %s survived the restart", cycle, objs[id], id)
		}
	}
	clear(r.mustVanish)
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
	time.Sleep(500 * time.Millisecond) // two reaper passes: what expired is destroyed
	stopped := time.Now()
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
			if rec.ExpiresAt.Before(stopped.Add(-time.Second)) {
				t.Errorf("%s expired at %s and was not reaped before the stop at %s", rec.UniqueID, rec.ExpiresAt, stopped)
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
		t.Errorf("LEAKED OBJECTS after the orderly stop: %v", leaked)
	}
	for id, n := range r.successes {
		if n > 1 {
			t.Errorf("DOUBLE DECRYPT: %s", id)
		}
	}
}
