package issuer_test

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// Integration tests: the issuer on a real token and a real store, each run
// on SoftHSM and on openCryptoki's soft token (subtests named by token).

func TestMain(m *testing.M) { hsmtest.Main(m) }

// env is one daemon's worth of parts; restart reopens them on the same
// token and store file, as a restarted daemon would.
type env struct {
	t       testing.TB
	token   hsmtest.Token
	storage hsm.Storage
	prefix  string
	dbPath  string
	now     atomic.Pointer[time.Time]

	tok *hsm.Token
	st  *store.Bolt
	is  *issuer.Issuer

	tokenConfig func(*hsm.Config) // if set, changes the Token's config at open
}

func newEnv(t testing.TB, tk hsmtest.Token, storage hsm.Storage) *env {
	t.Helper()
	e := &env{
		t:       t,
		token:   tk,
		storage: storage,
		prefix:  tk.Prefix + "it-" + filepath.Base(t.TempDir()) + ":",
		dbPath:  filepath.Join(t.TempDir(), "records.db"),
	}
	now := time.Now()
	e.now.Store(&now)
	if tk.Kind == hsmtest.OpenCryptoki {
		// The machine's token: keys still issued when the test ends (token
		// storage) must not outlive it. Registered first, runs last.
		t.Cleanup(func() { hsmtest.DestroyObjects(t, tk, e.prefix) })
	}
	e.open()
	t.Cleanup(e.close)
	return e
}

func (e *env) open() {
	t := e.t
	t.Helper()
	softTok := e.token
	var err error
	var is atomic.Pointer[issuer.Issuer]
	cfg := hsm.Config{
		Module:      softTok.Module,
		TokenLabel:  softTok.Label,
		PIN:         softTok.PIN,
		Storage:     e.storage,
		LabelPrefix: e.prefix,
		Sessions:    4,
		Paddings:    []hsm.Padding{hsm.OAEPSHA256},
		OnLost: func(ids []string) {
			if i := is.Load(); i != nil {
				i.KeysLost(ids)
			}
		},
	}
	if e.tokenConfig != nil {
		e.tokenConfig(&cfg)
	}
	e.tok, err = hsm.Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("hsm.Open: %v", err)
	}
	if e.st, err = store.Open(e.dbPath, store.Options{}); err != nil {
		t.Fatal(err)
	}
	e.is, err = issuer.New(issuer.Config{
		Token:        e.tok,
		Store:        e.st,
		Storage:      e.storage,
		Paddings:     []hsm.Padding{hsm.OAEPSHA256},
		Log:          slog.New(slog.DiscardHandler),
		TTL:          time.Minute,
		PoolSize:     2,
		Generators:   1,
		ApplyWait:    10 * time.Second,
		ReapInterval: time.Hour, // tests call Reap themselves
		Now:          func() time.Time { return *e.now.Load() },
	})
	if err != nil {
		t.Fatal(err)
	}
	is.Store(e.is)
	if err := e.is.Reconcile(context.Background()); err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
}

// run starts the pool and reaper; the returned func stops them the way a
// daemon shutting down does.
func (e *env) run() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.is.Run(ctx); close(done) }()
	return func() { cancel(); <-done }
}

func (e *env) close() {
	if e.tok != nil {
		e.tok.Close()
		e.st.Close()
		e.tok = nil
	}
}

// crash drops everything without the orderly shutdown: no pool drain, no
// record marking. Closing the Token is what the OS does to a dead process's
// sessions.
func (e *env) crash() { e.close() }

func (e *env) advance(d time.Duration) {
	now := e.now.Load().Add(d)
	e.now.Store(&now)
}

// objects counts keyissuer's objects for id in the token (-1: all ids).
func (e *env) objects(id string) int {
	e.t.Helper()
	objs, err := e.tok.List(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	n := 0
	for _, o := range objs {
		if id == "" || o.ID == id {
			n++
		}
	}
	return n
}

func (e *env) state(id string) store.State {
	e.t.Helper()
	r, err := e.st.Get(context.Background(), id)
	if err != nil {
		e.t.Fatal(err)
	}
	return r.State
}

func encrypt(t testing.TB, iss issuer.Issued, password string) []byte {
	t.Helper()
	pub, err := x509.ParsePKIXPublicKey(iss.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	ct, err := hsm.Encrypt(pub.(*rsa.PublicKey), hsm.OAEPSHA256, []byte(password+iss.Salt))
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

func apply(t testing.TB, e *env) issuer.Issued {
	t.Helper()
	iss, err := e.is.Apply(context.Background(), "2188000000000001", "client-1")
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return iss
}

var storages = []hsm.Storage{hsm.StorageSession, hsm.StorageToken}

func TestApplyDecryptDestroy(t *testing.T) { hsmtest.ForEach(t, testApplyDecryptDestroy) }

func testApplyDecryptDestroy(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			e := newEnv(t, tk, storage)
			stop := e.run()
			defer stop()
			iss := apply(t, e)
			if n := e.objects(iss.UniqueID); n != 2 {
				t.Fatalf("issued key has %d objects in the token, want 2", n)
			}
			pw, err := e.is.Decrypt(ctx, iss.UniqueID, encrypt(t, iss, "correct horse"))
			if err != nil || string(pw) != "correct horse" {
				t.Fatalf("Decrypt = %q, %v", pw, err)
			}
			if n := e.objects(iss.UniqueID); n != 0 {
				t.Errorf("after decrypt the key has %d objects, want 0", n)
			}
			if s := e.state(iss.UniqueID); s != store.Consumed {
				t.Errorf("state %s, want consumed", s)
			}
			if _, err := e.is.Decrypt(ctx, iss.UniqueID, encrypt(t, iss, "again")); !errors.Is(err, issuer.ErrConsumed) {
				t.Errorf("second Decrypt: %v, want ErrConsumed", err)
			}
		})
	}
}

func TestFailedDecryptsDestroyTheKey(t *testing.T) {
	hsmtest.ForEach(t, testFailedDecryptsDestroyTheKey)
}

func testFailedDecryptsDestroyTheKey(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	e := newEnv(t, tk, hsm.StorageSession)
	stop := e.run()
	defer stop()
	tests := []struct {
		name string
		ct   func(issuer.Issued) []byte
	}{
		{"wrong salt", func(iss issuer.Issued) []byte {
			iss.Salt = "AAAAAAAAAAAA"
			return encrypt(t, iss, "pw")
		}},
		{"no salt", func(iss issuer.Issued) []byte {
			iss.Salt = ""
			return encrypt(t, iss, "")
		}},
		{"garbage", func(iss issuer.Issued) []byte {
			ct := encrypt(t, iss, "pw")
			ct[10] ^= 1
			return ct
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			iss := apply(t, e)
			if _, err := e.is.Decrypt(ctx, iss.UniqueID, tt.ct(iss)); !errors.Is(err, issuer.ErrDecrypt) {
				t.Fatalf("Decrypt: %v, want ErrDecrypt", err)
			}
			if n := e.objects(iss.UniqueID); n != 0 {
				t.Errorf("%d objects left after a failed decrypt", n)
			}
			// The right ciphertext comes too late.
			if _, err := e.is.Decrypt(ctx, iss.UniqueID, encrypt(t, iss, "pw")); !errors.Is(err, issuer.ErrConsumed) {
				t.Errorf("Decrypt after failure: %v, want ErrConsumed", err)
			}
		})
	}
	t.Run("wrong length keeps the key", func(t *testing.T) {
		iss := apply(t, e)
		if _, err := e.is.Decrypt(ctx, iss.UniqueID, []byte("short")); !errors.Is(err, issuer.ErrCiphertext) {
			t.Fatalf("Decrypt: %v, want ErrCiphertext", err)
		}
		if pw, err := e.is.Decrypt(ctx, iss.UniqueID, encrypt(t, iss, "pw")); err != nil || string(pw) != "pw" {
			t.Errorf("Decrypt after a malformed request: %q, %v", pw, err)
		}
	})
}

func TestConcurrentDecryptsOfOneKey(t *testing.T) { hsmtest.ForEach(t, testConcurrentDecryptsOfOneKey) }

func testConcurrentDecryptsOfOneKey(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			e := newEnv(t, tk, storage)
			stop := e.run()
			defer stop()
			for round := range 3 {
				iss := apply(t, e)
				ct := encrypt(t, iss, "only once")
				const n = 24
				var (
					wg        sync.WaitGroup
					successes atomic.Int32
					start     = make(chan struct{})
				)
				for range n {
					wg.Add(1)
					go func() {
						defer wg.Done()
						<-start
						pw, err := e.is.Decrypt(ctx, iss.UniqueID, ct)
						switch {
						case err == nil && string(pw) == "only once":
							successes.Add(1)
						case errors.Is(err, issuer.ErrConsumed):
						default:
							t.Errorf("Decrypt: %q, %v", pw, err)
						}
					}()
				}
				close(start)
				wg.Wait()
				if got := successes.Load(); got != 1 {
					t.Fatalf("round %d: %d successes, want exactly 1", round, got)
				}
				if n := e.objects(iss.UniqueID); n != 0 {
					t.Errorf("round %d: %d objects left", round, n)
				}
			}
		})
	}
}

func TestExpiry(t *testing.T) { hsmtest.ForEach(t, testExpiry) }

func testExpiry(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	e := newEnv(t, tk, hsm.StorageToken)
	stop := e.run()
	defer stop()
	reaped := apply(t, e)
	late := apply(t, e)
	e.advance(time.Minute + time.Second)

	// A decrypt past expiry destroys the key without using it.
	if _, err := e.is.Decrypt(ctx, late.UniqueID, encrypt(t, late, "pw")); !errors.Is(err, issuer.ErrExpired) {
		t.Errorf("Decrypt past expiry: %v, want ErrExpired", err)
	}
	e.is.Reap(ctx)
	for _, iss := range []issuer.Issued{reaped, late} {
		if s := e.state(iss.UniqueID); s != store.Expired {
			t.Errorf("%s: state %s, want expired", iss.UniqueID, s)
		}
		if n := e.objects(iss.UniqueID); n != 0 {
			t.Errorf("%s: %d objects left", iss.UniqueID, n)
		}
	}
	if _, err := e.is.Decrypt(ctx, reaped.UniqueID, encrypt(t, reaped, "pw")); !errors.Is(err, issuer.ErrExpired) {
		t.Errorf("Decrypt of a reaped key: %v, want ErrExpired", err)
	}
}

// Token storage: keys survive a crash. After the restart, the issued key
// still decrypts once, the pool's orphans and a claimed key's objects are
// destroyed, and nothing is left over.
func TestRestartTokenStorage(t *testing.T) { hsmtest.ForEach(t, testRestartTokenStorage) }

func testRestartTokenStorage(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	e := newEnv(t, tk, hsm.StorageToken)
	stop := e.run()
	kept := apply(t, e)
	claimed := apply(t, e)
	time.Sleep(500 * time.Millisecond) // let the pool refill: orphans after the crash
	stop()
	// Simulate a crash between the claim and the token's decrypt: the
	// record says consuming, both objects are still there.
	if _, err := e.st.Transition(ctx, claimed.UniqueID, store.Issued, store.Consuming, time.Now()); err != nil {
		t.Fatal(err)
	}
	e.crash()

	e.open()
	if s := e.state(claimed.UniqueID); s != store.Consumed {
		t.Errorf("claimed key: state %s after restart, want consumed", s)
	}
	if n := e.objects(claimed.UniqueID); n != 0 {
		t.Errorf("claimed key: %d objects after restart, want 0", n)
	}
	if _, err := e.is.Decrypt(ctx, claimed.UniqueID, encrypt(t, claimed, "pw")); !errors.Is(err, issuer.ErrConsumed) {
		t.Errorf("claimed key: Decrypt after restart: %v, want ErrConsumed", err)
	}
	if n := e.objects(""); n != 2 {
		t.Errorf("%d objects in the token after reconciliation, want 2 (the kept key)", n)
	}
	pw, err := e.is.Decrypt(ctx, kept.UniqueID, encrypt(t, kept, "survivor"))
	if err != nil || string(pw) != "survivor" {
		t.Fatalf("kept key: Decrypt after restart = %q, %v", pw, err)
	}
	if n := e.objects(""); n != 0 {
		t.Errorf("%d objects left", n)
	}
}

// Session storage: keys die with the process, so a restart marks the
// records of unused keys lost.
func TestRestartSessionStorage(t *testing.T) { hsmtest.ForEach(t, testRestartSessionStorage) }

func testRestartSessionStorage(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	e := newEnv(t, tk, hsm.StorageSession)
	stop := e.run()
	iss := apply(t, e)
	stop()
	if s := e.state(iss.UniqueID); s != store.Lost {
		t.Errorf("after an orderly stop: state %s, want lost", s)
	}
	e.crash()
	e.open()
	if _, err := e.is.Decrypt(ctx, iss.UniqueID, encrypt(t, iss, "pw")); !errors.Is(err, issuer.ErrLost) {
		t.Errorf("Decrypt after restart: %v, want ErrLost", err)
	}

	// A crash (no orderly stop) is caught by reconciliation.
	stop = e.run()
	crashed := apply(t, e)
	stop()
	// Undo what the orderly stop recorded, as if the process had died.
	if _, err := e.st.Transition(ctx, crashed.UniqueID, store.Lost, store.Issued, time.Now()); err != nil {
		t.Fatal(err)
	}
	e.crash()
	e.open()
	if s := e.state(crashed.UniqueID); s != store.Lost {
		t.Errorf("after a crash: state %s, want lost", s)
	}
}

// A session that dies takes its keys along; the issuer marks their records
// lost rather than failing later.
func TestSessionDeathMarksKeysLost(t *testing.T) { hsmtest.ForEach(t, testSessionDeathMarksKeysLost) }

func testSessionDeathMarksKeysLost(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	e := newEnv(t, tk, hsm.StorageSession)
	stop := e.run()
	defer stop()
	iss := apply(t, e)
	e.is.KeysLost([]string{iss.UniqueID})
	// The record turns lost, then the key is destroyed: wait for both.
	deadline := time.Now().Add(10 * time.Second)
	for (e.state(iss.UniqueID) != store.Lost || e.objects(iss.UniqueID) != 0) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if s := e.state(iss.UniqueID); s != store.Lost {
		t.Fatalf("state %s, want lost", s)
	}
	if _, err := e.is.Decrypt(ctx, iss.UniqueID, encrypt(t, iss, "pw")); !errors.Is(err, issuer.ErrLost) {
		t.Errorf("Decrypt: %v, want ErrLost", err)
	}
	if n := e.objects(iss.UniqueID); n != 0 {
		t.Errorf("%d objects left", n)
	}
}

// Stopping destroys the pool: no objects outlive the daemon in token
// storage except issued keys.
func TestStopDrainsPool(t *testing.T) { hsmtest.ForEach(t, testStopDrainsPool) }

func testStopDrainsPool(t *testing.T, tk hsmtest.Token) {
	e := newEnv(t, tk, hsm.StorageToken)
	stop := e.run()
	iss := apply(t, e)
	deadline := time.Now().Add(20 * time.Second)
	for e.is.Stats().PoolReady < 2 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	stop()
	if n, m := e.objects(""), e.objects(iss.UniqueID); n != 2 || m != 2 {
		t.Errorf("after stop: %d objects, %d of them the issued key's; want 2 and 2", n, m)
	}
}
