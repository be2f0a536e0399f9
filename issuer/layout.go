package issuer

import (
	"crypto/subtle"
	"fmt"
)

// Layout says where the salt sits in the plaintext a client encrypts. The
// salt binds the ciphertext to this key's issuance: a plaintext without the
// key's salt is refused as ErrDecrypt, exactly like bad padding.
type Layout string

const (
	// LayoutPasswordSalt: the password, then the salt. The default.
	LayoutPasswordSalt Layout = "password-salt"
	// LayoutSaltPassword: the salt, then the password.
	LayoutSaltPassword Layout = "salt-password"
	// LayoutPipe: the password, "|", then the salt. The password may
	// itself contain "|": only the last one separates.
	LayoutPipe Layout = "password|salt"
	// LayoutNone: the password alone; the salt is not checked. Only the
	// padding then tells a forged or garbled ciphertext from a real one.
	LayoutNone Layout = "none"
)

// Layouts lists every layout, the default first.
func Layouts() []Layout {
	return []Layout{LayoutPasswordSalt, LayoutSaltPassword, LayoutPipe, LayoutNone}
}

// ParseLayout checks a configured layout name.
func ParseLayout(s string) (Layout, error) {
	for _, l := range Layouts() {
		if string(l) == s {
			return l, nil
		}
	}
	return "", fmt.Errorf("unknown layout %q (want password-salt, salt-password, password|salt or none)", s)
}

// Plaintext builds what a client encrypts under layout l, in a new slice
// the caller may zero: for tests and tools, as keyissuer itself never
// encrypts.
func (l Layout) Plaintext(password []byte, salt string) []byte {
	pt := make([]byte, 0, len(password)+1+len(salt))
	switch l {
	case LayoutSaltPassword:
		return append(append(pt, salt...), password...)
	case LayoutPipe:
		return append(append(append(pt, password...), '|'), salt...)
	case LayoutNone:
		return append(pt, password...)
	}
	return append(append(pt, password...), salt...)
}

// password returns the password in pt, a sub-slice of it, and whether pt
// carries salt where l puts it. The salt is compared in constant time; only
// pt's length, which the caller learns anyway, decides a branch.
func (l Layout) password(pt []byte, salt string) ([]byte, bool) {
	switch l {
	case LayoutNone:
		return pt, true
	case LayoutSaltPassword:
		if len(pt) < len(salt) {
			return nil, false
		}
		ok := subtle.ConstantTimeCompare(pt[:len(salt)], []byte(salt))
		return pt[len(salt):], ok == 1
	case LayoutPipe:
		n := len(pt) - len(salt) - 1
		if n < 0 {
			return nil, false
		}
		ok := subtle.ConstantTimeByteEq(pt[n], '|') & subtle.ConstantTimeCompare(pt[n+1:], []byte(salt))
		return pt[:n], ok == 1
	}
	return stripSalt(pt, salt)
}
