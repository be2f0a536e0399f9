package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"sync"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyissuer/keyissuer/hsm"
)

// rawToken is the baselines' direct line to the token: miekg/pkcs11 in this
// process, with no keyissuer code in between.
type rawToken struct {
	ctx  *pkcs11.Ctx
	slot uint
	pin  string

	mu       sync.Mutex
	sessions []pkcs11.SessionHandle
}

func openRaw(h *softHSM) (*rawToken, error) {
	p := pkcs11.New(h.Module)
	if p == nil {
		return nil, fmt.Errorf("failed to load %s", h.Module)
	}
	if err := p.Initialize(); err != nil {
		p.Destroy()
		return nil, fmt.Errorf("C_Initialize: %w", err)
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		return nil, err
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && strings.TrimSpace(ti.Label) == h.Label {
			return &rawToken{ctx: p, slot: s, pin: h.PIN}, nil
		}
	}
	return nil, fmt.Errorf("token %q not found", h.Label)
}

// session returns the i-th session of the baseline, opening it on first
// use; a worker always uses its own.
func (r *rawToken) session(i int) (pkcs11.SessionHandle, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.sessions) <= i {
		s, err := r.ctx.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return 0, err
		}
		if err := r.ctx.Login(s, pkcs11.CKU_USER, r.pin); err != nil {
			var rv pkcs11.Error
			if !errors.As(err, &rv) || rv != pkcs11.CKR_USER_ALREADY_LOGGED_IN {
				return 0, err
			}
		}
		r.sessions = append(r.sessions, s)
	}
	return r.sessions[i], nil
}

func (r *rawToken) close() {
	for _, s := range r.sessions {
		r.ctx.CloseSession(s)
	}
	r.ctx.Finalize()
	r.ctx.Destroy()
}

type rawPair struct{ pub, priv pkcs11.ObjectHandle }

// keygen is the baseline of rows 1 and 6: a C_GenerateKeyPair loop on
// sessions sessions, counted in a steady-state window like keyissuer's
// applies. The keys are destroyed afterwards, untimed.
func (r *rawToken) keygen(ctx context.Context, sessions int, warm, window time.Duration) (loadRun, error) {
	for i := range sessions {
		if _, err := r.session(i); err != nil {
			return loadRun{}, err
		}
	}
	made := make([][]rawPair, sessions)
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}
	run := timedRun(ctx, sessions, warm, window, func(ctx context.Context, w, i int) error {
		s, _ := r.session(w)
		// The daemon's own templates: the token does the same work.
		pubT, privT := hsm.KeyTemplates(false, fmt.Appendf(nil, "raw:%d", i), keyBits)
		pub, priv, err := r.ctx.GenerateKeyPair(s, mech, pubT, privT)
		if err != nil {
			return err
		}
		made[w] = append(made[w], rawPair{pub: pub, priv: priv})
		return nil
	})
	for w, ps := range made {
		s, _ := r.session(w)
		for _, p := range ps {
			r.ctx.DestroyObject(s, p.priv)
			r.ctx.DestroyObject(s, p.pub)
		}
	}
	return run, run.Err()
}

// rawKey is one imported key pair with a ciphertext for it.
type rawKey struct {
	rawPair
	ct []byte
}

// importKeys creates n key pairs in the token from the given RSA keys, with
// the attributes keyissuer's keys have, and a ciphertext for each. Import
// (C_CreateObject) instead of generation saves the baseline minutes of
// untimed key generation; the decrypt and destroy it then times work on the
// same kind of object (a sensitive CRT private key, a public key) as
// keyissuer's.
func (r *rawToken) importKeys(n int, token bool, material []*rsa.PrivateKey) ([]rawKey, error) {
	s, err := r.session(0)
	if err != nil {
		return nil, err
	}
	out := make([]rawKey, 0, n)
	for i := range n {
		k := material[i%len(material)]
		label := fmt.Sprintf("raw-import:%d", i)
		pubT, privT := hsm.KeyTemplates(token, []byte(label), 0)
		be := func(x *big.Int) []byte { return x.Bytes() }
		pubT = append(pubT,
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, be(k.N)),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, be(big.NewInt(int64(k.E)))))
		privT = append(privT,
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, be(k.N)),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, be(big.NewInt(int64(k.E)))),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, be(k.D)),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, be(k.Primes[0])),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, be(k.Primes[1])),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_1, be(k.Precomputed.Dp)),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_2, be(k.Precomputed.Dq)),
			pkcs11.NewAttribute(pkcs11.CKA_COEFFICIENT, be(k.Precomputed.Qinv)))
		pub, err := r.ctx.CreateObject(s, pubT)
		if err != nil {
			return nil, fmt.Errorf("C_CreateObject (public): %w", err)
		}
		priv, err := r.ctx.CreateObject(s, privT)
		if err != nil {
			return nil, fmt.Errorf("C_CreateObject (private): %w", err)
		}
		ct, err := hsm.Encrypt(&k.PublicKey, hsm.OAEPSHA256, []byte(password+"0123456789ab"))
		if err != nil {
			return nil, err
		}
		out = append(out, rawKey{rawPair: rawPair{pub: pub, priv: priv}, ct: ct})
	}
	return out, nil
}

// decryptDestroy is the baseline of row 3: C_DecryptInit and C_Decrypt with
// mech, then C_DestroyObject of the private and the public half, each worker
// on its own session; then, if durable is not nil, its write (the durable
// floor's fdatasync), inside the timed op.
func (r *rawToken) decryptDestroy(ctx context.Context, workers int, keys []rawKey, m []*pkcs11.Mechanism, durable *durableLog) (loadRun, error) {
	for i := range workers {
		if _, err := r.session(i); err != nil {
			return loadRun{}, err
		}
	}
	run := countedRun(ctx, workers, len(keys), func(ctx context.Context, w, i int) error {
		s, _ := r.session(w)
		k := keys[i]
		if err := r.ctx.DecryptInit(s, m, k.priv); err != nil {
			return fmt.Errorf("C_DecryptInit: %w", err)
		}
		pt, err := r.ctx.Decrypt(s, k.ct)
		if err != nil {
			return fmt.Errorf("C_Decrypt: %w", err)
		}
		clear(pt)
		if err := r.ctx.DestroyObject(s, k.priv); err != nil {
			return fmt.Errorf("C_DestroyObject: %w", err)
		}
		if err := r.ctx.DestroyObject(s, k.pub); err != nil {
			return fmt.Errorf("C_DestroyObject: %w", err)
		}
		if durable != nil {
			return durable.write()
		}
		return nil
	})
	return run, run.Err()
}

// decryptMechanism is the token operation keyissuer performs for
// oaep-sha256, given how it said it does it: natively, or as raw RSA with
// the padding removed in the daemon (SoftHSM 2.6).
func decryptMechanism(method string) []*pkcs11.Mechanism {
	if method == string(hsm.Native) {
		params := pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, nil)
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params)}
	}
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil)}
}

// signer finds the response-signing key's private half.
func (r *rawToken) signer(label string) (pkcs11.ObjectHandle, error) {
	s, err := r.session(0)
	if err != nil {
		return 0, err
	}
	if err := r.ctx.FindObjectsInit(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}); err != nil {
		return 0, err
	}
	hs, _, err := r.ctx.FindObjects(s, 2)
	r.ctx.FindObjectsFinal(s)
	if err != nil {
		return 0, err
	}
	if len(hs) != 1 {
		return 0, fmt.Errorf("%d private keys labelled %q", len(hs), label)
	}
	return hs[0], nil
}

// sign is the token's ceiling for row 2: every applyPublicKey answer is
// signed in the token (C_SignInit, C_Sign with CKM_SHA256_RSA_PKCS), so
// keyissuer can answer no faster than the token signs. n signatures of a
// message the size of an answer, with workers sessions.
func (r *rawToken) sign(ctx context.Context, workers, n int, key pkcs11.ObjectHandle, msgLen int) (loadRun, error) {
	for i := range workers {
		if _, err := r.session(i); err != nil {
			return loadRun{}, err
		}
	}
	msg := make([]byte, msgLen)
	rand.Read(msg)
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_SHA256_RSA_PKCS, nil)}
	run := countedRun(ctx, workers, n, func(ctx context.Context, w, _ int) error {
		s, _ := r.session(w)
		if err := r.ctx.SignInit(s, m, key); err != nil {
			return fmt.Errorf("C_SignInit: %w", err)
		}
		if _, err := r.ctx.Sign(s, msg); err != nil {
			return fmt.Errorf("C_Sign: %w", err)
		}
		return nil
	})
	return run, run.Err()
}

// keyMaterial makes a few RSA keys for importKeys (untimed).
func keyMaterial(n int) ([]*rsa.PrivateKey, error) {
	keys := make([]*rsa.PrivateKey, n)
	for i := range keys {
		k, err := rsa.GenerateKey(rand.Reader, keyBits)
		if err != nil {
			return nil, err
		}
		keys[i] = k
	}
	return keys, nil
}
