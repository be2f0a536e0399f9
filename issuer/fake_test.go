package issuer

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"

	"github.com/keyissuer/keyissuer/hsm"
)

// testKeys are real 2048-bit keys, made once per test binary. The fake
// token hands them out round-robin: many ids share a key, which keeps the
// tests fast and changes nothing the issuer can see.
var testKeys = sync.OnceValue(func() []*rsa.PrivateKey {
	keys := make([]*rsa.PrivateKey, 3)
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			k, err := rsa.GenerateKey(rand.Reader, 2048)
			if err != nil {
				panic(err)
			}
			keys[i] = k
		})
	}
	wg.Wait()
	return keys
})

// fakeObject is one key's objects in the fake token.
type fakeObject struct {
	priv    *rsa.PrivateKey
	der     []byte
	hasPriv bool
	hasPub  bool
	token   bool // token object, else session object
	spent   bool // a decrypt was attempted
}

// fakeToken is an in-memory [Token] for unit tests of the issuer: real RSA,
// one decrypt per key, injectable faults. It is safe for concurrent use.
// Integration tests use a real SoftHSM token instead.
type fakeToken struct {
	mu           sync.Mutex
	storage      hsm.Storage
	objs         map[string]*fakeObject // live objects by key id
	next         int                    // round-robin over testKeys
	destroyed    []string               // ids destroyed by Destroy or DestroyObject
	decrypts     int                    // Decrypt calls that reached a live key
	failGenerate bool
	failDecrypt  error // returned by Decrypt before any decrypt; ErrUnavailable leaves the key unspent
	// failAfterDecrypt is returned by Decrypt after the decrypt happened,
	// as a token that decrypts and then fails does; the key is spent.
	failAfterDecrypt error
	// plaintexts keeps every plaintext Decrypt returned, to check that the
	// issuer zeroes what it does not hand on.
	plaintexts  [][]byte
	failDestroy error
	ready       bool
}

var _ Token = (*fakeToken)(nil)

func newFakeToken(storage hsm.Storage) *fakeToken {
	return &fakeToken{storage: storage, objs: map[string]*fakeObject{}, ready: true}
}

// set changes the fake's faults under its lock.
func (f *fakeToken) set(fn func(f *fakeToken)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeToken) newObject() (*fakeObject, error) {
	keys := testKeys()
	priv := keys[f.next%len(keys)]
	f.next++
	der, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		return nil, err
	}
	return &fakeObject{priv: priv, der: der, hasPriv: true, hasPub: true, token: f.storage == hsm.StorageToken}, nil
}

func (o *fakeObject) key(id string) *hsm.Key {
	return &hsm.Key{ID: id, Public: &o.priv.PublicKey, PublicDER: o.der}
}

func (f *fakeToken) Generate(ctx context.Context, id string) (*hsm.Key, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case !f.ready:
		return nil, fmt.Errorf("failed to generate key %s: %w", id, hsm.ErrUnavailable)
	case f.failGenerate:
		return nil, fmt.Errorf("failed to generate key %s: injected fault", id)
	case f.objs[id] != nil:
		return nil, fmt.Errorf("failed to generate key %s: id in use", id)
	}
	o, err := f.newObject()
	if err != nil {
		return nil, err
	}
	f.objs[id] = o
	return o.key(id), nil
}

// plant puts a key's objects in the token as a previous run would have left
// them, and returns the key.
func (f *fakeToken) plant(id string, priv, pub bool) *hsm.Key {
	f.mu.Lock()
	defer f.mu.Unlock()
	o, err := f.newObject()
	if err != nil {
		panic(err)
	}
	o.hasPriv, o.hasPub, o.token = priv, pub, true
	f.objs[id] = o
	return o.key(id)
}

var fakeSchemes = map[hsm.Padding]*rsa.OAEPOptions{
	hsm.OAEPSHA256:         {Hash: crypto.SHA256, MGFHash: crypto.SHA256},
	hsm.OAEPSHA256MGF1SHA1: {Hash: crypto.SHA256, MGFHash: crypto.SHA1},
	hsm.OAEPSHA1:           {Hash: crypto.SHA1, MGFHash: crypto.SHA1},
	hsm.PKCS1v15:           nil,
}

func (f *fakeToken) Decrypt(ctx context.Context, k *hsm.Key, p hsm.Padding, ciphertext []byte) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	opts, ok := fakeSchemes[p]
	switch {
	case !ok:
		return nil, fmt.Errorf("padding %q was not probed at start-up", p)
	case ctx.Err() != nil:
		// As the real token: the caller gave up waiting for a session,
		// before C_Decrypt; the key is as it was.
		return nil, ctx.Err()
	case !f.ready:
		return nil, hsm.ErrUnavailable
	case f.failDecrypt != nil:
		if o := f.objs[k.ID]; o != nil && !errors.Is(f.failDecrypt, hsm.ErrUnavailable) {
			o.spent = true
		}
		return nil, f.failDecrypt
	case len(ciphertext) != k.Size():
		return nil, hsm.ErrDecrypt
	}
	o := f.objs[k.ID]
	if o == nil || !o.hasPriv {
		return nil, hsm.ErrKeyLost
	}
	if o.spent {
		return nil, hsm.ErrKeySpent
	}
	o.spent = true
	f.decrypts++
	var (
		pt  []byte
		err error
	)
	if opts == nil {
		pt, err = rsa.DecryptPKCS1v15(nil, o.priv, ciphertext)
	} else {
		pt, err = o.priv.Decrypt(nil, ciphertext, opts)
	}
	if f.failAfterDecrypt != nil {
		clear(pt)
		return nil, f.failAfterDecrypt
	}
	if err != nil {
		return nil, hsm.ErrDecrypt
	}
	f.plaintexts = append(f.plaintexts, pt)
	return pt, nil
}

func (f *fakeToken) Destroy(ctx context.Context, k *hsm.Key) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	o := f.objs[k.ID]
	if o == nil {
		return nil // gone already counts as destroyed
	}
	o.spent = true // as the real token: a key handed to Destroy never decrypts
	if f.failDestroy != nil {
		return fmt.Errorf("failed to destroy key %s: %w", k.ID, f.failDestroy)
	}
	delete(f.objs, k.ID)
	f.destroyed = append(f.destroyed, k.ID)
	return nil
}

func (f *fakeToken) List(ctx context.Context) ([]hsm.Object, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.ready {
		return nil, fmt.Errorf("failed to list key objects: %w", hsm.ErrUnavailable)
	}
	var out []hsm.Object
	for id, o := range f.objs {
		if o.hasPriv {
			out = append(out, hsm.Object{ID: id, Private: true, Token: o.token})
		}
		if o.hasPub {
			out = append(out, hsm.Object{ID: id, Private: false, Token: o.token})
		}
	}
	return out, nil
}

func (f *fakeToken) DestroyObject(ctx context.Context, obj hsm.Object) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failDestroy != nil {
		return fmt.Errorf("failed to destroy object %s: %w", obj.ID, f.failDestroy)
	}
	o := f.objs[obj.ID]
	if o == nil {
		return nil
	}
	if obj.Private {
		o.hasPriv = false
		o.spent = true
	} else {
		o.hasPub = false
	}
	if !o.hasPriv && !o.hasPub {
		delete(f.objs, obj.ID)
		f.destroyed = append(f.destroyed, obj.ID)
	}
	return nil
}

func (f *fakeToken) Adopt(ctx context.Context, objs []hsm.Object) (*hsm.Key, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var id string
	var priv, pub bool
	for _, o := range objs {
		id = o.ID
		priv = priv || o.Private
		pub = pub || !o.Private
	}
	o := f.objs[id]
	if !priv || !pub || o == nil || !o.hasPriv || !o.hasPub {
		return nil, fmt.Errorf("key %s: %w (a half is missing)", id, hsm.ErrKeyLost)
	}
	return o.key(id), nil
}

func (f *fakeToken) Check(ctx context.Context) error { return nil }

// SweepHalfMade: the fake makes every object whole.
func (f *fakeToken) SweepHalfMade(ctx context.Context) (hsm.HalfMadeSweep, error) {
	return hsm.HalfMadeSweep{}, nil
}

func (f *fakeToken) Ready() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ready
}

// live returns how many keys have objects in the token.
func (f *fakeToken) live() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.objs)
}

// has reports whether any object of key id is in the token.
func (f *fakeToken) has(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.objs[id] != nil
}

// wasDestroyed reports whether key id was destroyed.
func (f *fakeToken) wasDestroyed(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.destroyed {
		if d == id {
			return true
		}
	}
	return false
}

// decryptCount is the number of decrypts that reached a live, unspent key.
func (f *fakeToken) decryptCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.decrypts
}
