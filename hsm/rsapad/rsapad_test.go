package rsapad_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/keyissuer/keyissuer/hsm/internal/wycheproof"
	"github.com/keyissuer/keyissuer/hsm/rsapad"
)

// hashes are the hashes rsapad supports, in the order the fuzz targets
// index them.
var hashes = []crypto.Hash{crypto.SHA1, crypto.SHA224, crypto.SHA256, crypto.SHA384, crypto.SHA512}

// mgf1 is MGF1 (RFC 8017 §B.2.1), written independently of the package's
// so that the tests do not trust the code they test.
func mgf1(h crypto.Hash, seed []byte, n int) []byte {
	var out []byte
	for c := uint32(0); len(out) < n; c++ {
		d := h.New()
		d.Write(seed)
		d.Write(binary.BigEndian.AppendUint32(nil, c))
		out = d.Sum(out)
	}
	return out[:n]
}

func xor(dst, mask []byte) {
	for i := range dst {
		dst[i] ^= mask[i]
	}
}

func lHash(h crypto.Hash, label []byte) []byte {
	d := h.New()
	d.Write(label)
	return d.Sum(nil)
}

// maskOAEP returns 0x00 || maskedSeed || maskedDB for any seed and db,
// well formed or not, so tests can build encodings that break one rule.
func maskOAEP(tb testing.TB, hash, mgf crypto.Hash, seed, db []byte) []byte {
	tb.Helper()
	if len(seed) != hash.Size() {
		tb.Fatalf("seed is %d bytes, want %d", len(seed), hash.Size())
	}
	seed, db = bytes.Clone(seed), bytes.Clone(db)
	xor(db, mgf1(mgf, seed, len(db)))
	xor(seed, mgf1(mgf, db, len(seed)))
	return append(append([]byte{0}, seed...), db...)
}

// encodeOAEP builds a valid EME-OAEP encoding of msg into k bytes, with a
// fixed seed so that the result is reproducible.
func encodeOAEP(tb testing.TB, hash, mgf crypto.Hash, label, msg []byte, k int) []byte {
	tb.Helper()
	hLen := hash.Size()
	psLen := k - len(msg) - 2*hLen - 2
	if psLen < 0 {
		tb.Fatalf("message of %d bytes does not fit in %d bytes with %v", len(msg), k, hash)
	}
	db := append(lHash(hash, label), make([]byte, psLen)...)
	db = append(append(db, 1), msg...)
	return maskOAEP(tb, hash, mgf, bytes.Repeat([]byte{0xa5}, hLen), db)
}

// encodePKCS1v15 builds 0x00 || 0x02 || PS || 0x00 || msg into k bytes,
// with a fixed non-zero PS.
func encodePKCS1v15(tb testing.TB, msg []byte, k int) []byte {
	tb.Helper()
	psLen := k - len(msg) - 3
	if psLen < 8 {
		tb.Fatalf("message of %d bytes does not fit in %d bytes", len(msg), k)
	}
	em := append([]byte{0, 2}, bytes.Repeat([]byte{0x5a}, psLen)...)
	return append(append(em, 0), msg...)
}

// refDecodeOAEP is a plain, variable-time reading of RFC 8017 §7.1.2, the
// reference the fuzz targets compare against.
func refDecodeOAEP(hash, mgf crypto.Hash, label, em []byte) ([]byte, bool) {
	hLen := hash.Size()
	if len(em) < 2*hLen+2 || em[0] != 0 {
		return nil, false
	}
	seed, db := bytes.Clone(em[1:1+hLen]), bytes.Clone(em[1+hLen:])
	xor(seed, mgf1(mgf, db, hLen))
	xor(db, mgf1(mgf, seed, len(db)))
	if !bytes.Equal(db[:hLen], lHash(hash, label)) {
		return nil, false
	}
	rest := bytes.TrimLeft(db[hLen:], "\x00")
	if len(rest) == 0 || rest[0] != 1 {
		return nil, false
	}
	return rest[1:], true
}

// refDecodePKCS1v15 is a plain, variable-time reading of RFC 8017 §7.2.2.
func refDecodePKCS1v15(em []byte) ([]byte, bool) {
	if len(em) < 11 || em[0] != 0 || em[1] != 2 {
		return nil, false
	}
	i := bytes.IndexByte(em[2:], 0)
	if i < 8 {
		return nil, false
	}
	return em[2+i+1:], true
}

// rawKey is an RSA private key reduced to what the raw operation needs.
type rawKey struct {
	n, e, d *big.Int
	k       int // modulus length in bytes

	// The CRT values, as a token uses them: m = c^d mod n computed mod p
	// and mod q is four times faster, which matters for the 8192-bit keys
	// among the Wycheproof vectors.
	p, q, dp, dq, qinv *big.Int
}

// newRawKey builds a rawKey from n, e, d, p and q, checking that they
// belong together.
func newRawKey(tb testing.TB, n, e, d, p, q *big.Int) *rawKey {
	tb.Helper()
	if new(big.Int).Mul(p, q).Cmp(n) != 0 {
		tb.Fatal("p*q != n")
	}
	one := big.NewInt(1)
	pm1, qm1 := new(big.Int).Sub(p, one), new(big.Int).Sub(q, one)
	key := &rawKey{
		n: n, e: e, d: d, k: (n.BitLen() + 7) / 8,
		p: p, q: q,
		dp:   new(big.Int).Mod(d, pm1),
		dq:   new(big.Int).Mod(d, qm1),
		qinv: new(big.Int).ModInverse(q, p),
	}
	// e*d = 1 mod p-1 and mod q-1, so that m^(e*d) = m mod n.
	for _, r := range []struct{ dr, rm1 *big.Int }{{key.dp, pm1}, {key.dq, qm1}} {
		if new(big.Int).Mod(new(big.Int).Mul(e, r.dr), r.rm1).Cmp(one) != 0 {
			tb.Fatal("d is not the inverse of e")
		}
	}
	return key
}

func rawKeyFrom(tb testing.TB, priv *rsa.PrivateKey) *rawKey {
	tb.Helper()
	return newRawKey(tb, priv.N, big.NewInt(int64(priv.E)), priv.D, priv.Primes[0], priv.Primes[1])
}

// rawDecrypt does what CKM_RSA_X_509 does in the token: it refuses a
// ciphertext that is not k bytes or not below n (ok is false), and
// otherwise returns m = c^d mod n left-padded to k bytes.
func (key *rawKey) rawDecrypt(tb testing.TB, ct []byte) (em []byte, ok bool) {
	tb.Helper()
	c := new(big.Int).SetBytes(ct)
	if len(ct) != key.k || c.Cmp(key.n) >= 0 {
		return nil, false
	}
	m1 := new(big.Int).Exp(c, key.dp, key.p)
	m2 := new(big.Int).Exp(c, key.dq, key.q)
	h := m1.Sub(m1, m2)
	h.Mul(h, key.qinv).Mod(h, key.p)
	m := h.Mul(h, key.q).Add(h, m2)
	if new(big.Int).Exp(m, key.e, key.n).Cmp(c) != 0 {
		tb.Fatal("m^e mod n != c: the private key does not match its modulus")
	}
	return m.FillBytes(make([]byte, key.k)), true
}

var testKey = sync.OnceValues(func() (*rsa.PrivateKey, error) {
	return rsa.GenerateKey(rand.Reader, 2048)
})

func newTestKey(tb testing.TB) *rsa.PrivateKey {
	tb.Helper()
	priv, err := testKey()
	if err != nil {
		tb.Fatalf("failed to generate RSA key: %v", err)
	}
	return priv
}

// checkDecode runs a decoder on em and checks the result, and that em was
// left alone and the result does not alias it.
func checkDecode(tb testing.TB, decode func([]byte) ([]byte, error), em, want []byte, wantErr error) {
	tb.Helper()
	orig := bytes.Clone(em)
	got, err := decode(em)
	if !bytes.Equal(em, orig) {
		tb.Errorf("decoder modified em")
	}
	if wantErr != nil {
		// Exactly ErrDecryption, not something wrapping it: every
		// failure must look the same.
		if err != wantErr {
			tb.Errorf("err = %v, want %v", err, wantErr)
		}
		if got != nil {
			tb.Errorf("got %x with an error, want nil", got)
		}
		return
	}
	if err != nil {
		tb.Fatalf("err = %v, want nil", err)
	}
	if !bytes.Equal(got, want) {
		tb.Errorf("got %x, want %x", got, want)
	}
	if got == nil {
		tb.Errorf("got nil on success, want a non-nil (possibly empty) slice")
	}
	if len(got) > 0 {
		got[0] ^= 0xff
		if !bytes.Equal(em, orig) {
			tb.Errorf("result aliases em")
		}
	}
}

func TestDecodeOAEP(t *testing.T) {
	sha256, sha1 := crypto.SHA256, crypto.SHA1
	lh := lHash(sha256, nil)
	seed := bytes.Repeat([]byte{0x3c}, 32)
	msg := []byte("\x00\x01\x00one-time key\x01")
	const k = 256
	dbWith := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	pad := func(n int) []byte { return make([]byte, n) }
	// fill pads a db to k-1-hLen bytes by inserting zeros after lHash.
	fill := func(rest []byte) []byte { return dbWith(lh, pad(k-1-32-32-len(rest)), rest) }

	tests := []struct {
		name    string
		hash    crypto.Hash
		mgf     crypto.Hash
		label   []byte
		em      []byte
		want    []byte
		wantErr error
	}{
		{name: "valid", hash: sha256, mgf: sha256, em: encodeOAEP(t, sha256, sha256, nil, msg, k), want: msg},
		{name: "valid mgf1-sha1", hash: sha256, mgf: sha1, em: encodeOAEP(t, sha256, sha1, nil, msg, k), want: msg},
		{name: "valid label", hash: sha256, mgf: sha256, label: []byte("key 42"),
			em: encodeOAEP(t, sha256, sha256, []byte("key 42"), msg, k), want: msg},
		{name: "empty label is nil label", hash: sha256, mgf: sha256, label: []byte{},
			em: encodeOAEP(t, sha256, sha256, nil, msg, k), want: msg},
		{name: "valid no PS", hash: sha256, mgf: sha256,
			em:   maskOAEP(t, sha256, sha256, seed, dbWith(lh, []byte{1}, bytes.Repeat([]byte{7}, k-2-64))),
			want: bytes.Repeat([]byte{7}, k-2-64)},
		{name: "valid empty message", hash: sha256, mgf: sha256,
			em: maskOAEP(t, sha256, sha256, seed, fill([]byte{1})), want: []byte{}},
		{name: "smallest k", hash: sha256, mgf: sha256,
			em: maskOAEP(t, sha256, sha256, seed, dbWith(lh, []byte{1})), want: []byte{}},
		{name: "valid sha512 mgf1-sha224", hash: crypto.SHA512, mgf: crypto.SHA224,
			em: encodeOAEP(t, crypto.SHA512, crypto.SHA224, nil, msg, k), want: msg},
		{name: "k too small", hash: sha256, mgf: sha256, em: make([]byte, 2*32+1), wantErr: rsapad.ErrDecryption},
		{name: "nil em", hash: sha256, mgf: sha256, em: nil, wantErr: rsapad.ErrDecryption},
		{name: "first byte not zero", hash: sha256, mgf: sha256,
			em:      func() []byte { em := encodeOAEP(t, sha256, sha256, nil, msg, k); em[0] = 1; return em }(),
			wantErr: rsapad.ErrDecryption},
		{name: "wrong label", hash: sha256, mgf: sha256, label: []byte("other"),
			em: encodeOAEP(t, sha256, sha256, nil, msg, k), wantErr: rsapad.ErrDecryption},
		{name: "wrong mgf hash", hash: sha256, mgf: sha256,
			em: encodeOAEP(t, sha256, sha1, nil, msg, k), wantErr: rsapad.ErrDecryption},
		{name: "wrong hash", hash: crypto.SHA384, mgf: sha256,
			em: encodeOAEP(t, sha256, sha256, nil, msg, k), wantErr: rsapad.ErrDecryption},
		{name: "lHash mismatch in last byte", hash: sha256, mgf: sha256,
			em: func() []byte {
				db := fill(dbWith([]byte{1}, msg))
				db[31] ^= 1
				return maskOAEP(t, sha256, sha256, seed, db)
			}(),
			wantErr: rsapad.ErrDecryption},
		{name: "no separator", hash: sha256, mgf: sha256,
			em: maskOAEP(t, sha256, sha256, seed, fill(nil)), wantErr: rsapad.ErrDecryption},
		{name: "separator 0x02", hash: sha256, mgf: sha256,
			em: maskOAEP(t, sha256, sha256, seed, fill(dbWith([]byte{2}, msg))), wantErr: rsapad.ErrDecryption},
		{name: "non-zero PS byte", hash: sha256, mgf: sha256,
			em: maskOAEP(t, sha256, sha256, seed, fill(dbWith([]byte{0, 0, 9, 0, 1}, msg))), wantErr: rsapad.ErrDecryption},
		{name: "non-zero byte right after lHash", hash: sha256, mgf: sha256,
			em: maskOAEP(t, sha256, sha256, seed, fill(dbWith([]byte{0xff, 1}, msg))), wantErr: rsapad.ErrDecryption},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkDecode(t, func(em []byte) ([]byte, error) {
				return rsapad.DecodeOAEP(tt.hash, tt.mgf, tt.label, em)
			}, tt.em, tt.want, tt.wantErr)
		})
	}
}

func TestDecodeOAEPUnsupportedHash(t *testing.T) {
	em := encodeOAEP(t, crypto.SHA256, crypto.SHA256, nil, []byte("m"), 256)
	tests := []struct {
		name      string
		hash, mgf crypto.Hash
		em        []byte
	}{
		{name: "zero hash", hash: 0, mgf: crypto.SHA256, em: em},
		{name: "md5", hash: crypto.MD5, mgf: crypto.SHA256, em: em},
		{name: "sha512-256", hash: crypto.SHA512_256, mgf: crypto.SHA256, em: em},
		{name: "sha3-256", hash: crypto.SHA3_256, mgf: crypto.SHA256, em: em},
		{name: "zero mgf hash", hash: crypto.SHA256, mgf: 0, em: em},
		{name: "out of range mgf hash", hash: crypto.SHA256, mgf: crypto.Hash(200), em: em},
		// A programming error is reported as such even when em is bad too.
		{name: "and short em", hash: crypto.MD5, mgf: crypto.MD5, em: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := rsapad.DecodeOAEP(tt.hash, tt.mgf, nil, tt.em)
			if err == nil || errors.Is(err, rsapad.ErrDecryption) {
				t.Errorf("err = %v, want an error other than ErrDecryption", err)
			}
			if got != nil {
				t.Errorf("got %x, want nil", got)
			}
		})
	}
}

func TestDecodePKCS1v15(t *testing.T) {
	msg := []byte("\x00\x02\x00one-time key\x00")
	const k = 256
	withByte := func(em []byte, i int, b byte) []byte { em = bytes.Clone(em); em[i] = b; return em }
	valid := encodePKCS1v15(t, msg, k)
	ps := func(n int) []byte { return bytes.Repeat([]byte{0xff}, n) }
	join := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

	tests := []struct {
		name    string
		em      []byte
		want    []byte
		wantErr error
	}{
		{name: "valid", em: valid, want: msg},
		{name: "valid empty message", em: join([]byte{0, 2}, ps(k-3), []byte{0}), want: []byte{}},
		{name: "smallest k", em: join([]byte{0, 2}, ps(8), []byte{0}), want: []byte{}},
		{name: "PS of 8 bytes", em: join([]byte{0, 2}, ps(8), []byte{0}, ps(k-11)), want: ps(k - 11)},
		{name: "PS of 7 bytes", em: join([]byte{0, 2}, ps(7), []byte{0}, ps(k-10)), wantErr: rsapad.ErrDecryption},
		{name: "PS empty", em: join([]byte{0, 2, 0}, ps(k-3)), wantErr: rsapad.ErrDecryption},
		{name: "k too small", em: join([]byte{0, 2}, ps(7), []byte{0}), wantErr: rsapad.ErrDecryption},
		{name: "nil em", em: nil, wantErr: rsapad.ErrDecryption},
		{name: "first byte not zero", em: withByte(valid, 0, 1), wantErr: rsapad.ErrDecryption},
		{name: "block type 1", em: withByte(valid, 1, 1), wantErr: rsapad.ErrDecryption},
		{name: "block type 0", em: withByte(valid, 1, 0), wantErr: rsapad.ErrDecryption},
		{name: "no separator", em: join([]byte{0, 2}, ps(k-2)), wantErr: rsapad.ErrDecryption},
		{name: "all zero", em: make([]byte, k), wantErr: rsapad.ErrDecryption},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkDecode(t, rsapad.DecodePKCS1v15, tt.em, tt.want, tt.wantErr)
		})
	}
}

// TestRoundTripOAEP encrypts with crypto/rsa, does the raw RSA operation
// with math/big as the token would, and decodes.
func TestRoundTripOAEP(t *testing.T) {
	priv := newTestKey(t)
	key := rawKeyFrom(t, priv)
	tests := []struct {
		name      string
		hash, mgf crypto.Hash
	}{
		{name: "sha1", hash: crypto.SHA1, mgf: crypto.SHA1},
		{name: "sha224", hash: crypto.SHA224, mgf: crypto.SHA224},
		{name: "sha256", hash: crypto.SHA256, mgf: crypto.SHA256},
		{name: "sha384", hash: crypto.SHA384, mgf: crypto.SHA384},
		{name: "sha512", hash: crypto.SHA512, mgf: crypto.SHA512},
		{name: "sha256 mgf1-sha1", hash: crypto.SHA256, mgf: crypto.SHA1},
		{name: "sha1 mgf1-sha256", hash: crypto.SHA1, mgf: crypto.SHA256},
		{name: "sha512 mgf1-sha224", hash: crypto.SHA512, mgf: crypto.SHA224},
		{name: "sha384 mgf1-sha512", hash: crypto.SHA384, mgf: crypto.SHA512},
	}
	for _, tt := range tests {
		maxLen := key.k - 2*tt.hash.Size() - 2
		for _, label := range [][]byte{nil, []byte("keyissuer")} {
			for _, n := range []int{0, 1, 32, maxLen} {
				name := fmt.Sprintf("%s/label=%q/len=%d", tt.name, label, n)
				t.Run(name, func(t *testing.T) {
					msg := make([]byte, n)
					rand.Read(msg)
					var ct []byte
					var err error
					if tt.hash == tt.mgf {
						ct, err = rsa.EncryptOAEP(tt.hash.New(), rand.Reader, &priv.PublicKey, msg, label)
					} else {
						ct, err = rsa.EncryptOAEPWithOptions(rand.Reader, &priv.PublicKey, msg,
							&rsa.OAEPOptions{Hash: tt.hash, MGFHash: tt.mgf, Label: label})
					}
					if err != nil {
						t.Fatalf("failed to encrypt: %v", err)
					}
					em, ok := key.rawDecrypt(t, ct)
					if !ok {
						t.Fatal("raw operation rejected a ciphertext from crypto/rsa")
					}
					decode := func(em []byte) ([]byte, error) { return rsapad.DecodeOAEP(tt.hash, tt.mgf, label, em) }
					checkDecode(t, decode, em, msg, nil)

					// The same em under the wrong parameters is just a
					// decryption error. (Not so read as PKCS #1 v1.5: about
					// one OAEP encoding in 400 is also a valid one of those.)
					wrongLabel := append(bytes.Clone(label), 'x')
					if _, err := rsapad.DecodeOAEP(tt.hash, tt.mgf, wrongLabel, em); err != rsapad.ErrDecryption {
						t.Errorf("wrong label: err = %v, want ErrDecryption", err)
					}
					otherMGF := crypto.SHA256
					if tt.mgf == otherMGF {
						otherMGF = crypto.SHA1
					}
					if _, err := rsapad.DecodeOAEP(tt.hash, otherMGF, label, em); err != rsapad.ErrDecryption {
						t.Errorf("wrong mgf hash: err = %v, want ErrDecryption", err)
					}
				})
			}
		}
	}
}

func TestRoundTripPKCS1v15(t *testing.T) {
	priv := newTestKey(t)
	key := rawKeyFrom(t, priv)
	for _, n := range []int{0, 1, 16, 48, key.k - 11} {
		t.Run(fmt.Sprintf("len=%d", n), func(t *testing.T) {
			msg := make([]byte, n)
			rand.Read(msg)
			ct, err := rsa.EncryptPKCS1v15(rand.Reader, &priv.PublicKey, msg)
			if err != nil {
				t.Fatalf("failed to encrypt: %v", err)
			}
			em, ok := key.rawDecrypt(t, ct)
			if !ok {
				t.Fatal("raw operation rejected a ciphertext from crypto/rsa")
			}
			checkDecode(t, rsapad.DecodePKCS1v15, em, msg, nil)
			// A random PKCS #1 v1.5 encoding is a valid OAEP one with
			// probability 2^-160 at most.
			if _, err := rsapad.DecodeOAEP(crypto.SHA1, crypto.SHA1, nil, em); err != rsapad.ErrDecryption {
				t.Errorf("as OAEP: err = %v, want ErrDecryption", err)
			}
		})
	}
}

type wycheproofFile struct {
	Algorithm     string            `json:"algorithm"`
	NumberOfTests int               `json:"numberOfTests"`
	TestGroups    []wycheproofGroup `json:"testGroups"`
}

type wycheproofGroup struct {
	Type       string `json:"type"`
	SHA        string `json:"sha"`    // OAEP only
	MGF        string `json:"mgf"`    // OAEP only
	MGFSHA     string `json:"mgfSha"` // OAEP only
	PrivateKey struct {
		Modulus         string `json:"modulus"`
		PrivateExponent string `json:"privateExponent"`
		PublicExponent  string `json:"publicExponent"`
		Prime1          string `json:"prime1"`
		Prime2          string `json:"prime2"`
	} `json:"privateKey"`
	Tests []wycheproofTest `json:"tests"`
}

type wycheproofTest struct {
	TcID    int      `json:"tcId"`
	Comment string   `json:"comment"`
	Flags   []string `json:"flags"`
	Msg     string   `json:"msg"`
	CT      string   `json:"ct"`
	Label   string   `json:"label"` // OAEP only
	Result  string   `json:"result"`
}

func (v *wycheproofTest) hasFlag(flags ...string) bool {
	for _, f := range v.Flags {
		for _, want := range flags {
			if f == want {
				return true
			}
		}
	}
	return false
}

func loadWycheproof(tb testing.TB, dir, name string) *wycheproofFile {
	tb.Helper()
	data, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		tb.Fatalf("failed to read Wycheproof vectors: %v", err)
	}
	var f wycheproofFile
	if err := json.Unmarshal(data, &f); err != nil {
		tb.Fatalf("failed to parse %s: %v", name, err)
	}
	return &f
}

func mustHex(tb testing.TB, s string) []byte {
	tb.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		tb.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

func mustInt(tb testing.TB, s string) *big.Int {
	tb.Helper()
	return new(big.Int).SetBytes(mustHex(tb, s))
}

// wycheproofKey builds the group's key from its hex fields and checks that
// they agree with each other.
func wycheproofKey(tb testing.TB, g *wycheproofGroup) *rawKey {
	tb.Helper()
	pk := g.PrivateKey
	return newRawKey(tb, mustInt(tb, pk.Modulus), mustInt(tb, pk.PublicExponent),
		mustInt(tb, pk.PrivateExponent), mustInt(tb, pk.Prime1), mustInt(tb, pk.Prime2))
}

// wycheproofHashes maps Wycheproof's hash names to the ones rsapad
// supports; a group with any other hash is skipped.
var wycheproofHashes = map[string]crypto.Hash{
	"SHA-1":   crypto.SHA1,
	"SHA-224": crypto.SHA224,
	"SHA-256": crypto.SHA256,
	"SHA-384": crypto.SHA384,
	"SHA-512": crypto.SHA512,
}

// TestWycheproof runs the vectors found by wycheproof.Dir, outside this
// repository, through rsapad's decoders.
func TestWycheproof(t *testing.T) {
	dir := wycheproof.Dir(t)
	tests := []struct {
		file string
		oaep bool
	}{
		{file: "rsa_oaep_2048_sha1_mgf1sha1_test.json", oaep: true},
		{file: "rsa_oaep_2048_sha256_mgf1sha256_test.json", oaep: true},
		{file: "rsa_oaep_3072_sha256_mgf1sha256_test.json", oaep: true},
		{file: "rsa_oaep_misc_test.json", oaep: true},
		{file: "rsa_pkcs1_2048_test.json", oaep: false},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			t.Parallel()
			f := loadWycheproof(t, dir, tt.file)
			var run, passed, skipped, malformed int
			for i := range f.TestGroups {
				g := &f.TestGroups[i]
				var decode func(label, em []byte) ([]byte, error)
				if tt.oaep {
					hash, ok1 := wycheproofHashes[g.SHA]
					mgf, ok2 := wycheproofHashes[g.MGFSHA]
					if !ok1 || !ok2 || g.MGF != "MGF1" {
						t.Logf("skipping %d vectors: %s with %s-%s", len(g.Tests), g.SHA, g.MGF, g.MGFSHA)
						skipped += len(g.Tests)
						continue
					}
					decode = func(label, em []byte) ([]byte, error) { return rsapad.DecodeOAEP(hash, mgf, label, em) }
				} else {
					decode = func(_, em []byte) ([]byte, error) { return rsapad.DecodePKCS1v15(em) }
				}
				key := wycheproofKey(t, g)
				for _, v := range g.Tests {
					run++
					name := fmt.Sprintf("tcId=%d", v.TcID)
					ok := t.Run(name, func(t *testing.T) {
						if checkWycheproof(t, key, decode, &v) {
							malformed++
						}
					})
					if ok {
						passed++
					}
				}
			}
			if run+skipped != f.NumberOfTests {
				t.Errorf("saw %d vectors, file says %d", run+skipped, f.NumberOfTests)
			}
			t.Logf("%s: run %d, passed %d, skipped %d (%d malformed ciphertexts stopped before decoding)",
				tt.file, run, passed, skipped, malformed)
		})
	}
}

// checkWycheproof checks one vector and reports whether its ciphertext was
// malformed, so that the raw operation refused it.
func checkWycheproof(tb testing.TB, key *rawKey, decode func(label, em []byte) ([]byte, error), v *wycheproofTest) (malformed bool) {
	tb.Helper()
	ct, msg, label := mustHex(tb, v.CT), mustHex(tb, v.Msg), mustHex(tb, v.Label)
	flagged := v.hasFlag("InvalidCiphertext", "InvalidCiphertextFormat")
	em, ok := key.rawDecrypt(tb, ct)
	if !ok {
		// Not a padding failure: the token refuses the operation, and the
		// decoder never sees it.
		if v.Result != "invalid" {
			tb.Fatalf("%s: raw operation refused a %s vector", v.Comment, v.Result)
		}
		if !flagged {
			tb.Errorf("%s: raw operation refused a vector not flagged as a malformed ciphertext", v.Comment)
		}
		return true
	}
	if flagged {
		tb.Fatalf("%s: flagged as a malformed ciphertext, but it is %d bytes and below n", v.Comment, len(ct))
	}

	got, err := decode(label, em)
	switch v.Result {
	case "valid":
		if err != nil {
			tb.Fatalf("%s: err = %v, want %x", v.Comment, err, msg)
		}
		if !bytes.Equal(got, msg) {
			tb.Errorf("%s: got %x, want %x", v.Comment, got, msg)
		}
	case "acceptable":
		switch {
		case err == rsapad.ErrDecryption:
			tb.Logf("%s %v: acceptable, rejected", v.Comment, v.Flags)
		case err != nil:
			tb.Errorf("%s: err = %v, want nil or ErrDecryption", v.Comment, err)
		case !bytes.Equal(got, msg):
			tb.Errorf("%s: got %x, want %x", v.Comment, got, msg)
		default:
			tb.Logf("%s %v: acceptable, accepted", v.Comment, v.Flags)
		}
	case "invalid":
		if err != rsapad.ErrDecryption {
			tb.Errorf("%s: got %x, err = %v, want ErrDecryption", v.Comment, got, err)
		}
	default:
		tb.Fatalf("unknown result %q", v.Result)
	}
	return false
}

// FuzzDecodeOAEP checks that DecodeOAEP never panics, fails only with
// ErrDecryption, and agrees with a plain reading of the RFC. The seeds in
// testdata/fuzz are valid and nearly valid encodings, so mutations explore
// around the checks rather than only failing the first.
func FuzzDecodeOAEP(f *testing.F) {
	f.Fuzz(func(t *testing.T, em, label []byte, sel byte) {
		hash, mgf := hashes[int(sel)%len(hashes)], hashes[int(sel)/len(hashes)%len(hashes)]
		orig := bytes.Clone(em)
		got, err := rsapad.DecodeOAEP(hash, mgf, label, em)
		if !bytes.Equal(em, orig) {
			t.Fatal("decoder modified em")
		}
		want, ok := refDecodeOAEP(hash, mgf, label, em)
		if !ok {
			if err != rsapad.ErrDecryption || got != nil {
				t.Fatalf("got %x, err = %v, want ErrDecryption", got, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("err = %v, want %x", err, want)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("got %x, want %x", got, want)
		}
		if len(got) >= len(em) || len(got) > len(em)-2*hash.Size()-2 {
			t.Fatalf("message of %d bytes from em of %d bytes", len(got), len(em))
		}
	})
}

// FuzzDecodePKCS1v15 checks that DecodePKCS1v15 never panics, fails only
// with ErrDecryption, and agrees with a plain reading of the RFC.
func FuzzDecodePKCS1v15(f *testing.F) {
	f.Fuzz(func(t *testing.T, em []byte) {
		orig := bytes.Clone(em)
		got, err := rsapad.DecodePKCS1v15(em)
		if !bytes.Equal(em, orig) {
			t.Fatal("decoder modified em")
		}
		want, ok := refDecodePKCS1v15(em)
		if !ok {
			if err != rsapad.ErrDecryption || got != nil {
				t.Fatalf("got %x, err = %v, want ErrDecryption", got, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("err = %v, want %x", err, want)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("got %x, want %x", got, want)
		}
		if len(got) >= len(em) || len(got) > len(em)-11 {
			t.Fatalf("message of %d bytes from em of %d bytes", len(got), len(em))
		}
	})
}

// The benchmarks time a valid and an invalid em side by side: in constant
// time code the two should be close (the valid one also copies the
// message out).

func BenchmarkDecodeOAEPSHA256(b *testing.B) {
	const k = 256 // 2048-bit modulus
	valid := encodeOAEP(b, crypto.SHA256, crypto.SHA256, nil, make([]byte, 32), k)
	badHash := bytes.Clone(valid)
	badHash[1] ^= 1 // a different seed unmasks a different lHash'
	badFirst := bytes.Clone(valid)
	badFirst[0] = 1
	for _, bm := range []struct {
		name string
		em   []byte
	}{{"valid", valid}, {"bad-lhash", badHash}, {"bad-first-byte", badFirst}} {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(k)
			for b.Loop() {
				rsapad.DecodeOAEP(crypto.SHA256, crypto.SHA256, nil, bm.em)
			}
		})
	}
}

func BenchmarkDecodePKCS1v15(b *testing.B) {
	const k = 256 // 2048-bit modulus
	valid := encodePKCS1v15(b, make([]byte, 32), k)
	badType := bytes.Clone(valid)
	badType[1] = 1
	shortPS := bytes.Clone(valid)
	shortPS[5] = 0
	for _, bm := range []struct {
		name string
		em   []byte
	}{{"valid", valid}, {"bad-block-type", badType}, {"short-ps", shortPS}} {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(k)
			for b.Loop() {
				rsapad.DecodePKCS1v15(bm.em)
			}
		})
	}
}
