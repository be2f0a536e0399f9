package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// What keyissuer asks of a token's mechanisms (OPERATIONS.md, "What a
// token must offer"). Open checks the minimum and chooses a fallback for
// the rest:
//
//   - CKM_RSA_PKCS_KEY_PAIR_GEN with CKF_GENERATE_KEY_PAIR, for key sizes
//     that include Config.KeyBits: required, there is no other way to make
//     a key inside the token.
//   - Each configured padding: the native mechanism (CKM_RSA_PKCS_OAEP,
//     CKM_RSA_PKCS) or else CKM_RSA_X_509 and keyissuer's own decoding,
//     chosen by a decrypt probe ([Token.probe]); without either, Open fails.
//   - Response signing: CKM_SHA256_RSA_PKCS with CKF_SIGN, or else
//     CKM_RSA_PKCS with CKF_SIGN over a DigestInfo that keyissuer hashes
//     ([SignMethod]); without either, Open still succeeds and only
//     [Token.Signer] fails, saying why.
//
// C_FindObjects, C_DestroyObject and C_GetAttributeValue are functions
// every token has, not mechanisms; keyissuer needs no others.

// mechInfo is what the token says of one mechanism.
type mechInfo struct {
	min, max uint // key sizes, in bits as the token reports them
	flags    uint
}

// mechanismInfos lists the token's mechanisms with their C_GetMechanismInfo.
// A mechanism whose info cannot be read is left out: it cannot be relied on.
func (t *Token) mechanismInfos() (map[uint]mechInfo, error) {
	slot := uint(t.slot.Load())
	t.mod.mu.RLock() // calls without a session (module.mu)
	defer t.mod.mu.RUnlock()
	ms, err := t.mod.ctx.GetMechanismList(slot)
	if err != nil {
		return nil, fmt.Errorf("failed to list mechanisms: %w", err)
	}
	infos := make(map[uint]mechInfo, len(ms))
	for _, m := range ms {
		mi, err := t.mod.ctx.GetMechanismInfo(slot, []*pkcs11.Mechanism{m})
		if err != nil {
			continue
		}
		infos[m.Mechanism] = mechInfo{min: mi.MinKeySize, max: mi.MaxKeySize, flags: mi.Flags}
	}
	return infos, nil
}

// probeMechanisms checks the minimum set and chooses the signing method.
func (t *Token) probeMechanisms() error {
	infos, err := t.mechanismInfos()
	if err != nil {
		return err
	}
	gen, ok := infos[pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN]
	switch {
	case !ok || gen.flags&pkcs11.CKF_GENERATE_KEY_PAIR == 0:
		return fmt.Errorf("token %q does not offer CKM_RSA_PKCS_KEY_PAIR_GEN, which keyissuer needs to make keys", t.info.Label)
	case !sizeFits(gen, t.cfg.KeyBits):
		return fmt.Errorf("token %q makes RSA keys of %d to %d bits, not the %d configured", t.info.Label, gen.min, gen.max, t.cfg.KeyBits)
	}
	t.mechs = infos
	t.info.Signing = chooseSignMethod(infos)
	return nil
}

// probeMessages are what the padding probe encrypts and has the token
// decrypt; a method is used only if every one comes back intact. The empty
// message is there because openCryptoki 3.8's CKM_RSA_PKCS decrypts it to
// one zero byte (Wycheproof's rsa_pkcs1_2048 tcId 1 found it).
var probeMessages = [][]byte{[]byte("keyissuer probe"), {}}

// ErrKeySize means the token's mechanism does not take keys of that size.
// keyissuer's own keys always fit (Open checks), so only a key made
// elsewhere can meet it: openCryptoki 3.8, for one, crashes when asked to
// decrypt with a key above the 4096 bits its mechanisms claim.
var ErrKeySize = errors.New("key size outside what the token's mechanism takes")

// fits checks that the token's mechanism for padding p by method m takes
// keys of bits bits. A mechanism the token did not describe is let be.
func (t *Token) fits(p Padding, m Method, bits int) error {
	mech := p.mechanism(m)[0].Mechanism
	if mi, ok := t.mechs[mech]; ok && !sizeFits(mi, bits) {
		return fmt.Errorf("%w: %d bits, and the token's mechanism %#x takes %d to %d", ErrKeySize, bits, mech, mi.min, mi.max)
	}
	return nil
}

// sizeFits reports whether bits is within a mechanism's key sizes. A token
// that reports no range (0-0) is taken at its word that any size works.
func sizeFits(mi mechInfo, bits int) bool {
	if mi.max == 0 {
		return true
	}
	return uint(bits) >= mi.min && uint(bits) <= mi.max
}
