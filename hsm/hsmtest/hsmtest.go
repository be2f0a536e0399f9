// Package hsmtest gives a test binary real SoftHSM2 tokens in a private
// temporary directory, so integration tests never touch a developer's
// tokens or the system token directory /var/lib/softhsm.
//
// A test package opts in from TestMain and creates tokens as it needs them:
//
//	func TestMain(m *testing.M) { hsmtest.Main(m) }
//
//	func TestSomething(t *testing.T) {
//		tok := hsmtest.NewToken(t)
//		// open tok.Module, find tok.Label, log in with tok.PIN
//	}
//
// # When tokens become visible
//
// SoftHSM2 (2.6.1, checked with github.com/miekg/pkcs11) reads SOFTHSM2_CONF
// and scans its token directory in C_Initialize, and only there. A token
// that softhsm2-util initialises after this process has called C_Initialize
// does not show up in C_GetSlotList(true), not even seconds later: the module
// keeps listing the slot as the free, uninitialised token it was. It appears
// only after C_Finalize and a new C_Initialize, which also re-reads
// SOFTHSM2_CONF. In practice:
//
//   - Call [NewToken] (or [NewTokens]) before the code under test opens the
//     module, for example before hsm.Open.
//   - The hsm package keeps one initialised module per process while any
//     hsm.Token is open and finalises it when the last one is closed. So a
//     test may create more tokens only once every Token in the process is
//     closed; parallel tests should create their tokens before any of them
//     opens one, or run one at a time.
//
// NewToken checks this: if the module is already initialised in the process
// and cannot see the new token, it fails the test and says why, instead of
// leaving the code under test to fail later with "no token with label".
package hsmtest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"
)

// Debian's paths of the SoftHSM2 module, in order of preference.
var modulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
}

const installHint = "run `apt-get install softhsm2` (as root)"

// mu serialises token creation and guards the state below. softhsm2-util
// picks the first free slot, so two running at once could race for it.
var (
	mu       sync.Mutex
	confPath string      // the SOFTHSM2_CONF that Main set up; "" if Main was not used
	probe    *pkcs11.Ctx // the module, loaded but never initialised by us
)

// Main sets up a private SoftHSM configuration and token directory for the
// test binary (a temp dir), points SOFTHSM2_CONF at it, runs the tests and
// removes the dir. Use from TestMain:
//
//	func TestMain(m *testing.M) { hsmtest.Main(m) }
//
// It overrides any SOFTHSM2_CONF in the environment, so tests never see a
// developer's token. It does not need SoftHSM to be installed: only
// [NewToken] does, so tests that need no token still run without it.
func Main(m *testing.M) { os.Exit(Run(m)) }

// Runner is what Run runs: a *testing.M, or a wrapper of one such as
// pgtest.Wrap's, for a test binary that needs both harnesses.
type Runner interface{ Run() int }

// Run is Main without the exit: it returns m.Run's code. In a child of
// [LeaveHalfMade] it makes the object and returns, running no test.
func Run(m Runner) int {
	if kind := os.Getenv(halfMadeEnv); kind != "" {
		return halfMadeChild(kind)
	}
	return run(m)
}

func run(m Runner) int {
	dir, err := os.MkdirTemp("", "hsmtest-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "hsmtest: failed to create SoftHSM directory: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	conf, err := writeConfig(dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "hsmtest: %v\n", err)
		return 1
	}
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		fmt.Fprintf(os.Stderr, "hsmtest: failed to set SOFTHSM2_CONF: %v\n", err)
		return 1
	}
	mu.Lock()
	confPath = conf
	mu.Unlock()
	code := m.Run()
	mu.Lock()
	used := ockUsed
	mu.Unlock()
	if used {
		// Token objects on openCryptoki outlive the binary: none may be
		// left behind.
		n, err := sweepOpenCryptoki()
		if err != nil {
			fmt.Fprintf(os.Stderr, "hsmtest: FAIL: failed to clean openCryptoki's soft token: %v\n", err)
			code = max(code, 1)
		}
		if n > 0 {
			// A leak: the run fails, so that it is seen.
			fmt.Fprintf(os.Stderr, "hsmtest: FAIL: tests left %d objects under %q on openCryptoki's soft token (destroyed now)\n", n, ockPrefix)
			code = max(code, 1)
		}
	}
	return code
}

// writeConfig writes a SoftHSM2 configuration keeping its tokens in
// dir/tokens and returns its path.
func writeConfig(dir string) (string, error) {
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		return "", fmt.Errorf("failed to create token directory: %w", err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	text := "directories.tokendir = " + tokens + "\n" +
		"objectstore.backend = file\n" +
		"log.level = ERROR\n" +
		"slots.removable = false\n"
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		return "", fmt.Errorf("failed to write SoftHSM configuration: %w", err)
	}
	return conf, nil
}

// Token describes an initialised test token.
type Token struct {
	Kind   Kind   // which implementation
	Module string // path of the PKCS#11 module
	Label  string
	PIN    string // user PIN: a test fixture
	SOPIN  string
	// Prefix must start the label of every object a test makes on the
	// token: "" on SoftHSM, whose tokens are the binary's own; unique to
	// the binary on openCryptoki, whose one soft token every test binary
	// of the machine shares.
	Prefix string
}

// NewToken initialises a fresh token with a unique label ("test-" and 16
// random hex digits) in the process's SoftHSM directory and returns it. It
// fails the test when SoftHSM is not installed, saying how to install it,
// and when [Main] was not used. Safe for parallel tests.
//
// Call it before the code under test initialises the module in this process:
// see the package documentation. It fails the test if that has already
// happened. A token takes some 10–50 ms to create; the tokens live until
// Main removes the directory.
//
// The PINs are passed to softhsm2-util as arguments, so other local users
// can see them while it runs: fine for fixtures, not for real tokens.
func NewToken(t testing.TB) Token {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if confPath == "" {
		t.Fatal("hsmtest: no private SoftHSM configuration: call hsmtest.Main from TestMain: " +
			"func TestMain(m *testing.M) { hsmtest.Main(m) }")
	}
	mod := Module()
	if mod == "" {
		t.Fatal("hsmtest: SoftHSM2 module not found (set SOFTHSM2_MODULE if it is elsewhere): " + installHint)
	}
	if _, err := os.Stat(mod); err != nil {
		t.Fatalf("hsmtest: SoftHSM2 module: %v", err)
	}
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		t.Fatal("hsmtest: softhsm2-util not found: " + installHint)
	}
	tok := Token{Kind: SoftHSM, Module: mod, Label: "test-" + randomHex(8), PIN: rand.Text(), SOPIN: rand.Text()}
	cmd := exec.Command(util, "--init-token", "--free", "--label", tok.Label,
		"--so-pin", tok.SOPIN, "--pin", tok.PIN)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+confPath)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("hsmtest: softhsm2-util --init-token failed: %v\n%s", err, out)
	}
	if err := checkVisible(mod, tok.Label); err != nil {
		t.Fatal(err)
	}
	return tok
}

// shared is the process's [Shared] token, made on first use.
var (
	sharedOnce sync.Once
	shared     Token
)

// Shared returns one token for the whole test binary, made by [NewToken] on
// the first call. Tests that share it keep apart by using their own object
// label prefixes. The first call must come before the module is initialised
// in this process, as for NewToken; the usual way is to call Shared in every
// test before opening the token.
func Shared(t testing.TB) Token {
	t.Helper()
	sharedOnce.Do(func() { shared = NewToken(t) })
	if shared.Label == "" {
		t.Fatal("hsmtest: the shared token could not be made (see the first test that asked for it)")
	}
	return shared
}

// NewTokens returns n tokens made by [NewToken].
func NewTokens(t testing.TB, n int) []Token {
	t.Helper()
	toks := make([]Token, n)
	for i := range toks {
		toks[i] = NewToken(t)
	}
	return toks
}

// MoveTokenDir takes the test binary's SoftHSM token directory away (every
// token [Main] made), as a real fault would, and returns the function that
// brings it back. Cleanup brings it back if the test does not.
func MoveTokenDir(t testing.TB) (restore func()) {
	t.Helper()
	mu.Lock()
	conf := confPath
	mu.Unlock()
	if conf == "" {
		t.Fatal("hsmtest: no private SoftHSM configuration: call hsmtest.Main from TestMain")
	}
	dir := filepath.Join(filepath.Dir(conf), "tokens")
	if err := os.Rename(dir, dir+".away"); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			if err := os.Rename(dir+".away", dir); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Cleanup(restore)
	return restore
}

// Module returns the path of the SoftHSM2 PKCS#11 module: $SOFTHSM2_MODULE
// if set (taken as is), else the first of Debian's paths that exists
// (/usr/lib/softhsm/libsofthsm2.so, then
// /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so), else "".
func Module() string { return findModule("SOFTHSM2_MODULE", modulePaths) }

// findModule returns $env if set, else the first of paths that exists,
// else "".
func findModule(env string, paths []string) string {
	if p := os.Getenv(env); p != "" {
		return p
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// checkVisible reports an error if the module is initialised in this process
// but does not list the token labelled label. It asks through a handle of
// its own that it never initialises: C_GetSlotList answers
// CKR_CRYPTOKI_NOT_INITIALIZED unless someone else has initialised the
// module, and then the new token will be seen when they do. Called with mu
// held.
func checkVisible(mod, label string) error {
	if probe == nil {
		// Loaded once and kept: loading and unloading SoftHSM (and the
		// OpenSSL it links) for every token is slow and asking for trouble.
		if probe = pkcs11.New(mod); probe == nil {
			return fmt.Errorf("hsmtest: failed to load PKCS#11 module %s", mod)
		}
	}
	slots, err := probe.GetSlotList(true)
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED)) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("hsmtest: failed to list slots: %w", err)
	}
	var labels []string
	for _, s := range slots {
		if ti, err := probe.GetTokenInfo(s); err == nil {
			labels = append(labels, strings.TrimSpace(ti.Label))
		}
	}
	if slices.Contains(labels, label) {
		return nil
	}
	return fmt.Errorf("hsmtest: token %q was created after the PKCS#11 module was initialised "+
		"in this process, and SoftHSM only scans its tokens at C_Initialize: create tokens "+
		"before opening the module, or finalise it (close every hsm.Token) first", label)
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
