package issuer_test

import (
	"bytes"
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

	"github.com/miekg/pkcs11"

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
//
// Through the real token's hsm.Config.AfterCall (its method afterCall) it
// also fails PKCS#11 calls after the token did their work: C_Decrypt that
// decrypted or refused the ciphertext, C_GenerateKeyPair, the read of a new
// public key, C_DestroyObject; and after a C_Decrypt that failed, it makes
// the next health checks fail, as a token that goes away at that moment
// would. It counts every C_Decrypt call per key: more than one is a key
// that saw two ciphertexts.
type faultToken struct {
	issuer.Token // the real *hsm.Token

	mu          sync.Mutex
	rng         *rand.Rand
	fail        float64       // chance that Generate, Decrypt, Destroy or DestroyObject fails
	after       float64       // chance that a PKCS#11 call fails after its work
	latency     time.Duration // up to this much is added to every call
	down        bool          // every call fails and Ready is false
	decrypts    map[string]int
	attempts    map[string]int  // C_Decrypt calls by key
	interrupted map[string]bool // keys whose C_Decrypt was failed after the call
	sick        int             // health checks still to fail
	injected    int
}

func newFaultToken(real issuer.Token, seed uint64) *faultToken {
	return &faultToken{Token: real, rng: rand.New(rand.NewPCG(seed, 1)), decrypts: map[string]int{},
		attempts: map[string]int{}, interrupted: map[string]bool{}}
}

// set changes the faults under the lock.
func (f *faultToken) set(fail float64, latency time.Duration, down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail, f.latency, f.down = fail, latency, down
}

// setAfter changes the chance of a fault after a call's work.
func (f *faultToken) setAfter(after float64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.after = after
}

// afterCall is the real token's hsm.Config.AfterCall.
func (f *faultToken) afterCall(op hsm.Op, id string, err error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch op {
	case hsm.OpDecrypt:
		f.attempts[id]++
		if f.rng.Float64() < f.after {
			f.injected++
			f.interrupted[id] = true
			err = pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)
		}
		if err != nil && f.rng.IntN(2) == 0 {
			f.sick = 3 // the token goes away just as C_Decrypt failed
		}
		return err
	case hsm.OpGetTokenInfo:
		if f.sick > 0 {
			f.sick--
			return pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)
		}
	case hsm.OpGenerateKeyPair, hsm.OpGetAttributeValue, hsm.OpDestroyObject:
		if f.rng.Float64() < f.after {
			f.injected++
			return pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)
		}
	}
	return err
}

func (f *faultToken) wasInterrupted(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.interrupted[id]
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
	var (
		is     atomic.Pointer[issuer.Issuer]
		faults atomic.Pointer[faultToken] // set once the probe at Open is done
	)
	real, err := hsm.Open(ctx, hsm.Config{
		Module: softTok.Module, TokenLabel: softTok.Label, PIN: softTok.PIN,
		Storage: storage, LabelPrefix: prefix, Sessions: 4,
		Paddings: []hsm.Padding{hsm.OAEPSHA256, hsm.OAEPSHA1},
		OnLost: func(ids []string) {
			if i := is.Load(); i != nil {
				i.KeysLost(ids)
			}
		},
		AfterCall: func(op hsm.Op, id string, err error) error {
			if f := faults.Load(); f != nil {
				return f.afterCall(op, id, err)
			}
			return err
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
	faults.Store(ft)
	iss, err := issuer.New(issuer.Config{
		Token: ft, Store: st, Storage: storage,
		// OAEP-SHA-1 is native on SoftHSM: bad padding is a token error.
		Paddings: []hsm.Padding{hsm.OAEPSHA256, hsm.OAEPSHA1},
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
	// decrypt decrypts k's password, or with wrong a wrong salt, or with
	// garbage a ciphertext whose padding is bad (OAEP-SHA-1, native).
	decrypt := func(k key, wrong bool, garbage ...bool) {
		salt := k.Salt
		if wrong {
			salt = "WRONGSALT000"
		}
		p := hsm.OAEPSHA256
		ct, err := hsm.Encrypt(k.pub, p, []byte("pw-"+k.UniqueID[:8]+salt))
		if err != nil {
			t.Error(err)
			return
		}
		if len(garbage) > 0 && garbage[0] {
			p, wrong = hsm.OAEPSHA1, true
			ct = bytes.Repeat([]byte{0x5a}, len(ct))
			ct[0] = 0x01
		}
		pw, err := iss.DecryptWithPadding(ctx, k.UniqueID, ct, p)
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
		case errors.Is(err, issuer.ErrDecrypt) && ft.wasInterrupted(k.UniqueID):
			note("interrupted")
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
			ft.setAfter(rng.Float64() * 0.3)
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
					switch rng.IntN(5) {
					case 0:
						decrypt(k, true)
						decrypt(k, false)
					case 4: // bad padding, then the right ciphertext, too late
						decrypt(k, false, true)
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
	ft.setAfter(0)

	// Calm: every failed destroy is retried, every unused key expires and
	// is destroyed.
	waitUntil(t, "the issuer to settle", func() bool {
		s := iss.Stats()
		return s.TokenReady && s.PendingDestroys == 0 && s.Outstanding == 0
	})
	stopRun()
	<-runDone
	// What failed generations left and could not destroy at once, the
	// token's Check destroys (the reaper runs it; once more, to be sure it
	// ran since the storm).
	if err := real.Check(ctx); err != nil {
		t.Fatalf("Check after the storm: %v", err)
	}
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
	for id, n := range ft.attempts {
		if n > 1 {
			t.Errorf("DOUBLE DECRYPT: C_Decrypt was called %d times with key %s", n, id)
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
