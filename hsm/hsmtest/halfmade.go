package hsmtest

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

// HalfMade is a shape of key object that a process killed inside SoftHSM
// 2.6's C_GenerateKeyPair leaves in a token (see hsm/halfmade.go): SoftHSM
// creates the object's file, writes its attributes in steps, and the
// label, the id and the key last.
type HalfMade string

const (
	// HalfMadeClassless is an object whose file holds no attribute yet:
	// SoftHSM lists it, and answers CKR_ATTRIBUTE_VALUE_INVALID for every
	// attribute.
	HalfMadeClassless HalfMade = "classless"
	// HalfMadePublic and HalfMadePrivate are RSA key objects with their
	// class, key type and default attributes only: CKA_TOKEN false, an
	// empty CKA_LABEL, CKA_ID and CKA_MODULUS.
	HalfMadePublic  HalfMade = "public"
	HalfMadePrivate HalfMade = "private"
	// HalfMadeUnmarked is a finished RSA private key whose CKA_LABEL and
	// CKA_ID are empty: what SoftHSM 2.6.1 leaves of a key being made when
	// another process reads it meanwhile and writes its defaults back over
	// the template (RELIABILITY.md, bug 6). Not cut short, but marked by
	// nobody all the same.
	HalfMadeUnmarked HalfMade = "unmarked"
)

const (
	halfMadeEnv      = "HSMTEST_HALF_MADE"
	halfMadeTokenEnv = "HSMTEST_HALF_MADE_TOKEN"
	halfMadePINEnv   = "HSMTEST_HALF_MADE_PIN"
)

// LeaveHalfMade leaves one half-made object of the given shape in tok,
// exactly as a kill at that point of C_GenerateKeyPair leaves it on disk,
// from a child process (the test binary again, through [Main]), so that the
// caller's own initialised module plays no part in making it. For the key
// shapes the child calls C_CreateObject with a template that lacks the
// modulus: SoftHSM 2.6 writes the object's class, key type and defaults to
// its file, then refuses the template with CKR_TEMPLATE_INCOMPLETE and
// leaves the file (a leak of its own, and the very state of a kill before
// the template). For the classless shape it writes the file SoftHSM
// creates first (a generation number and no attribute, and its lock file)
// into the token's directory. The object shows up in the caller's
// searches: the child creates and destroys a data object after it, which
// makes every process re-read the token's directory. SoftHSM tokens only:
// the shapes are SoftHSM's.
func LeaveHalfMade(t testing.TB, tok Token, shape HalfMade) {
	t.Helper()
	if tok.Kind != SoftHSM {
		t.Fatalf("hsmtest: LeaveHalfMade makes SoftHSM's half-made objects; token %q is %s", tok.Label, tok.Kind)
	}
	mu.Lock()
	conf := confPath
	mu.Unlock()
	if conf == "" {
		t.Fatal("hsmtest: LeaveHalfMade needs hsmtest.Main")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf, halfMadeEnv+"="+string(shape),
		halfMadeTokenEnv+"="+tok.Label, halfMadePINEnv+"="+tok.PIN, "SOFTHSM2_MODULE="+tok.Module)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("hsmtest: leaving a half-made %s object in token %q: %v\n%s", shape, tok.Label, err, out)
	}
}

// halfMadeChild is the child of LeaveHalfMade: it makes the object and
// exits without C_Finalize, as a killed process would.
func halfMadeChild(shape string) int {
	if err := leaveHalfMade(HalfMade(shape), os.Getenv(halfMadeTokenEnv), os.Getenv(halfMadePINEnv)); err != nil {
		fmt.Fprintf(os.Stderr, "hsmtest child: %v\n", err)
		return 1
	}
	return 0
}

func leaveHalfMade(shape HalfMade, label, pin string) error {
	p := pkcs11.New(Module())
	if p == nil {
		return fmt.Errorf("failed to load %s", Module())
	}
	if err := p.Initialize(); err != nil {
		return fmt.Errorf("C_Initialize: %w", err)
	}
	slot, err := slotLabelled(p, label)
	if err != nil {
		return err
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("C_OpenSession: %w", err)
	}
	if err := p.Login(s, pkcs11.CKU_USER, pin); err != nil {
		return fmt.Errorf("C_Login: %w", err)
	}
	rsaTmpl := func(class uint, more ...*pkcs11.Attribute) []*pkcs11.Attribute {
		return append([]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		}, more...)
	}
	switch shape {
	case HalfMadePublic, HalfMadePrivate:
		tmpl := rsaTmpl(pkcs11.CKO_PUBLIC_KEY, pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
		if shape == HalfMadePrivate {
			tmpl = rsaTmpl(pkcs11.CKO_PRIVATE_KEY, pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true))
		}
		_, err := p.CreateObject(s, tmpl)
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_TEMPLATE_INCOMPLETE)) {
			return fmt.Errorf("C_CreateObject without a modulus: %v, want CKR_TEMPLATE_INCOMPLETE", err)
		}
	case HalfMadeUnmarked:
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return err
		}
		key.Precompute()
		b := func(i *big.Int) []byte { return i.Bytes() }
		_, err = p.CreateObject(s, rsaTmpl(pkcs11.CKO_PRIVATE_KEY,
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, []byte{}),
			pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{}),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, b(key.N)),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, b(big.NewInt(int64(key.E)))),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, b(key.D)),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, b(key.Primes[0])),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, b(key.Primes[1])),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_1, b(key.Precomputed.Dp)),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_2, b(key.Precomputed.Dq)),
			pkcs11.NewAttribute(pkcs11.CKA_COEFFICIENT, b(key.Precomputed.Qinv)),
		))
		if err != nil {
			return fmt.Errorf("C_CreateObject (an RSA private key without label and id): %w", err)
		}
	case HalfMadeClassless:
		dir, err := tokenDir(label)
		if err != nil {
			return err
		}
		// What ObjectFile's constructor writes: an empty lock file, and
		// the object's file with generation 1 (big-endian) and nothing
		// else.
		base := filepath.Join(dir, "hsmtest-half-made-"+randomHex(8))
		if err := os.WriteFile(base+".lock", nil, 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(base+".object", []byte{0, 0, 0, 0, 0, 0, 0, 1}, 0o600); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown half-made shape %q", shape)
	}
	// A change of the token's object set makes every process re-read its
	// directory, where the half-made object now is.
	data, err := p.CreateObject(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "hsmtest-half-made"),
	})
	if err != nil {
		return fmt.Errorf("C_CreateObject (a data object): %w", err)
	}
	if err := p.DestroyObject(s, data); err != nil {
		return fmt.Errorf("C_DestroyObject (the data object): %w", err)
	}
	return nil
}

// tokenDir finds the directory of the token labelled label under the
// SoftHSM configuration's token directory: the one whose token.object
// holds the label.
func tokenDir(label string) (string, error) {
	conf, err := os.ReadFile(os.Getenv("SOFTHSM2_CONF"))
	if err != nil {
		return "", err
	}
	var root string
	for _, line := range strings.Split(string(conf), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "directories.tokendir" {
			root = strings.TrimSpace(v)
		}
	}
	dirs, err := filepath.Glob(filepath.Join(root, "*", "token.object"))
	if err != nil {
		return "", err
	}
	for _, d := range dirs {
		if b, err := os.ReadFile(d); err == nil && bytes.Contains(b, []byte(label)) {
			return filepath.Dir(d), nil
		}
	}
	return "", fmt.Errorf("no token directory for %q under %s", label, root)
}
