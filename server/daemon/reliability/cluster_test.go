package reliability

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer/store/pgtest"
	"github.com/keyissuer/keyissuer/server/admin"
	"github.com/keyissuer/keyissuer/server/apisig"
	"github.com/keyissuer/keyissuer/server/audit"
)

// Cluster mode with real daemons: three keyissuerd processes on one
// SoftHSM token directory (standing in for a network HSM partition) and
// one PostgreSQL, sharing a label prefix.

type clusterFixture struct {
	t     *testing.T
	db    pgtest.Database
	fs    []*fixture
	procs []*proc
}

// newClusterFixture starts n instances. extra is more TOML for each.
func newClusterFixture(t *testing.T, n int, extra string) *clusterFixture {
	t.Helper()
	c := &clusterFixture{t: t, db: pgtest.NewDatabase(t)}
	pw := filepath.Join(t.TempDir(), "pg.password")
	if err := os.WriteFile(pw, []byte(c.db.Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	prefix := "relc-" + filepath.Base(t.TempDir()) + ":"
	for i := range n {
		f := newFixture(t, fixtureConfig{
			storage: "token", poolSize: 4, generators: 1,
			ttl: "1m", reap: "200ms", applyWait: "30s",
			prefix: prefix,
			// A kill -9 inside C_GenerateKeyPair leaves SoftHSM a key
			// object with no label nor id; the survivors sweep it once
			// it has stayed so for the grace, which outlasts any of
			// their own generations in progress.
			dedicated: true, halfMadeGrace: "3s",
			store: fmt.Sprintf("backend = \"postgres\"\ndsn = %q\npassword_file = %q", c.db.DSN, pw),
			extra: fmt.Sprintf("[cluster]\ninstance_id = \"n%d\"\nheartbeat = \"500ms\"\nlease = \"5s\"\n%s", i+1, extra),
		})
		// The PostgreSQL password is a secret too: the scans look for it.
		f.mu.Lock()
		f.secrets = append(f.secrets, c.db.Password)
		f.mu.Unlock()
		c.fs = append(c.fs, f)
		c.procs = append(c.procs, f.mustStart())
		// The next instance's start-up reconciliation reads the label of
		// every key object, which on SoftHSM can damage a key this one
		// is making (RELIABILITY.md, bug 6): start it once this one's
		// pool is full.
		c.waitQuiet(t, -1)
	}
	return c
}

func (c *clusterFixture) conn() *pgx.Conn {
	c.t.Helper()
	conn, err := pgx.Connect(context.Background(), c.db.DSN+" password="+c.db.Password)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// count runs a SELECT count(*) query.
func (c *clusterFixture) count(conn *pgx.Conn, q string, args ...any) int {
	c.t.Helper()
	var n int
	if err := conn.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		c.t.Fatal(err)
	}
	return n
}

// mustApply applies on p until it succeeds (the pool may be refilling).
func mustApply(t *testing.T, p *proc, customer string) keyInfo {
	t.Helper()
	r, err := p.apply(customer)
	if err != nil || r.code != "SUCCESS" {
		t.Fatalf("apply = %+v, %v", r, err)
	}
	return r.key
}

func TestClusterDaemons(t *testing.T) {
	// A registered client beside the unsigned applies: its signed
	// requests go through the cluster's replay cache.
	clientKey, client := newClient(t)
	c := newClusterFixture(t, 3, "[limits]\nmax_outstanding_per_customer = 10\n"+client)
	f := c.fs[0]
	// signed returns a signed apply to p, and one with the same headers
	// and body for any other instance: the replay.
	signed := func(p *proc) (first *http.Request, replay func(p *proc) *http.Request) {
		body := fmt.Sprintf(`{"customerId":%q}`, newCustomerID())
		build := func(p *proc) *http.Request {
			req, _ := http.NewRequest(http.MethodPost, p.api, strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			return req
		}
		first = build(p)
		if err := apisig.SignRequest(first, clientID, 1, clientKey, []byte(body), time.Now()); err != nil {
			t.Fatal(err)
		}
		return first, func(p *proc) *http.Request {
			req := build(p)
			for _, h := range []string{apisig.HeaderClientID, apisig.HeaderRequestTime, apisig.HeaderSignature} {
				req.Header.Set(h, first.Header.Get(h))
			}
			return req
		}
	}

	t.Run("a signed apply replayed to another instance", func(t *testing.T) {
		first, replay := signed(c.procs[0])
		if r, err := c.procs[0].doApply(first); err != nil || r.code != "SUCCESS" {
			t.Fatalf("signed apply on n1 = %+v, %v", r, err)
		}
		for i, p := range c.procs {
			if r, err := p.doApply(replay(p)); err != nil || r.code != "REPEAT_REQUEST" || r.resultStatus != "U" || r.key.UniqueID != "" {
				t.Errorf("the replay to n%d = %+v, %v; want REPEAT_REQUEST/U and no key", i+1, r, err)
			}
		}
	})

	// metric reports whether p's /metrics has the line that starts so.
	metric := func(p *proc, line string) bool {
		return strings.Contains(scrape(p), "\n"+line)
	}

	t.Run("metrics count the live instances", func(t *testing.T) {
		waitFor(t, "n1 to count three live instances", func() bool {
			return metric(c.procs[0], "keyissuer_cluster_instances_live 3") &&
				metric(c.procs[0], "keyissuer_cluster_heartbeat_age_seconds ") &&
				metric(c.procs[0], "keyissuer_store_up 1")
		})
	})

	t.Run("decrypt through another instance", func(t *testing.T) {
		for i, p := range c.procs {
			k := mustApply(t, p, "")
			pw := f.password()
			via := c.procs[(i+1)%3]
			if r, err := via.decrypt(k.UniqueID, seal(t, k, pw)); err != nil || r.status != http.StatusOK || r.password != pw {
				t.Errorf("key of n%d decrypted through n%d: %+v, %v", i+1, (i+1)%3+1, r, err)
			}
			third := c.procs[(i+2)%3]
			if r, err := third.decrypt(k.UniqueID, seal(t, k, pw)); err != nil || r.code != "KEY_CONSUMED" {
				t.Errorf("second decrypt through n%d: %+v, %v; want KEY_CONSUMED", (i+2)%3+1, r, err)
			}
		}
	})

	t.Run("30 decrypts of one key over three sockets", func(t *testing.T) {
		k := mustApply(t, c.procs[0], "")
		pw := f.password()
		ct := seal(t, k, pw)
		var ok, consumed atomic.Int32
		together(30, func(i int) {
			r, err := c.procs[i%3].decrypt(k.UniqueID, ct)
			switch {
			case err != nil:
				t.Errorf("decrypt through n%d: %v", i%3+1, err)
			case r.status == http.StatusOK && r.password == pw:
				ok.Add(1)
			case r.code == "KEY_CONSUMED":
				consumed.Add(1)
			default:
				t.Errorf("decrypt through n%d: %+v", i%3+1, r)
			}
		})
		if ok.Load() != 1 || consumed.Load() != 29 {
			t.Errorf("%d decrypts succeeded, %d refused as consumed; want 1 and 29", ok.Load(), consumed.Load())
		}
	})

	t.Run("customer cap of 10 over three instances", func(t *testing.T) {
		customer := newCustomerID()
		var ok, limit atomic.Int32
		together(12, func(i int) {
			r, err := c.procs[i%3].apply(customer)
			switch {
			case err != nil:
				t.Errorf("apply on n%d: %v", i%3+1, err)
			case r.code == "SUCCESS":
				ok.Add(1)
			case r.code == "REQUEST_TRAFFIC_EXCEED_LIMIT":
				limit.Add(1)
			default:
				t.Errorf("apply on n%d: %+v", i%3+1, r)
			}
		})
		if ok.Load() != 10 || limit.Load() != 2 {
			t.Errorf("%d applies issued, %d refused by the cap; want exactly 10 and 2", ok.Load(), limit.Load())
		}
	})

	t.Run("kill -9 under load", func(t *testing.T) {
		oks := map[string]int{}
		c.killUnderLoad(t, 2, oks)
		c.checkDecryptedOnce(t, oks)
		c.checkOwned(t)
	})

	t.Run("PostgreSQL stopped and started", func(t *testing.T) {
		p := c.procs[0]
		k := mustApply(t, p, "")
		pw := f.password()
		c.db.Server.Stop(t)
		if r, err := p.apply(""); err != nil || r.resultStatus != "U" {
			t.Errorf("apply with PostgreSQL down = %+v, %v; want resultStatus U", r, err)
		}
		// The replay cache is in PostgreSQL too: it cannot tell, so U.
		first, _ := signed(p)
		if r, err := p.doApply(first); err != nil || r.code != "UNKNOWN_EXCEPTION" || r.resultStatus != "U" {
			t.Errorf("signed apply with PostgreSQL down = %+v, %v; want UNKNOWN_EXCEPTION/U", r, err)
		}
		if r, err := c.procs[1].decrypt(k.UniqueID, seal(t, k, pw)); err != nil || r.status != http.StatusServiceUnavailable || r.code != "STORE_UNAVAILABLE" {
			t.Errorf("decrypt with PostgreSQL down = %+v, %v; want 503 STORE_UNAVAILABLE", r, err)
		}
		if resp, err := http.Get(p.admin + admin.ReadyzPath); err != nil || resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("/readyz with PostgreSQL down: %v, %v; want 503", resp, err)
		} else {
			resp.Body.Close()
		}
		waitFor(t, "n1's keyissuer_store_up to be 0", func() bool { return metric(p, "keyissuer_store_up 0") })
		c.db.Server.Start(t)
		waitFor(t, "n1's keyissuer_store_up to be 1", func() bool { return metric(p, "keyissuer_store_up 1") })
		waitFor(t, "applies to succeed again", func() bool {
			r, err := p.apply("")
			return err == nil && r.code == "SUCCESS"
		})
		if r, err := c.procs[1].decrypt(k.UniqueID, seal(t, k, pw)); err != nil || r.status != http.StatusOK || r.password != pw {
			t.Errorf("decrypt of the key untouched by the outage = %+v, %v", r, err)
		}
	})

	t.Run("each instance's audit trail names it and verifies", func(t *testing.T) {
		for i, fx := range c.fs {
			b, err := os.ReadFile(fx.audit)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := audit.Verify(bytes.NewReader(b)); err != nil {
				t.Errorf("n%d's audit trail: %v", i+1, err)
			}
			if want := fmt.Sprintf(`"instance":"n%d"`, i+1); !bytes.Contains(b, []byte(want)) {
				t.Errorf("n%d's audit trail has no %s", i+1, want)
			}
		}
	})
}

// TestClusterKillCycles kills an instance of three under load, waits for a
// survivor to clean up after it, restarts it, and checks the token and the
// decrypts, cycle after cycle: 3 in make test, SOAK_CYCLES/10 in make soak.
func TestClusterKillCycles(t *testing.T) {
	cycles := 3
	if v := os.Getenv("SOAK_CYCLES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("SOAK_CYCLES=%q: want a positive number", v)
		}
		cycles = max(n/10, 1)
	}
	c := newClusterFixture(t, 3, "")
	oks := map[string]int{}
	issued := 0
	for cycle := range cycles {
		victim := cycle % 3
		issued += c.killUnderLoad(t, victim, oks)
		c.checkDecryptedOnce(t, oks)
		c.checkOwned(t)
		c.procs[victim] = c.fs[victim].mustStart()
		if t.Failed() {
			t.Fatalf("cycle %d failed", cycle+1)
		}
	}
	t.Logf("%d kill -9 cycles: %d keys issued, %d decrypted once each, no double decrypt, no leaked object", cycles, issued, len(oks))
}

// killUnderLoad kills instance v with SIGKILL while clients apply on it
// and decrypt through all three, then waits until a survivor has taken
// over what it left. Successful decrypts are counted in oks. It returns
// how many keys the load was issued.
func (c *clusterFixture) killUnderLoad(t *testing.T, v int, oks map[string]int) int {
	t.Helper()
	conn := c.conn()
	victim := c.procs[v]
	f := c.fs[v]
	stop := make(chan struct{})
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		sent = map[string]string{}
	)
	for w := range 3 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				r, err := victim.apply("")
				if err != nil || r.code != "SUCCESS" {
					if !victim.alive() {
						return
					}
					continue
				}
				pw := f.password()
				mu.Lock()
				sent[r.key.UniqueID] = pw
				mu.Unlock()
				via := c.procs[w%3]
				if via == victim && !victim.alive() {
					via = c.procs[(v+1)%3]
				}
				ct := seal(t, r.key, pw)
				d, err := via.decrypt(r.key.UniqueID, ct)
				// 503 means "not used, retry", as a client would.
				for try := 0; try < 20 && err == nil && d.status == http.StatusServiceUnavailable; try++ {
					time.Sleep(100 * time.Millisecond)
					d, err = via.decrypt(r.key.UniqueID, ct)
				}
				switch {
				case err == nil && d.status == http.StatusOK && d.password == pw:
					mu.Lock()
					oks[r.key.UniqueID]++
					mu.Unlock()
				case err == nil && via != victim:
					t.Errorf("decrypt of %s through a survivor: %+v", r.key.UniqueID, d)
				}
			}
		})
	}
	waitFor(t, "the load to issue keys", func() bool { mu.Lock(); defer mu.Unlock(); return len(sent) >= 6 })
	victim.kill()
	close(stop)
	wg.Wait()
	// A survivor takes over once the lease (5s) has run out: the dead
	// instance's pool entries and claims are gone, and so are their
	// objects.
	id := fmt.Sprintf("n%d", v+1)
	waitFor(t, "a survivor to take over "+id+"'s keys", func() bool {
		return c.count(conn, "SELECT count(*) FROM pool_keys WHERE instance_id = $1", id) == 0 &&
			c.count(conn, "SELECT count(*) FROM records WHERE state = 'consuming'") == 0 &&
			c.count(conn, "SELECT count(*) FROM instances WHERE instance_id = $1", id) == 0
	})
	// Reading a SoftHSM object's attributes while another process makes
	// it can wipe its label and id (RELIABILITY.md, bug 6), so the token is
	// read only once the survivors have refilled their pools and make no
	// key.
	c.waitQuiet(t, v)
	// What the kill left half-made, the survivors' token checks destroy
	// once it has stayed half-made for the grace (3s).
	var seen []hsmtest.Object
	defer func() {
		if t.Failed() {
			t.Logf("half-made objects at the last look: %v", seen)
		}
	}()
	waitFor(t, "the survivors to destroy the kill's half-made key objects", func() bool {
		seen = seen[:0]
		for _, o := range hsmtest.Added(c.fs[0].baseline, hsmtest.Objects(t, c.fs[0].soft)) {
			if halfMade(o) {
				seen = append(seen, o)
			}
		}
		if len(seen) > 0 {
			time.Sleep(time.Second)
			return false
		}
		return true
	})
	return len(sent)
}

// waitQuiet waits until every instance but the dead one v (-1: none) has
// its pool full, so that none is making a key: the token may then be read.
func (c *clusterFixture) waitQuiet(t *testing.T, v int) {
	t.Helper()
	waitFor(t, "the survivors to refill their pools", func() bool {
		for i, p := range c.procs {
			if i == v {
				continue
			}
			ready, target := poolGauges(p)
			if target == 0 || ready < target {
				return false
			}
		}
		return true
	})
}

// scrape returns p's /metrics, or "" if it cannot.
func scrape(p *proc) string {
	resp, err := http.Get(p.admin + admin.MetricsPath)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// poolGauges reads p's keyissuer_pool_keys_ready and _target; 0s if it
// cannot.
func poolGauges(p *proc) (ready, target float64) {
	for _, line := range strings.Split(scrape(p), "\n") {
		name, value, _ := strings.Cut(line, " ")
		f, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		switch name {
		case "keyissuer_pool_keys_ready":
			ready = f
		case "keyissuer_pool_keys_target":
			target = f
		}
	}
	return ready, target
}

func (c *clusterFixture) checkDecryptedOnce(t *testing.T, oks map[string]int) {
	t.Helper()
	for id, n := range oks {
		if n > 1 {
			t.Errorf("key %s decrypted %d times", id, n)
		}
	}
}

// checkOwned checks that every object under the shared prefix has a live
// owner: a pool entry, or an active record. The survivors run meanwhile,
// so an object is judged only if it is still there after the owners are
// read.
func (c *clusterFixture) checkOwned(t *testing.T) {
	t.Helper()
	conn := c.conn()
	f := c.fs[0]
	objs := f.tokenObjects()
	rows, err := conn.Query(context.Background(), `SELECT unique_id FROM pool_keys
		UNION SELECT unique_id FROM records WHERE state IN ('issued', 'consuming')`)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	owned := map[string]bool{}
	for _, id := range ids {
		owned[id] = true
	}
	again := f.tokenObjects()
	for id, n := range objs {
		if !owned[id] && again[id] > 0 {
			var state, claimedBy, issuer string
			conn.QueryRow(context.Background(), "SELECT state, claimed_by, instance_id FROM records WHERE unique_id = $1", id).Scan(&state, &claimedBy, &issuer)
			t.Errorf("%d objects of key %s in the token without an owner: leaked (record: %q issued by %q, claimed by %q)", n, id, state, issuer, claimedBy)
		}
	}
}

// together runs fn(0), ..., fn(n-1) in n goroutines released at once, and
// waits for them.
func together(n int, fn func(i int)) {
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			fn(i)
		})
	}
	close(start)
	wg.Wait()
}
