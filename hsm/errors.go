package hsm

import (
	"errors"

	"github.com/miekg/pkcs11"
)

var (
	// ErrUnavailable means the token could not serve the call: it is down,
	// a session died under the call, or the token is being reconnected.
	// The call did nothing in the token (Decrypt returns it only when
	// C_Decrypt was never called) and may be retried.
	ErrUnavailable = errors.New("token unavailable")

	// ErrInterrupted means the token failed (its session or the token
	// died) during or after a call that may have done its work: whether
	// C_Decrypt decrypted, or C_GenerateKeyPair made a pair, is unknown.
	// Such a call is never retried. A key whose Decrypt returns it is
	// spent and must be destroyed.
	ErrInterrupted = errors.New("token failed during the call; its outcome is unknown")

	// ErrKeyLost means the key's objects are gone from the token: its
	// session died (session storage) or the objects were removed. The key
	// can never be used again.
	ErrKeyLost = errors.New("key lost from the token")

	// ErrDecrypt means the token or the padding decoder rejected the
	// ciphertext. Every such failure returns this same error, whatever the
	// reason (bad padding, ciphertext not below the modulus...), so no
	// caller can build a padding oracle from it.
	ErrDecrypt = errors.New("decryption failed")

	// ErrKeySpent means C_Decrypt was already called with this key in this
	// process, or the key was handed to Destroy. The issuer's records
	// prevent it; this is a second lock.
	ErrKeySpent = errors.New("key already used for a decrypt")

	// ErrClosed is returned by calls on a closed Token.
	ErrClosed = errors.New("token closed")
)

// faultScope says how far a PKCS#11 error reaches.
type faultScope int

const (
	faultNone    faultScope = iota // not a fault: the call's own result
	faultSession                   // this session is dead; replace it
	faultToken                     // the token or the login is gone
)

// classify sorts a PKCS#11 return value into what must be done about it.
func classify(err error) faultScope {
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return faultNone
	}
	switch rv {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED:
		return faultSession
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_DEVICE_MEMORY,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
		pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED,
		pkcs11.CKR_SLOT_ID_INVALID:
		return faultToken
	}
	return faultNone
}

// isRV reports whether err is one of the given PKCS#11 return values.
func isRV(err error, rvs ...uint) bool {
	var rv pkcs11.Error
	if !errors.As(err, &rv) {
		return false
	}
	for _, want := range rvs {
		if uint(rv) == want {
			return true
		}
	}
	return false
}
