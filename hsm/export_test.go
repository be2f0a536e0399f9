package hsm

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"
)

// Test-only access for the package's external tests (the Wycheproof
// vectors), which need keys they know. keyissuer itself never imports a
// key: its keys are born in the token and die there. Nothing in this file is
// compiled into keyissuer.

// Imported is an RSA private key imported into the token as a session
// object, by [Token.ImportPrivateKey].
type Imported struct {
	tok   *Token
	id    string
	priv  pkcs11.ObjectHandle
	pub   *rsa.PublicKey
	der   []byte
	owner *owner
	n     int // keys made by NewKey
}

// ImportPrivateKey creates priv in the token as a session object with the
// attributes of a generated key: private, sensitive, not extractable,
// decrypt only, every CRT component set. id is the label under the
// Token's prefix.
func (t *Token) ImportPrivateKey(ctx context.Context, id string, priv *rsa.PrivateKey) (*Imported, error) {
	if len(priv.Primes) != 2 {
		return nil, errors.New("import: want a two-prime RSA key")
	}
	p, q, d := priv.Primes[0], priv.Primes[1], priv.D
	one := big.NewInt(1)
	dp := new(big.Int).Mod(d, new(big.Int).Sub(p, one))
	dq := new(big.Int).Mod(d, new(big.Int).Sub(q, one))
	qinv := new(big.Int).ModInverse(q, p)
	if qinv == nil {
		return nil, errors.New("import: q has no inverse mod p")
	}
	der, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		return nil, err
	}
	_, tmpl := KeyTemplates(false, t.label(id), 0)
	tmpl = append(tmpl,
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, priv.N.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(priv.E)).Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, d.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, p.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, q.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_1, dp.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_2, dq.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_COEFFICIENT, qinv.Bytes()))
	im := &Imported{tok: t, id: id, pub: &priv.PublicKey, der: der}
	err = t.do(ctx, func(s *session) error {
		h, err := t.mod.ctx.CreateObject(s.h, tmpl)
		if err != nil {
			return err
		}
		im.priv, im.owner = h, s.owner
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("failed to import key %s: %w", id, err)
	}
	return im, nil
}

// NewKey returns a fresh [Key] over the imported object. Like the daemon's
// keys, each allows one Decrypt; a test runs each vector with a new one.
// Do not Destroy it: that would destroy the shared object. Destroy the
// Imported instead.
func (im *Imported) NewKey() *Key {
	im.n++
	return &Key{
		ID:        fmt.Sprintf("%s/%d", im.id, im.n),
		Public:    im.pub,
		PublicDER: im.der,
		priv:      im.priv,
		owner:     im.owner,
	}
}

// Destroy destroys the imported object.
func (im *Imported) Destroy(ctx context.Context) error {
	return im.tok.Destroy(ctx, &Key{ID: im.id, Public: im.pub, priv: im.priv, owner: im.owner})
}

// Fits reports whether the token takes keys of bits bits for padding p by
// method m: nil, or an error wrapping ErrKeySize.
func (t *Token) Fits(p Padding, m Method, bits int) error { return t.fits(p, m, bits) }

// SetMethod makes the Token do p by method m from now on, so that tests
// can drive the raw path (CKM_RSA_X_509 and rsapad) for a padding the token
// does natively. Not safe while other goroutines use the Token.
func (t *Token) SetMethod(p Padding, m Method) { t.info.Methods[p] = m }
