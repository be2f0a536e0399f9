// Package hsm is keyissuer's view of a PKCS#11 token: it generates one-time
// RSA key pairs inside the token, decrypts with them, and destroys them by
// handle. It knows nothing of records, HTTP or expiry.
//
// The hot path never searches the token (C_FindObjects gets slow with many
// objects on SoftHSM): a [Key] keeps its object handles. Sessions are
// long-lived and owned by the [Token]; a session that dies is replaced, with
// a fresh login and backoff, and while the token is down calls fail fast
// with [ErrUnavailable]. In session storage, a key's objects live and die
// with the session that created it, so the Token reports the keys a dead
// session took with it through [Config.OnLost].
//
// A crash inside C_GenerateKeyPair can leave, on a token that makes objects
// in steps (SoftHSM's file store), a token object with no label, no id and
// no key, which no label search finds. [Token.SweepHalfMade] finds those
// and, only on a token stated to be keyissuer's alone
// ([Config.SweepHalfMade]), destroys them once they cannot be anyone's
// object in the making: halfmade.go argues why that is safe.
//
// github.com/miekg/pkcs11 is used directly rather than crypto11: crypto11's
// session pool keeps handing out dead sessions after a token fault, it
// cannot keep a session open for the lifetime of the session objects made in
// it, and its Delete is not atomic.
package hsm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// Storage says where key objects live.
type Storage string

const (
	// StorageSession keeps keys as session objects: in the token's memory
	// only, gone when the daemon stops. The default.
	StorageSession Storage = "session"
	// StorageToken keeps keys as token objects: they survive restarts, and
	// a network HSM shared by several hosts needs them.
	StorageToken Storage = "token"
)

// Key sizes keyissuer accepts. Nothing below 2048 bits.
var KeySizes = []int{2048, 3072, 4096}

// Config selects and opens a token.
type Config struct {
	Module      string  // path of the PKCS#11 module
	TokenLabel  string  // select the token by label...
	TokenSerial string  // ...or by serial number (exactly one of the two)
	PIN         string  // the user PIN; never logged
	Storage     Storage // session (default) or token
	LabelPrefix string  // CKA_LABEL and CKA_ID prefix of keyissuer's objects ([CheckLabelPrefix])
	KeyBits     int     // RSA modulus size: 2048 (default), 3072 or 4096
	Sessions    int     // sessions kept open (default 8)
	// Paddings the daemon will decrypt with; each is probed at Open to
	// choose between the token's native mechanism and raw RSA.
	Paddings []Padding
	// OnLost is told the IDs of keys whose objects died with a session
	// (session storage). It is called without locks held and must not
	// block for long.
	OnLost func(ids []string)
	Log    *slog.Logger

	// AfterCall is a fault-injection seam for tests: leave it nil. When
	// set, it is called after each PKCS#11 call the Token makes for its
	// keys, sessions and health, with the call (an [Op]), the id of the key
	// it concerns ("" for none) and the call's error, and the Token goes
	// on with the error it returns. A test makes a call fail after the
	// token did its work, which a wrapper around the Token cannot.
	AfterCall func(op Op, keyID string, err error) error

	// SweepHalfMade states that the token (the partition) is keyissuer's
	// alone, so that key objects a crash left half-made, which carry no
	// label and no id, may be destroyed: see [Token.SweepHalfMade]. Off,
	// they are only counted and logged.
	SweepHalfMade bool
	// HalfMadeGrace is how long an object must stay half-made before it
	// is destroyed: longer than any other process on the token may take
	// to make one (default a minute).
	HalfMadeGrace time.Duration
}

func (c *Config) setDefaults() {
	if c.Storage == "" {
		c.Storage = StorageSession
	}
	if c.KeyBits == 0 {
		c.KeyBits = 2048
	}
	if c.Sessions == 0 {
		c.Sessions = 8
	}
	if c.LabelPrefix == "" {
		c.LabelPrefix = "keyissuer:"
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.OnLost == nil {
		c.OnLost = func([]string) {}
	}
	if c.HalfMadeGrace == 0 {
		c.HalfMadeGrace = time.Minute
	}
}

func (c *Config) validate() error {
	switch {
	case c.Module == "":
		return errors.New("module path is empty")
	case (c.TokenLabel == "") == (c.TokenSerial == ""):
		return errors.New("select the token by exactly one of label or serial")
	case c.Storage != StorageSession && c.Storage != StorageToken:
		return fmt.Errorf("unknown storage %q (want session or token)", c.Storage)
	case c.Sessions < 2:
		return fmt.Errorf("sessions = %d, want at least 2", c.Sessions)
	}
	if err := CheckLabelPrefix(c.LabelPrefix); err != nil {
		return err
	}
	if !validKeyBits(c.KeyBits) {
		return fmt.Errorf("key size %d bits not allowed (want 2048, 3072 or 4096)", c.KeyBits)
	}
	for _, p := range c.Paddings {
		if _, err := ParsePadding(string(p)); err != nil {
			return err
		}
	}
	return nil
}

func validKeyBits(n int) bool {
	for _, b := range KeySizes {
		if n == b {
			return true
		}
	}
	return false
}

// Info describes the open token, for logs and status.
type Info struct {
	Label, Serial, Model, Manufacturer string
	Storage                            Storage
	KeyBits                            int
	Methods                            map[Padding]Method // how each padding is done
	Signing                            SignMethod         // how responses are signed; "" if the token cannot
}

// Token is an open, logged-in PKCS#11 token. It is safe for concurrent use.
type Token struct {
	cfg  Config
	mod  *module
	slot atomic.Uint64 // the token's slot; changes only in a reset
	info Info
	// mechs is what the token said of its mechanisms at Open.
	mechs map[uint]mechInfo

	idle chan *session // sessions not in use; len == cfg.Sessions when all idle

	mu         sync.Mutex
	down       bool      // the token failed its health check
	recovering bool      // a call is bringing the token back
	retryAt    time.Time // while down, calls before this fail fast
	backoff    time.Duration
	serial     uint64 // last session serial handed out
	closed     bool
	inFlight   sync.WaitGroup

	rescanMu sync.Mutex // one Rescan at a time (find.go)

	// epoch counts module resets. Object handles do not survive one, and
	// may even name other objects after it, so a token-storage Key's
	// handles are trusted only in the epoch they were found in.
	epoch atomic.Uint64

	faults faultCounts // for metrics (faults.go)

	// orphans are ids under which a failed generation may have left
	// objects that could not be destroyed at once; Check destroys them.
	orphans map[string]struct{} // guarded by mu

	half halfMade // half-made objects and this process's generations (halfmade.go)
}

// session is one PKCS#11 session. At most one goroutine uses it at a time.
type session struct {
	h     pkcs11.SessionHandle
	owner *owner // nil when the session is broken and must be reopened
	// committed is set by the function do runs, just before a call that
	// must not be repeated: see do.
	committed bool
}

// commit tells do that fn is about to make a call that may do work that
// must not happen twice: from here on a failure is not retried.
func (s *session) commit() { s.committed = true }

// owner tracks the session objects made in one session: they die with it.
type owner struct {
	serial uint64
	dead   atomic.Bool
	mu     sync.Mutex
	keys   map[string]struct{}
}

const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// Open loads the module, finds the token, opens cfg.Sessions sessions,
// logs in and probes how each configured padding can be done.
func Open(ctx context.Context, cfg Config) (*Token, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	mod, err := openModule(cfg.Module)
	if err != nil {
		return nil, err
	}
	t := &Token{cfg: cfg, mod: mod, idle: make(chan *session, cfg.Sessions)}
	if err := t.init(ctx); err != nil {
		t.closeSessions()
		mod.release()
		return nil, err
	}
	return t, nil
}

func (t *Token) init(ctx context.Context) error {
	slot, ti, err := t.findSlot()
	if err != nil {
		return err
	}
	t.slot.Store(uint64(slot))
	t.info = Info{
		Label:        strings.TrimSpace(ti.Label),
		Serial:       strings.TrimSpace(ti.SerialNumber),
		Model:        strings.TrimSpace(ti.Model),
		Manufacturer: strings.TrimSpace(ti.ManufacturerID),
		Storage:      t.cfg.Storage,
		KeyBits:      t.cfg.KeyBits,
		Methods:      map[Padding]Method{},
	}
	for range t.cfg.Sessions {
		s := &session{}
		if err := t.open(s); err != nil {
			t.idle <- s
			return err
		}
		t.idle <- s
	}
	if err := t.probeMechanisms(); err != nil {
		return err
	}
	return t.probe(ctx)
}

func (t *Token) findSlot() (uint, pkcs11.TokenInfo, error) {
	t.mod.mu.RLock()
	defer t.mod.mu.RUnlock()
	slots, err := t.mod.ctx.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, fmt.Errorf("failed to list slots: %w", err)
	}
	var labels []string
	for _, slot := range slots {
		ti, err := t.mod.ctx.GetTokenInfo(slot)
		if err != nil {
			continue
		}
		label, serial := strings.TrimSpace(ti.Label), strings.TrimSpace(ti.SerialNumber)
		if (t.cfg.TokenLabel != "" && label == t.cfg.TokenLabel) ||
			(t.cfg.TokenSerial != "" && serial == t.cfg.TokenSerial) {
			return slot, ti, nil
		}
		labels = append(labels, fmt.Sprintf("%q", label))
	}
	want := "label " + fmt.Sprintf("%q", t.cfg.TokenLabel)
	if t.cfg.TokenSerial != "" {
		want = "serial " + fmt.Sprintf("%q", t.cfg.TokenSerial)
	}
	hint := ""
	if strings.Contains(strings.ToLower(t.cfg.Module), "softhsm") {
		conf, ok := os.LookupEnv("SOFTHSM2_CONF")
		if !ok {
			conf = "unset, so the system's /etc/softhsm/softhsm2.conf"
		}
		hint = fmt.Sprintf("; SoftHSM reads its tokens from SOFTHSM2_CONF (%s): for the development token run ./softhsm-setup.sh and export SOFTHSM2_CONF=$PWD/.softhsm/softhsm2.conf", conf)
	}
	return 0, pkcs11.TokenInfo{}, fmt.Errorf("no token with %s in %s (tokens present: %s)%s",
		want, t.cfg.Module, strings.Join(labels, ", "), hint)
}

// open (re)opens s as a fresh, logged-in session with a new owner.
func (t *Token) open(s *session) error {
	h, err := t.mod.ctx.OpenSession(uint(t.slot.Load()), pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err = t.after(OpOpenSession, "", err); err != nil {
		if h != 0 {
			t.mod.ctx.CloseSession(h)
		}
		return fmt.Errorf("failed to open session: %w", err)
	}
	// Login is per application: the first session's login covers the rest.
	if err := t.after(OpLogin, "", t.mod.ctx.Login(h, pkcs11.CKU_USER, t.cfg.PIN)); err != nil &&
		!isRV(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		t.mod.ctx.CloseSession(h)
		if isRV(err, pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE) {
			return fmt.Errorf("failed to log in to token %q: wrong PIN: %w", t.info.Label, err)
		}
		return fmt.Errorf("failed to log in to token %q: %w", t.info.Label, err)
	}
	t.mu.Lock()
	t.serial++
	s.h, s.owner = h, &owner{serial: t.serial, keys: map[string]struct{}{}}
	t.mu.Unlock()
	return nil
}

// retire closes a session found dead. In session storage its objects are
// gone with it (C_CloseSession destroys what survives), so its keys are
// reported lost.
func (t *Token) retire(s *session, cause error) {
	o := s.owner
	if o == nil {
		return
	}
	t.mod.ctx.CloseSession(s.h)
	s.h, s.owner = 0, nil
	o.dead.Store(true)
	o.mu.Lock()
	ids := make([]string, 0, len(o.keys))
	for id := range o.keys {
		ids = append(ids, id)
	}
	o.keys = nil
	o.mu.Unlock()
	t.cfg.Log.Warn("token session retired", "session", o.serial, "cause", cause, "keys_lost", len(ids))
	t.faults.retired.Add(1)
	if len(ids) > 0 {
		t.cfg.OnLost(ids)
	}
}

// do runs fn on an idle session.
//
// Until fn calls s.commit, which it does just before a call that may do
// work that must not happen twice (C_Decrypt, C_GenerateKeyPair), a failure
// is taken to have done nothing: a dead session is replaced and fn tried
// once more, and any other failure makes the token check its health; a
// token that fails it is marked down, and the call, and every call until
// the next recovery attempt, fails fast with ErrUnavailable.
//
// Once fn has committed, nothing is tried again and no health check
// follows: do returns fn's own error, or for a fault (the session or the
// token died, so whether the call did its work is unknown) ErrInterrupted
// wrapping it, and never ErrUnavailable. The caller decides what an
// ambiguous outcome means; the session is replaced for the next call.
func (t *Token) do(ctx context.Context, fn func(*session) error) error {
	if err := t.enter(ctx); err != nil {
		return err
	}
	defer t.inFlight.Done()

	var s *session
	select {
	case s = <-t.idle:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { t.idle <- s }()

	if s.owner == nil {
		if err := t.reconnect(s); err != nil {
			return err
		}
	}
	for try := 0; ; try++ {
		s.committed = false
		err := fn(s)
		switch {
		case classify(err) == faultNone && s.committed:
			return err
		case classify(err) == faultNone:
			return t.vet(err)
		}
		// The session is dead.
		t.retire(s, err)
		if s.committed {
			t.reconnect(s)
			return fmt.Errorf("%w: %w", ErrInterrupted, err)
		}
		// The call did nothing, so it is tried once more on a fresh
		// session: after a token fault every idle session is dead, and
		// one retry spares the caller finding them all.
		if try == 1 {
			t.reconnect(s)
			return fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
		if t.reconnect(s) != nil {
			return fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
	}
}

// vet tells an answer of the token from a symptom of its failure. SoftHSM,
// for one, reports a missing token directory as CKR_GENERAL_ERROR or an
// invalid handle, which are also what a bad ciphertext or a gone object
// look like; so on any token error, the token's health decides.
func (t *Token) vet(err error) error {
	if err == nil || errors.Is(err, ErrDecrypt) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	if herr := t.healthy(); herr != nil {
		t.markDown(herr)
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

// healthy asks the token for its info: cheap, no session needed, and it
// fails when the token is gone (a device error, a network HSM out of
// reach, SoftHSM's token directory missing). A failure is asked again
// twice, a moment apart, before it counts: SoftHSM fails C_GetTokenInfo
// now and then while another process logs in to the token (pkcs11-tool,
// another daemon on the same token), which is no outage.
func (t *Token) healthy() error {
	var err error
	for i := range healthTries {
		if i > 0 {
			time.Sleep(healthRetry)
		}
		t.mod.mu.RLock()
		_, err = t.mod.ctx.GetTokenInfo(uint(t.slot.Load()))
		t.mod.mu.RUnlock()
		if err = t.after(OpGetTokenInfo, "", err); err == nil {
			return nil
		}
	}
	return err
}

// A token is unhealthy when healthTries checks, healthRetry apart, fail.
const (
	healthTries = 3
	healthRetry = 25 * time.Millisecond
)

// enter admits a call: at once while the token is up; while it is down,
// only the one call that tries to recover it, once the backoff has passed.
func (t *Token) enter(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrClosed
	}
	if t.down {
		if t.recovering || time.Now().Before(t.retryAt) {
			return fmt.Errorf("%w: token down, next attempt in %s", ErrUnavailable, time.Until(t.retryAt).Round(time.Millisecond))
		}
		t.recovering = true
		t.mu.Unlock()
		err := t.recover(ctx)
		t.mu.Lock()
		t.recovering = false
		if err != nil {
			return err
		}
	}
	t.inFlight.Add(1)
	return nil
}

// recover brings a down token back once it answers again. A module whose
// token went away may not see it return until it is re-initialised
// (SoftHSM keeps failing), so an unhealthy token gets a reset, which in
// session storage loses every key (reported through OnLost). In token
// storage the module is reset even when the token answers, because its
// view of the objects may be stale.
func (t *Token) recover(ctx context.Context) error {
	err := t.healthy()
	if err != nil || t.cfg.Storage == StorageToken {
		if err = t.reset(ctx); err == nil {
			err = t.healthy()
		}
	}
	if err != nil {
		t.markDown(err)
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	t.mu.Lock()
	t.down, t.backoff = false, 0
	t.mu.Unlock()
	t.faults.recovered.Add(1)
	t.cfg.Log.Info("token recovered", "label", t.info.Label)
	return nil
}

// markDown records a failed health check and schedules the next attempt.
func (t *Token) markDown(cause error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.backoff = min(max(2*t.backoff, minBackoff), maxBackoff)
	if !t.down {
		t.cfg.Log.Error("token down", "label", t.info.Label, "err", cause)
		t.faults.down.Add(1)
	} else {
		t.cfg.Log.Debug("token still down", "label", t.info.Label, "retry_in", t.backoff)
	}
	t.down, t.retryAt = true, time.Now().Add(t.backoff)
}

// reconnect reopens a broken session.
func (t *Token) reconnect(s *session) error {
	if err := t.open(s); err != nil {
		t.markDown(err)
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return nil
}

// reset takes every session, closes them, re-initialises the module (unless
// another Token of this process shares it), finds the token again and
// reopens the sessions. Handles found before are void after it.
func (t *Token) reset(ctx context.Context) error {
	held := make([]*session, 0, t.cfg.Sessions)
	defer func() {
		for _, s := range held {
			t.idle <- s
		}
	}()
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	for len(held) < t.cfg.Sessions {
		select {
		case s := <-t.idle:
			held = append(held, s)
		case <-timer.C:
			return errors.New("sessions still busy after 10s")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for _, s := range held {
		t.retire(s, errors.New("token reset"))
	}
	if err := t.mod.reinit(); err != nil {
		return err
	}
	slot, _, err := t.findSlot()
	if err != nil {
		return err
	}
	t.slot.Store(uint64(slot))
	t.epoch.Add(1)
	for _, s := range held {
		if err := t.open(s); err != nil {
			return err
		}
	}
	return nil
}

// Check asks the token for its health, then looks at every session once
// (C_GetSessionInfo), retires those that are dead or logged out, and
// reopens them; while the token is down, it tries to recover it. Last, it
// destroys what generations cut short by a fault may have left in the token
// (see Generate). Run it periodically, so that an outage, dead sessions and
// their lost keys are found before a request trips on them.
func (t *Token) Check(ctx context.Context) error {
	if t.Ready() {
		if err := t.healthy(); err != nil {
			t.markDown(err)
			return fmt.Errorf("%w: %w", ErrUnavailable, err)
		}
	}
	var errs []error
	for range t.cfg.Sessions {
		err := t.do(ctx, func(s *session) error {
			si, err := t.mod.ctx.GetSessionInfo(s.h)
			if err = t.after(OpGetSessionInfo, "", err); err != nil {
				return err
			}
			if si.State != pkcs11.CKS_RW_USER_FUNCTIONS {
				// Logged out: private session objects are gone.
				return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
			}
			return nil
		})
		if err != nil {
			errs = append(errs, err)
		}
		if errors.Is(err, ErrClosed) {
			break
		}
	}
	if err := t.sweepOrphans(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := t.sweepHalfMadeDue(ctx); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Ready reports whether the token is believed to be up. A false answer means
// calls fail fast with ErrUnavailable until the next reconnect attempt.
func (t *Token) Ready() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return !t.down && !t.closed
}

// Info describes the token. The caller owns the copy.
func (t *Token) Info() Info {
	i := t.info
	i.Methods = maps.Clone(t.info.Methods)
	return i
}

// Close waits for calls in flight, closes every session (destroying the
// session objects left in them) and releases the module.
func (t *Token) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	t.mu.Unlock()
	t.inFlight.Wait()
	t.closeSessions()
	t.mod.release()
	return nil
}

func (t *Token) closeSessions() {
	for {
		select {
		case s := <-t.idle:
			if s.owner != nil {
				t.mod.ctx.CloseSession(s.h)
				s.owner.dead.Store(true)
				s.h, s.owner = 0, nil
			}
		default:
			return
		}
	}
}

// module is a loaded, initialised PKCS#11 library, shared by every Token of
// the process: C_Initialize may be called only once per process.
type module struct {
	path string
	ctx  *pkcs11.Ctx
	refs int
	ours bool // we called C_Initialize, so we may call C_Finalize

	// mu is held for reading by every call made without a session
	// (C_GetTokenInfo, C_GetSlotList...) and for writing by C_Finalize and
	// the C_Initialize after it. PKCS#11 leaves C_Finalize undefined while
	// other threads make calls, and SoftHSM frees its slots and the
	// library's instance under them. Calls in a session need no lock: a
	// reset holds every session of the one Token that uses the module.
	mu sync.RWMutex
}

var (
	modulesMu sync.Mutex
	modules   = map[string]*module{}
	// loaded keeps every library ever loaded, by path, for the life of
	// the process: finalised when its last Token closes, never unloaded.
	// openCryptoki 3.8 crashes in C_Initialize when loaded a second time
	// into a process where SoftHSM has run.
	loaded = map[string]*pkcs11.Ctx{}
)

func openModule(path string) (*module, error) {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	if m, ok := modules[path]; ok {
		m.refs++
		return m, nil
	}
	ctx := loaded[path]
	if ctx == nil {
		if ctx = pkcs11.New(path); ctx == nil {
			return nil, fmt.Errorf("failed to load PKCS#11 module %s", path)
		}
		loaded[path] = ctx
	}
	err := ctx.Initialize()
	if err != nil && !isRV(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return nil, fmt.Errorf("failed to initialise PKCS#11 module %s: %w", path, err)
	}
	m := &module{path: path, ctx: ctx, refs: 1, ours: err == nil}
	modules[path] = m
	return m, nil
}

// reinit re-initialises the module so that it reads its tokens afresh. A
// module shared with another Token of this process is left alone: that
// Token's sessions would die under it.
func (m *module) reinit() error {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	if m.refs > 1 || !m.ours {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ctx.Finalize()
	if err := m.ctx.Initialize(); err != nil {
		return fmt.Errorf("failed to re-initialise PKCS#11 module %s: %w", m.path, err)
	}
	return nil
}

func (m *module) release() {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules, m.path)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ours {
		m.ctx.Finalize()
	}
}
