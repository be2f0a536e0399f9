package hsmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// openCryptoki's soft token ("IBM SoftTok", slot 3), as the second PKCS#11
// implementation the integration tests run on.
//
// Unlike SoftHSM, it cannot be given a private directory: its tokens live in
// /var/lib/opencryptoki/swtok, behind the slot daemon pkcsslotd, and there is
// one soft token per machine. So the harness sets it up once per machine and
// every test binary shares it:
//
//   - /etc/opencryptoki/opencryptoki.conf lists only slot 3 (the other
//     slots' libraries are for hardware this machine does not have), the
//     original kept beside it as opencryptoki.conf.keyissuer-orig;
//   - pkcsslotd runs (it is started if it is not; it keeps running);
//   - the token is initialised with label [OpenCryptokiLabel] and the
//     fixture PINs below: `pkcsconf -I` (with the default SO PIN 87654321),
//     `-P` to change the SO PIN, `-u` to set the user PIN and `-p` to change
//     it, so that the token leaves its "PIN to be changed" state.
//
// Each step is done only if needed, under a lock file, since several test
// binaries run at once. A soft token initialised under another label is
// never re-initialised (that would destroy its objects): the tests skip, or
// fail under CI=true. Tests keep apart with [Token.Prefix] in every label
// they make, and must destroy their token objects: they outlive the test
// binary. [Main] destroys what is left under the binary's prefix.
//
// No test kills a process that uses the soft token: openCryptoki 3.8
// rewrites the token's NVTOK.DAT in place, and a SIGKILL at the wrong
// moment leaves it empty, which de-initialises the token for every process
// on the machine. Crash-harness runs on it did that here; the harness runs
// on SoftHSM only.

// OpenCryptokiLabel is the label of the soft token the harness initialises.
const OpenCryptokiLabel = "keyissuer-test"

// The soft token's PINs: test fixtures, not secrets. openCryptoki 3.8
// takes PINs of 4 to 8 characters.
const (
	ockSOPIN      = "ki-so-88"
	ockPIN        = "ki-user8"
	ockInterimPIN = "ki-tmp-1" // set by -u, changed by -p
	ockDefaultSO  = "87654321" // what pkcsconf -I expects
	ockSlot       = 3
)

var (
	ockModulePaths = []string{
		"/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so",
		"/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so",
		"/usr/lib/pkcs11/libopencryptoki.so",
	}
	ockConf     = "/etc/opencryptoki/opencryptoki.conf"
	ockConfText = "version opencryptoki-3.1\n\n# Written by keyissuer's test harness (hsm/hsmtest): only the soft token.\nslot 3\n{\nstdll = libpkcs11_sw.so\n}\n"
	ockPIDFile  = "/var/run/pkcsslotd.pid"
	ockNVToken  = "/var/lib/opencryptoki/swtok/NVTOK.DAT"
	ockLock     = "/var/lock/keyissuer-hsmtest-opencryptoki.lock"
)

const ockInstallHint = "run `apt-get install opencryptoki` (as root)"

// OpenCryptokiModule returns the path of openCryptoki's PKCS#11 module:
// $OPENCRYPTOKI_MODULE if set, else the first of Debian's paths that
// exists, else "".
func OpenCryptokiModule() string { return findModule("OPENCRYPTOKI_MODULE", ockModulePaths) }

var (
	ockOnce   sync.Once
	ockToken  Token
	ockErr    error // set up failed: the test fails
	ockSkip   string
	ockUsed   bool // a test asked for the token: Main sweeps its prefix
	ockPrefix = "ock" + randomHex(4) + "-"
	// ockPin holds the module loaded for the life of the process, never
	// initialised by it: openCryptoki 3.8 crashes in C_Initialize when
	// loaded again into a process where SoftHSM has run, which unloading
	// it between two tests would do.
	ockPin *pkcs11.Ctx
)

// OpenCryptokiToken returns the machine's openCryptoki soft token, set up on
// first use (see the file's comment). Without openCryptoki, or without the
// rights to set it up, the test skips, and fails under CI=true. Labels of
// every object a test makes on it must start with the token's Prefix.
func OpenCryptokiToken(t testing.TB) Token {
	t.Helper()
	ockOnce.Do(func() {
		ockToken, ockSkip, ockErr = setupOpenCryptoki()
	})
	switch {
	case ockErr != nil:
		t.Fatalf("hsmtest: openCryptoki: %v", ockErr)
	case ockSkip != "" && os.Getenv("CI") == "true":
		t.Fatalf("hsmtest: openCryptoki: %s (CI=true: not skipping)", ockSkip)
	case ockSkip != "":
		t.Skipf("hsmtest: openCryptoki: %s", ockSkip)
	}
	mu.Lock()
	ockUsed = true
	mu.Unlock()
	return ockToken
}

// SetUpOpenCryptoki is [OpenCryptokiToken] for programs that are not
// tests (the benchmark): it returns an error where a test would skip.
func SetUpOpenCryptoki() (Token, error) {
	ockOnce.Do(func() {
		ockToken, ockSkip, ockErr = setupOpenCryptoki()
	})
	switch {
	case ockErr != nil:
		return Token{}, ockErr
	case ockSkip != "":
		return Token{}, errors.New(ockSkip)
	}
	return ockToken, nil
}

// setupOpenCryptoki makes the soft token ready. skip says why it cannot
// be, when that is a matter of what is installed or allowed.
func setupOpenCryptoki() (tok Token, skip string, err error) {
	mod := OpenCryptokiModule()
	if mod == "" {
		return tok, "module libopencryptoki.so not found (set OPENCRYPTOKI_MODULE if it is elsewhere): " + ockInstallHint, nil
	}
	conf, err := exec.LookPath("pkcsconf")
	if err != nil {
		return tok, "pkcsconf not found: " + ockInstallHint, nil
	}
	slotd, err := exec.LookPath("pkcsslotd")
	if err != nil {
		return tok, "pkcsslotd not found: " + ockInstallHint, nil
	}
	unlock, err := lockFile(ockLock)
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			return tok, fmt.Sprintf("cannot take the set-up lock (%v): run the tests as root, or set the soft token up once as root", err), nil
		}
		return tok, "", err
	}
	defer unlock()

	if !slotdRunning() {
		if os.Geteuid() != 0 {
			return tok, "pkcsslotd is not running and only root can start it", nil
		}
		if err := writeOCKConf(); err != nil {
			return tok, "", err
		}
		if out, err := exec.Command(slotd).CombinedOutput(); err != nil {
			return tok, "", fmt.Errorf("failed to start pkcsslotd: %v\n%s", err, out)
		}
		if err := waitFor(slotdRunning); err != nil {
			return tok, "", fmt.Errorf("pkcsslotd did not start: %w", err)
		}
	}
	st, err := ockState(conf)
	if err != nil {
		if fi, serr := os.Stat(ockNVToken); serr == nil && fi.Size() == 0 {
			return tok, "", fmt.Errorf("%w; %s is empty: a process was killed while openCryptoki rewrote it, "+
				"and the token is gone. To start afresh (this destroys the soft token's objects): stop pkcsslotd, "+
				"remove NVTOK.DAT, MK_SO, MK_USER and TOK_OBJ/* in /var/lib/opencryptoki/swtok, "+
				"and /dev/shm/var.lib.opencryptoki.swtok", err, ockNVToken)
		}
		return tok, "", err
	}
	if st.flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
		cmd := exec.Command(conf, "-I", "-c", strconv.Itoa(ockSlot), "-S", ockDefaultSO)
		cmd.Stdin = strings.NewReader(OpenCryptokiLabel + "\n") // pkcsconf asks for the label
		if out, err := cmd.CombinedOutput(); err != nil {
			return tok, "", fmt.Errorf("pkcsconf -I failed: %v\n%s", err, out)
		}
		if st, err = ockState(conf); err != nil {
			return tok, "", err
		}
	}
	if st.label != OpenCryptokiLabel {
		return tok, fmt.Sprintf("the soft token (slot %d) is initialised as %q, not by the tests as %q; "+
			"they will not re-initialise it, which would destroy its objects", ockSlot, st.label, OpenCryptokiLabel), nil
	}
	slot := strconv.Itoa(ockSlot)
	steps := []struct {
		needed bool
		args   []string
	}{
		{st.flags&pkcs11.CKF_SO_PIN_TO_BE_CHANGED != 0, []string{"-P", "-c", slot, "-S", ockDefaultSO, "-n", ockSOPIN}},
		{st.flags&pkcs11.CKF_USER_PIN_INITIALIZED == 0, []string{"-u", "-c", slot, "-S", ockSOPIN, "-n", ockInterimPIN}},
		{st.flags&(pkcs11.CKF_USER_PIN_INITIALIZED|pkcs11.CKF_USER_PIN_TO_BE_CHANGED) != pkcs11.CKF_USER_PIN_INITIALIZED,
			[]string{"-p", "-c", slot, "-U", ockInterimPIN, "-n", ockPIN}},
	}
	for _, s := range steps {
		if !s.needed {
			continue
		}
		if out, err := exec.Command(conf, s.args...).CombinedOutput(); err != nil {
			return tok, "", fmt.Errorf("pkcsconf %s failed: %v\n%s", s.args[0], err, out)
		}
	}
	if st, err = ockState(conf); err != nil {
		return tok, "", err
	}
	const ready = pkcs11.CKF_TOKEN_INITIALIZED | pkcs11.CKF_USER_PIN_INITIALIZED
	if st.flags&ready != ready || st.flags&(pkcs11.CKF_USER_PIN_TO_BE_CHANGED|pkcs11.CKF_SO_PIN_TO_BE_CHANGED) != 0 {
		return tok, "", fmt.Errorf("the soft token is not ready after set-up (flags %#x)", st.flags)
	}
	if ockPin = pkcs11.New(mod); ockPin == nil {
		return tok, "", fmt.Errorf("failed to load %s", mod)
	}
	return Token{Kind: OpenCryptoki, Module: mod, Label: OpenCryptokiLabel, PIN: ockPIN, SOPIN: ockSOPIN, Prefix: ockPrefix}, "", nil
}

// lockFile takes an exclusive flock on path, waiting for it.
func lockFile(path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil // closing releases the lock
}

// slotdRunning reports whether the pid in pkcsslotd's pid file is a live
// pkcsslotd.
func slotdRunning() bool {
	b, err := os.ReadFile(ockPIDFile)
	if err != nil {
		return false
	}
	// /proc/PID/stat: "PID (comm) state ...". A zombie is not running.
	stat, err := os.ReadFile(filepath.Join("/proc", strings.TrimSpace(string(b)), "stat"))
	if err != nil {
		return false
	}
	_, rest, ok := strings.Cut(string(stat), " (pkcsslotd) ")
	return ok && !strings.HasPrefix(rest, "Z")
}

// waitFor polls ok for up to 10 seconds: pkcsslotd forks and returns
// before its child writes the pid file.
func waitFor(ok func() bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for !ok() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// writeOCKConf makes opencryptoki.conf list only the soft token, keeping
// the original once.
func writeOCKConf() error {
	old, err := os.ReadFile(ockConf)
	if err == nil && string(old) == ockConfText {
		return nil
	}
	if err == nil {
		if _, serr := os.Stat(ockConf + ".keyissuer-orig"); errors.Is(serr, os.ErrNotExist) {
			if err := os.WriteFile(ockConf+".keyissuer-orig", old, 0o644); err != nil {
				return err
			}
		}
	}
	return os.WriteFile(ockConf, []byte(ockConfText), 0o644)
}

type ockTokenState struct {
	label string
	flags uint
}

var (
	ockLabelRe = regexp.MustCompile(`(?m)^\s*Label:\s*(.*?)\s*$`)
	ockFlagsRe = regexp.MustCompile(`(?m)^\s*Flags:\s*0x([0-9A-Fa-f]+)`)
)

// ockState reads the soft token's label and flags with pkcsconf -t, in
// another process: this one must not initialise the module before the
// token is ready.
func ockState(conf string) (ockTokenState, error) {
	out, err := exec.Command(conf, "-t", "-c", strconv.Itoa(ockSlot)).CombinedOutput()
	if err != nil {
		return ockTokenState{}, fmt.Errorf("pkcsconf -t failed: %v\n%s", err, out)
	}
	l, f := ockLabelRe.FindSubmatch(out), ockFlagsRe.FindSubmatch(out)
	if l == nil || f == nil {
		return ockTokenState{}, fmt.Errorf("pkcsconf -t: no label or flags in\n%s", out)
	}
	flags, err := strconv.ParseUint(string(f[1]), 16, 64)
	if err != nil {
		return ockTokenState{}, fmt.Errorf("pkcsconf -t: flags: %w", err)
	}
	return ockTokenState{label: string(l[1]), flags: uint(flags)}, nil
}

// sweepOpenCryptoki destroys the objects left on the soft token under this
// binary's prefix and says how many there were: a test that left token
// objects leaked them, and nothing else would ever remove them.
func sweepOpenCryptoki() (int, error) { return destroyUnder(ockPin, ockToken, ockToken.Prefix) }

// DestroyObjects destroys every token object on tok whose label starts
// with prefix, and returns how many there were. prefix must start with
// tok.Prefix. Call it when no Token of the code under test is open, for
// example from t.Cleanup after the Token's own cleanup: it initialises the
// module itself when nobody has.
func DestroyObjects(t testing.TB, tok Token, prefix string) int {
	t.Helper()
	if !strings.HasPrefix(prefix, tok.Prefix) || prefix == "" {
		t.Fatalf("hsmtest: DestroyObjects(%q): the prefix must start with the token's %q", prefix, tok.Prefix)
	}
	p := ockPin
	if tok.Kind != OpenCryptoki {
		if p = pkcs11.New(tok.Module); p == nil {
			t.Fatalf("hsmtest: failed to load %s", tok.Module)
		}
		defer p.Destroy()
	}
	n, err := destroyUnder(p, tok, prefix)
	if err != nil {
		t.Fatalf("hsmtest: failed to destroy objects under %q: %v", prefix, err)
	}
	return n
}

// destroyUnder destroys tok's token objects whose label starts with prefix.
func destroyUnder(p *pkcs11.Ctx, tok Token, prefix string) (int, error) {
	if err := p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return 0, err
	} else if err == nil {
		defer p.Finalize()
	}
	slot, err := slotLabelled(p, tok.Label)
	if err != nil {
		return 0, err
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return 0, err
	}
	defer p.CloseSession(s)
	if err := p.Login(s, pkcs11.CKU_USER, tok.PIN); err != nil &&
		!errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		return 0, err
	}
	if err := p.FindObjectsInit(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}); err != nil {
		return 0, err
	}
	var hs []pkcs11.ObjectHandle
	for {
		more, _, err := p.FindObjects(s, 256)
		if err != nil || len(more) == 0 {
			break
		}
		hs = append(hs, more...)
	}
	p.FindObjectsFinal(s)
	n := 0
	for _, h := range hs {
		attrs, err := p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
		if err != nil || !strings.HasPrefix(string(attrs[0].Value), prefix) {
			continue
		}
		if err := p.DestroyObject(s, h); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}
