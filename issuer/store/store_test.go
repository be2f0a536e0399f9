package store_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/issuer/store"
)

// base is a fixed instant in UTC without a monotonic reading, so records
// compare equal with reflect.DeepEqual after a JSON round trip.
var base = time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC)

func openStore(t testing.TB, path string) *store.Bolt {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "sub", "records.db")
	}
	s, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatalf("Open(%s) = %v", path, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func issued(id string, expires time.Time) store.Record {
	return store.Record{
		UniqueID:   id,
		Salt:       "salt-" + id,
		CustomerID: "customer",
		ClientID:   "client",
		State:      store.Issued,
		IssuedAt:   expires.Add(-10 * time.Minute),
		ExpiresAt:  expires,
	}
}

func mustCreate(t testing.TB, s *store.Bolt, rs ...store.Record) {
	t.Helper()
	for _, r := range rs {
		if err := s.Create(context.Background(), r); err != nil {
			t.Fatalf("Create(%s) = %v", r.UniqueID, err)
		}
	}
}

func mustTransition(t testing.TB, s *store.Bolt, id string, from, to store.State, at time.Time) store.Record {
	t.Helper()
	r, err := s.Transition(context.Background(), id, from, to, at)
	if err != nil {
		t.Fatalf("Transition(%s, %s→%s) = %v", id, from, to, err)
	}
	return r
}

func ids(rs []store.Record) []string {
	out := []string{}
	for _, r := range rs {
		out = append(out, r.UniqueID)
	}
	return out
}

func TestCreateGet(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name     string
		existing []store.Record
		create   store.Record
		get      string
		want     store.Record
		wantErr  error // of Create
		wantGet  error
	}{
		{
			name:   "new record",
			create: issued("a", base),
			get:    "a",
			want:   issued("a", base),
		},
		{
			name:     "second record",
			existing: []store.Record{issued("a", base)},
			create:   issued("b", base.Add(time.Second)),
			get:      "b",
			want:     issued("b", base.Add(time.Second)),
		},
		{
			name:     "create twice",
			existing: []store.Record{issued("a", base)},
			create:   store.Record{UniqueID: "a", Salt: "other", State: store.Issued, ExpiresAt: base.Add(time.Hour)},
			get:      "a",
			want:     issued("a", base), // untouched
			wantErr:  store.ErrExists,
		},
		{
			name:    "get unknown",
			create:  issued("a", base),
			get:     "zz",
			wantGet: store.ErrNotFound,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, "")
			mustCreate(t, s, tt.existing...)
			err := s.Create(ctx, tt.create)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Create() = %v, want %v", err, tt.wantErr)
			}
			got, err := s.Get(ctx, tt.get)
			if !errors.Is(err, tt.wantGet) {
				t.Fatalf("Get(%s) = %v, want %v", tt.get, err, tt.wantGet)
			}
			if tt.wantGet != nil {
				return
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Get(%s) =\n%+v\nwant\n%+v", tt.get, got, tt.want)
			}
		})
	}
}

func TestTransition(t *testing.T) {
	at := base.Add(3 * time.Minute)
	tests := []struct {
		name       string
		state      store.State // the record's state before the call
		id         string
		from, to   store.State
		want       store.State
		wantClosed bool        // ClosedAt == at
		wantErr    error       // a sentinel
		wantStuck  store.State // a *StateError with this Current.State
	}{
		{name: "claim", state: store.Issued, from: store.Issued, to: store.Consuming, want: store.Consuming},
		{name: "release", state: store.Consuming, from: store.Consuming, to: store.Issued, want: store.Issued},
		{name: "consume", state: store.Consuming, from: store.Consuming, to: store.Consumed, want: store.Consumed, wantClosed: true},
		{name: "expire", state: store.Issued, from: store.Issued, to: store.Expired, want: store.Expired, wantClosed: true},
		{name: "lose", state: store.Issued, from: store.Issued, to: store.Lost, want: store.Lost, wantClosed: true},
		{name: "claim consuming", state: store.Consuming, from: store.Issued, to: store.Consuming, wantStuck: store.Consuming},
		{name: "claim consumed", state: store.Consumed, from: store.Issued, to: store.Consuming, wantStuck: store.Consumed},
		{name: "expire consuming", state: store.Consuming, from: store.Issued, to: store.Expired, wantStuck: store.Consuming},
		{name: "unknown", state: store.Issued, id: "nope", from: store.Issued, to: store.Consuming, wantErr: store.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := openStore(t, "")
			mustCreate(t, s, issued("a", base))
			// Walk the record to its starting state.
			switch tt.state {
			case store.Consuming:
				mustTransition(t, s, "a", store.Issued, store.Consuming, base)
			case store.Consumed:
				mustTransition(t, s, "a", store.Issued, store.Consuming, base)
				mustTransition(t, s, "a", store.Consuming, store.Consumed, base)
			}
			before, _ := s.Get(ctx, "a")
			id := tt.id
			if id == "" {
				id = "a"
			}

			got, err := s.Transition(ctx, id, tt.from, tt.to, at)
			var se *store.StateError
			switch {
			case tt.wantErr != nil:
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Transition() = %v, want %v", err, tt.wantErr)
				}
				return
			case tt.wantStuck != "":
				if !errors.As(err, &se) {
					t.Fatalf("Transition() = %v, want a *StateError", err)
				}
				if se.Current.State != tt.wantStuck || se.Want != tt.from || se.Current.UniqueID != "a" {
					t.Errorf("StateError = %+v, want Current.State %s, Want %s", se, tt.wantStuck, tt.from)
				}
				if after, _ := s.Get(ctx, "a"); !reflect.DeepEqual(after, before) {
					t.Errorf("a failed CAS changed the record: %+v, was %+v", after, before)
				}
				return
			case err != nil:
				t.Fatalf("Transition() = %v", err)
			}
			if got.State != tt.want {
				t.Errorf("State = %s, want %s", got.State, tt.want)
			}
			if closed := got.ClosedAt.Equal(at); closed != tt.wantClosed {
				t.Errorf("ClosedAt = %v, want set to %v: %v", got.ClosedAt, at, tt.wantClosed)
			}
			if !tt.wantClosed && !got.ClosedAt.IsZero() {
				t.Errorf("ClosedAt = %v for an active record", got.ClosedAt)
			}
			stored, err := s.Get(ctx, "a")
			if err != nil || !reflect.DeepEqual(stored, got) {
				t.Errorf("Get() = %+v, %v; want %+v", stored, err, got)
			}
			active, err := s.Active(ctx, base.Add(time.Hour), 0)
			if err != nil {
				t.Fatal(err)
			}
			if inActive := len(active) == 1; inActive != tt.want.Active() {
				t.Errorf("Active() = %v, want the record listed: %v", ids(active), tt.want.Active())
			}
		})
	}
}

func TestTransitionCompareAndSwap(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")
	mustCreate(t, s, issued("a", base))
	if _, err := s.Transition(ctx, "a", store.Issued, store.Consuming, base); err != nil {
		t.Fatalf("first claim = %v", err)
	}
	_, err := s.Transition(ctx, "a", store.Issued, store.Consuming, base)
	var se *store.StateError
	if !errors.As(err, &se) {
		t.Fatalf("second claim = %v, want a *StateError", err)
	}
	if se.Current.State != store.Consuming {
		t.Errorf("StateError.Current.State = %s, want %s", se.Current.State, store.Consuming)
	}
	if !strings.Contains(err.Error(), "consuming") {
		t.Errorf("error %q does not say the record is consuming", err)
	}
}

func TestTransitionConcurrentClaim(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")
	mustCreate(t, s, issued("a", base))

	const n = 64
	var (
		wg                 sync.WaitGroup
		start              = make(chan struct{})
		mu                 sync.Mutex
		wins, stuck, other int
	)
	for range n {
		wg.Go(func() {
			<-start
			_, err := s.Transition(ctx, "a", store.Issued, store.Consuming, base)
			var se *store.StateError
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				wins++
			case errors.As(err, &se) && se.Current.State == store.Consuming:
				stuck++
			default:
				other++
				t.Errorf("Transition() = %v", err)
			}
		})
	}
	close(start)
	wg.Wait()
	if wins != 1 || stuck != n-1 {
		t.Errorf("%d claims won, %d lost with a StateError, %d other; want 1, %d, 0", wins, stuck, other, n-1)
	}
}

func TestActive(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, "")
	// Created out of order; "x" ends consumed, "y" expired: neither is active.
	mustCreate(t, s,
		issued("c", base.Add(3*time.Minute)),
		issued("a", base.Add(1*time.Minute)),
		issued("x", base.Add(30*time.Second)),
		issued("d", base.Add(4*time.Minute)),
		issued("b", base.Add(2*time.Minute)),
		issued("y", base.Add(90*time.Second)),
	)
	mustTransition(t, s, "b", store.Issued, store.Consuming, base) // still active
	mustTransition(t, s, "x", store.Issued, store.Consuming, base)
	mustTransition(t, s, "x", store.Consuming, store.Consumed, base)
	mustTransition(t, s, "y", store.Issued, store.Expired, base)

	tests := []struct {
		name   string
		before time.Time
		limit  int
		want   []string
	}{
		{name: "all", before: base.Add(time.Hour), want: []string{"a", "b", "c", "d"}},
		{name: "negative limit is all", before: base.Add(time.Hour), limit: -1, want: []string{"a", "b", "c", "d"}},
		{name: "limit", before: base.Add(time.Hour), limit: 2, want: []string{"a", "b"}},
		{name: "limit above count", before: base.Add(time.Hour), limit: 10, want: []string{"a", "b", "c", "d"}},
		{name: "before some", before: base.Add(150 * time.Second), want: []string{"a", "b"}},
		{name: "strictly before", before: base.Add(3 * time.Minute), want: []string{"a", "b"}},
		{name: "just after", before: base.Add(3*time.Minute + 1), want: []string{"a", "b", "c"}},
		{name: "none due", before: base, want: []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Active(ctx, tt.before, tt.limit)
			if err != nil {
				t.Fatalf("Active() = %v", err)
			}
			if !reflect.DeepEqual(ids(got), tt.want) {
				t.Errorf("Active() = %v, want %v", ids(got), tt.want)
			}
			for _, r := range got {
				if !r.State.Active() {
					t.Errorf("Active() returned %s in state %s", r.UniqueID, r.State)
				}
			}
		})
	}
}

func TestPrune(t *testing.T) {
	// Closed at base+1m ("a"), +2m ("b"), +3m ("c"); "d" is active with an
	// old expiry and must never be pruned.
	setup := func(t testing.TB) *store.Bolt {
		t.Helper()
		s := openStore(t, "")
		mustCreate(t, s, issued("a", base), issued("b", base), issued("c", base), issued("d", base.Add(-time.Hour)))
		mustTransition(t, s, "c", store.Issued, store.Lost, base.Add(3*time.Minute))
		mustTransition(t, s, "a", store.Issued, store.Expired, base.Add(1*time.Minute))
		mustTransition(t, s, "b", store.Issued, store.Consuming, base)
		mustTransition(t, s, "b", store.Consuming, store.Consumed, base.Add(2*time.Minute))
		return s
	}
	tests := []struct {
		name      string
		before    time.Time
		limit     int
		want      int
		wantLeft  []string
		wantAgain int // what a second Prune with a large limit deletes
	}{
		{name: "all closed", before: base.Add(time.Hour), limit: 100, want: 3, wantLeft: []string{"d"}},
		{name: "limit", before: base.Add(time.Hour), limit: 2, want: 2, wantLeft: []string{"c", "d"}, wantAgain: 1},
		{name: "cutoff", before: base.Add(150 * time.Second), limit: 100, want: 2, wantLeft: []string{"c", "d"}},
		{name: "cutoff is exclusive", before: base.Add(2 * time.Minute), limit: 100, want: 1, wantLeft: []string{"b", "c", "d"}},
		{name: "nothing old enough", before: base, limit: 100, want: 0, wantLeft: []string{"a", "b", "c", "d"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := setup(t)
			got, err := s.Prune(ctx, tt.before, tt.limit)
			if err != nil {
				t.Fatalf("Prune() = %v", err)
			}
			if got != tt.want {
				t.Errorf("Prune() = %d, want %d", got, tt.want)
			}
			left := []string{}
			for _, id := range []string{"a", "b", "c", "d"} {
				_, err := s.Get(ctx, id)
				switch {
				case err == nil:
					left = append(left, id)
				case !errors.Is(err, store.ErrNotFound):
					t.Fatalf("Get(%s) = %v", id, err)
				}
			}
			if !reflect.DeepEqual(left, tt.wantLeft) {
				t.Errorf("records left = %v, want %v", left, tt.wantLeft)
			}
			// Pruning again removes what the limit left, and nothing more.
			again, err := s.Prune(ctx, tt.before, 100)
			if err != nil {
				t.Fatal(err)
			}
			if again != tt.wantAgain {
				t.Errorf("second Prune() = %d, want %d", again, tt.wantAgain)
			}
			if active, _ := s.Active(ctx, base.Add(time.Hour), 0); !reflect.DeepEqual(ids(active), []string{"d"}) {
				t.Errorf("Active() = %v after pruning, want [d]", ids(active))
			}
		})
	}
}

func TestReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "records.db")
	s, err := store.Open(path, store.Options{CommitDelay: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	mustCreate(t, s, issued("a", base), issued("b", base.Add(time.Minute)), issued("c", base.Add(2*time.Minute)))
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
		s   *store.Bolt
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		s, err := store.Open(path, store.Options{})
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

func TestCanceledContext(t *testing.T) {
	s := openStore(t, "")
	mustCreate(t, s, issued("a", base))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Create(ctx, issued("b", base)); !errors.Is(err, context.Canceled) {
		t.Errorf("Create() with a canceled context = %v", err)
	}
	if _, err := s.Transition(ctx, "a", store.Issued, store.Consuming, base); !errors.Is(err, context.Canceled) {
		t.Errorf("Transition() with a canceled context = %v", err)
	}
	if r, _ := s.Get(context.Background(), "a"); r.State != store.Issued {
		t.Errorf("record is %s after a canceled transition", r.State)
	}
}

func BenchmarkTransition(b *testing.B) {
	ctx := context.Background()
	s := openStore(b, "")
	i := 0
	for b.Loop() {
		id := fmt.Sprintf("bench-%09d", i)
		i++
		if err := s.Create(ctx, issued(id, base)); err != nil {
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
		if err := s.Create(ctx, issued(fmt.Sprintf("bench-%09d", i), base)); err != nil {
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
