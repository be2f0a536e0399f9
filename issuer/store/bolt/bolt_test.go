package bolt_test

import (
	"context"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
	"github.com/keyissuer/keyissuer/issuer/store/storetest"
)

// base is a fixed instant in UTC without a monotonic reading, so records
// compare equal with reflect.DeepEqual after a JSON round trip.
var base = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

func openStore(t testing.TB, path string) *bolt.Store {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "sub", "records.db")
	}
	s, err := bolt.Open(path, bolt.Options{})
	if err != nil {
		t.Fatalf("Open(%s) = %v", path, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mustCreate(t testing.TB, s *bolt.Store, rs ...store.Record) {
	t.Helper()
	for _, r := range rs {
		if err := s.Create(context.Background(), r); err != nil {
			t.Fatalf("Create(%s) = %v", r.UniqueID, err)
		}
	}
}

func mustTransition(t testing.TB, s *bolt.Store, id string, from, to store.State, at time.Time) store.Record {
	t.Helper()
	r, err := s.Transition(context.Background(), id, from, to, at)
	if err != nil {
		t.Fatalf("Transition(%s, %s→%s) = %v", id, from, to, err)
	}
	return r
}

// TestContract runs the contract every record store keeps.
func TestContract(t *testing.T) {
	storetest.Run(t, func(t testing.TB) storetest.Store { return openStore(t, "") })
}

func TestReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "records.db")
	s, err := bolt.Open(path, bolt.Options{CommitDelay: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	mustCreate(t, s, storetest.Issued("a", base), storetest.Issued("b", base.Add(time.Minute)), storetest.Issued("c", base.Add(2*time.Minute)))
	mustTransition(t, s, "a", store.Issued, store.Consuming, base)
	mustTransition(t, s, "a", store.Consuming, store.Consumed, base.Add(time.Second))
	mustTransition(t, s, "b", store.Issued, store.Consuming, base)
	want, _ := s.Get(ctx, "a")
	if err := s.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}

	s = openStore(t, path)
	got, err := s.Get(ctx, "a")
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("Get(a) after reopen = %+v, %v; want %+v", got, err, want)
	}
	active, err := s.Active(ctx, base.Add(time.Hour), 0)
	if err != nil || !reflect.DeepEqual(ids(active), []string{"b", "c"}) {
		t.Errorf("Active() after reopen = %v, %v; want [b c]", ids(active), err)
	}
	if _, err := s.Transition(ctx, "b", store.Issued, store.Consuming, base); err == nil {
		t.Error("claim of a record claimed before the restart succeeded")
	}
	if n, err := s.Prune(ctx, base.Add(time.Hour), 10); err != nil || n != 1 {
		t.Errorf("Prune() after reopen = %d, %v; want 1", n, err)
	}
}

func TestOpenInUse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "records.db")
	openStore(t, path)

	type result struct {
		s   *bolt.Store
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		s, err := bolt.Open(path, bolt.Options{})
		done <- result{s, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second): // a hang guard, not a timing check
		t.Fatal("a second Open of a file in use did not return")
	}
	t.Logf("second Open returned after %v", time.Since(start))
	if r.err == nil {
		r.s.Close()
		t.Fatal("second Open of the same file succeeded")
	}
	if !strings.Contains(r.err.Error(), "in use") {
		t.Errorf("second Open = %q, want it to say the store is in use", r.err)
	}
}

func BenchmarkTransition(b *testing.B) {
	ctx := context.Background()
	s := openStore(b, "")
	i := 0
	for b.Loop() {
		id := fmt.Sprintf("bench-%09d", i)
		i++
		if err := s.Create(ctx, storetest.Issued(id, base)); err != nil {
			b.Fatal(err)
		}
		if _, err := s.Transition(ctx, id, store.Issued, store.Consuming, base); err != nil {
			b.Fatal(err)
		}
		if _, err := s.Transition(ctx, id, store.Consuming, store.Consumed, base); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkGet(b *testing.B) {
	ctx := context.Background()
	s := openStore(b, "")
	const n = 1000
	for i := range n {
		if err := s.Create(ctx, storetest.Issued(fmt.Sprintf("bench-%09d", i), base)); err != nil {
			b.Fatal(err)
		}
	}
	i := 0
	for b.Loop() {
		if _, err := s.Get(ctx, fmt.Sprintf("bench-%09d", i%n)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func ids(rs []store.Record) []string {
	out := []string{}
	for _, r := range rs {
		out = append(out, r.UniqueID)
	}
	return out
}
