// Package rsapad decodes RSA encryption padding from the raw output of an
// RSA private-key operation, for tokens that cannot do a padding scheme
// natively: SoftHSM 2.6, for one, does OAEP only with SHA-1. The token then
// performs the bare RSA operation (CKM_RSA_X_509) and the daemon removes the
// padding here, as RFC 8017 specifies.
//
// Padding checks on a decrypted block are the classic chosen-ciphertext
// oracles: Manger's attack on OAEP needs only to learn whether the first
// byte was zero, Bleichenbacher's attack on PKCS #1 v1.5 whether the block
// was well formed. So the decoders inspect every byte whatever it holds,
// combine the checks with [crypto/subtle] instead of branching on them, and
// report every failure as the same [ErrDecryption] after the same work. The
// only things that may vary with the input are the length of a successfully
// decoded message, which the caller learns anyway, and whether there was
// one at all.
//
// Constant-time decoding is necessary, not sufficient: a caller that lets an
// attacker submit many ciphertexts to one key and tell success from failure
// still offers an oracle. keyissuer's keys decrypt once.
package rsapad

import (
	"bytes"
	"crypto"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"

	// Registered with crypto.Hash for hash.New: the hashes checkHash allows.
	_ "crypto/sha1"
	_ "crypto/sha256"
	_ "crypto/sha512"
)

// ErrDecryption is the only error a decoder returns for a bad encoding: every
// padding failure looks the same, so a caller cannot pass on which check
// failed even by accident.
var ErrDecryption = errors.New("rsapad: decryption error")

// checkHash rejects hashes the decoders do not support. It is a programming
// error, not a property of the ciphertext, so it is not [ErrDecryption].
func checkHash(h crypto.Hash) error {
	switch h {
	case crypto.SHA1, crypto.SHA224, crypto.SHA256, crypto.SHA384, crypto.SHA512:
		return nil
	}
	return fmt.Errorf("rsapad: unsupported hash %v", h)
}

// DecodeOAEP decodes EME-OAEP (RFC 8017 §7.1.2 step 3). em is the raw RSA
// output, exactly k bytes (the modulus length; callers left-pad with
// zeros). hash and mgfHash may differ (e.g. Java's
// OAEPWithSHA-256AndMGF1Padding uses SHA-256 with MGF1-SHA-1). label may be
// nil.
//
// Every malformed em, and every em too short for hash (k < 2*hLen+2),
// yields [ErrDecryption]; an unsupported hash or mgfHash yields a different
// error. em is not modified. The message is returned in a new slice, which
// the caller owns and may zero.
func DecodeOAEP(hash, mgfHash crypto.Hash, label, em []byte) ([]byte, error) {
	if err := checkHash(hash); err != nil {
		return nil, err
	}
	if err := checkHash(mgfHash); err != nil {
		return nil, err
	}
	hLen := hash.Size()
	if len(em) < 2*hLen+2 {
		return nil, ErrDecryption
	}

	h := hash.New()
	h.Write(label)
	lHash := h.Sum(nil)

	// Unmasking works in place; em belongs to the caller, and the copy holds
	// the seed and the message, so it is zeroed on the way out.
	buf := bytes.Clone(em)
	defer clear(buf)

	var valid, index int
	subtle.WithDataIndependentTiming(func() {
		valid, index = unpadOAEP(mgfHash, lHash, buf)
	})
	if valid != 1 {
		return nil, ErrDecryption
	}
	return bytes.Clone(buf[index:]), nil
}

// unpadOAEP unmasks em in place and checks it against
// 0x00 || maskedSeed || lHash' || PS || 0x01 || M without branching on its
// contents. It returns valid == 1 and the offset of M, or valid == 0 and an
// index the caller must ignore.
func unpadOAEP(mgfHash crypto.Hash, lHash, em []byte) (valid, index int) {
	hLen := len(lHash)
	good := subtle.ConstantTimeByteEq(em[0], 0)

	seed, db := em[1:1+hLen], em[1+hLen:]
	mgf1XOR(seed, mgfHash, db)
	mgf1XOR(db, mgfHash, seed)

	good &= subtle.ConstantTimeCompare(db[:hLen], lHash)

	// After lHash' come zero or more 0x00 bytes, one 0x01, then M. The scan
	// always runs to the end: looking is 1 until the first 0x01, sep records
	// where it was, and bad notes any other byte before it.
	looking, sep, bad := 1, 0, 0
	for i := 1 + 2*hLen; i < len(em); i++ {
		is0 := subtle.ConstantTimeByteEq(em[i], 0)
		is1 := subtle.ConstantTimeByteEq(em[i], 1)
		sep = subtle.ConstantTimeSelect(looking&is1, i, sep)
		looking = subtle.ConstantTimeSelect(is1, 0, looking)
		bad |= looking &^ is0
	}

	valid = good &^ bad &^ looking
	return valid, sep + 1
}

// mgf1XOR XORs out with MGF1(seed) using h (RFC 8017 §B.2.1). The masks are
// hashes of secret data, which the standard library's hashes compute in
// constant time; the loop bounds are public lengths.
func mgf1XOR(out []byte, h crypto.Hash, seed []byte) {
	d := h.New()
	var counter [4]byte
	var digest []byte
	for c, n := uint32(0), 0; n < len(out); c++ {
		binary.BigEndian.PutUint32(counter[:], c)
		d.Reset()
		d.Write(seed)
		d.Write(counter[:])
		digest = d.Sum(digest[:0])
		n += subtle.XORBytes(out[n:], out[n:], digest)
	}
	clear(digest)
}

// DecodePKCS1v15 decodes EME-PKCS1-v1_5 (RFC 8017 §7.2.2 step 3) in
// constant time: em must be 0x00 || 0x02 || PS || 0x00 || M, where PS is at
// least eight non-zero bytes. em is the raw RSA output, exactly k bytes, and
// k must be at least 11.
//
// Every malformed em yields [ErrDecryption]. em is not modified; the message
// is returned in a new slice. Prefer OAEP: with PKCS #1 v1.5 the answer
// "well formed or not" is itself Bleichenbacher's oracle, however it is
// computed.
func DecodePKCS1v15(em []byte) ([]byte, error) {
	if len(em) < 11 {
		return nil, ErrDecryption
	}
	var valid, index int
	subtle.WithDataIndependentTiming(func() {
		valid, index = unpadPKCS1v15(em)
	})
	if valid != 1 {
		return nil, ErrDecryption
	}
	return bytes.Clone(em[index:]), nil
}

// unpadPKCS1v15 checks em without branching on its contents. It returns
// valid == 1 and the offset of M, or valid == 0 and an index the caller must
// ignore.
func unpadPKCS1v15(em []byte) (valid, index int) {
	good := subtle.ConstantTimeByteEq(em[0], 0) & subtle.ConstantTimeByteEq(em[1], 2)

	// PS ends at the first zero byte after the header; the scan always runs
	// to the end so that its position does not show in the timing.
	looking, sep := 1, 0
	for i := 2; i < len(em); i++ {
		is0 := subtle.ConstantTimeByteEq(em[i], 0)
		sep = subtle.ConstantTimeSelect(looking&is0, i, sep)
		looking = subtle.ConstantTimeSelect(is0, 0, looking)
	}

	// PS is em[2:sep], and must be at least 8 bytes long.
	good &= subtle.ConstantTimeLessOrEq(2+8, sep)

	valid = good &^ looking
	return valid, sep + 1
}
