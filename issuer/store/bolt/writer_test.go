package bolt_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
	"github.com/keyissuer/keyissuer/issuer/store/storetest"
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// waitState polls Get until id is in state want, for at most a minute: a
// bound against a hang, not a timing check.
func waitState(t *testing.T, s *bolt.Store, id string, want store.State) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		r, err := s.Get(context.Background(), id)
		if err == nil && r.State == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("record %s is %s (%v), want %s", id, r.State, err, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSettle(t *testing.T) {
	tests := []struct {
		name  string
		claim bool // move the record to consuming before the settle
		to    store.State
		want  store.State
		close bool // close the store at once, before the settle's own commit
	}{
		{name: "consumed", claim: true, to: store.Consumed, want: store.Consumed},
		{name: "lost", claim: true, to: store.Lost, want: store.Lost},
		{name: "flushed by Close", claim: true, to: store.Consumed, want: store.Consumed, close: true},
		{name: "not consuming: no change", claim: false, to: store.Consumed, want: store.Issued},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "records.db")
			s := openStore(t, path)
			mustCreate(t, s, storetest.Issued("a", t0))
			if tt.claim {
				mustTransition(t, s, "a", store.Issued, store.Consuming, t0)
			}
			s.Settle("a", store.Consuming, tt.to, t0.Add(time.Second))
			// Visible at once, committed or not.
			r, err := s.Get(context.Background(), "a")
			if err != nil {
				t.Fatal(err)
			}
			if r.State != tt.want {
				t.Errorf("Get() right after Settle: state %s, want %s", r.State, tt.want)
			}
			if !tt.want.Active() && !r.ClosedAt.Equal(t0.Add(time.Second)) {
				t.Errorf("ClosedAt = %v, want %v", r.ClosedAt, t0.Add(time.Second))
			}
			// A compare-and-swap sees it too: the record is no longer
			// consuming.
			_, err = s.Transition(context.Background(), "a", store.Consuming, store.Expired, t0)
			var se *store.StateError
			if !errors.As(err, &se) || se.Current.State != tt.want {
				t.Errorf("Transition(consuming→expired) after Settle = %v, want a StateError in state %s", err, tt.want)
			}
			if !tt.close {
				waitState(t, s, "a", tt.want)
			}
			s.Close()
			s = openStore(t, path)
			if r, _ := s.Get(context.Background(), "a"); r.State != tt.want {
				t.Errorf("after reopen: state %s, want %s", r.State, tt.want)
			}
		})
	}
}

// TestSettleRidesAlong checks that a settle queued before a durable write
// is committed no later than that write: after the write returns, a reopen
// finds both.
func TestSettleRidesAlong(t *testing.T) {
	path := filepath.Join(t.TempDir(), "records.db")
	s, err := bolt.Open(path, bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	mustCreate(t, s, storetest.Issued("a", t0))
	mustTransition(t, s, "a", store.Issued, store.Consuming, t0)
	s.Settle("a", store.Consuming, store.Consumed, t0)
	mustCreate(t, s, storetest.Issued("b", t0))
	// Copy the file as a crash would leave it: what is committed.
	snap := filepath.Join(t.TempDir(), "snap.db")
	if err := copyFile(path, snap); err != nil {
		t.Fatal(err)
	}
	s.Close()
	c := openStore(t, snap)
	if r, _ := c.Get(context.Background(), "a"); r.State != store.Consumed {
		t.Errorf("the settle did not ride along with the next write: state %s", r.State)
	}
}

// TestGroupCommit runs many concurrent writes and checks every one of them
// is durable when it returns, and that compare-and-swap still admits one
// winner per record.
func TestGroupCommit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "records.db")
	s, err := bolt.Open(path, bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const n = 200
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if err := s.Create(context.Background(), storetest.Issued(fmt.Sprintf("r%03d", i), t0)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	var wins sync.Map
	for i := range n {
		for range 3 {
			wg.Go(func() {
				id := fmt.Sprintf("r%03d", i)
				_, err := s.Transition(context.Background(), id, store.Issued, store.Consuming, t0)
				var se *store.StateError
				switch {
				case err == nil:
					if _, loaded := wins.LoadOrStore(id, true); loaded {
						t.Errorf("two claims of %s succeeded", id)
					}
				case !errors.As(err, &se):
					t.Error(err)
				}
			})
		}
	}
	wg.Wait()
	s.Close()
	s = openStore(t, path)
	for i := range n {
		id := fmt.Sprintf("r%03d", i)
		if r, err := s.Get(context.Background(), id); err != nil || r.State != store.Consuming {
			t.Errorf("%s after reopen: %s, %v", id, r.State, err)
		}
	}
}

func copyFile(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o600)
}

func TestClosedStore(t *testing.T) {
	s, err := bolt.Open(filepath.Join(t.TempDir(), "records.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := s.Create(context.Background(), storetest.Issued("a", t0)); err == nil {
		t.Error("Create() on a closed store succeeded")
	}
	s.Settle("a", store.Consuming, store.Consumed, t0) // dropped, no panic
}

// BenchmarkDecryptWrites is the store's share of a decrypt: the durable
// claim and the settled final state, one request at a time.
func BenchmarkDecryptWrites(b *testing.B) {
	ctx := context.Background()
	s := openStore(b, "")
	i := 0
	for b.Loop() {
		id := fmt.Sprintf("bench-%09d", i)
		i++
		b.StopTimer()
		mustCreate(b, s, storetest.Issued(id, t0))
		b.StartTimer()
		if _, err := s.Transition(ctx, id, store.Issued, store.Consuming, t0); err != nil {
			b.Fatal(err)
		}
		s.Settle(id, store.Consuming, store.Consumed, t0)
	}
}

// BenchmarkTransitionParallel claims records from many goroutines at once,
// as concurrent decrypts do: their commits are shared.
func BenchmarkTransitionParallel(b *testing.B) {
	ctx := context.Background()
	s := openStore(b, "")
	var mu sync.Mutex
	next := 0
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			mu.Lock()
			id := fmt.Sprintf("bench-%09d", next)
			next++
			mu.Unlock()
			if err := s.Create(ctx, storetest.Issued(id, t0)); err != nil {
				b.Fatal(err)
			}
			if _, err := s.Transition(ctx, id, store.Issued, store.Consuming, t0); err != nil {
				b.Fatal(err)
			}
		}
	})
}
