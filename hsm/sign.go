package hsm

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// The response-signing key.
//
// keyissuer signs its API responses with one long-lived RSA key pair kept
// in the token as token objects and found by CKA_LABEL. Signing goes
// through the Token's own sessions rather than through crypto11: both would
// call C_Initialize on the same module in one process, and crypto11 fails
// on the CKR_CRYPTOKI_ALREADY_INITIALIZED that the second call gets (the
// Token tolerates it); a second pool of sessions would also escape the
// Token's fault handling. The private key's handle is found once and kept;
// the hot path never searches the token.
//
// Not every token offers CKM_SHA256_RSA_PKCS (openCryptoki's soft token
// 3.8 does not). Open chooses a [SignMethod]: that mechanism when the token
// offers it for signing, or else SHA-256 in keyissuer and CKM_RSA_PKCS over
// the DER DigestInfo, which is the very same RSASSA-PKCS1-v1_5 signature
// (RFC 8017, section 9.2), so whoever verifies sees no difference.

// SignMethod says how the token makes a response signature.
type SignMethod string

const (
	// SignSHA256RSA is CKM_SHA256_RSA_PKCS: the token hashes and signs.
	SignSHA256RSA SignMethod = "sha256-rsa-pkcs"
	// SignDigestInfo is SHA-256 computed by keyissuer and CKM_RSA_PKCS in
	// the token over the DigestInfo, for tokens without the former.
	SignDigestInfo SignMethod = "rsa-pkcs-digestinfo"
)

// sha256DigestInfo is the DER prefix of a SHA-256 DigestInfo (RFC 8017,
// section 9.2, note 1); the 32-byte digest follows it.
var sha256DigestInfo = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
	0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}

// chooseSignMethod picks the signing method from the token's mechanisms;
// "" means the token can do neither.
func chooseSignMethod(infos map[uint]mechInfo) SignMethod {
	for _, c := range []struct {
		mech uint
		m    SignMethod
	}{{pkcs11.CKM_SHA256_RSA_PKCS, SignSHA256RSA}, {pkcs11.CKM_RSA_PKCS, SignDigestInfo}} {
		if mi, ok := infos[c.mech]; ok && mi.flags&pkcs11.CKF_SIGN != 0 {
			return c.m
		}
	}
	return ""
}

// ErrNoSigningKey means the token holds no private key under the label.
var ErrNoSigningKey = errors.New("no signing key under that label in the token")

// Signer signs with the token's RSA key pair under one label, with
// RSASSA-PKCS1-v1_5 over SHA-256, made by the token's [SignMethod]. It is
// safe for concurrent use.
type Signer struct {
	t      *Token
	label  string
	pub    *rsa.PublicKey
	method SignMethod

	mu   sync.Mutex
	priv pkcs11.ObjectHandle

	signs atomic.Uint64 // C_SignInit/C_Sign pairs issued
}

// Signs is how many signatures the token was asked for (each C_Sign, the
// start-up check and retries included): what a caller could make the
// token spend.
func (s *Signer) Signs() uint64 { return s.signs.Load() }

// Public is the signing key's public half.
func (s *Signer) Public() *rsa.PublicKey { return s.pub }

// Label is the key's CKA_LABEL.
func (s *Signer) Label() string { return s.label }

// Method is how the token makes the signatures.
func (s *Signer) Method() SignMethod { return s.method }

// Signer finds the private key labelled label (a token object, RSA, with
// CKA_SIGN) and checks that it signs. It fails with ErrNoSigningKey when
// there is none. The label must not start with the Token's label prefix:
// objects under the prefix are one-time keys, which reconciliation
// destroys.
func (t *Token) Signer(ctx context.Context, label string) (*Signer, error) {
	if err := t.checkSigningLabel(label); err != nil {
		return nil, err
	}
	if err := t.canSign(); err != nil {
		return nil, err
	}
	s := &Signer{t: t, label: label, method: t.info.Signing}
	err := t.do(ctx, func(ss *session) error {
		h, pub, err := t.findSigningKey(ss, label)
		if err != nil {
			return err
		}
		s.priv, s.pub = h, pub
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrNoSigningKey) {
			return nil, fmt.Errorf("signing key %q: %w", label, ErrNoSigningKey)
		}
		return nil, fmt.Errorf("failed to find signing key %q: %w", label, err)
	}
	// A private key whose CKA_MODULUS disagrees with what it signs with
	// would sign responses nobody can verify: find out now.
	if _, err := s.Sign(ctx, []byte("keyissuer signing-key check")); err != nil {
		return nil, err
	}
	return s, nil
}

// CreateSigningKey makes a response-signing key pair of bits bits under
// label, as token objects, unless the token has one already. The private
// half is sensitive, never extractable, and can only sign; the public half
// can only verify. created says whether a key was made.
func (t *Token) CreateSigningKey(ctx context.Context, label string, bits int) (s *Signer, created bool, err error) {
	if err := t.checkSigningLabel(label); err != nil {
		return nil, false, err
	}
	if !validKeyBits(bits) {
		return nil, false, fmt.Errorf("key size %d bits not allowed (want 2048, 3072 or 4096)", bits)
	}
	// Before a key is made that could never sign.
	if err := t.canSign(); err != nil {
		return nil, false, err
	}
	s, err = t.Signer(ctx, label)
	if !errors.Is(err, ErrNoSigningKey) {
		return s, false, err
	}
	id := []byte(label)
	pubTmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY_RECOVER, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	privTmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN_RECOVER, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	}
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}
	err = t.do(ctx, func(ss *session) error {
		_, _, err := t.mod.ctx.GenerateKeyPair(ss.h, mech, pubTmpl, privTmpl)
		return err
	})
	if err != nil {
		return nil, false, fmt.Errorf("failed to create signing key %q: %w", label, err)
	}
	s, err = t.Signer(ctx, label)
	return s, err == nil, err
}

// canSign fails when the token offers no mechanism to sign with.
func (t *Token) canSign() error {
	if t.info.Signing == "" {
		return fmt.Errorf("token %q offers neither CKM_SHA256_RSA_PKCS nor CKM_RSA_PKCS for signing, "+
			"so it cannot sign responses", t.info.Label)
	}
	return nil
}

func (t *Token) checkSigningLabel(label string) error {
	switch {
	case label == "":
		return errors.New("empty signing key label")
	case strings.HasPrefix(label, t.cfg.LabelPrefix):
		return fmt.Errorf("signing key label %q starts with the one-time keys' prefix %q, whose objects reconciliation destroys", label, t.cfg.LabelPrefix)
	}
	return nil
}

// findSigningKey finds the one RSA private key under label and reads its
// public half from it: CKA_MODULUS and CKA_PUBLIC_EXPONENT are public
// attributes of a private key.
func (t *Token) findSigningKey(ss *session, label string) (pkcs11.ObjectHandle, *rsa.PublicKey, error) {
	hs, err := t.findAll(ss, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
	})
	switch {
	case err != nil:
		return 0, nil, err
	case len(hs) == 0:
		return 0, nil, ErrNoSigningKey
	case len(hs) > 1:
		return 0, nil, fmt.Errorf("%d RSA private keys are labelled %q; keep one", len(hs), label)
	}
	attrs, err := t.mod.ctx.GetAttributeValue(ss.h, hs[0], []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, nil),
	})
	if err != nil {
		return 0, nil, err
	}
	n := new(big.Int).SetBytes(attrs[0].Value)
	e := new(big.Int).SetBytes(attrs[1].Value)
	switch {
	case len(attrs[2].Value) != 1 || attrs[2].Value[0] == 0:
		return 0, nil, fmt.Errorf("the key labelled %q may not sign (CKA_SIGN is false)", label)
	case n.BitLen() < 2048:
		return 0, nil, fmt.Errorf("the key labelled %q has %d bits; at least 2048 are required", label, n.BitLen())
	case !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1:
		return 0, nil, fmt.Errorf("the key labelled %q has an unusable public exponent", label)
	}
	return hs[0], &rsa.PublicKey{N: n, E: int(e.Int64())}, nil
}

// Sign returns the RSASSA-PKCS1-v1_5 SHA-256 signature of msg, made in the
// token. Each signature is checked against the public key before it is
// returned; a handle that went stale (after a token reset) is looked up
// again by label, once. It fails with ErrUnavailable when the token is
// down.
func (s *Signer) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	digest := sha256.Sum256(msg)
	var sig []byte
	err := s.t.do(ctx, func(ss *session) error {
		var err error
		for attempt := range 2 {
			var h pkcs11.ObjectHandle
			if h, err = s.handle(ss, attempt > 0); err != nil {
				return err
			}
			s.signs.Add(1)
			sig, err = s.t.sign(ss, h, s.method, msg, digest[:])
			if err == nil {
				if rsa.VerifyPKCS1v15(s.pub, crypto.SHA256, digest[:], sig) == nil {
					return nil
				}
				// The handle names some other key now.
				err = errors.New("the token signed with a key other than the signing key")
			} else if !isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID,
				pkcs11.CKR_KEY_TYPE_INCONSISTENT, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED) {
				return err
			}
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("failed to sign with %q: %w", s.label, err)
	}
	return sig, nil
}

// handle returns the private key's handle, looking it up again if refresh.
func (s *Signer) handle(ss *session, refresh bool) (pkcs11.ObjectHandle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !refresh {
		return s.priv, nil
	}
	h, pub, err := s.t.findSigningKey(ss, s.label)
	if err != nil {
		return 0, err
	}
	if !pub.Equal(s.pub) {
		return 0, fmt.Errorf("the key labelled %q changed while keyissuerd ran; restart it", s.label)
	}
	s.priv = h
	return h, nil
}

// sign makes the RSASSA-PKCS1-v1_5 SHA-256 signature of msg, whose
// SHA-256 is digest, by method m.
func (t *Token) sign(ss *session, h pkcs11.ObjectHandle, m SignMethod, msg, digest []byte) ([]byte, error) {
	mech, data := uint(pkcs11.CKM_SHA256_RSA_PKCS), msg
	if m == SignDigestInfo {
		mech, data = pkcs11.CKM_RSA_PKCS, append(slices.Clip(sha256DigestInfo), digest...)
	}
	if err := t.mod.ctx.SignInit(ss.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, h); err != nil {
		return nil, err
	}
	return t.mod.ctx.Sign(ss.h, data)
}
