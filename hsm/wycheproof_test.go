package hsm_test

import (
	"bytes"
	"context"
	"crypto/rsa"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/hsm/internal/wycheproof"
)

// Project Wycheproof's RSA decryption vectors, run through a SoftHSM token
// by the daemon's own path: Token.Decrypt, native or raw + rsapad. Each
// group's private key is imported into the token; each vector gets a fresh
// one-time Key over it.
//
// The vectors live outside the repository (see their README); the test
// finds them with wycheproof.Dir.

// hexBytes is a hex string in the vector files.
type hexBytes []byte

func (h *hexBytes) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := hex.DecodeString(s)
	*h = v
	return err
}

type wpFile struct {
	Algorithm     string
	NumberOfTests int
	TestGroups    []struct {
		KeySize    int
		Sha        string // OAEP only
		MgfSha     string
		PrivateKey struct {
			Modulus, PublicExponent, PrivateExponent, Prime1, Prime2 hexBytes
		}
		Tests []wpTest
	}
}

type wpTest struct {
	TcID    int
	Comment string
	Flags   []string
	Msg, Ct hexBytes
	Label   hexBytes
	Result  string // valid, invalid or acceptable
}

// wpPadding maps a group's scheme to keyissuer's padding; ok is false for a
// scheme keyissuer does not offer.
func wpPadding(algorithm, sha, mgfSha string) (hsm.Padding, bool) {
	if algorithm == "RSAES-PKCS1-v1_5" {
		return hsm.PKCS1v15, true
	}
	switch sha + "/" + mgfSha {
	case "SHA-1/SHA-1":
		return hsm.OAEPSHA1, true
	case "SHA-256/SHA-256":
		return hsm.OAEPSHA256, true
	case "SHA-256/SHA-1":
		return hsm.OAEPSHA256MGF1SHA1, true
	}
	return "", false
}

// wpCounts are one file's results for one method.
type wpCounts struct {
	run, passed, failed int
	// Vectors with a non-empty OAEP label are unsupported: keyissuer,
	// like every client it serves, uses the empty label. They are still
	// run, and must be rejected.
	labelled, labelledRejected int
	// Vectors of a key size the token does not take, refused unrun.
	tooBig int
}

func TestWycheproof(t *testing.T) { hsmtest.ForEach(t, testWycheproof) }

func testWycheproof(t *testing.T, st hsmtest.Token) {
	dir := wycheproof.Dir(t)
	ctx := context.Background()
	tok, err := hsm.Open(ctx, hsm.Config{
		Module:      st.Module,
		TokenLabel:  st.Label,
		PIN:         st.PIN,
		LabelPrefix: st.Prefix + "wycheproof:",
		Sessions:    2,
		Paddings:    hsm.Paddings(),
		Log:         slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	probed := maps.Clone(tok.Info().Methods)

	files := []string{
		"rsa_oaep_2048_sha1_mgf1sha1_test.json",
		"rsa_oaep_2048_sha256_mgf1sha256_test.json",
		"rsa_oaep_3072_sha256_mgf1sha256_test.json",
		"rsa_oaep_misc_test.json",
		"rsa_pkcs1_2048_test.json",
	}
	var (
		total            wpCounts
		totalUnsupported int
		totalLabelled    int
	)
	invalidErrs := map[string]int{} // every invalid vector's error, by text
	for _, name := range files {
		t.Run(strings.TrimSuffix(name, "_test.json"), func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil {
				t.Fatal(err)
			}
			var f wpFile
			if err := json.Unmarshal(b, &f); err != nil {
				t.Fatal(err)
			}
			counts := map[hsm.Method]*wpCounts{hsm.Native: {}, hsm.Raw: {}}
			seen, unsupported := 0, 0
			for gi, g := range f.TestGroups {
				seen += len(g.Tests)
				p, ok := wpPadding(f.Algorithm, g.Sha, g.MgfSha)
				if !ok {
					unsupported += len(g.Tests)
					continue
				}
				priv := wpKey(t, g.PrivateKey.Modulus, g.PrivateKey.PublicExponent, g.PrivateKey.PrivateExponent,
					g.PrivateKey.Prime1, g.PrivateKey.Prime2)
				im, err := tok.ImportPrivateKey(ctx, fmt.Sprintf("%s/%d", name, gi), priv)
				if err != nil {
					t.Fatalf("group %d (%d bits): %v", gi, g.KeySize, err)
				}
				// The daemon's method, and raw as well when the daemon's
				// is native: rsapad must pass the vectors too.
				methods := []hsm.Method{probed[p]}
				if probed[p] == hsm.Native {
					methods = append(methods, hsm.Raw)
				}
				for _, m := range methods {
					tok.SetMethod(p, m)
					c := counts[m]
					if err := tok.Fits(p, m, priv.N.BitLen()); err != nil {
						// A key size the token's mechanism does not take
						// (openCryptoki: above 4096 bits) is refused
						// before it reaches the token.
						if _, err := tok.Decrypt(ctx, im.NewKey(), p, g.Tests[0].Ct); !errors.Is(err, hsm.ErrKeySize) {
							t.Errorf("group %d (%d bits, %s): Decrypt = %v, want ErrKeySize", gi, priv.N.BitLen(), m, err)
						}
						c.tooBig += len(g.Tests)
						continue
					}
					for _, tc := range g.Tests {
						runVector(t, tok, im, p, m, tc, c, invalidErrs)
					}
				}
				tok.SetMethod(p, probed[p])
				if err := im.Destroy(ctx); err != nil {
					t.Error(err)
				}
			}
			if seen != f.NumberOfTests {
				t.Errorf("read %d vectors, the file says %d", seen, f.NumberOfTests)
			}
			labelled := max(counts[hsm.Native].labelled, counts[hsm.Raw].labelled)
			t.Logf("%s: %d vectors, %d of a scheme keyissuer offers; skipped-unsupported %d (%d of another hash pair, %d with a label)",
				name, f.NumberOfTests, f.NumberOfTests-unsupported-labelled, unsupported+labelled, unsupported, labelled)
			for _, m := range []hsm.Method{hsm.Native, hsm.Raw} {
				c := counts[m]
				if c.run+c.labelled == 0 {
					continue
				}
				t.Logf("    %s: run %d, passed %d, failed %d; labelled ones run anyway, rejected %d of %d; "+
					"of a key size the token does not take %d",
					m, c.run, c.passed, c.failed, c.labelledRejected, c.labelled, c.tooBig)
				total.run += c.run
				total.passed += c.passed
				total.failed += c.failed
				total.labelled += c.labelled
				total.labelledRejected += c.labelledRejected
			}
			totalUnsupported += unsupported
			totalLabelled += labelled
			if counts[hsm.Native].run+counts[hsm.Raw].run == 0 {
				t.Errorf("%s: no vector ran", name)
			}
		})
	}
	t.Logf("Wycheproof through the token: runs %d (native and raw counted apart), passed %d, failed %d; "+
		"skipped-unsupported %d vectors (%d of another hash pair, %d with a label, whose %d runs were all rejected: %d)",
		total.run, total.passed, total.failed, totalUnsupported+totalLabelled, totalUnsupported, totalLabelled,
		total.labelled, total.labelledRejected)
	// Every invalid vector, whatever was wrong with it and whichever path
	// decoded it, failed with the one error.
	if len(invalidErrs) != 1 {
		t.Errorf("invalid vectors failed with %d different errors, want one: %v", len(invalidErrs), invalidErrs)
	}
}

// runVector decrypts one vector with a fresh Key and checks the outcome.
func runVector(t *testing.T, tok *hsm.Token, im *hsm.Imported, p hsm.Padding, m hsm.Method, tc wpTest, c *wpCounts, invalidErrs map[string]int) {
	t.Helper()
	pt, err := tok.Decrypt(context.Background(), im.NewKey(), p, tc.Ct)
	desc := fmt.Sprintf("tcId %d (%s, %s, %s %v %q)", tc.TcID, p, m, tc.Result, tc.Flags, tc.Comment)
	if len(tc.Label) > 0 {
		c.labelled++
		if err == hsm.ErrDecrypt {
			c.labelledRejected++
		} else {
			t.Errorf("%s: a ciphertext with a label: got %x, %v; want ErrDecrypt", desc, pt, err)
		}
		return
	}
	c.run++
	ok := false
	switch tc.Result {
	case "valid":
		ok = err == nil && bytes.Equal(pt, tc.Msg)
	case "acceptable":
		ok = (err == nil && bytes.Equal(pt, tc.Msg)) || err == hsm.ErrDecrypt
	case "invalid":
		if err != nil {
			invalidErrs[err.Error()]++
		}
		// The very same error value, not merely one that wraps it.
		ok = err == hsm.ErrDecrypt && errors.Is(err, hsm.ErrDecrypt)
	default:
		t.Fatalf("%s: unknown result", desc)
	}
	if ok {
		c.passed++
		return
	}
	c.failed++
	t.Errorf("%s: got %x, %v", desc, pt, err)
}

// wpKey builds the private key of a group from its hex fields.
func wpKey(t *testing.T, n, e, d, p, q []byte) *rsa.PrivateKey {
	t.Helper()
	bi := func(b []byte) *big.Int { return new(big.Int).SetBytes(b) }
	eb := bi(e)
	if !eb.IsInt64() {
		t.Fatalf("public exponent %s too large", eb)
	}
	return &rsa.PrivateKey{
		PublicKey: rsa.PublicKey{N: bi(n), E: int(eb.Int64())},
		D:         bi(d),
		Primes:    []*big.Int{bi(p), bi(q)},
	}
}
