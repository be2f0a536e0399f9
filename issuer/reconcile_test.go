package issuer_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// newEnvPrefix is newEnv with a label prefix of the caller's choosing.
func newEnvPrefix(t testing.TB, storage hsm.Storage, prefix string) *env {
	t.Helper()
	e := &env{t: t, token: hsmtest.Shared(t), storage: storage, prefix: prefix, dbPath: filepath.Join(t.TempDir(), "records.db")}
	now := time.Now()
	e.now.Store(&now)
	e.open()
	t.Cleanup(e.close)
	return e
}

// fillPool runs e until its pool is full and returns the stop func.
func fillPool(t testing.TB, e *env) (stop func()) {
	t.Helper()
	stop = e.run()
	waitUntil(t, "the pool to fill", func() bool {
		s := e.is.Stats()
		return s.PoolReady == s.PoolSize
	})
	return stop
}

// Regression (issue 14, item 3): two daemons on one token in token
// storage, the second configured with a prefix that extends the first's.
// The first's reconciliation used to take the second's objects for its own
// ("host-b:<id>"), find no record and destroy them: issued keys and pooled
// ones. Restarting the first must leave them all alone.
func TestReconcileSparesNestedPrefix(t *testing.T) {
	ctx := context.Background()
	a := newEnvPrefix(t, hsm.StorageToken, "keyissuer:")
	b := newEnvPrefix(t, hsm.StorageToken, "keyissuer:host-b:")

	stopA := fillPool(t, a)
	issA := apply(t, a)
	stopA()
	stopB := fillPool(t, b)
	defer stopB()
	issB := apply(t, b)
	waitUntil(t, "b's pool to refill", func() bool {
		s := b.is.Stats()
		return s.PoolReady == s.PoolSize
	})
	before := b.objects("")
	if want := 2 * (1 + b.is.Stats().PoolSize); before != want {
		t.Fatalf("b has %d objects, want %d (its issued key and its pool)", before, want)
	}

	// Restart a: its reconciliation runs in open.
	a.close()
	a.open()
	if after := b.objects(""); after != before {
		t.Errorf("restarting a left b %d objects of %d: a destroyed its neighbour's keys", after, before)
	}
	if n := b.objects(issB.UniqueID); n != 2 {
		t.Fatalf("b's issued key has %d objects after a's restart, want 2", n)
	}
	if pw, err := b.is.Decrypt(ctx, issB.UniqueID, encrypt(t, issB, "neighbour")); err != nil || string(pw) != "neighbour" {
		t.Errorf("b's key after a's restart: %q, %v", pw, err)
	}
	// a adopted its own key and still decrypts with it.
	if pw, err := a.is.Decrypt(ctx, issA.UniqueID, encrypt(t, issA, "own")); err != nil || string(pw) != "own" {
		t.Errorf("a's own key after its restart: %q, %v", pw, err)
	}
}

// Regression (issue 14, item 5): a daemon switched from token to session
// storage never searched the token, so the private keys of its token
// storage runs stayed there for ever. The restart in session storage marks
// their records and destroys them, and an object without a record too.
func TestReconcileSessionStorageDestroysTokenLeftovers(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, hsmtest.Shared(t), hsm.StorageToken)
	stop := fillPool(t, e)
	issued := apply(t, e)
	stop() // the pool is drained; the issued key stays in the token
	// A key a crash left without a record, as if it was in the pool.
	orphanID := "Orphan0000000000000000000000000X"
	if _, err := e.tok.Generate(ctx, orphanID); err != nil {
		t.Fatal(err)
	}
	if n := e.objects(issued.UniqueID); n != 2 {
		t.Fatalf("issued key has %d objects before the switch, want 2", n)
	}
	if n := e.objects(""); n != 4 {
		t.Fatalf("%d objects before the switch, want 4", n)
	}

	e.close()
	e.storage = hsm.StorageSession
	e.open()
	if n := e.objects(""); n != 0 {
		t.Errorf("after the restart in session storage %d objects are left in the token, want 0", n)
	}
	if s := e.state(issued.UniqueID); s != store.Lost {
		t.Errorf("the leftover key's record is %s, want lost", s)
	}
}
