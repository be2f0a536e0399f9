// Package storetest is the contract every record store keeps, as one suite
// of tests: [Run] it from each backend's tests, so that a behaviour that
// differs between backends is a test failure, not a surprise in production.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/issuer/store"
)

// Store is the contract: what the issuer needs of a record store, plus
// Import. Implementations are safe for concurrent use. Create and Import
// fail with [store.ErrExists] on a taken uniqueId (Import then stores
// nothing); Get and Transition fail with [store.ErrNotFound] on an unknown
// one; Transition is a compare-and-swap that fails with a
// *[store.StateError] holding the record as it is; leaving the active
// states sets ClosedAt. Settle is that compare-and-swap without waiting for
// durability, seen at once by Get and Transition of the same store. Times
// come back in UTC, to the microsecond at least.
type Store interface {
	Create(ctx context.Context, r store.Record) error
	Import(ctx context.Context, recs []store.Record) error
	Get(ctx context.Context, id string) (store.Record, error)
	Transition(ctx context.Context, id string, from, to store.State, at time.Time) (store.Record, error)
	Settle(id string, from, to store.State, at time.Time)
	Active(ctx context.Context, before time.Time, limit int) ([]store.Record, error)
	Prune(ctx context.Context, before time.Time, limit int) (int, error)
}

// base is a fixed instant in UTC, whole microseconds, without a monotonic
// reading: records compare equal with reflect.DeepEqual after a round trip
// through any backend.
var base = time.Date(2030, 1, 2, 3, 4, 5, 6000, time.UTC)

// Run runs the contract suite. newStore returns a new, empty store, and
// closes it with t.Cleanup.
func Run(t *testing.T, newStore func(t testing.TB) Store) {
	tests := []struct {
		name string
		fn   func(*testing.T, func(testing.TB) Store)
	}{
		{"CreateGet", testCreateGet},
		{"Transition", testTransition},
		{"CompareAndSwapRace", testCompareAndSwapRace},
		{"ManyRecordsRace", testManyRecordsRace},
		{"Settle", testSettle},
		{"SettleThenPrune", testSettleThenPrune},
		{"Active", testActive},
		{"Prune", testPrune},
		{"Import", testImport},
		{"CanceledContext", testCanceledContext},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, newStore) })
	}
}

// Issued returns an issued record with the given id and expiry: a fixture
// for backends' own tests.
func Issued(id string, expires time.Time) store.Record {
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

func mustCreate(t testing.TB, s Store, rs ...store.Record) {
	t.Helper()
	for _, r := range rs {
		if err := s.Create(context.Background(), r); err != nil {
			t.Fatalf("Create(%s) = %v", r.UniqueID, err)
		}
	}
}

func mustTransition(t testing.TB, s Store, id string, from, to store.State, at time.Time) store.Record {
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

func testCreateGet(t *testing.T, newStore func(testing.TB) Store) {
	ctx := context.Background()
	bare := store.Record{UniqueID: "bare", State: store.Issued, IssuedAt: base, ExpiresAt: base.Add(time.Hour)}
	tests := []struct {
		name     string
		existing []store.Record
		create   store.Record
		get      string
		want     store.Record
		wantErr  error // of Create
		wantGet  error
	}{
		{name: "new record", create: Issued("a", base), get: "a", want: Issued("a", base)},
		{name: "no customer or client", create: bare, get: "bare", want: bare},
		{
			name:     "second record",
			existing: []store.Record{Issued("a", base)},
			create:   Issued("b", base.Add(time.Second)),
			get:      "b",
			want:     Issued("b", base.Add(time.Second)),
		},
		{
			name:     "create twice",
			existing: []store.Record{Issued("a", base)},
			create:   store.Record{UniqueID: "a", Salt: "other", State: store.Issued, ExpiresAt: base.Add(time.Hour)},
			get:      "a",
			want:     Issued("a", base), // untouched
			wantErr:  store.ErrExists,
		},
		{name: "get unknown", create: Issued("a", base), get: "zz", wantGet: store.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
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

func testTransition(t *testing.T, newStore func(testing.TB) Store) {
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
		{name: "lose while consuming", state: store.Consuming, from: store.Consuming, to: store.Lost, want: store.Lost, wantClosed: true},
		{name: "expire", state: store.Issued, from: store.Issued, to: store.Expired, want: store.Expired, wantClosed: true},
		{name: "lose", state: store.Issued, from: store.Issued, to: store.Lost, want: store.Lost, wantClosed: true},
		{name: "claim consuming", state: store.Consuming, from: store.Issued, to: store.Consuming, wantStuck: store.Consuming},
		{name: "claim consumed", state: store.Consumed, from: store.Issued, to: store.Consuming, wantStuck: store.Consumed},
		{name: "expire consuming", state: store.Consuming, from: store.Issued, to: store.Expired, wantStuck: store.Consuming},
		{name: "release consumed", state: store.Consumed, from: store.Consuming, to: store.Issued, wantStuck: store.Consumed},
		{name: "unknown", state: store.Issued, id: "nope", from: store.Issued, to: store.Consuming, wantErr: store.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := newStore(t)
			mustCreate(t, s, Issued("a", base))
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
				if !strings.Contains(err.Error(), string(tt.wantStuck)) {
					t.Errorf("error %q does not say the record is %s", err, tt.wantStuck)
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

// testCompareAndSwapRace claims one record from many goroutines at once:
// exactly one wins, every other sees a StateError saying consuming.
func testCompareAndSwapRace(t *testing.T, newStore func(testing.TB) Store) {
	ctx := context.Background()
	s := newStore(t)
	mustCreate(t, s, Issued("a", base))

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

// testManyRecordsRace races claims, expiries and losses on many records at
// once: each record leaves issued exactly once.
func testManyRecordsRace(t *testing.T, newStore func(testing.TB) Store) {
	ctx := context.Background()
	s := newStore(t)
	const n = 100
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if err := s.Create(ctx, Issued(fmt.Sprintf("r%03d", i), base)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	var (
		mu   sync.Mutex
		wins = map[string]store.State{}
	)
	for i := range n {
		for _, to := range []store.State{store.Consuming, store.Consuming, store.Expired, store.Lost} {
			wg.Go(func() {
				id := fmt.Sprintf("r%03d", i)
				_, err := s.Transition(ctx, id, store.Issued, to, base)
				var se *store.StateError
				switch {
				case err == nil:
					mu.Lock()
					if w, ok := wins[id]; ok {
						t.Errorf("%s left issued twice: to %s and to %s", id, w, to)
					}
					wins[id] = to
					mu.Unlock()
				case !errors.As(err, &se):
					t.Error(err)
				}
			})
		}
	}
	wg.Wait()
	for i := range n {
		id := fmt.Sprintf("r%03d", i)
		r, err := s.Get(ctx, id)
		if err != nil || r.State != wins[id] {
			t.Errorf("%s is %s (%v), want %s, the winner's", id, r.State, err, wins[id])
		}
	}
}

func testSettle(t *testing.T, newStore func(testing.TB) Store) {
	tests := []struct {
		name  string
		claim bool // move the record to consuming before the settle
		to    store.State
		want  store.State
	}{
		{name: "consumed", claim: true, to: store.Consumed, want: store.Consumed},
		{name: "lost", claim: true, to: store.Lost, want: store.Lost},
		{name: "not consuming: no change", claim: false, to: store.Consumed, want: store.Issued},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := newStore(t)
			mustCreate(t, s, Issued("a", base))
			if tt.claim {
				mustTransition(t, s, "a", store.Issued, store.Consuming, base)
			}
			at := base.Add(time.Second)
			s.Settle("a", store.Consuming, tt.to, at)
			// Visible at once, committed or not.
			r, err := s.Get(ctx, "a")
			if err != nil {
				t.Fatal(err)
			}
			if r.State != tt.want {
				t.Errorf("Get() right after Settle: state %s, want %s", r.State, tt.want)
			}
			if !tt.want.Active() && !r.ClosedAt.Equal(at) {
				t.Errorf("ClosedAt = %v, want %v", r.ClosedAt, at)
			}
			// So does the scan of active records, which the reaper and
			// every "is anything left" check run.
			active, err := s.Active(ctx, base.Add(time.Hour), 0)
			if err != nil {
				t.Fatal(err)
			}
			if listed := len(active) == 1; listed != tt.want.Active() || listed && active[0].State != tt.want {
				t.Errorf("Active() right after Settle = %v, want the record listed only if %s is active", active, tt.want)
			}
			// A compare-and-swap sees it too.
			from := store.Consuming
			if !tt.claim {
				from = store.Expired // never the state: a sure conflict
			}
			_, err = s.Transition(ctx, "a", from, store.Expired, base)
			var se *store.StateError
			if !errors.As(err, &se) || se.Current.State != tt.want {
				t.Errorf("Transition(%s→expired) after Settle = %v, want a StateError in state %s", from, err, tt.want)
			}
		})
	}
}

// A settled record is closed for Prune at once too, committed or not.
func testSettleThenPrune(t *testing.T, newStore func(testing.TB) Store) {
	ctx := context.Background()
	s := newStore(t)
	mustCreate(t, s, Issued("a", base))
	mustTransition(t, s, "a", store.Issued, store.Consuming, base)
	at := base.Add(time.Second)
	s.Settle("a", store.Consuming, store.Consumed, at)
	if n, err := s.Prune(ctx, at.Add(time.Hour), 0); err != nil || n != 1 {
		t.Errorf("Prune() right after Settle = %d, %v; want 1", n, err)
	}
	if _, err := s.Get(ctx, "a"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Get() of the pruned record = %v, want ErrNotFound", err)
	}
}

func testActive(t *testing.T, newStore func(testing.TB) Store) {
	ctx := context.Background()
	s := newStore(t)
	// Created out of order; "x" ends consumed, "y" expired: neither is active.
	mustCreate(t, s,
		Issued("c", base.Add(3*time.Minute)),
		Issued("a", base.Add(1*time.Minute)),
		Issued("x", base.Add(30*time.Second)),
		Issued("d", base.Add(4*time.Minute)),
		Issued("b", base.Add(2*time.Minute)),
		Issued("y", base.Add(90*time.Second)),
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
		{name: "just after", before: base.Add(3*time.Minute + time.Microsecond), want: []string{"a", "b", "c"}},
		{name: "none due", before: base, want: []string{}},
		{name: "far future", before: time.Unix(0, 1<<62), want: []string{"a", "b", "c", "d"}},
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

func testPrune(t *testing.T, newStore func(testing.TB) Store) {
	// Closed at base+1m ("a"), +2m ("b"), +3m ("c"); "d" is active with an
	// old expiry and must never be pruned.
	setup := func(t testing.TB) Store {
		t.Helper()
		s := newStore(t)
		mustCreate(t, s, Issued("a", base), Issued("b", base), Issued("c", base), Issued("d", base.Add(-time.Hour)))
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
		{name: "no limit", before: base.Add(time.Hour), limit: 0, want: 3, wantLeft: []string{"d"}},
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

// testImport loads records in bulk, as the benchmark loads its store of a
// million (here fewer, to stay quick): all or nothing, and indexed.
func testImport(t *testing.T, newStore func(testing.TB) Store) {
	ctx := context.Background()
	s := newStore(t)
	mustCreate(t, s, Issued("taken", base))
	const n = 20000
	recs := make([]store.Record, 0, n)
	for i := range n {
		r := Issued(fmt.Sprintf("imp-%06d", i), base.Add(time.Duration(i+1)*time.Second))
		if i%2 == 1 { // every other one closed, in order of closing
			r.State, r.ClosedAt = store.Consumed, base.Add(time.Duration(i)*time.Millisecond)
		}
		recs = append(recs, r)
	}
	if err := s.Import(ctx, recs); err != nil {
		t.Fatalf("Import(%d records) = %v", n, err)
	}
	if r, err := s.Get(ctx, "imp-000001"); err != nil || !reflect.DeepEqual(r, recs[1]) {
		t.Errorf("Get(imp-000001) = %+v, %v; want %+v", r, err, recs[1])
	}
	active, err := s.Active(ctx, base.Add(time.Hour), 3)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(ids(active)); got != "[taken imp-000000 imp-000002]" {
		t.Errorf("Active(limit 3) = %v, want [taken imp-000000 imp-000002]", got)
	}
	if all, err := s.Active(ctx, time.Unix(0, 1<<62), 0); err != nil || len(all) != n/2+1 {
		t.Errorf("Active() = %d records, %v; want %d", len(all), err, n/2+1)
	}
	if k, err := s.Prune(ctx, base.Add(time.Second), 0); err != nil || k != 500 {
		t.Errorf("Prune(first second) = %d, %v; want the 500 records closed in it", k, err)
	}
	err = s.Import(ctx, []store.Record{Issued("d", base), Issued("taken", base)})
	if !errors.Is(err, store.ErrExists) {
		t.Errorf("Import() with a taken id = %v, want ErrExists", err)
	}
	if _, err := s.Get(ctx, "d"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a failed Import() left record d behind: %v", err)
	}
	err = s.Import(ctx, []store.Record{Issued("e", base), Issued("e", base)})
	if !errors.Is(err, store.ErrExists) {
		t.Errorf("Import() of one id twice = %v, want ErrExists", err)
	}
}

func testCanceledContext(t *testing.T, newStore func(testing.TB) Store) {
	s := newStore(t)
	mustCreate(t, s, Issued("a", base))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Create(ctx, Issued("b", base)); !errors.Is(err, context.Canceled) {
		t.Errorf("Create() with a canceled context = %v", err)
	}
	if _, err := s.Transition(ctx, "a", store.Issued, store.Consuming, base); !errors.Is(err, context.Canceled) {
		t.Errorf("Transition() with a canceled context = %v", err)
	}
	if r, _ := s.Get(context.Background(), "a"); r.State != store.Issued {
		t.Errorf("record is %s after a canceled transition", r.State)
	}
	if _, err := s.Get(context.Background(), "b"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a canceled Create() stored its record: %v", err)
	}
}
