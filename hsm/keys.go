package hsm

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// Key is a key pair inside the token, known by its handles. Only its public
// half ever leaves the token.
type Key struct {
	ID        string         // the uniqueId; CKA_ID and CKA_LABEL are prefix+ID
	Public    *rsa.PublicKey // the public half
	PublicDER []byte         // DER SubjectPublicKeyInfo of Public

	mu         sync.Mutex // guards the handles (re-found after a token reset)
	priv, pub  pkcs11.ObjectHandle
	owner      *owner      // session storage: the session the objects live in
	epoch      uint64      // token storage: the Token epoch the handles belong to
	spent      atomic.Bool // a decrypt was attempted
	destroyed  atomic.Bool
	tokenStore bool
}

// Size is the modulus length in bytes: the only valid ciphertext length.
func (k *Key) Size() int { return k.Public.Size() }

// Alive reports whether the key's objects can still exist in the token. A
// key whose session died is not alive.
func (k *Key) Alive() bool {
	return !k.destroyed.Load() && (k.owner == nil || !k.owner.dead.Load())
}

func (t *Token) label(id string) []byte { return []byte(t.cfg.LabelPrefix + id) }

// KeyTemplates returns the templates of a key pair as [Token.Generate]
// makes it, labelled label (CKA_ID and CKA_LABEL): a private, sensitive,
// non-extractable, decrypt-only private half and an encrypt-only public
// half; token objects if token is set, else session objects. bits > 0 adds
// what C_GenerateKeyPair needs (the modulus length, e = 65537); pass 0 for
// C_CreateObject, which refuses CKA_MODULUS_BITS, and add the key's own
// components. Tools and tests use it so that their keys match the daemon's.
func KeyTemplates(token bool, label []byte, bits int) (pub, priv []*pkcs11.Attribute) {
	pub = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, token),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY_RECOVER, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ID, label),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	if bits > 0 {
		pub = append(pub,
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
	}
	priv = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, token),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN_RECOVER, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ID, label),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	return pub, priv
}

// Generate makes a new key pair in the token for id, which must be a
// well-formed key id ([ValidKeyID]): List finds no other, and an object
// List cannot find would never be reconciled. The private half is
// sensitive, never extractable and can only decrypt.
//
// C_GenerateKeyPair is never simply tried again: a fault after it leaves
// the token holding a pair or not, nobody can tell. So every object under
// id's CKA_ID is found and destroyed first, and only then, after a fault,
// is the generation tried once more; the token never holds two pairs under
// one CKA_ID, nor one that Generate did not return. Objects that cannot be
// destroyed at once (the token is down) are remembered, and Check destroys
// them once it answers.
func (t *Token) Generate(ctx context.Context, id string) (*Key, error) {
	if !ValidKeyID(id) {
		return nil, fmt.Errorf("key id %q is not %d characters of A-Z, a-z, 0-9", id, KeyIDLen)
	}
	for try := 0; ; try++ {
		k, made, err := t.generate(ctx, id, t.cfg.Storage == StorageToken)
		if err == nil {
			return k, nil
		}
		if !made {
			return nil, fmt.Errorf("failed to generate key %s: %w", id, err)
		}
		if !errors.Is(err, ErrInterrupted) {
			err = t.vet(err) // a token error may be a symptom of an outage
		}
		if serr := t.sweep(ctx, id); serr != nil {
			t.addOrphan(id)
			t.cfg.Log.Warn("objects of a failed key generation left for the next check", "key", id, "err", serr)
			return nil, fmt.Errorf("failed to generate key %s: %w (cleaning up after it: %v)", id, err, serr)
		}
		if try == 1 || !errors.Is(err, ErrInterrupted) {
			return nil, fmt.Errorf("failed to generate key %s: %w", id, err)
		}
	}
}

// generate makes one attempt at a key pair labelled id, as a token object
// if token is set. made reports whether C_GenerateKeyPair was called, so
// that the token may hold objects under id's label whatever err says.
func (t *Token) generate(ctx context.Context, id string, token bool) (k *Key, made bool, err error) {
	pubTmpl, privTmpl := KeyTemplates(token, t.label(id), t.cfg.KeyBits)
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}
	err = t.do(ctx, func(s *session) error {
		s.commit()
		made = true
		end := t.half.beginGeneration() // its objects are half-made a while
		pub, priv, err := t.mod.ctx.GenerateKeyPair(s.h, mech, pubTmpl, privTmpl)
		end()
		if err = t.after(OpGenerateKeyPair, id, err); err != nil {
			return err
		}
		k = &Key{ID: id, pub: pub, priv: priv, tokenStore: token, epoch: t.epoch.Load()}
		if err := t.readPublic(s, k); err != nil {
			return err // Generate destroys the pair
		}
		if !token {
			k.owner = s.owner
			s.owner.mu.Lock()
			s.owner.keys[id] = struct{}{}
			s.owner.mu.Unlock()
		}
		return nil
	})
	if err != nil {
		return nil, made, err
	}
	return k, made, nil
}

// sweep destroys every object under id's CKA_ID, whatever its class: what
// a generation that may or may not have happened left behind. An empty
// search is believed only from a healthy token.
func (t *Token) sweep(ctx context.Context, id string) error {
	err := t.do(ctx, func(s *session) error {
		hs, err := t.findAll(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, t.label(id))})
		if err != nil {
			return err
		}
		for _, h := range hs {
			err := t.after(OpDestroyObject, id, t.mod.ctx.DestroyObject(s.h, h))
			if err != nil && !isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID) {
				return err
			}
		}
		return nil
	})
	if err == nil {
		err = t.confirmGone()
	}
	return err
}

func (t *Token) addOrphan(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.orphans == nil {
		t.orphans = map[string]struct{}{}
	}
	t.orphans[id] = struct{}{}
}

// sweepOrphans destroys the objects that failed generations may have left
// and that could not be destroyed at the time.
func (t *Token) sweepOrphans(ctx context.Context) error {
	t.mu.Lock()
	ids := slices.Collect(maps.Keys(t.orphans))
	t.mu.Unlock()
	var errs []error
	for _, id := range ids {
		if err := t.sweep(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("failed to destroy what the generation of key %s left: %w", id, err))
			continue
		}
		t.mu.Lock()
		delete(t.orphans, id)
		t.mu.Unlock()
	}
	return errors.Join(errs...)
}

func (t *Token) readPublic(s *session, k *Key) error {
	attrs, err := t.mod.ctx.GetAttributeValue(s.h, k.pub, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
	})
	if err = t.after(OpGetAttributeValue, k.ID, err); err != nil {
		return err
	}
	n := new(big.Int).SetBytes(attrs[0].Value)
	e := new(big.Int).SetBytes(attrs[1].Value)
	if !e.IsInt64() || e.Int64() != 65537 || n.BitLen() != t.cfg.KeyBits {
		return fmt.Errorf("token returned an unexpected public key (%d bits, e=%s)", n.BitLen(), e)
	}
	k.Public = &rsa.PublicKey{N: n, E: 65537}
	k.PublicDER, err = x509.MarshalPKIXPublicKey(k.Public)
	return err
}

// Decrypt decrypts ciphertext with k's private half inside the token. A key
// allows one attempt: once C_Decrypt has been called with it, whatever
// came of it, a second call returns ErrKeySpent. Every rejection of the
// ciphertext is ErrDecrypt.
//
// Whether C_Decrypt was called decides the error. Before it, a failure
// leaves the key as it was: ErrUnavailable (the token is down or its
// session died; retry), the context's error (the caller gave up while
// waiting for a session), ErrKeyLost, or another error. After it, Decrypt
// never returns ErrUnavailable: it returns ErrDecrypt, ErrInterrupted (a
// fault: whether the token decrypted is unknown) or another error, and no
// health check follows, so that every answer to a ciphertext costs the
// same token calls.
func (t *Token) Decrypt(ctx context.Context, k *Key, p Padding, ciphertext []byte) ([]byte, error) {
	method, ok := t.info.Methods[p]
	if !ok {
		return nil, fmt.Errorf("padding %q was not probed at start-up", p)
	}
	if len(ciphertext) != k.Size() {
		return nil, ErrDecrypt
	}
	if err := t.fits(p, method, k.Public.N.BitLen()); err != nil {
		return nil, err
	}
	if !k.Alive() {
		return nil, ErrKeyLost
	}
	if !k.spent.CompareAndSwap(false, true) {
		return nil, ErrKeySpent
	}
	var (
		out       []byte
		attempted bool // C_Decrypt was called
	)
	err := t.do(ctx, func(s *session) error {
		defer func() { attempted = attempted || s.committed }()
		priv, err := t.handles(s, k, false)
		if err != nil {
			return err
		}
		if err = t.intact(s, k, priv); err == nil {
			out, err = t.decrypt(s, k.ID, priv, p, method, k.Size(), ciphertext)
		}
		if !s.committed && k.tokenStore && isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID) {
			// C_DecryptInit refused the handle: nothing was decrypted.
			if priv, err = t.handles(s, k, true); err != nil {
				return err
			}
			if err = t.intact(s, k, priv); err == nil {
				out, err = t.decrypt(s, k.ID, priv, p, method, k.Size(), ciphertext)
			}
		}
		return err
	})
	if err == nil {
		return out, nil
	}
	clear(out)
	if !attempted {
		k.spent.Store(false) // C_Decrypt never saw a ciphertext
		switch {
		case errors.Is(err, ErrUnavailable), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
			return nil, fmt.Errorf("failed to decrypt with key %s: %w", k.ID, err)
		case isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID), errors.Is(err, ErrKeyLost):
			return nil, ErrKeyLost
		}
		return nil, fmt.Errorf("failed to decrypt with key %s: %w", k.ID, err)
	}
	switch {
	case errors.Is(err, ErrDecrypt),
		isRV(err, pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE,
			pkcs11.CKR_DATA_INVALID, pkcs11.CKR_DATA_LEN_RANGE,
			// SoftHSM 2.6 reports bad padding, and a ciphertext not below
			// the modulus, as a general error.
			pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED):
		return nil, ErrDecrypt
	}
	return nil, fmt.Errorf("failed to decrypt with key %s: %w", k.ID, err)
}

// intact checks, in token storage, that k's private half still holds k's
// modulus before the token is asked to decrypt with it. SoftHSM 2.6.1 (its
// file object store) lets another process that only reads the token damage
// a key: C_GetAttributeValue on an object read while its creator was still
// writing it finds attributes missing, writes their defaults (an empty
// modulus, empty key material) and stores the object back over the
// creator's. C_DecryptInit accepts such a key, and C_Decrypt with it
// dereferences a null modulus: the daemon dies of a SIGSEGV (RELIABILITY.md,
// "Bugs the suite found"). A key whose modulus is gone can never decrypt: it
// is lost. Session objects live in this process's memory only and are not
// checked.
func (t *Token) intact(s *session, k *Key, priv pkcs11.ObjectHandle) error {
	if !k.tokenStore {
		return nil
	}
	attrs, err := t.mod.ctx.GetAttributeValue(s.h, priv, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
	})
	if err = t.after(OpGetAttributeValue, k.ID, err); err != nil {
		return err
	}
	if new(big.Int).SetBytes(attrs[0].Value).Cmp(k.Public.N) != 0 {
		return fmt.Errorf("%w: the private half of key %s no longer holds its modulus (damaged in the token)", ErrKeyLost, k.ID)
	}
	return nil
}

func (t *Token) decrypt(s *session, id string, priv pkcs11.ObjectHandle, p Padding, m Method, size int, ct []byte) ([]byte, error) {
	if err := t.after(OpDecryptInit, id, t.mod.ctx.DecryptInit(s.h, p.mechanism(m), priv)); err != nil {
		return nil, err
	}
	s.commit() // the token sees the ciphertext: never again with this key
	out, err := t.mod.ctx.Decrypt(s.h, ct)
	if err = t.after(OpDecrypt, id, err); err != nil {
		clear(out)
		return nil, err
	}
	if m == Native {
		return out, err
	}
	// Raw RSA yields k bytes; should a token strip leading zeros, pad
	// them back, as the decoder needs k bytes.
	em := out
	if len(out) > size {
		clear(out)
		return nil, ErrDecrypt
	}
	if len(out) < size {
		em = make([]byte, size)
		copy(em[size-len(out):], out)
		clear(out)
	}
	msg, err := p.decode(em)
	clear(em)
	return msg, err
}

// handles returns k's private handle. In token storage, handles from
// before a module reset are void and are looked up again by CKA_ID, as they
// are when refresh is set because the token said a handle is invalid
// (SoftHSM drops its handles when the last session closes). Session objects
// cannot come back.
func (t *Token) handles(s *session, k *Key, refresh bool) (pkcs11.ObjectHandle, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return t.handlesLocked(s, k, refresh)
}

func (t *Token) handlesLocked(s *session, k *Key, refresh bool) (pkcs11.ObjectHandle, error) {
	epoch := t.epoch.Load()
	if !k.tokenStore || (k.epoch == epoch && !refresh) {
		return k.priv, nil
	}
	// Each half is looked up on its own: a destroy may have got through
	// one of them before the handles went stale.
	priv, err := t.find(s, pkcs11.CKO_PRIVATE_KEY, k.ID)
	if err != nil {
		return 0, err
	}
	pub, err := t.find(s, pkcs11.CKO_PUBLIC_KEY, k.ID)
	if err != nil {
		return 0, err
	}
	k.priv, k.pub, k.epoch = priv, pub, epoch
	if priv == 0 {
		return 0, ErrKeyLost
	}
	return priv, nil
}

// find returns the handle of the one object of class under id's label, or
// 0 if there is none.
func (t *Token) find(s *session, class uint, id string) (pkcs11.ObjectHandle, error) {
	hs, err := t.findAll(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_ID, t.label(id)),
	})
	switch {
	case err != nil:
		return 0, err
	case len(hs) > 1:
		return 0, fmt.Errorf("%d objects of class %d under the label of key %s", len(hs), class, id)
	case len(hs) == 0:
		return 0, nil
	}
	return hs[0], nil
}

func (t *Token) findAll(s *session, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := t.after(OpFindObjectsInit, "", t.mod.ctx.FindObjectsInit(s.h, tmpl)); err != nil {
		return nil, err
	}
	var all []pkcs11.ObjectHandle
	for {
		hs, _, err := t.mod.ctx.FindObjects(s.h, 256)
		if err = t.after(OpFindObjects, "", err); err != nil {
			t.mod.ctx.FindObjectsFinal(s.h)
			return nil, err
		}
		if len(hs) == 0 {
			break
		}
		all = append(all, hs...)
	}
	return all, t.after(OpFindObjectsFinal, "", t.mod.ctx.FindObjectsFinal(s.h))
}

// Destroy destroys both halves of k, the private half first. Objects already
// gone count as destroyed. On error the key is unusable (it is spent) and
// Destroy may be called again.
func (t *Token) Destroy(ctx context.Context, k *Key) error {
	k.spent.Store(true)
	if k.destroyed.Load() {
		return nil
	}
	if !k.Alive() {
		// The session that held the objects is closed, and them with it.
		k.destroyed.Store(true)
		return nil
	}
	var (
		notFound bool // a search came back without the private half
		tries    int
	)
	err := t.do(ctx, func(s *session) error {
		k.mu.Lock()
		defer k.mu.Unlock()
		notFound = false
		start := 0
		if tries++; tries > 1 && k.tokenStore {
			// After a fault a handle is not trusted (a token may give
			// it to another object): look the objects up by CKA_ID.
			start = 1
		}
		for refresh := start; refresh < 2; refresh++ {
			if _, err := t.handlesLocked(s, k, refresh == 1); errors.Is(err, ErrKeyLost) {
				notFound = true
			} else if err != nil {
				return err
			}
			err := t.destroyHandles(s, k)
			if !k.tokenStore || !isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID) {
				return err
			}
			// A stale handle: look the objects up by CKA_ID and try again.
		}
		notFound = true
		return nil
	})
	if err == nil && notFound {
		err = t.confirmGone()
	}
	if err != nil {
		return fmt.Errorf("failed to destroy key %s: %w", k.ID, err)
	}
	k.destroyed.Store(true)
	if o := k.owner; o != nil {
		o.mu.Lock()
		delete(o.keys, k.ID)
		o.mu.Unlock()
	}
	return nil
}

// confirmGone vets an answer that objects are not there: SoftHSM answers
// an invalid handle and an empty search when its token directory is gone,
// so objects are believed gone only from a token that passes its health
// check. A token that fails it is marked down.
func (t *Token) confirmGone() error {
	if err := t.healthy(); err != nil {
		t.markDown(err)
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return nil
}

// destroyHandles destroys k's objects, the private half first. In session
// storage an invalid handle means the object is gone already.
func (t *Token) destroyHandles(s *session, k *Key) error {
	for _, h := range []*pkcs11.ObjectHandle{&k.priv, &k.pub} {
		if *h == 0 {
			continue
		}
		err := t.after(OpDestroyObject, k.ID, t.mod.ctx.DestroyObject(s.h, *h))
		if err != nil && (k.tokenStore || !isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID)) {
			return err
		}
		*h = 0
	}
	return nil
}

// Object is one of keyissuer's objects found in the token.
type Object struct {
	ID      string // the key id (label without the prefix)
	Private bool   // private or public half
	Token   bool   // a token object (else a session object of this process)
	handle  pkcs11.ObjectHandle
}

// List finds every key object of the configured label prefix that this
// process can see: token objects, and its own session objects. An object is
// one only if its CKA_LABEL is exactly the prefix and a key id
// ([ParseLabel]) and its CKA_ID is the same; any other is never touched.
// It searches the token, so it is slow with many objects; it is meant for
// start-up reconciliation and for tests, never for the hot path.
//
// It reads the label of a key object only once no generation is making it
// (see settled): on SoftHSM 2.6.1 a read of a key that another process is
// making can wipe its label and id (RELIABILITY.md, bugs 6 and 11), and a
// cluster instance lists the token at start-up while its neighbours make
// keys.
func (t *Token) List(ctx context.Context) ([]Object, error) {
	var objs []Object
	err := t.do(ctx, func(s *session) error {
		objs = objs[:0]
		byClass, err := t.settled(s)
		if err != nil {
			return err
		}
		for _, class := range keyClasses {
			for _, h := range byClass[class] {
				attrs, err := t.listAttrs(s, h)
				if err != nil {
					if isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID) {
						continue // destroyed meanwhile
					}
					return err
				}
				label := string(attrs[0].Value)
				id, ok := ParseLabel(t.cfg.LabelPrefix, label)
				if !ok || string(attrs[2].Value) != label {
					continue // not ours: never touched
				}
				objs = append(objs, Object{
					ID:      id,
					Private: class == pkcs11.CKO_PRIVATE_KEY,
					Token:   len(attrs[1].Value) == 1 && attrs[1].Value[0] != 0,
					handle:  h,
				})
			}
		}
		return nil
	})
	if err == nil {
		err = t.confirmGone() // what the search did not find
	}
	if err != nil {
		return nil, fmt.Errorf("failed to list key objects: %w", err)
	}
	return objs, nil
}

// listSettle is how long an object that no generation is known to have
// finished must stay in view before List reads it.
const listSettle = 100 * time.Millisecond

// settled finds, by searches, the key objects of each class that List may
// read: those whose generation has finished (CKA_LOCAL true, which SoftHSM
// writes in one transaction with the key material, after the label and
// id), and the others (keys a generation cut short, keys put in the token
// by C_CreateObject or C_UnwrapKey, a token that does not set CKA_LOCAL)
// once they are still in view, still not finished, listSettle after the
// first search: a key being made is finished within milliseconds. Objects
// that appeared after the first search are left out; List's callers judge
// only what existed when it began.
func (t *Token) settled(s *session) (map[uint][]pkcs11.ObjectHandle, error) {
	first := time.Now()
	out := map[uint][]pkcs11.ObjectHandle{}
	pending := map[uint][]pkcs11.ObjectHandle{}
	for _, class := range keyClasses {
		all, err := t.findAll(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)})
		if err != nil {
			return nil, err
		}
		done, err := t.findAll(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
			pkcs11.NewAttribute(pkcs11.CKA_LOCAL, true),
		})
		if err != nil {
			return nil, err
		}
		for _, h := range all {
			if slices.Contains(done, h) {
				out[class] = append(out[class], h)
			} else {
				pending[class] = append(pending[class], h)
			}
		}
	}
	if len(pending) == 0 {
		return out, nil
	}
	time.Sleep(time.Until(first.Add(listSettle)))
	for class, hs := range pending {
		again, err := t.findAll(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)})
		if err != nil {
			return nil, err
		}
		for _, h := range hs {
			if slices.Contains(again, h) {
				out[class] = append(out[class], h)
			}
		}
	}
	return out, nil
}

// listAttrs reads an object's CKA_LABEL, CKA_TOKEN and CKA_ID. The module reads
// an attribute in two calls, its length and then its value; an object that
// another process (another daemon on the token, pkcs11-tool) is creating
// meanwhile can grow in between, which SoftHSM answers with
// CKR_BUFFER_TOO_SMALL: the read is tried again.
func (t *Token) listAttrs(s *session, h pkcs11.ObjectHandle) ([]*pkcs11.Attribute, error) {
	var (
		attrs []*pkcs11.Attribute
		err   error
	)
	for try := range 5 {
		if try > 0 {
			time.Sleep(10 * time.Millisecond)
		}
		attrs, err = t.mod.ctx.GetAttributeValue(s.h, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
			pkcs11.NewAttribute(pkcs11.CKA_ID, nil),
		})
		if !isRV(err, pkcs11.CKR_BUFFER_TOO_SMALL) {
			break
		}
	}
	return attrs, err
}

// DestroyObject destroys one object found by List. Gone already is fine.
func (t *Token) DestroyObject(ctx context.Context, o Object) error {
	var invalid bool
	err := t.do(ctx, func(s *session) error {
		err := t.after(OpDestroyObject, o.ID, t.mod.ctx.DestroyObject(s.h, o.handle))
		if invalid = isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID); invalid {
			return nil
		}
		return err
	})
	if err == nil && invalid {
		err = t.confirmGone()
	}
	if err != nil {
		return fmt.Errorf("failed to destroy object %s: %w", o.ID, err)
	}
	return nil
}

// Adopt builds a Key for an existing token object pair found by List, so a
// restarted daemon can use keys it issued before (token storage).
func (t *Token) Adopt(ctx context.Context, objs []Object) (*Key, error) {
	k := &Key{tokenStore: true, epoch: t.epoch.Load()}
	for _, o := range objs {
		k.ID = o.ID
		if o.Private {
			k.priv = o.handle
		} else {
			k.pub = o.handle
		}
	}
	if k.priv == 0 || k.pub == 0 {
		return nil, fmt.Errorf("key %s: %w (a half is missing)", k.ID, ErrKeyLost)
	}
	err := t.do(ctx, func(s *session) error { return t.readPublic(s, k) })
	if err != nil {
		return nil, fmt.Errorf("failed to adopt key %s: %w", k.ID, err)
	}
	return k, nil
}

// probe decides, for each configured padding, whether the token does it
// natively or it must be done raw, by decrypting a known message with a
// throw-away session key.
func (t *Token) probe(ctx context.Context) error {
	if len(t.cfg.Paddings) == 0 {
		return nil
	}
	mechs, err := t.mechanisms()
	if err != nil {
		return err
	}
	// A session object under a label that is no key id: List never
	// reports it, and it dies with its session whatever happens.
	k, _, err := t.generate(ctx, "probe", false)
	if err != nil {
		return err
	}
	defer t.Destroy(context.WithoutCancel(ctx), k)

	for _, p := range t.cfg.Paddings {
		cts := make([][]byte, len(probeMessages))
		for i, msg := range probeMessages {
			if cts[i], err = encrypt(k.Public, p, msg); err != nil {
				return err
			}
		}
		var tried []string
		for _, m := range []Method{Native, Raw} {
			if !mechs[p.mechanism(m)[0].Mechanism] {
				continue
			}
			if err := t.fits(p, m, t.cfg.KeyBits); err != nil {
				tried = append(tried, fmt.Sprintf("%s: %v", m, err))
				continue
			}
			err := t.do(ctx, func(s *session) error {
				for i, ct := range cts {
					got, err := t.decrypt(s, k.ID, k.priv, p, m, k.Size(), ct)
					if err != nil {
						return err
					}
					if string(got) != string(probeMessages[i]) {
						return fmt.Errorf("a message of %d bytes came back as %d bytes", len(probeMessages[i]), len(got))
					}
				}
				return nil
			})
			if err == nil {
				t.info.Methods[p] = m
				break
			}
			tried = append(tried, fmt.Sprintf("%s: %v", m, err))
		}
		if _, ok := t.info.Methods[p]; !ok {
			return fmt.Errorf("token %q cannot decrypt padding %s (tried %s)", t.info.Label, p, strings.Join(tried, "; "))
		}
	}
	return nil
}

func (t *Token) mechanisms() (map[uint]bool, error) {
	t.mod.mu.RLock()
	ms, err := t.mod.ctx.GetMechanismList(uint(t.slot.Load()))
	t.mod.mu.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("failed to list mechanisms: %w", err)
	}
	set := make(map[uint]bool, len(ms))
	for _, m := range ms {
		set[m.Mechanism] = true
	}
	return set, nil
}

// encrypt is what a client does: it lets the probe and tests make
// ciphertexts for any supported padding.
func encrypt(pub *rsa.PublicKey, p Padding, msg []byte) ([]byte, error) {
	s := schemes[p]
	if !s.oaep {
		return rsa.EncryptPKCS1v15(rand.Reader, pub, msg)
	}
	return rsa.EncryptOAEPWithOptions(rand.Reader, pub, msg, &rsa.OAEPOptions{Hash: s.hash, MGFHash: s.mgf})
}

// Encrypt encrypts msg to pub with padding p, as a client would. It is for
// tests and tools; keyissuer itself never encrypts.
func Encrypt(pub *rsa.PublicKey, p Padding, msg []byte) ([]byte, error) {
	if _, err := ParsePadding(string(p)); err != nil {
		return nil, err
	}
	return encrypt(pub, p, msg)
}
