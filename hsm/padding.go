package hsm

import (
	"crypto"
	"fmt"
	"sort"
	"strings"

	"github.com/miekg/pkcs11"

	"github.com/keyissuer/keyissuer/hsm/rsapad"
)

// Padding names an RSA encryption scheme, spelled as in the configuration.
type Padding string

// The schemes keyissuer decrypts. Each is done natively by the token when
// the token can, and otherwise as a raw RSA operation in the token
// (CKM_RSA_X_509) followed by a constant-time decode in [rsapad].
const (
	// OAEPSHA256 is RSA-OAEP with SHA-256 and MGF1-SHA-256: WebCrypto's
	// RSA-OAEP with hash SHA-256, Go's EncryptOAEP(sha256), Node's
	// publicEncrypt with oaepHash "sha256".
	OAEPSHA256 Padding = "oaep-sha256"
	// OAEPSHA256MGF1SHA1 is RSA-OAEP with SHA-256 and MGF1-SHA-1: what
	// Java's "RSA/ECB/OAEPWithSHA-256AndMGF1Padding" produces by default.
	OAEPSHA256MGF1SHA1 Padding = "oaep-sha256-mgf1-sha1"
	// OAEPSHA1 is RSA-OAEP with SHA-1 and MGF1-SHA-1: OpenSSL's and Node's
	// default OAEP, Java's "OAEPWithSHA-1AndMGF1Padding".
	OAEPSHA1 Padding = "oaep-sha1"
	// PKCS1v15 is RSAES-PKCS1-v1_5, for old clients. Prefer OAEP.
	PKCS1v15 Padding = "pkcs1v15"
)

type scheme struct {
	oaep      bool
	hash, mgf crypto.Hash
}

var schemes = map[Padding]scheme{
	OAEPSHA256:         {oaep: true, hash: crypto.SHA256, mgf: crypto.SHA256},
	OAEPSHA256MGF1SHA1: {oaep: true, hash: crypto.SHA256, mgf: crypto.SHA1},
	OAEPSHA1:           {oaep: true, hash: crypto.SHA1, mgf: crypto.SHA1},
	PKCS1v15:           {},
}

// Paddings lists every supported scheme name, sorted.
func Paddings() []Padding {
	ps := make([]Padding, 0, len(schemes))
	for p := range schemes {
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i] < ps[j] })
	return ps
}

// ParsePadding checks a configured scheme name.
func ParsePadding(s string) (Padding, error) {
	p := Padding(s)
	if _, ok := schemes[p]; !ok {
		names := make([]string, 0, len(schemes))
		for _, p := range Paddings() {
			names = append(names, string(p))
		}
		return "", fmt.Errorf("unknown padding %q (want one of %s)", s, strings.Join(names, ", "))
	}
	return p, nil
}

// Method says how the token performs a padding scheme.
type Method string

const (
	// Native: the token's own mechanism (CKM_RSA_PKCS_OAEP, CKM_RSA_PKCS).
	Native Method = "native"
	// Raw: CKM_RSA_X_509 in the token, padding decoded in the daemon.
	Raw Method = "raw"
)

var (
	hashMech = map[crypto.Hash]uint{
		crypto.SHA1:   pkcs11.CKM_SHA_1,
		crypto.SHA256: pkcs11.CKM_SHA256,
	}
	mgfMech = map[crypto.Hash]uint{
		crypto.SHA1:   pkcs11.CKG_MGF1_SHA1,
		crypto.SHA256: pkcs11.CKG_MGF1_SHA256,
	}
)

// mechanism returns the PKCS#11 mechanism for p done by method m.
func (p Padding) mechanism(m Method) []*pkcs11.Mechanism {
	s := schemes[p]
	switch {
	case m == Raw:
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil)}
	case s.oaep:
		params := pkcs11.NewOAEPParams(hashMech[s.hash], mgfMech[s.mgf], pkcs11.CKZ_DATA_SPECIFIED, nil)
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params)}
	default:
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}
	}
}

// decode removes p's padding from em, the raw RSA output of k bytes. It
// returns only [ErrDecrypt] on bad input.
func (p Padding) decode(em []byte) ([]byte, error) {
	s := schemes[p]
	var (
		out []byte
		err error
	)
	if s.oaep {
		out, err = rsapad.DecodeOAEP(s.hash, s.mgf, nil, em)
	} else {
		out, err = rsapad.DecodePKCS1v15(em)
	}
	if err != nil {
		return nil, ErrDecrypt
	}
	return out, nil
}
