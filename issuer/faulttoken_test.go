package issuer_test

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
)

// faultToken wraps a real token (SoftHSM) with injected faults: calls that
// fail with hsm.ErrUnavailable before they reach the token, latency, spells
// of a token that is down altogether, and keys reported lost as a dead
// session reports them. The faults keep the token's contract: an
// ErrUnavailable call did nothing, so a decrypt it stopped leaves the key
// unspent. It counts the decrypts that succeeded in the real token.
type faultToken struct {
	issuer.Token // the real *hsm.Token

	mu       sync.Mutex
	rng      *rand.Rand
	fail     float64       // chance that Generate, Decrypt, Destroy or DestroyObject fails
	latency  time.Duration // up to this much is added to every call
	down     bool          // every call fails and Ready is false
	decrypts map[string]int
	injected int
}

func newFaultToken(real issuer.Token, seed uint64) *faultToken {
	return &faultToken{Token: real, rng: rand.New(rand.NewPCG(seed, 1)), decrypts: map[string]int{}}
}

// set changes the faults under the lock.
func (f *faultToken) set(fail float64, latency time.Duration, down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail, f.latency, f.down = fail, latency, down
}

// fault sleeps for the injected latency and reports whether the call must
// fail.
func (f *faultToken) fault(op string) error {
	f.mu.Lock()
	d := time.Duration(0)
	if f.latency > 0 {
		d = time.Duration(f.rng.Int64N(int64(f.latency)))
	}
	fail := f.down || f.rng.Float64() < f.fail
	if fail {
		f.injected++
	}
	f.mu.Unlock()
	time.Sleep(d)
	if fail {
		return fmt.Errorf("injected fault in %s: %w", op, hsm.ErrUnavailable)
	}
	return nil
}

func (f *faultToken) Generate(ctx context.Context, id string) (*hsm.Key, error) {
	if err := f.fault("generate"); err != nil {
		return nil, err
	}
	return f.Token.Generate(ctx, id)
}

func (f *faultToken) Decrypt(ctx context.Context, k *hsm.Key, p hsm.Padding, ct []byte) ([]byte, error) {
	if err := f.fault("decrypt"); err != nil {
		return nil, err
	}
	pt, err := f.Token.Decrypt(ctx, k, p, ct)
	if err == nil {
		f.mu.Lock()
		f.decrypts[k.ID]++
		f.mu.Unlock()
	}
	return pt, err
}

func (f *faultToken) Destroy(ctx context.Context, k *hsm.Key) error {
	if err := f.fault("destroy"); err != nil {
		return err
	}
	return f.Token.Destroy(ctx, k)
}

func (f *faultToken) DestroyObject(ctx context.Context, o hsm.Object) error {
	if err := f.fault("destroy object"); err != nil {
		return err
	}
	return f.Token.DestroyObject(ctx, o)
}

func (f *faultToken) Check(ctx context.Context) error {
	if err := f.fault("check"); err != nil {
		return err
	}
	return f.Token.Check(ctx)
}

func (f *faultToken) Ready() bool {
	f.mu.Lock()
	down := f.down
	f.mu.Unlock()
	return !down && f.Token.Ready()
}

// TestIssuerUnderTokenFaults drives the issuer on a real SoftHSM token
// through a storm of injected faults: failing calls, latency, the token down
// for spells, keys reported lost. Meanwhile clients apply and decrypt, right
// and wrong, some concurrently. Every answer must be one the issuer
// documents, no key may decrypt twice in the token, and once the faults
// stop, every failed destroy is retried and nothing is left in the token
// but the keys still issued.
func TestIssuerUnderTokenFaults(t *testing.T) {
	for _, storage := range []hsm.Storage{hsm.StorageToken, hsm.StorageSession} {
		t.Run(string(storage), func(t *testing.T) {
			faultStorm(t, storage)
		})
	}
}

func faultStorm(t *testing.T, storage hsm.Storage) {
	ctx := context.Background()
	softTok := hsmtest.Shared(t)
	prefix := "ft-" + filepath.Base(t.TempDir()) + ":"
	var is atomic.Pointer[issuer.Issuer]
	real, err := hsm.Open(ctx, hsm.Config{
		Module: softTok.Module, TokenLabel: softTok.Label, PIN: softTok.PIN,
		Storage: storage, LabelPrefix: prefix, Sessions: 4,
		Paddings: []hsm.Padding{hsm.OAEPSHA256},
		OnLost: func(ids []string) {
			if i := is.Load(); i != nil {
				i.KeysLost(ids)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer real.Close()
	st, err := bolt.Open(filepath.Join(t.TempDir(), "records.db"), bolt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	ft := newFaultToken(real, seed)
	iss, err := issuer.New(issuer.Config{
		Token: ft, Store: st, Storage: storage,
		Paddings: []hsm.Padding{hsm.OAEPSHA256},
		TTL:      2 * time.Second, PoolSize: 4, Generators: 2,
		ApplyWait: 300 * time.Millisecond, ReapInterval: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	is.Store(iss)
	if err := iss.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	runCtx, stopRun := context.WithCancel(ctx)
	runDone := make(chan struct{})
	go func() { iss.Run(runCtx); close(runDone) }()
	defer func() { stopRun(); <-runDone }()

	type key struct {
		issuer.Issued
		pub *rsa.PublicKey
	}
	var (
		mu        sync.Mutex
		keys      = map[string]key{}
		successes = map[string]int{}
		answers   = map[string]int{}
	)
	note := func(what string) {
		mu.Lock()
		answers[what]++
		mu.Unlock()
	}
	decrypt := func(k key, wrong bool) {
		salt := k.Salt
		if wrong {
			salt = "WRONGSALT000"
		}
		ct, err := hsm.Encrypt(k.pub, hsm.OAEPSHA256, []byte("pw-"+k.UniqueID[:8]+salt))
		if err != nil {
			t.Error(err)
			return
		}
		pw, err := iss.Decrypt(ctx, k.UniqueID, ct)
		switch {
		case err == nil:
			if wrong || string(pw) != "pw-"+k.UniqueID[:8] {
				t.Errorf("%s decrypted to %q (wrong ciphertext: %v)", k.UniqueID, pw, wrong)
			}
			mu.Lock()
			successes[k.UniqueID]++
			if successes[k.UniqueID] > 1 {
				t.Errorf("DOUBLE DECRYPT of %s", k.UniqueID)
			}
			mu.Unlock()
			note("decrypted")
		case errors.Is(err, issuer.ErrUnavailable):
			note("unavailable")
		case errors.Is(err, issuer.ErrConsumed), errors.Is(err, issuer.ErrExpired), errors.Is(err, issuer.ErrLost):
			note("refused")
		case errors.Is(err, issuer.ErrDecrypt) && wrong:
			note("failed")
		default:
			t.Errorf("decrypt %s (wrong: %v): %v", k.UniqueID, wrong, err)
		}
	}

	// The storm: faults change every 100ms.
	storm := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		rng := rand.New(rand.NewPCG(seed, 2))
		for {
			select {
			case <-storm:
				return
			case <-time.After(100 * time.Millisecond):
			}
			down := rng.IntN(6) == 0
			ft.set(rng.Float64()*0.4, time.Duration(rng.IntN(20))*time.Millisecond, down)
			if storage == hsm.StorageSession && rng.IntN(4) == 0 {
				// A session died and took a key with it.
				mu.Lock()
				for id := range keys {
					if successes[id] == 0 {
						iss.KeysLost([]string{id})
						break
					}
				}
				mu.Unlock()
			}
		}
	})
	deadline := time.Now().Add(3 * time.Second)
	for w := range 6 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(10+w)))
			for time.Now().Before(deadline) {
				r, err := iss.Apply(ctx, "2188000000000001", "")
				switch {
				case err == nil:
					pub, perr := x509.ParsePKIXPublicKey(r.PublicKey)
					if perr != nil {
						t.Error(perr)
						return
					}
					k := key{r, pub.(*rsa.PublicKey)}
					mu.Lock()
					keys[r.UniqueID] = k
					mu.Unlock()
					note("issued")
					switch rng.IntN(4) {
					case 0:
						decrypt(k, true)
						decrypt(k, false)
					case 1:
						var inner sync.WaitGroup
						for range 3 {
							inner.Go(func() { decrypt(k, false) })
						}
						inner.Wait()
					case 2: // left to expire
					default:
						decrypt(k, false)
						for rng.IntN(2) == 0 { // retried, as a client retries 503
							decrypt(k, false)
						}
					}
				case errors.Is(err, issuer.ErrPoolEmpty), errors.Is(err, issuer.ErrUnavailable):
					note("no key")
					time.Sleep(20 * time.Millisecond) // the token is down: do not spin
				default:
					t.Errorf("apply: %v", err)
				}
			}
		})
	}
	time.Sleep(time.Until(deadline))
	close(storm)
	wg.Wait()
	ft.set(0, 0, false)

	// Calm: every failed destroy is retried, every unused key expires and
	// is destroyed.
	waitUntil(t, "the issuer to settle", func() bool {
		s := iss.Stats()
		return s.TokenReady && s.PendingDestroys == 0 && s.Outstanding == 0
	})
	stopRun()
	<-runDone
	objs, err := real.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if storage == hsm.StorageToken && len(objs) != 0 {
		t.Errorf("LEAKED OBJECTS: %d objects in the token after the storm: %v", len(objs), objs)
	}
	active, err := st.Active(ctx, time.Now().Add(time.Hour), 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range active {
		t.Errorf("%s is still %s after the storm", r.UniqueID, r.State)
	}
	ft.mu.Lock()
	defer ft.mu.Unlock()
	for id, n := range ft.decrypts {
		if n > 1 {
			t.Errorf("DOUBLE DECRYPT: %s decrypted %d times in the token", id, n)
		}
	}
	t.Logf("%s storage: %d faults injected; answers %v", storage, ft.injected, answers)
}

func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("%s: not within a minute", what)
}
