package reliability

import (
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// A real token fault under a running keyissuerd: the SoftHSM token
// directory, which the daemon finds through the SOFTHSM2_CONF it inherits,
// is moved away and brought back. While it is gone, applies answer
// UNKNOWN_EXCEPTION/U and decrypts HSM_UNAVAILABLE 503 without using the
// key; the daemon recovers by itself once it is back; a destroy that
// failed in the outage is retried, and its key never decrypts meanwhile.

func TestTokenOutage(t *testing.T) {
	outages := 1
	if v := os.Getenv("SOAK_CYCLES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("SOAK_CYCLES=%q: want a positive number", v)
		}
		outages = max(outages, n/10)
	}
	for _, storage := range []string{"token", "session"} {
		t.Run(storage, func(t *testing.T) {
			f := newFixture(t, fixtureConfig{
				storage: storage, poolSize: 2, generators: 1,
				ttl: "1m", reap: "100ms", applyWait: "500ms",
			})
			p := f.mustStart(pauseEnv + "=decrypted:" + f.dir)
			n := outages
			if storage == "session" {
				n = 1
			}
			for i := range n {
				outage(t, f, p, storage, i+1)
				if t.Failed() {
					t.FailNow()
				}
			}
			p.stop()
			f.checkLedger()
			if storage == "token" {
				if objs := f.tokenObjects(); len(objs) != 0 {
					t.Errorf("LEAKED OBJECTS after the orderly stop: %v", objs)
				}
			}
			t.Logf("%d token outages survived in %s storage", n, storage)
		})
	}
}

// outage takes the token away under p once, and checks the daemon through
// it and after it.
func outage(t *testing.T, f *fixture, p *proc, storage string, n int) {
	waitFor(t, "a full pool", func() bool {
		h, _, err := p.health()
		return err == nil && h.TokenReady && h.PoolReady == h.PoolSize
	})
	type held struct {
		k  keyInfo
		pw string
	}
	issue := func() held {
		t.Helper()
		var r applyResult
		waitFor(t, "an apply to succeed", func() bool {
			var err error
			r, err = p.apply("")
			if err != nil {
				t.Fatal(err)
			}
			return r.code == "SUCCESS"
		})
		return held{r.key, f.password()}
	}
	waiting := issue()   // asks to decrypt during the outage
	untouched := issue() // left alone through the outage
	var restore func()
	var paused held // token storage: decrypts, then the token goes before its destroy
	start := time.Now()
	if storage == "token" {
		paused = issue()
		// paused's decrypt stops after the token decrypted, before the
		// destroy: the token goes away right there.
		hold := filepath.Join(f.dir, "pause-"+paused.k.UniqueID)
		if err := os.WriteFile(hold, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		pausedDone := make(chan decryptResult, 1)
		go func() {
			res, err := p.decrypt(paused.k.UniqueID, seal(t, paused.k, paused.pw))
			if err != nil {
				t.Errorf("decrypt %s: %v", paused.k.UniqueID, err)
			}
			pausedDone <- res
		}()
		waitEvent(t, p, "paused decrypted "+paused.k.UniqueID)
		restore = hsmtest.MoveTokenDir(t)
		start = time.Now()

		// The first call to meet the outage: the key is claimed, the
		// token fails, the key is given back.
		if res, err := p.decrypt(waiting.k.UniqueID, seal(t, waiting.k, waiting.pw)); err != nil ||
			res.status != http.StatusServiceUnavailable || res.code != "HSM_UNAVAILABLE" {
			t.Errorf("outage %d: decrypt as the token goes: %+v, %v; want 503 HSM_UNAVAILABLE", n, res, err)
		}
		// Let paused's decrypt go on: its destroy fails in the outage.
		os.Remove(hold)
		if res := <-pausedDone; res.status != http.StatusOK || res.password != paused.pw {
			t.Errorf("outage %d: the paused decrypt: %d %s; want 200 and its password", n, res.status, res.code)
		}
	} else {
		// Session objects live in the token's memory and keep working
		// without its directory: the daemon finds the outage through the
		// token's health, in its periodic check.
		restore = hsmtest.MoveTokenDir(t)
	}
	waitFor(t, "the daemon to report the token down", func() bool {
		_, st, err := p.health()
		return err == nil && st == http.StatusServiceUnavailable
	})

	// While the token is away: requests, and failed attempts to recover.
	stillDown := strings.Count(p.stderr.String(), `"msg":"token still down"`)
	for range 3 {
		r, err := p.apply("")
		if err != nil || r.status != http.StatusOK || r.code != "UNKNOWN_EXCEPTION" || r.resultStatus != "U" {
			t.Errorf("outage %d: apply: %+v, %v; want 200 UNKNOWN_EXCEPTION/U", n, r, err)
		}
		// In session storage the first recovery attempt resets the
		// module, and the session objects die with it: from then on the
		// truth is KEY_LOST, which no retry would change.
		res, err := p.decrypt(waiting.k.UniqueID, seal(t, waiting.k, waiting.pw))
		if err != nil || (res.status != http.StatusServiceUnavailable || res.code != "HSM_UNAVAILABLE") &&
			(storage != "session" || res.status != http.StatusGone || res.code != "KEY_LOST") {
			t.Errorf("outage %d: decrypt: %+v, %v; want 503 HSM_UNAVAILABLE", n, res, err)
		}
		if storage == "token" {
			// The key whose destroy failed never decrypts again.
			res, err = p.decrypt(paused.k.UniqueID, seal(t, paused.k, paused.pw))
			if err != nil || res.status != http.StatusGone || res.code != "KEY_CONSUMED" {
				t.Errorf("outage %d: decrypt of the key whose destroy failed: %+v, %v; want 410 KEY_CONSUMED", n, res, err)
			}
		}
		// Another recovery attempt fails (the daemon logs each at debug
		// level) before the next round.
		waitFor(t, "another failed recovery attempt", func() bool {
			p.apply("") // a call to the token: an attempt once the backoff has passed
			n := strings.Count(p.stderr.String(), `"msg":"token still down"`)
			if n > stillDown {
				stillDown = n
				return true
			}
			return false
		})
	}
	h, _, err := p.health()
	if err != nil || h.TokenReady || (storage == "token" && h.PendingDestroys < 1) {
		t.Errorf("outage %d: health %+v, %v; want the token down and a destroy pending", n, h, err)
	}
	for _, k := range []held{waiting, untouched} {
		if st, err := p.state(k.k.UniqueID); err != nil || st != "issued" && (storage != "session" || st != "lost") {
			t.Errorf("outage %d: %s is %q, %v; want issued, untouched", n, k.k.UniqueID, st, err)
		}
	}

	restore()
	back := time.Now()
	waitFor(t, "the daemon to recover", func() bool {
		h, st, err := p.health()
		return err == nil && st == http.StatusOK && h.TokenReady
	})
	t.Logf("outage %d (%s storage): down %s, recovered %s after the token came back",
		n, storage, back.Sub(start).Round(time.Millisecond), time.Since(back).Round(time.Millisecond))
	// The failed destroy is retried (token objects only: session objects
	// live in the token's memory, and their destroy got through).
	waitFor(t, "the failed destroy to be retried", func() bool {
		h, _, err := p.health()
		return err == nil && h.PendingDestroys == 0
	})
	if storage == "token" {
		if objs := f.tokenObjects(); objs[paused.k.UniqueID] != 0 {
			t.Errorf("outage %d: after the retry the key whose destroy failed has %d objects", n, objs[paused.k.UniqueID])
		}
	}

	// After: token objects survived the outage and decrypt once; session
	// objects died with the module's reset, and their keys say so.
	for _, k := range []held{waiting, untouched} {
		res, err := p.decrypt(k.k.UniqueID, seal(t, k.k, k.pw))
		switch {
		case err != nil:
			t.Errorf("outage %d: decrypt after recovery: %v", n, err)
		case storage == "token" && (res.status != http.StatusOK || res.password != k.pw):
			t.Errorf("outage %d: decrypt after recovery: %d %s; want 200 and the password", n, res.status, res.code)
		case storage == "session" && (res.status != http.StatusGone || res.code != "KEY_LOST"):
			t.Errorf("outage %d: decrypt after recovery: %d %s; want 410 KEY_LOST", n, res.status, res.code)
		}
		res, err = p.decrypt(k.k.UniqueID, seal(t, k.k, k.pw))
		if err != nil || res.status != http.StatusGone {
			t.Errorf("outage %d: second decrypt after recovery: %+v, %v; want 410", n, res, err)
		}
	}
	// New keys work.
	k := issue()
	if res, err := p.decrypt(k.k.UniqueID, seal(t, k.k, k.pw)); err != nil || res.status != http.StatusOK || res.password != k.pw {
		t.Errorf("outage %d: a key issued after recovery: %+v, %v", n, res, err)
	}
}

// waitEvent waits for a line on the child's stdout.
func waitEvent(t testing.TB, p *proc, want string) {
	t.Helper()
	timeout := time.After(hangLimit)
	for {
		select {
		case ev := <-p.events:
			if ev == want {
				return
			}
		case <-p.exited:
			t.Fatalf("the daemon exited waiting for %q: %v", want, p.err)
		case <-timeout:
			t.Fatalf("no %q within %s", want, hangLimit)
		}
	}
}

// Regression: another process logging in to the token (pkcs11-tool, as
// the README's walk-through does) made SoftHSM fail the daemon's
// C_GetTokenInfo now and then, and a single failure marked the token down:
// a false outage, with applies refused, decrypts answered 503 and, in
// token storage, a module reset. The health check now asks again before
// it counts a failure.
//
// The daemon is idle here, as when an operator looks at its token. While
// it writes to the token too (generates, destroys), SoftHSM's file store
// still fails it now and then for longer: see RELIABILITY.md's limits.
func TestAnotherProcessOnTheTokenIsNoOutage(t *testing.T) {
	f := newFixture(t, fixtureConfig{
		storage: "token", poolSize: 2, generators: 1,
		ttl: "1m", reap: "100ms", applyWait: "1s",
	})
	p := f.mustStart()
	waitFor(t, "a full pool", func() bool {
		h, _, err := p.health()
		return err == nil && h.PoolReady == h.PoolSize
	})
	const lists = 40
	for i := range lists {
		f.listKeys() // C_Initialize, C_Login, C_FindObjects, C_Finalize
		if i%10 == 9 {
			if h, st, err := p.health(); err != nil || st != http.StatusOK {
				t.Fatalf("after %d logins by another process: health %d %+v %v", i+1, st, h, err)
			}
		}
	}
	r, err := p.apply("")
	if err != nil || r.code != "SUCCESS" {
		t.Fatalf("apply after the logins: %+v, %v", r, err)
	}
	pw := f.password()
	if res, err := p.decrypt(r.key.UniqueID, seal(t, r.key, pw)); err != nil || res.status != http.StatusOK || res.password != pw {
		t.Errorf("decrypt after the logins: %+v, %v", res, err)
	}
	p.stop()
	if strings.Contains(p.stderr.String(), `"msg":"token down"`) {
		t.Errorf("the daemon took %d logins by another process for an outage", lists)
	}
	t.Logf("%d logins by another process, no outage", lists)
}

// Regression: listing the token while another process made keys in it
// failed now and then with CKR_BUFFER_TOO_SMALL: SoftHSM reads an
// attribute in two calls, and a label being written grew in between. List
// is what start-up reconciliation runs, so a daemon starting next to
// another on the same token could fail to start. List now reads again.
// The daemon here makes, uses and destroys keys while this process lists.
func TestListWhileAnotherProcessMakesKeys(t *testing.T) {
	f := newFixture(t, fixtureConfig{
		storage: "token", poolSize: 2, generators: 1,
		ttl: "1m", reap: "100ms", applyWait: "1s",
	})
	p := f.mustStart()
	stop := make(chan struct{})
	var (
		wg   sync.WaitGroup
		used atomic.Int64
	)
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			r, err := p.apply("")
			if err != nil || r.code != "SUCCESS" {
				continue // the pool is refilling, or the daemon met a false outage
			}
			p.decrypt(r.key.UniqueID, seal(t, r.key, f.password()))
			used.Add(1)
		}
	})
	// List until the daemon has made, used and destroyed keys meanwhile:
	// the scenario, not a time, ends the loop.
	const minLists, minKeys = 20, 4
	lists := 0
	for deadline := time.Now().Add(hangLimit); lists < minLists || used.Load() < minKeys; lists++ {
		if time.Now().After(deadline) {
			t.Fatalf("in %s, %d lists while the daemon made and used %d keys; want %d and %d", hangLimit, lists, used.Load(), minLists, minKeys)
		}
		f.listKeys() // fails the test on a List error
	}
	close(stop)
	wg.Wait()
	p.kill()
	t.Logf("%d lists while %d keys were made, used and destroyed", lists, used.Load())
}
