package issuer_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/pgtest"
	"github.com/keyissuer/keyissuer/issuer/store/postgres"
)

// Cluster mode in one process: several issuers, each with its own Token
// (its own sessions) on one SoftHSM token and one label prefix, sharing one
// PostgreSQL database. server/daemon/cluster runs real daemons.

type node struct {
	id    string
	tok   *hsm.Token
	finds atomic.Int32 // searches of the token by CKA_ID (Find)
	st    *postgres.Store
	cl    *postgres.Cluster
	is    *issuer.Issuer
	stop  func()
	claim func(string) // AfterClaim hook, if set
}

type cluster struct {
	t      *testing.T
	db     pgtest.Database
	prefix string
	nodes  []*node
	skew   atomic.Int64 // added to every node's clock (Config.Now)
	events sync.Map     // issuer.Event kind+reason+uniqueId -> *atomic.Int32, over all nodes
}

func (c *cluster) now() time.Time { return time.Now().Add(time.Duration(c.skew.Load())) }

// count is how many times the nodes reported an event.
func (c *cluster) count(kind issuer.EventKind, reason, id string) int32 {
	v, ok := c.events.Load(fmt.Sprint(kind, reason, id))
	if !ok {
		return 0
	}
	return v.(*atomic.Int32).Load()
}

func newCluster(t *testing.T, n int) *cluster {
	t.Helper()
	c := &cluster{t: t, db: pgtest.NewDatabase(t), prefix: "cl-" + filepath.Base(t.TempDir()) + ":"}
	for i := range n {
		c.nodes = append(c.nodes, c.start(fmt.Sprintf("n%d", i+1), nil))
	}
	return c
}

// start opens and runs one instance. afterClaim, if set, runs after each
// decrypt's claim.
func (c *cluster) start(id string, afterClaim func(string)) *node {
	t := c.t
	t.Helper()
	ctx := context.Background()
	soft := hsmtest.Shared(t)
	nd := &node{id: id}
	var err error
	nd.tok, err = hsm.Open(ctx, hsm.Config{
		Module: soft.Module, TokenLabel: soft.Label, PIN: soft.PIN,
		Storage: hsm.StorageToken, LabelPrefix: c.prefix, Sessions: 4,
		Paddings: []hsm.Padding{hsm.OAEPSHA256},
	})
	if err != nil {
		t.Fatalf("hsm.Open: %v", err)
	}
	if nd.st, err = postgres.Open(ctx, postgres.Options{DSN: c.db.DSN, Password: c.db.Password}); err != nil {
		t.Fatal(err)
	}
	nd.cl = nd.st.Cluster(id, "test", time.Hour) // leases end in tests by expireLease
	nd.cl.SetSteadyFor(0)
	if err := nd.cl.Join(ctx); err != nil {
		t.Fatal(err)
	}
	nd.is, err = issuer.New(issuer.Config{
		Token: findCounter{nd.tok, &nd.finds}, Store: nd.st, Cluster: nd.cl, Storage: hsm.StorageToken,
		Paddings: []hsm.Padding{hsm.OAEPSHA256}, Log: slog.New(slog.DiscardHandler),
		TTL: time.Minute, PoolSize: 2, Generators: 1, ApplyWait: 30 * time.Second,
		ReapInterval: time.Hour, // tests call Reap themselves
		AfterClaim:   afterClaim,
		Now:          c.now,
		OnEvent: func(_ context.Context, e issuer.Event) {
			v, _ := c.events.LoadOrStore(fmt.Sprint(e.Kind, e.Reason, e.UniqueID), new(atomic.Int32))
			v.(*atomic.Int32).Add(1)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := nd.is.Reconcile(ctx); err != nil {
		t.Fatalf("Reconcile(%s): %v", id, err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { nd.is.Run(rctx); close(done) }()
	var once sync.Once
	nd.stop = func() {
		once.Do(func() {
			cancel()
			<-done
			nd.tok.Close()
			nd.st.Close()
		})
	}
	t.Cleanup(nd.stop)
	return nd
}

// findCounter counts a node's searches of the token by CKA_ID.
type findCounter struct {
	*hsm.Token
	n *atomic.Int32
}

func (f findCounter) Find(ctx context.Context, id string) (*hsm.Key, error) {
	f.n.Add(1)
	return f.Token.Find(ctx, id)
}

// expireLease ends a node's lease, as time would after its death.
func (c *cluster) expireLease(id string) {
	c.t.Helper()
	_, err := c.nodes[0].st.Pool().Exec(context.Background(),
		"UPDATE instances SET lease_until = now() - interval '1 second' WHERE instance_id = $1", id)
	if err != nil {
		c.t.Fatal(err)
	}
}

// ids returns the uniqueIds a SQL query lists.
func (c *cluster) ids(q string, args ...any) []string {
	c.t.Helper()
	rows, err := c.nodes[0].st.Pool().Query(context.Background(), q, args...)
	if err != nil {
		c.t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id string
		rows.Scan(&id)
		out = append(out, id)
	}
	return out
}

// tokenIDs lists the ids of the cluster's objects in the token, as a
// live node sees them.
func (c *cluster) tokenIDs(nd *node) map[string]int {
	c.t.Helper()
	objs, err := nd.tok.List(context.Background())
	if err != nil {
		c.t.Fatal(err)
	}
	out := map[string]int{}
	for _, o := range objs {
		out[o.ID]++
	}
	return out
}

func TestClusterDecryptThroughAnotherInstance(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3)
	for i, from := range c.nodes {
		k, err := from.is.Apply(ctx, "cust", "")
		if err != nil {
			t.Fatalf("Apply on %s: %v", from.id, err)
		}
		via := c.nodes[(i+1)%3]
		got, err := via.is.Decrypt(ctx, k.UniqueID, encrypt(t, k, "pw"))
		if err != nil || string(got) != "pw" {
			t.Fatalf("key issued by %s, decrypted by %s: %q, %v", from.id, via.id, got, err)
		}
		third := c.nodes[(i+2)%3]
		if _, err := third.is.Decrypt(ctx, k.UniqueID, encrypt(t, k, "pw")); !errors.Is(err, issuer.ErrConsumed) {
			t.Errorf("second decrypt through %s = %v, want ErrConsumed", third.id, err)
		}
		if n := c.tokenIDs(third)[k.UniqueID]; n != 0 {
			t.Errorf("%d objects of consumed key %s left in the token", n, k.UniqueID)
		}
	}
}

// TestClusterDecryptOnIssuerSkipsSearch: the instance that issued a key
// decrypts it with the handles it made, without searching the shared
// token (slow in SoftHSM: BENCHMARKS.md row 8); a neighbour searches.
func TestClusterDecryptOnIssuerSkipsSearch(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	own, other := c.nodes[0], c.nodes[1]
	for _, via := range []*node{own, other} {
		k, err := own.is.Apply(ctx, "cust", "")
		if err != nil {
			t.Fatal(err)
		}
		before := via.finds.Load()
		got, err := via.is.Decrypt(ctx, k.UniqueID, encrypt(t, k, "pw"))
		if err != nil || string(got) != "pw" {
			t.Fatalf("decrypt through %s = %q, %v", via.id, got, err)
		}
		searched := via.finds.Load() - before
		switch {
		case via == own && searched != 0:
			t.Errorf("the issuing instance searched the token %d times for its own key, want 0", searched)
		case via == other && searched == 0:
			t.Errorf("the neighbour decrypted a key it never searched for: the test did not reach the token")
		}
		if _, err := own.is.Decrypt(ctx, k.UniqueID, encrypt(t, k, "pw")); !errors.Is(err, issuer.ErrConsumed) {
			t.Errorf("second decrypt through %s = %v, want ErrConsumed", own.id, err)
		}
	}
}

func TestClusterOneDecryptOfMany(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3)
	k, err := c.nodes[0].is.Apply(ctx, "cust", "")
	if err != nil {
		t.Fatal(err)
	}
	ct := encrypt(t, k, "pw")
	var ok atomic.Int32
	together(30, func(i int) {
		got, err := c.nodes[i%3].is.Decrypt(ctx, k.UniqueID, ct)
		switch {
		case err == nil && string(got) == "pw":
			ok.Add(1)
		case !errors.Is(err, issuer.ErrConsumed):
			t.Errorf("decrypt through %s = %q, %v", c.nodes[i%3].id, got, err)
		}
	})
	if ok.Load() != 1 {
		t.Errorf("%d decrypts succeeded, want exactly 1", ok.Load())
	}
}

func TestClusterCustomerCapIsExact(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3)
	var ok, quota atomic.Int32
	together(12, func(i int) {
		_, err := c.nodes[i%3].is.ApplyWithin(ctx, "capped", "", issuer.Limits{Customer: 10})
		switch {
		case err == nil:
			ok.Add(1)
		case errors.Is(err, issuer.ErrQuota):
			quota.Add(1)
		default:
			t.Errorf("Apply on %s = %v", c.nodes[i%3].id, err)
		}
	})
	if ok.Load() != 10 || quota.Load() != 2 {
		t.Errorf("%d applies issued, %d refused by the quota; want exactly 10 and 2", ok.Load(), quota.Load())
	}
}

// TestClusterSurvivorCleansUp kills an instance with a full pool and a
// decrypt claimed but not done; once its lease is over, a survivor
// destroys its pooled keys and finishes the claim, and the token holds
// only keys with a live owner.
func TestClusterSurvivorCleansUp(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	claimed := make(chan struct{})
	release := make(chan struct{})
	dead := c.start("dead", func(string) {
		close(claimed)
		<-release // the process dies here
	})
	t.Cleanup(func() { close(release) })
	k, err := dead.is.Apply(ctx, "cust", "")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the dead instance's pool to refill", func() bool { return dead.is.Stats().PoolReady == 2 })
	go dead.is.Decrypt(ctx, k.UniqueID, encrypt(t, k, "pw"))
	<-claimed
	pooled := c.ids("SELECT unique_id FROM pool_keys WHERE instance_id = 'dead'")
	if len(pooled) < 2 {
		t.Fatalf("the dead instance has %d pooled keys recorded, want at least 2", len(pooled))
	}
	dead.tok.Close() // what the OS does to a killed process's sessions

	survivor := c.nodes[1]
	survivor.is.Reap(ctx) // its lease is live: nothing to take over
	if objs := c.tokenIDs(survivor); objs[pooled[0]] != 2 || objs[k.UniqueID] != 2 {
		t.Fatalf("a neighbour with a live lease lost keys: %v", objs)
	}
	c.expireLease("dead")
	survivor.is.Reap(ctx)

	objs := c.tokenIDs(survivor)
	for _, id := range append(pooled, k.UniqueID) {
		if objs[id] != 0 {
			t.Errorf("%d objects of the dead instance's key %s left", objs[id], id)
		}
	}
	if r, err := survivor.st.Get(ctx, k.UniqueID); err != nil || r.State != store.Consumed {
		t.Errorf("the dead instance's claim is %s (%v), want consumed", r.State, err)
	}
	if left := c.ids("SELECT unique_id FROM pool_keys WHERE instance_id = 'dead'"); len(left) > 0 {
		t.Errorf("pool entries of the dead instance left: %v", left)
	}
	// Every object in the token has a live owner: no leak.
	owned := c.ids("SELECT unique_id FROM pool_keys UNION SELECT unique_id FROM records WHERE state IN ('issued', 'consuming')")
	for id := range objs {
		if !slices.Contains(owned, id) {
			t.Errorf("object %s in the token has no owner", id)
		}
	}
}

// TestClusterReconcileSparesNeighbours starts an instance next to others
// whose pools are full and keys issued: its reconciliation destroys only
// an orphan.
func TestClusterReconcileSparesNeighbours(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	k, err := c.nodes[0].is.Apply(ctx, "cust", "")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the pools to fill", func() bool {
		return c.nodes[0].is.Stats().PoolReady == 2 && c.nodes[1].is.Stats().PoolReady == 2
	})
	const orphanID = "orphan0000000000000000000000000a" // well formed; no record, no pool entry
	orphan, err := c.nodes[0].tok.Generate(ctx, orphanID)
	if err != nil {
		t.Fatal(err)
	}
	_ = orphan
	before := c.tokenIDs(c.nodes[0])
	c.start("late", nil)
	after := c.tokenIDs(c.nodes[0])
	if after[orphanID] != 0 {
		t.Error("reconciliation left the orphan")
	}
	for id, n := range before {
		if id != orphanID && after[id] != n {
			t.Errorf("reconciliation of a new instance took %d objects of a neighbour's key %s", n-after[id], id)
		}
	}
	got, err := c.nodes[1].is.Decrypt(ctx, k.UniqueID, encrypt(t, k, "pw"))
	if err != nil || string(got) != "pw" {
		t.Errorf("decrypt after a neighbour's start-up = %q, %v", got, err)
	}
}

// TestClusterReapersDestroyOnce lets a key expire and runs every
// instance's reaper at once: one of them destroys it, once.
func TestClusterReapersDestroyOnce(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3)
	k, err := c.nodes[1].is.Apply(ctx, "cust", "")
	if err != nil {
		t.Fatal(err)
	}
	c.skew.Store(int64(2 * time.Minute)) // past the one-minute TTL
	together(3, func(i int) { c.nodes[i].is.Reap(ctx) })
	if n := c.count(issuer.EventExpired, "", k.UniqueID); n != 1 {
		t.Errorf("the key expired %d times, want 1", n)
	}
	if n := c.count(issuer.EventDestroyed, issuer.ReasonExpired, k.UniqueID); n != 1 {
		t.Errorf("the key was destroyed %d times, want 1", n)
	}
	if n := c.tokenIDs(c.nodes[0])[k.UniqueID]; n != 0 {
		t.Errorf("%d objects of the expired key left", n)
	}
	if r, err := c.nodes[2].st.Get(ctx, k.UniqueID); err != nil || r.State != store.Expired {
		t.Errorf("record = %s, %v; want expired", r.State, err)
	}
}

// TestClusterInstanceIDHeld refuses a second live instance with one id.
func TestClusterInstanceIDHeld(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 1)
	st, err := postgres.Open(ctx, postgres.Options{DSN: c.db.DSN, Password: c.db.Password})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	err = st.Cluster("n1", "other-host", time.Hour).Join(ctx)
	if err == nil {
		t.Fatal("a second instance joined with a live instance's id")
	}
	t.Log(err)
	c.expireLease("n1")
	if err := st.Cluster("n1", "other-host", time.Hour).Join(ctx); err != nil {
		t.Errorf("Join() once the lease ran out = %v", err)
	}
	if err := c.nodes[0].cl.Heartbeat(ctx, 0, 0); !errors.Is(err, postgres.ErrLeaseLost) {
		t.Errorf("the old holder's Heartbeat() = %v, want ErrLeaseLost", err)
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

// waitFor polls cond for at most a minute: a hang guard, not a timing check.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
