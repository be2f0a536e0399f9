package issuer

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
)

// clock is a controllable Config.Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// watchStore wraps the real store: it counts transitions and can stop a
// request just after its Get, to order concurrent requests deterministically.
type watchStore struct {
	Store
	transitions atomic.Int64

	mu       sync.Mutex
	afterGet func(id string) // runs once, after the next Get
	// beforeTo[s] runs once, before the next transition to state s.
	beforeTo map[store.State]func()
	// failTo[s] fails the next transition to state s, once.
	failTo  map[store.State]error
	settles [][2]store.State // from, to of each Settle
}

func (w *watchStore) Settle(id string, from, to store.State, at time.Time) {
	w.mu.Lock()
	w.settles = append(w.settles, [2]store.State{from, to})
	w.mu.Unlock()
	w.Store.Settle(id, from, to, at)
}

func (w *watchStore) Get(ctx context.Context, id string) (store.Record, error) {
	r, err := w.Store.Get(ctx, id)
	w.mu.Lock()
	fn := w.afterGet
	w.afterGet = nil
	w.mu.Unlock()
	if fn != nil {
		fn(id)
	}
	return r, err
}

func (w *watchStore) Transition(ctx context.Context, id string, from, to store.State, at time.Time) (store.Record, error) {
	w.transitions.Add(1)
	w.mu.Lock()
	fn := w.beforeTo[to]
	delete(w.beforeTo, to)
	fail := w.failTo[to]
	delete(w.failTo, to)
	w.mu.Unlock()
	if fn != nil {
		fn()
	}
	if fail != nil {
		return store.Record{}, fail
	}
	return w.Store.Transition(ctx, id, from, to, at)
}

type harness struct {
	is    *Issuer
	tok   *fakeToken
	st    *watchStore
	clock *clock
}

// newHarness makes an Issuer over a fake token and a real store in a temp
// dir. mod may change the config; Token and Store are set after it.
func newHarness(t testing.TB, mod func(*Config)) *harness {
	t.Helper()
	testKeys() // generate the shared RSA keys before any ApplyWait runs
	bs, err := bolt.Open(filepath.Join(t.TempDir(), "records.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bs.Close() })
	clk := &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	cfg := Config{
		Storage:      hsm.StorageSession,
		TTL:          10 * time.Minute,
		PoolSize:     4,
		Generators:   1,
		ApplyWait:    200 * time.Millisecond,
		Retention:    time.Hour,
		ReapInterval: time.Hour, // tests call Reap themselves
		Now:          clk.Now,
	}
	if mod != nil {
		mod(&cfg)
	}
	h := &harness{tok: newFakeToken(cfg.Storage), st: &watchStore{Store: bs}, clock: clk}
	cfg.Token, cfg.Store = h.tok, h.st
	h.is, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// start runs the pool's generators until the test ends, then destroys the
// pooled keys.
func (h *harness) start(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range h.is.cfg.Generators {
		wg.Go(func() { h.is.generate(ctx) })
	}
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		h.is.drain(context.Background())
	})
}

func (h *harness) apply(t testing.TB) Issued {
	t.Helper()
	iss, err := h.is.Apply(context.Background(), "customer-1", "client-1")
	if err != nil {
		t.Fatalf("Apply() = %v", err)
	}
	return iss
}

func (h *harness) record(t testing.TB, id string) store.Record {
	t.Helper()
	r, err := h.st.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("Get(%s) = %v", id, err)
	}
	return r
}

func (h *harness) wantState(t testing.TB, id string, want store.State) {
	t.Helper()
	if r := h.record(t, id); r.State != want {
		t.Errorf("record %s is %s, want %s", id, r.State, want)
	}
}

func parsePublic(t testing.TB, der []byte) *rsa.PublicKey {
	t.Helper()
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		t.Fatalf("ParsePKIXPublicKey() = %v", err)
	}
	rsaPub, ok := pub.(*rsa.PublicKey)
	if !ok {
		t.Fatalf("public key is a %T, want *rsa.PublicKey", pub)
	}
	return rsaPub
}

// seal does what a client does: OAEP-SHA256 over password||salt.
func seal(t testing.TB, der []byte, password, salt string) []byte {
	t.Helper()
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, parsePublic(t, der), []byte(password+salt), nil)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9]*$`)

func TestApply(t *testing.T) {
	tests := []struct {
		name               string
		customer, client   string
		wantCust, wantClnt string
	}{
		{name: "with ids", customer: "cust-42", client: "app-7", wantCust: "cust-42", wantClnt: "app-7"},
		{name: "without ids", customer: "", client: "", wantCust: "", wantClnt: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			h.start(t)
			now := h.clock.Now()
			got, err := h.is.Apply(context.Background(), tt.customer, tt.client)
			if err != nil {
				t.Fatalf("Apply() = %v", err)
			}
			if len(got.UniqueID) != uniqueIDLen || !idRE.MatchString(got.UniqueID) {
				t.Errorf("UniqueID = %q, want %d characters of [A-Za-z0-9]", got.UniqueID, uniqueIDLen)
			}
			if len(got.Salt) != saltLen || !idRE.MatchString(got.Salt) {
				t.Errorf("Salt = %q, want %d characters of [A-Za-z0-9]", got.Salt, saltLen)
			}
			if pub := parsePublic(t, got.PublicKey); pub.Size() != 256 {
				t.Errorf("public key is %d bytes, want 256", pub.Size())
			}
			wantExp := now.Add(10 * time.Minute)
			if !got.ExpiresAt.Equal(wantExp) {
				t.Errorf("ExpiresAt = %v, want %v", got.ExpiresAt, wantExp)
			}
			r := h.record(t, got.UniqueID)
			want := store.Record{
				UniqueID:   got.UniqueID,
				Salt:       got.Salt,
				CustomerID: tt.wantCust,
				ClientID:   tt.wantClnt,
				State:      store.Issued,
				IssuedAt:   now,
				ExpiresAt:  wantExp,
			}
			if r.UniqueID != want.UniqueID || r.Salt != want.Salt || r.CustomerID != want.CustomerID ||
				r.ClientID != want.ClientID || r.State != want.State || !r.IssuedAt.Equal(want.IssuedAt) ||
				!r.ExpiresAt.Equal(want.ExpiresAt) || !r.ClosedAt.IsZero() {
				t.Errorf("record =\n%+v\nwant\n%+v", r, want)
			}
			if s := h.is.Stats(); s.Outstanding != 1 || s.Issued != 1 {
				t.Errorf("Stats() = %+v, want 1 outstanding, 1 issued", s)
			}
		})
	}
}

func TestApplyUniqueIDs(t *testing.T) {
	h := newHarness(t, nil)
	h.start(t)
	seen := map[string]bool{}
	for range 20 {
		iss := h.apply(t)
		if seen[iss.UniqueID] {
			t.Fatalf("uniqueId %s issued twice", iss.UniqueID)
		}
		seen[iss.UniqueID] = true
	}
}

func TestDecrypt(t *testing.T) {
	const password = "correct horse battery staple"
	tests := []struct {
		name          string
		id            func(iss Issued) string
		ciphertext    func(t testing.TB, iss Issued) []byte
		want          []byte
		wantErr       error
		wantState     store.State // "" when there is no record
		wantDestroyed bool
	}{
		{
			name:          "password",
			ciphertext:    func(t testing.TB, iss Issued) []byte { return seal(t, iss.PublicKey, password, iss.Salt) },
			want:          []byte(password),
			wantState:     store.Consumed,
			wantDestroyed: true,
		},
		{
			name:          "empty password",
			ciphertext:    func(t testing.TB, iss Issued) []byte { return seal(t, iss.PublicKey, "", iss.Salt) },
			want:          []byte{},
			wantState:     store.Consumed,
			wantDestroyed: true,
		},
		{
			name:          "wrong salt",
			ciphertext:    func(t testing.TB, iss Issued) []byte { return seal(t, iss.PublicKey, password, "AAAAAAAAAAAA") },
			wantErr:       ErrDecrypt,
			wantState:     store.Consumed,
			wantDestroyed: true,
		},
		{
			name:          "no salt",
			ciphertext:    func(t testing.TB, iss Issued) []byte { return seal(t, iss.PublicKey, password, "") },
			wantErr:       ErrDecrypt,
			wantState:     store.Consumed,
			wantDestroyed: true,
		},
		{
			name: "garbage of the right length",
			ciphertext: func(t testing.TB, iss Issued) []byte {
				ct := make([]byte, 256)
				rand.Read(ct[1:]) // below the modulus
				return ct
			},
			wantErr:       ErrDecrypt,
			wantState:     store.Consumed,
			wantDestroyed: true,
		},
		{
			name: "too short",
			ciphertext: func(t testing.TB, iss Issued) []byte {
				return seal(t, iss.PublicKey, password, iss.Salt)[:255]
			},
			wantErr:   ErrCiphertext,
			wantState: store.Issued,
		},
		{
			name: "too long",
			ciphertext: func(t testing.TB, iss Issued) []byte {
				return append(seal(t, iss.PublicKey, password, iss.Salt), 0)
			},
			wantErr:   ErrCiphertext,
			wantState: store.Issued,
		},
		{
			name:       "empty",
			ciphertext: func(t testing.TB, iss Issued) []byte { return nil },
			wantErr:    ErrCiphertext,
			wantState:  store.Issued,
		},
		{
			name:       "unknown id",
			id:         func(Issued) string { return "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345" },
			ciphertext: func(t testing.TB, iss Issued) []byte { return seal(t, iss.PublicKey, password, iss.Salt) },
			wantErr:    ErrNotFound,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			h := newHarness(t, nil)
			h.start(t)
			iss := h.apply(t)
			id := iss.UniqueID
			if tt.id != nil {
				id = tt.id(iss)
			}

			got, err := h.is.Decrypt(ctx, id, tt.ciphertext(t, iss))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Decrypt() = %q, %v; want error %v", got, err, tt.wantErr)
			}
			if err == nil && !bytes.Equal(got, tt.want) {
				t.Errorf("Decrypt() = %q, want %q", got, tt.want)
			}
			if tt.wantState == "" {
				if _, err := h.st.Get(ctx, id); !errors.Is(err, store.ErrNotFound) {
					t.Errorf("Get(%s) = %v, want ErrNotFound", id, err)
				}
			} else {
				h.wantState(t, iss.UniqueID, tt.wantState)
			}
			if d := h.tok.wasDestroyed(iss.UniqueID); d != tt.wantDestroyed {
				t.Errorf("key destroyed: %v, want %v", d, tt.wantDestroyed)
			}

			// Then a correct ciphertext: it works only if the key is untouched.
			got, err = h.is.Decrypt(ctx, iss.UniqueID, seal(t, iss.PublicKey, password, iss.Salt))
			switch tt.wantState {
			case store.Consumed:
				if !errors.Is(err, ErrConsumed) {
					t.Errorf("second Decrypt() = %q, %v; want ErrConsumed", got, err)
				}
			default:
				if err != nil || string(got) != password {
					t.Errorf("Decrypt() after %s = %q, %v; want the password", tt.name, got, err)
				}
				h.wantState(t, iss.UniqueID, store.Consumed)
			}
			if !h.tok.wasDestroyed(iss.UniqueID) || h.tok.has(iss.UniqueID) {
				t.Error("the key survived its decrypt")
			}
			if n := h.tok.decryptCount(); n != 1 {
				t.Errorf("the token decrypted %d times, want 1", n)
			}
		})
	}
}

func TestDecryptConcurrent(t *testing.T) {
	const n = 32
	for round := range 5 {
		h := newHarness(t, nil)
		h.start(t)
		iss := h.apply(t)
		ct := seal(t, iss.PublicKey, "pw", iss.Salt)

		var (
			wg    sync.WaitGroup
			start = make(chan struct{})
			errs  = make(chan error, n)
			wins  atomic.Int64
		)
		for range n {
			wg.Go(func() {
				<-start
				got, err := h.is.Decrypt(context.Background(), iss.UniqueID, ct)
				if err == nil {
					if string(got) != "pw" {
						t.Errorf("Decrypt() = %q, want pw", got)
					}
					wins.Add(1)
					return
				}
				errs <- err
			})
		}
		close(start)
		wg.Wait()
		close(errs)
		if w := wins.Load(); w != 1 {
			t.Errorf("round %d: %d decrypts returned the password, want exactly 1", round, w)
		}
		for err := range errs {
			if !errors.Is(err, ErrConsumed) {
				t.Errorf("round %d: a losing Decrypt() = %v, want ErrConsumed", round, err)
			}
		}
		if c := h.tok.decryptCount(); c != 1 {
			t.Errorf("round %d: the token decrypted %d times", round, c)
		}
		h.wantState(t, iss.UniqueID, store.Consumed)
	}
}

// newClaimPausingHarness returns a harness whose first decrypt, once it has
// claimed its key, closes claimed and waits for resume to be closed before
// it asks the token.
func newClaimPausingHarness(t *testing.T) (h *harness, claimed, resume chan struct{}) {
	t.Helper()
	return pausedClaim(t, hsm.StorageSession, nil)
}

// TestDecryptRacingClaim orders two decrypts of one key: B reads the record
// while it is still issued, then A claims it, then B goes on. B must report
// the key as consumed, not lost.
func TestDecryptRacingClaim(t *testing.T) {
	ctx := context.Background()
	h, claimed, resume := newClaimPausingHarness(t)
	h.start(t)
	iss := h.apply(t)
	ct := seal(t, iss.PublicKey, "pw", iss.Salt)

	bGot, bGo := make(chan struct{}), make(chan struct{})
	h.st.mu.Lock()
	h.st.afterGet = func(string) {
		close(bGot)
		<-bGo
	}
	h.st.mu.Unlock()
	type result struct {
		pt  []byte
		err error
	}
	bDone, aDone := make(chan result, 1), make(chan result, 1)
	go func() {
		pt, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
		bDone <- result{pt, err}
	}()
	<-bGot // B holds an issued record
	go func() {
		pt, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
		aDone <- result{pt, err}
	}()
	<-claimed // A claimed the key and waits before the token decrypt
	close(bGo)
	b := <-bDone
	close(resume)
	a := <-aDone

	if a.err != nil || string(a.pt) != "pw" {
		t.Errorf("A: Decrypt() = %q, %v; want the password", a.pt, a.err)
	}
	if !errors.Is(b.err, ErrConsumed) {
		t.Errorf("B: Decrypt() = %q, %v; want ErrConsumed", b.pt, b.err)
	}
	h.wantState(t, iss.UniqueID, store.Consumed)
}

// TestDecryptRetryAfterRacingRelease: A claims the key and the token fails
// (ErrUnavailable, which promises the key is untouched and a retry may
// work); B, which read the record while it was issued, finds no key in the
// map meanwhile. Whatever B answers, A's retry must decrypt.
func TestDecryptRetryAfterRacingRelease(t *testing.T) {
	ctx := context.Background()
	h, claimed, resume := newClaimPausingHarness(t)
	h.start(t)
	iss := h.apply(t)
	ct := seal(t, iss.PublicKey, "pw", iss.Salt)
	h.tok.set(func(f *fakeToken) { f.failDecrypt = hsm.ErrUnavailable })

	bGot, bGo := make(chan struct{}), make(chan struct{})
	bLosing, bLose := make(chan struct{}), make(chan struct{})
	h.st.mu.Lock()
	h.st.afterGet = func(string) {
		close(bGot)
		<-bGo
	}
	h.st.beforeTo = map[store.State]func(){store.Lost: func() {
		close(bLosing)
		<-bLose
	}}
	h.st.mu.Unlock()
	bDone, aDone := make(chan error, 1), make(chan error, 1)
	go func() {
		_, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
		bDone <- err
	}()
	<-bGot // B holds an issued record
	go func() {
		_, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
		aDone <- err
	}()
	<-claimed // A claimed the key; B goes on and finds no key
	close(bGo)
	var bErr error
	bFinished := false
	select {
	case <-bLosing: // B marks the record lost, and is held just before
	case bErr = <-bDone: // B answered without marking the record lost
		bFinished = true
	}
	close(resume) // A's token call fails; A releases the key
	if err := <-aDone; !errors.Is(err, ErrUnavailable) {
		t.Fatalf("A: Decrypt() = %v, want ErrUnavailable", err)
	}
	close(bLose)
	if !bFinished {
		bErr = <-bDone
	}
	t.Logf("B: Decrypt() = %v", bErr)

	h.tok.set(func(f *fakeToken) { f.failDecrypt = nil })
	got, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
	if err != nil || string(got) != "pw" {
		t.Errorf("A's retry after ErrUnavailable: Decrypt() = %q, %v; want the password", got, err)
	}
}

func TestDecryptUnavailable(t *testing.T) {
	tests := []struct {
		name            string
		storage         hsm.Storage
		fault           func(f *fakeToken)
		wantTransitions int64 // by the failed Decrypt
	}{
		{
			name:            "token fails during decrypt, session storage",
			storage:         hsm.StorageSession,
			fault:           func(f *fakeToken) { f.failDecrypt = hsm.ErrUnavailable },
			wantTransitions: 0, // claimed and given back in memory
		},
		{
			name:            "token fails during decrypt, token storage",
			storage:         hsm.StorageToken,
			fault:           func(f *fakeToken) { f.failDecrypt = hsm.ErrUnavailable },
			wantTransitions: 2, // claim, release
		},
		{
			name:            "token not ready",
			storage:         hsm.StorageSession,
			fault:           func(f *fakeToken) { f.ready = false },
			wantTransitions: 0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			h := newHarness(t, func(c *Config) { c.Storage = tt.storage })
			h.start(t)
			iss := h.apply(t)
			ct := seal(t, iss.PublicKey, "pw", iss.Salt)
			before := h.record(t, iss.UniqueID)

			h.tok.set(tt.fault)
			n0 := h.st.transitions.Load()
			got, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
			if !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Decrypt() = %q, %v; want ErrUnavailable", got, err)
			}
			if n := h.st.transitions.Load() - n0; n != tt.wantTransitions {
				t.Errorf("Decrypt() made %d transitions, want %d", n, tt.wantTransitions)
			}
			after := h.record(t, iss.UniqueID)
			if after.State != store.Issued || !after.ClosedAt.IsZero() || !after.ExpiresAt.Equal(before.ExpiresAt) {
				t.Errorf("record after ErrUnavailable = %+v, want it issued as before", after)
			}
			if !h.tok.has(iss.UniqueID) {
				t.Fatal("the key was destroyed")
			}

			h.tok.set(func(f *fakeToken) { f.failDecrypt, f.ready = nil, true })
			got, err = h.is.Decrypt(ctx, iss.UniqueID, ct)
			if err != nil || string(got) != "pw" {
				t.Errorf("retry Decrypt() = %q, %v; want pw", got, err)
			}
			h.wantState(t, iss.UniqueID, store.Consumed)
		})
	}
}

func TestDecryptTokenErrors(t *testing.T) {
	tests := []struct {
		name      string
		fault     error
		wantErr   error
		wantState store.State
	}{
		{name: "key lost", fault: hsm.ErrKeyLost, wantErr: ErrLost, wantState: store.Lost},
		{name: "rejected", fault: hsm.ErrDecrypt, wantErr: ErrDecrypt, wantState: store.Consumed},
		{name: "spent", fault: hsm.ErrKeySpent, wantErr: ErrDecrypt, wantState: store.Consumed},
		{name: "other", fault: errors.New("CKR_GENERAL_ERROR"), wantErr: ErrDecrypt, wantState: store.Consumed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			h.start(t)
			iss := h.apply(t)
			h.tok.set(func(f *fakeToken) { f.failDecrypt = tt.fault })
			got, err := h.is.Decrypt(context.Background(), iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt))
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("Decrypt() = %q, %v; want %v", got, err, tt.wantErr)
			}
			h.wantState(t, iss.UniqueID, tt.wantState)
			if h.tok.has(iss.UniqueID) {
				t.Error("the key was not destroyed")
			}
		})
	}
}

func TestDecryptExpired(t *testing.T) {
	tests := []struct {
		name    string
		advance time.Duration
		wantErr error
		want    store.State
	}{
		{name: "just before expiry", advance: 10*time.Minute - time.Nanosecond, want: store.Consumed},
		{name: "at expiry", advance: 10 * time.Minute, wantErr: ErrExpired, want: store.Expired},
		{name: "past expiry", advance: time.Hour, wantErr: ErrExpired, want: store.Expired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			h.start(t)
			iss := h.apply(t)
			h.clock.Advance(tt.advance)
			_, err := h.is.Decrypt(context.Background(), iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Decrypt() = %v, want %v", err, tt.wantErr)
			}
			h.wantState(t, iss.UniqueID, tt.want)
			if !h.tok.wasDestroyed(iss.UniqueID) {
				t.Error("key not destroyed")
			}
			if tt.wantErr != nil && h.tok.decryptCount() != 0 {
				t.Error("an expired key decrypted")
			}
			// Once closed, the record answers with its state.
			_, err = h.is.Decrypt(context.Background(), iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt))
			wantAgain := ErrConsumed
			if tt.wantErr != nil {
				wantAgain = tt.wantErr
			}
			if !errors.Is(err, wantAgain) {
				t.Errorf("second Decrypt() = %v, want %v", err, wantAgain)
			}
		})
	}
}

func TestReap(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, nil) // TTL 10m, Retention 1h
	h.start(t)
	old := h.apply(t)
	h.clock.Advance(5 * time.Minute)
	young := h.apply(t)
	h.clock.Advance(5*time.Minute + time.Second) // old is past TTL, young is not

	h.is.Reap(ctx)
	h.wantState(t, old.UniqueID, store.Expired)
	h.wantState(t, young.UniqueID, store.Issued)
	h.clock.Advance(time.Second) // young closes a second after old
	if h.tok.has(old.UniqueID) || !h.tok.wasDestroyed(old.UniqueID) {
		t.Error("the expired key was not destroyed")
	}
	if !h.tok.has(young.UniqueID) {
		t.Error("the unexpired key was destroyed")
	}
	if _, err := h.is.Decrypt(ctx, young.UniqueID, seal(t, young.PublicKey, "pw", young.Salt)); err != nil {
		t.Errorf("Decrypt() of the unexpired key = %v", err)
	}
	if _, err := h.is.Decrypt(ctx, old.UniqueID, seal(t, old.PublicKey, "pw", old.Salt)); !errors.Is(err, ErrExpired) {
		t.Errorf("Decrypt() of the reaped key = %v, want ErrExpired", err)
	}

	// Within retention, the closed records stay.
	h.clock.Advance(59 * time.Minute)
	h.is.Reap(ctx)
	h.wantState(t, old.UniqueID, store.Expired)
	h.wantState(t, young.UniqueID, store.Consumed)

	// Past it, they go: old closed an hour and a second ago, young less.
	h.clock.Advance(time.Minute)
	h.is.Reap(ctx)
	if _, err := h.is.Record(ctx, old.UniqueID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Record() of a record past retention = %v, want ErrNotFound", err)
	}
	h.wantState(t, young.UniqueID, store.Consumed)
	h.clock.Advance(time.Hour)
	h.is.Reap(ctx)
	if _, err := h.is.Record(ctx, young.UniqueID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Record() of a record past retention = %v, want ErrNotFound", err)
	}
	if s := h.is.Stats(); s.Outstanding != 0 || s.Expired != 1 {
		t.Errorf("Stats() = %+v, want 0 outstanding, 1 expired", s)
	}
}

func TestReapFinishesConsuming(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, nil)
	h.start(t)
	iss := h.apply(t)
	// A decrypt whose final write was lost: the record stays consuming.
	if _, err := h.st.Transition(ctx, iss.UniqueID, store.Issued, store.Consuming, h.clock.Now()); err != nil {
		t.Fatal(err)
	}
	h.is.Reap(ctx)
	h.wantState(t, iss.UniqueID, store.Consuming) // not yet past expiry
	h.clock.Advance(11 * time.Minute)
	h.is.Reap(ctx)
	h.wantState(t, iss.UniqueID, store.Consumed)
}

func TestReapRetriesFailedDestroy(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, nil)
	h.start(t)
	iss := h.apply(t)
	ct := seal(t, iss.PublicKey, "pw", iss.Salt)
	h.tok.set(func(f *fakeToken) { f.failDestroy = errors.New("CKR_DEVICE_ERROR") })

	got, err := h.is.Decrypt(ctx, iss.UniqueID, ct)
	if err != nil || string(got) != "pw" {
		t.Fatalf("Decrypt() = %q, %v", got, err)
	}
	if !h.tok.has(iss.UniqueID) {
		t.Fatal("the key is gone although its destroy failed")
	}
	if s := h.is.Stats(); s.PendingDestroys != 1 {
		t.Errorf("PendingDestroys = %d, want 1", s.PendingDestroys)
	}

	// Meanwhile the key never decrypts: not through the issuer, not at all.
	h.is.Reap(ctx) // the destroy fails again and stays queued
	if _, err := h.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, ErrConsumed) {
		t.Errorf("Decrypt() of a key waiting for destruction = %v, want ErrConsumed", err)
	}
	k := &hsm.Key{ID: iss.UniqueID, Public: parsePublic(t, iss.PublicKey), PublicDER: iss.PublicKey}
	if _, err := h.tok.Decrypt(ctx, k, hsm.OAEPSHA256, ct); !errors.Is(err, hsm.ErrKeySpent) {
		t.Errorf("token Decrypt() of the spent key = %v, want ErrKeySpent", err)
	}
	if s := h.is.Stats(); s.PendingDestroys != 1 {
		t.Errorf("PendingDestroys after a failed retry = %d, want 1", s.PendingDestroys)
	}

	h.tok.set(func(f *fakeToken) { f.failDestroy = nil })
	h.is.Reap(ctx)
	if h.tok.has(iss.UniqueID) || !h.tok.wasDestroyed(iss.UniqueID) {
		t.Error("the reaper did not destroy the key")
	}
	if s := h.is.Stats(); s.PendingDestroys != 0 {
		t.Errorf("PendingDestroys = %d, want 0", s.PendingDestroys)
	}
	if n := h.tok.decryptCount(); n != 1 {
		t.Errorf("the token decrypted %d times, want 1", n)
	}
}

func TestKeysLost(t *testing.T) {
	tests := []struct {
		name    string
		viaLoop bool // let Run's maintenance loop notice, else call accountLost
	}{
		{name: "accountLost"},
		{name: "maintenance loop", viaLoop: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			h := newHarness(t, func(c *Config) { c.Storage = hsm.StorageToken })
			iss, keep := Issued{}, Issued{}
			if tt.viaLoop {
				runCtx, cancel := context.WithCancel(ctx)
				done := make(chan error, 1)
				go func() { done <- h.is.Run(runCtx) }()
				t.Cleanup(func() { cancel(); <-done })
				iss, keep = h.apply(t), h.apply(t)
				h.is.KeysLost([]string{iss.UniqueID, "never-issued"})
				deadline := time.Now().Add(10 * time.Second)
				// The record turns lost before the key is destroyed: wait for both.
				for (h.record(t, iss.UniqueID).State != store.Lost || h.tok.has(iss.UniqueID)) && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
			} else {
				h.start(t)
				iss, keep = h.apply(t), h.apply(t)
				h.is.KeysLost([]string{iss.UniqueID, "never-issued"})
				h.is.accountLost(ctx)
			}
			h.wantState(t, iss.UniqueID, store.Lost)
			h.wantState(t, keep.UniqueID, store.Issued)
			if r := h.record(t, iss.UniqueID); !r.ClosedAt.Equal(h.clock.Now()) {
				t.Errorf("ClosedAt = %v, want %v", r.ClosedAt, h.clock.Now())
			}
			if _, err := h.is.Decrypt(ctx, iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt)); !errors.Is(err, ErrLost) {
				t.Errorf("Decrypt() of a lost key = %v, want ErrLost", err)
			}
			if h.tok.has(iss.UniqueID) {
				t.Error("the objects of a lost key were left in the token")
			}
			if got, err := h.is.Decrypt(ctx, keep.UniqueID, seal(t, keep.PublicKey, "pw", keep.Salt)); err != nil || string(got) != "pw" {
				t.Errorf("Decrypt() of another key = %q, %v", got, err)
			}
		})
	}
}

// createRecord writes a record as a previous run would have left it.
func createRecord(t testing.TB, h *harness, id string, state store.State) store.Record {
	t.Helper()
	ctx := context.Background()
	now := h.clock.Now()
	r := store.Record{UniqueID: id, Salt: "salt" + strings.Repeat("x", saltLen-4), State: store.Issued, IssuedAt: now, ExpiresAt: now.Add(10 * time.Minute)}
	if err := h.st.Create(ctx, r); err != nil {
		t.Fatal(err)
	}
	var path []store.State
	switch state {
	case store.Consuming:
		path = []store.State{store.Issued, store.Consuming}
	case store.Consumed:
		path = []store.State{store.Issued, store.Consuming, store.Consumed}
	}
	for i := 1; i < len(path); i++ {
		if _, err := h.st.Transition(ctx, id, path[i-1], path[i], now); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

func TestReconcileSession(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, nil)
	createRecord(t, h, "issued1", store.Issued)
	createRecord(t, h, "issued2", store.Issued)
	createRecord(t, h, "consuming", store.Consuming)
	createRecord(t, h, "consumed", store.Consumed)

	if err := h.is.Reconcile(ctx); err != nil {
		t.Fatalf("Reconcile() = %v", err)
	}
	for _, tt := range []struct {
		id   string
		want store.State
	}{
		{"issued1", store.Lost},
		{"issued2", store.Lost},
		{"consuming", store.Consumed},
		{"consumed", store.Consumed},
	} {
		h.wantState(t, tt.id, tt.want)
	}
	if _, err := h.is.Decrypt(ctx, "issued1", make([]byte, 256)); !errors.Is(err, ErrLost) {
		t.Errorf("Decrypt() of a lost key = %v, want ErrLost", err)
	}
	if s := h.is.Stats(); s.Outstanding != 0 {
		t.Errorf("Outstanding = %d, want 0", s.Outstanding)
	}
}

func TestReconcileToken(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, func(c *Config) { c.Storage = hsm.StorageToken })
	adopt := createRecord(t, h, "adopt", store.Issued)
	adoptKey := h.tok.plant("adopt", true, true)
	createRecord(t, h, "missing", store.Issued)
	createRecord(t, h, "half", store.Issued)
	h.tok.plant("half", true, false)
	createRecord(t, h, "consuming", store.Consuming)
	h.tok.plant("consuming", true, true)
	createRecord(t, h, "consumed", store.Consumed)
	h.tok.plant("consumed", true, true)
	h.tok.plant("orphan", true, true)

	if err := h.is.Reconcile(ctx); err != nil {
		t.Fatalf("Reconcile() = %v", err)
	}
	tests := []struct {
		id        string
		want      store.State
		wantLive  bool // objects still in the token
		destroyed bool
	}{
		{id: "adopt", want: store.Issued, wantLive: true},
		{id: "missing", want: store.Lost},
		{id: "half", want: store.Lost, destroyed: true},
		{id: "consuming", want: store.Consumed, destroyed: true},
		{id: "consumed", want: store.Consumed, destroyed: true},
		{id: "orphan", destroyed: true},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			if tt.want != "" {
				h.wantState(t, tt.id, tt.want)
			}
			if live := h.tok.has(tt.id); live != tt.wantLive {
				t.Errorf("objects in the token: %v, want %v", live, tt.wantLive)
			}
			if d := h.tok.wasDestroyed(tt.id); d != tt.destroyed {
				t.Errorf("destroyed: %v, want %v", d, tt.destroyed)
			}
		})
	}
	if n := h.tok.live(); n != 1 {
		t.Errorf("%d keys left in the token, want 1", n)
	}

	got, err := h.is.Decrypt(ctx, "adopt", seal(t, adoptKey.PublicDER, "pw", adopt.Salt))
	if err != nil || string(got) != "pw" {
		t.Errorf("Decrypt() with an adopted key = %q, %v; want pw", got, err)
	}
	h.wantState(t, "adopt", store.Consumed)
	if h.tok.has("adopt") {
		t.Error("the adopted key survived its decrypt")
	}
}

func TestApplyEmptyPool(t *testing.T) {
	tests := []struct {
		name    string
		fault   func(f *fakeToken)
		wantErr error
	}{
		{name: "generator fails", fault: func(f *fakeToken) { f.failGenerate = true }, wantErr: ErrPoolEmpty},
		{name: "token down", fault: func(f *fakeToken) { f.ready = false }, wantErr: ErrUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, nil)
			h.tok.set(tt.fault)
			h.start(t)
			start := time.Now()
			_, err := h.is.Apply(context.Background(), "c", "c")
			t.Logf("Apply() returned after %v (ApplyWait 200ms)", time.Since(start))
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("Apply() = %v, want %v", err, tt.wantErr)
			}
			if s := h.is.Stats(); s.Outstanding != 0 || s.Issued != 0 {
				t.Errorf("Stats() = %+v after a failed Apply", s)
			}
		})
	}
}

func TestApplyCanceled(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.ApplyWait = time.Minute })
	h.tok.set(func(f *fakeToken) { f.failGenerate = true })
	h.start(t)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(20*time.Millisecond, cancel)
	if _, err := h.is.Apply(ctx, "c", "c"); !errors.Is(err, context.Canceled) {
		t.Errorf("Apply() = %v, want context.Canceled", err)
	}
}

func TestRunCancel(t *testing.T) {
	tests := []struct {
		name        string
		storage     hsm.Storage
		wantState   store.State // of the outstanding record after Run
		wantLive    int         // keys left in the token
		wantOutLive bool        // the outstanding key among them
	}{
		{name: "session", storage: hsm.StorageSession, wantState: store.Lost, wantLive: 0},
		{name: "token", storage: hsm.StorageToken, wantState: store.Issued, wantLive: 1, wantOutLive: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config) { c.Storage = tt.storage; c.ReapInterval = 10 * time.Millisecond })
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- h.is.Run(ctx) }()

			out := h.apply(t)
			used := h.apply(t)
			if _, err := h.is.Decrypt(context.Background(), used.UniqueID, seal(t, used.PublicKey, "pw", used.Salt)); err != nil {
				t.Fatalf("Decrypt() = %v", err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for h.is.Stats().PoolReady < 4 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if s := h.is.Stats(); s.PoolReady != 4 {
				t.Errorf("PoolReady = %d, want 4", s.PoolReady)
			}

			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run() = %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("Run() did not return after cancel")
			}
			if n := h.tok.live(); n != tt.wantLive {
				t.Errorf("%d keys left in the token, want %d", n, tt.wantLive)
			}
			if live := h.tok.has(out.UniqueID); live != tt.wantOutLive {
				t.Errorf("outstanding key in the token: %v, want %v", live, tt.wantOutLive)
			}
			h.wantState(t, out.UniqueID, tt.wantState)
			h.wantState(t, used.UniqueID, store.Consumed)
			if s := h.is.Stats(); s.PoolReady != 0 {
				t.Errorf("PoolReady = %d after Run, want 0", s.PoolReady)
			}
		})
	}
}

func TestNew(t *testing.T) {
	tok := newFakeToken(hsm.StorageSession)
	st := &watchStore{}
	tests := []struct {
		name    string
		cfg     Config
		wantErr bool
	}{
		{name: "defaults", cfg: Config{Token: tok, Store: st}},
		{name: "no token", cfg: Config{Store: st}, wantErr: true},
		{name: "no store", cfg: Config{Token: tok}, wantErr: true},
		{name: "negative pool", cfg: Config{Token: tok, Store: st, PoolSize: -1}, wantErr: true},
		{name: "negative generators", cfg: Config{Token: tok, Store: st, Generators: -1}, wantErr: true},
		{name: "short ttl", cfg: Config{Token: tok, Store: st, TTL: time.Millisecond}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg)
			if (err != nil) != tt.wantErr {
				t.Errorf("New() = %v, want error: %v", err, tt.wantErr)
			}
		})
	}
}

func TestNewID(t *testing.T) {
	tests := []struct {
		name string
		n    int
	}{
		{name: "empty", n: 0},
		{name: "one", n: 1},
		{name: "salt", n: saltLen},
		{name: "uniqueId", n: uniqueIDLen},
		{name: "long", n: 1000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := newID(tt.n)
			if err != nil {
				t.Fatalf("newID(%d) = %v", tt.n, err)
			}
			if len(got) != tt.n || !idRE.MatchString(got) {
				t.Errorf("newID(%d) = %q, want %d characters of [A-Za-z0-9]", tt.n, got, tt.n)
			}
		})
	}

	// 10,000 characters: every one of the 62 appears, none far from the
	// expected 161 (a biased generator favours the first 8 by 25%; the
	// bounds are many standard deviations wide, so this never flakes).
	counts := map[rune]int{}
	for range 10_000 / uniqueIDLen {
		id, err := newID(uniqueIDLen)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range id {
			counts[c]++
		}
	}
	if len(counts) != len(alphabet) {
		t.Errorf("%d distinct characters in 10k, want %d", len(counts), len(alphabet))
	}
	for c, n := range counts {
		if n < 70 || n > 270 {
			t.Errorf("character %q appeared %d times, expected about 161", c, n)
		}
	}
}

func TestStripSalt(t *testing.T) {
	tests := []struct {
		name   string
		pt     string
		salt   string
		want   string
		wantOK bool
	}{
		{name: "password and salt", pt: "hunter2SALTSALTSALT", salt: "SALTSALTSALT", want: "hunter2", wantOK: true},
		{name: "empty password", pt: "SALTSALTSALT", salt: "SALTSALTSALT", want: "", wantOK: true},
		{name: "wrong salt", pt: "hunter2SALTSALTSALX", salt: "SALTSALTSALT"},
		{name: "salt at the start", pt: "SALTSALTSALThunter2", salt: "SALTSALTSALT"},
		{name: "shorter than salt", pt: "SALT", salt: "SALTSALTSALT"},
		{name: "empty plaintext", pt: "", salt: "SALTSALTSALT"},
		{name: "case matters", pt: "pwsaltsaltsalt", salt: "SALTSALTSALT"},
		{name: "empty salt", pt: "pw", salt: "", want: "pw", wantOK: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := stripSalt([]byte(tt.pt), tt.salt)
			if ok != tt.wantOK {
				t.Fatalf("stripSalt(%q, %q) ok = %v, want %v", tt.pt, tt.salt, ok, tt.wantOK)
			}
			if ok && string(got) != tt.want {
				t.Errorf("stripSalt(%q, %q) = %q, want %q", tt.pt, tt.salt, got, tt.want)
			}
		})
	}
}

// TestReapWaitsForTheTokenToRetry: while the token is down, reaper passes
// leave failed destroys queued instead of failing them again, with a
// warning and an audit event each, on every pass of the outage.
func TestReapWaitsForTheTokenToRetry(t *testing.T) {
	ctx := context.Background()
	var log eventLog
	h := newHarness(t, func(c *Config) { c.OnEvent = log.add })
	h.start(t)
	iss := h.apply(t)
	h.tok.set(func(f *fakeToken) { f.failDestroy = errors.New("CKR_DEVICE_REMOVED") })
	if _, err := h.is.Decrypt(ctx, iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt)); err != nil {
		t.Fatal(err)
	}
	h.tok.set(func(f *fakeToken) { f.ready = false })
	for range 5 {
		h.is.Reap(ctx)
	}
	if n := len(log.of(EventDestroyFailed, iss.UniqueID)); n != 1 {
		t.Errorf("%d destroy failures reported over 5 passes of an outage, want 1 (the first)", n)
	}
	if s := h.is.Stats(); s.PendingDestroys != 1 {
		t.Errorf("PendingDestroys during the outage = %d, want 1", s.PendingDestroys)
	}

	h.tok.set(func(f *fakeToken) { f.failDestroy, f.ready = nil, true })
	h.is.Reap(ctx)
	if h.tok.has(iss.UniqueID) || !h.tok.wasDestroyed(iss.UniqueID) {
		t.Error("the reaper did not destroy the key once the token was back")
	}
	if s := h.is.Stats(); s.PendingDestroys != 0 {
		t.Errorf("PendingDestroys = %d, want 0", s.PendingDestroys)
	}
}
