package postgres_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/pgtest"
	"github.com/keyissuer/keyissuer/issuer/store/postgres"
	"github.com/keyissuer/keyissuer/issuer/store/storetest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// The issuer's contracts: a record store, and a cluster membership.
var (
	_ issuer.Store   = (*postgres.Store)(nil)
	_ issuer.Cluster = (*postgres.Cluster)(nil)
)

func open(t testing.TB, db pgtest.Database) *postgres.Store {
	t.Helper()
	s, err := postgres.Open(context.Background(), postgres.Options{DSN: db.DSN, Password: db.Password})
	if err != nil {
		t.Fatalf("Open() = %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestContract runs the contract every record store keeps.
func TestContract(t *testing.T) {
	storetest.Run(t, func(t testing.TB) storetest.Store { return open(t, pgtest.NewDatabase(t)) })
}

func TestMigrationsConcurrentAndIdempotent(t *testing.T) {
	db := pgtest.NewDatabase(t)
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			s, err := postgres.Open(context.Background(), postgres.Options{DSN: db.DSN, Password: db.Password})
			if err == nil {
				s.Close()
			}
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Errorf("Open() of instances starting together = %v", err)
		}
	}
	s := open(t, db)
	var n int
	if err := s.Pool().QueryRow(context.Background(), "SELECT count(*) FROM schema_migrations").Scan(&n); err != nil || n != postgres.SchemaVersion() {
		t.Errorf("schema_migrations has %d rows (%v), want %d", n, err, postgres.SchemaVersion())
	}
}

func TestRefusesNewerSchema(t *testing.T) {
	db := pgtest.NewDatabase(t)
	s := open(t, db)
	if _, err := s.Pool().Exec(context.Background(), "INSERT INTO schema_migrations (version, name) VALUES (999, '0999_future.sql')"); err != nil {
		t.Fatal(err)
	}
	_, err := postgres.Open(context.Background(), postgres.Options{DSN: db.DSN, Password: db.Password})
	if err == nil || !strings.Contains(err.Error(), "version 999, newer than this keyissuerd knows") {
		t.Errorf("Open() on a newer schema = %v, want a refusal that says why", err)
	}
}

func TestCheckDSN(t *testing.T) {
	tests := []struct {
		dsn     string
		wantErr bool
	}{
		{"host=127.0.0.1 port=5432 user=keyissuer dbname=keyissuer", false},
		{"postgres://keyissuer@127.0.0.1:5432/keyissuer?sslmode=disable", false},
		{"host=127.0.0.1 user=k password=secret dbname=k", true},
		{"postgres://k:secret@127.0.0.1/k", true},
		{"postgres://k@127.0.0.1/k?password=secret", true},
	}
	for _, tt := range tests {
		err := postgres.CheckDSN(tt.dsn)
		if (err != nil) != tt.wantErr {
			t.Errorf("CheckDSN(%q) = %v, want error %v", tt.dsn, err, tt.wantErr)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("CheckDSN(%q) = %q shows the password", tt.dsn, err)
		}
	}
}

func TestFirstUse(t *testing.T) {
	ctx := context.Background()
	db := pgtest.NewDatabase(t)
	a, b := open(t, db), open(t, db) // two instances
	digest := []byte("digest-1")
	future := time.Now().Add(time.Hour)
	var (
		wg    sync.WaitGroup
		first atomic.Int32
	)
	for i := range 20 {
		s := a
		if i%2 == 1 {
			s = b
		}
		wg.Go(func() {
			ok, err := s.FirstUse(ctx, digest, future)
			if err != nil {
				t.Error(err)
			}
			if ok {
				first.Add(1)
			}
		})
	}
	wg.Wait()
	if first.Load() != 1 {
		t.Errorf("%d of 20 concurrent uses were first, want 1", first.Load())
	}
	// An expired use is forgotten: the digest may come again.
	if ok, err := a.FirstUse(ctx, []byte("digest-2"), time.Now().Add(-time.Second)); !ok || err != nil {
		t.Fatalf("FirstUse(new) = %v, %v", ok, err)
	}
	if ok, err := b.FirstUse(ctx, []byte("digest-2"), future); !ok || err != nil {
		t.Errorf("FirstUse after the first use expired = %v, %v; want true", ok, err)
	}
	if ok, _ := b.FirstUse(ctx, []byte("digest-2"), future); ok {
		t.Error("a replay within its expiry was first")
	}
	if n, err := a.PruneReplay(ctx, 100); err != nil || n != 0 {
		t.Errorf("PruneReplay() = %d, %v; want nothing expired", n, err)
	}
	// Pruning takes the expired digests, a bounded batch at a time.
	for _, d := range []string{"old-1", "old-2", "old-3"} {
		if ok, err := a.FirstUse(ctx, []byte(d), time.Now().Add(-time.Second)); !ok || err != nil {
			t.Fatalf("FirstUse(%s) = %v, %v", d, ok, err)
		}
	}
	for _, want := range []int{2, 1, 0} {
		if n, err := b.PruneReplay(ctx, 2); err != nil || n != want {
			t.Errorf("PruneReplay(2) = %d, %v; want %d", n, err, want)
		}
	}
	if ok, _ := a.FirstUse(ctx, []byte("digest-2"), future); ok {
		t.Error("pruning forgot an unexpired digest")
	}
	// A guard that cannot reach PostgreSQL says so: the public API answers
	// UNKNOWN_EXCEPTION and accepts nothing.
	b.Close()
	if ok, err := b.FirstUse(ctx, []byte("digest-3"), future); ok || !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("FirstUse on a closed store = %v, %v; want false, ErrUnavailable", ok, err)
	}
}

// TestSettleLeavesCommitsDurable: Settle commits without waiting for the
// flush, and that setting ends with its own transaction: every later
// statement on the connection (a claim, an issue) commits durably again.
func TestSettleLeavesCommitsDurable(t *testing.T) {
	ctx := context.Background()
	s, check := oneConnection(t)
	now := time.Now().UTC().Truncate(time.Microsecond)
	r := store.Record{UniqueID: "settle-1", Salt: "s", State: store.Consuming, IssuedAt: now, ExpiresAt: now.Add(time.Hour)}
	if err := s.Create(ctx, r); err != nil {
		t.Fatal(err)
	}
	s.Settle(r.UniqueID, store.Consuming, store.Consumed, now)
	got, err := s.Get(ctx, r.UniqueID)
	if err != nil || got.State != store.Consumed {
		t.Fatalf("Get() after Settle = %v, %v; want consumed", got.State, err)
	}
	check("Settle")
}

// FirstUse commits without waiting for the flush, for its own transaction
// only: the replay guard's answer stays exact, and the connection's later
// commits (the issue that makes the digest durable) still wait.
func TestFirstUseLeavesCommitsDurable(t *testing.T) {
	ctx := context.Background()
	s, check := oneConnection(t)
	digest, expires := []byte("first-use-digest"), time.Now().Add(time.Hour)
	for i, wantFirst := range []bool{true, false} {
		if first, err := s.FirstUse(ctx, digest, expires); err != nil || first != wantFirst {
			t.Errorf("FirstUse() #%d = %v, %v; want %v", i+1, first, err, wantFirst)
		}
	}
	check("FirstUse")
}

// oneConnection opens a store of one connection on a database of its own,
// on a server that flushes its commits, and returns it with check, which
// fails the test unless the connection still flushes them after what.
func oneConnection(t *testing.T) (s *postgres.Store, check func(what string)) {
	t.Helper()
	ctx := context.Background()
	db := pgtest.NewDatabase(t)
	s, err := postgres.Open(ctx, postgres.Options{DSN: db.DSN, Password: db.Password, MaxConns: 1})
	if err != nil {
		t.Fatalf("Open() = %v", err)
	}
	t.Cleanup(func() { s.Close() })
	setting := func() string {
		var v string
		if err := s.Pool().QueryRow(ctx, "SHOW synchronous_commit").Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	want := setting()
	if want == "off" {
		t.Fatal("the test server commits asynchronously already: the test would prove nothing")
	}
	return s, func(what string) {
		t.Helper()
		if after := setting(); after != want {
			t.Errorf("synchronous_commit on the connection after %s = %q, want %q", what, after, want)
		}
	}
}
