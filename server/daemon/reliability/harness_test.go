package reliability

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
	"github.com/keyissuer/keyissuer/server/admin"
	"github.com/keyissuer/keyissuer/server/apisig"
	"github.com/keyissuer/keyissuer/server/daemon/internal/daemontest"
)

// The parent's side: a fixture per daemon (config, data, label prefix),
// the child processes, their clients, and what the tests read of the token
// and the store while no daemon runs.

// hangLimit bounds every request and every wait: it catches hangs, and is
// never what a test measures.
const hangLimit = 60 * time.Second

// fixtureConfig is what a test sets of its daemon's configuration.
type fixtureConfig struct {
	storage    string // session or token
	poolSize   int
	generators int
	ttl        string
	reap       string // keys.reap_interval
	applyWait  string
	api        string // more [api] keys
	extra      string // more TOML, appended
	// dedicated sets token.dedicated with a 1ms grace: for fixtures whose
	// daemons run one at a time on the token. A kill's half-made objects
	// (no label nor id) are then not leaks at once: the next start must
	// destroy them (crashRun.checkVanished).
	dedicated bool
	// halfMadeGrace, with dedicated, is token.half_made_grace ("1ms" if
	// empty): instances sharing a token need one longer than a generation.
	halfMadeGrace string
	// signed registers a client and refuses unsigned applies; the
	// fixture's procs sign as it.
	signed bool
	// prefix, if set, is the label prefix (cluster instances share one);
	// store is more [store] keys (the postgres backend).
	prefix string
	store  string
}

// clientID is the Client-Id of a signed fixture's client.
const clientID = "reliability"

// newClient returns a fresh key for clientID and the [[clients]] TOML that
// registers it.
func newClient(t testing.TB) (*rsa.PrivateKey, string) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return key, fmt.Sprintf("\n[[clients]]\nid = %q\n[clients.public_keys]\n1 = %q\n", clientID, base64.StdEncoding.EncodeToString(der))
}

// fixture is one daemon's configuration, files and token label prefix, and
// everything its children wrote, for the secret scans.
type fixture struct {
	t       *testing.T
	soft    hsmtest.Token
	dir     string
	cfgPath string
	prefix  string
	dbPath  string
	audit   string
	ledger  string

	clientKey *rsa.PrivateKey // signed fixtures: the client's key

	storage  string                  // session or token
	baseline []hsmtest.Object        // the token's objects before the fixture's daemons
	foreign  map[hsmtest.Object]bool // objects reported as not the daemon's keys
	// dedicated: see fixtureConfig; halfMadeLeft is how many half-made
	// objects the last tokenObjects found after a kill.
	dedicated    bool
	halfMadeLeft int

	mu      sync.Mutex
	procs   []*proc
	secrets []string                 // passwords the test sent; none may appear anywhere
	sealed  map[string]bool          // every plaintext sealed to a key: each password with its salt, in each layout
	logs    []*daemontest.SyncBuffer // logs of in-process daemons, for the secret scans
	// What the clients saw of decrypts, for the ledger's check: the
	// successes, and the keys whose decrypt may have reached the token
	// without a success seen (the answer was lost, or the daemon refused
	// the plaintext after the token decrypted it: a wrong salt).
	clientOK      map[string]int
	tokenMay      map[string]bool
	ledgerSummary string // what the last checkLedger found
}

// owners maps each password a fixture made to the fixture, so that seal
// finds where to note the plaintexts it makes.
var owners sync.Map // password -> *fixture

func newFixture(t *testing.T, fc fixtureConfig) *fixture {
	t.Helper()
	soft := hsmtest.Shared(t)
	// Short: a Unix socket path is limited to 108 bytes.
	dir, err := os.MkdirTemp("", "rel")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fixture{
		t:        t,
		soft:     soft,
		storage:  fc.storage,
		baseline: hsmtest.Objects(t, soft),
		foreign:  map[hsmtest.Object]bool{},
		clientOK: map[string]int{},
		tokenMay: map[string]bool{},
		sealed:   map[string]bool{},
		dir:      dir,
		cfgPath:  filepath.Join(dir, "config.toml"),
		prefix:   cmp.Or(fc.prefix, "rel-"+filepath.Base(dir)+":"),
		dbPath:   filepath.Join(dir, "data", "keyissuer.db"),
		audit:    filepath.Join(dir, "data", "audit.jsonl"),
		ledger:   filepath.Join(dir, "ledger"),
	}
	f.dedicated = fc.dedicated
	tokenExtra := ""
	if fc.dedicated {
		tokenExtra = fmt.Sprintf("dedicated = true\nhalf_made_grace = %q\n", cmp.Or(fc.halfMadeGrace, "1ms"))
	}
	if err := os.WriteFile(filepath.Join(dir, "pin"), []byte(soft.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	unsigned := "true"
	if fc.signed {
		unsigned = "false"
		var client string
		f.clientKey, client = newClient(t)
		fc.extra += client
	}
	cfg := fmt.Sprintf(`
[token]
module = %q
label = %q
pin_file = "pin"
storage = %q
label_prefix = %q
sessions = %d
%s[keys]
ttl = %q
reap_interval = %q
[pool]
size = %d
generators = %d
apply_wait = %q
[store]
path = "data/keyissuer.db"
%s
[api]
listen = "127.0.0.1:0"
allow_unsigned = %s
%s
[admin]
listen = "127.0.0.1:0"
[audit]
path = "data/audit.jsonl"
[decrypt]
socket = "run/decrypt.sock"
[log]
level = "debug"
format = "json"
%s`, soft.Module, soft.Label, fc.storage, f.prefix, fc.generators+3, tokenExtra,
		fc.ttl, fc.reap, fc.poolSize, fc.generators, fc.applyWait, fc.store, unsigned, fc.api, fc.extra)
	if err := os.WriteFile(f.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.clearToken) // runs last, once every daemon is dead
	t.Cleanup(f.checkObjects)
	t.Cleanup(f.checkLedgerAtEnd)
	t.Cleanup(f.checkSecrets)
	t.Cleanup(f.dumpOnFailure)
	return f
}

// clearToken destroys what the fixture's daemons left in the binary's
// shared token (issued keys, in token storage), so that the tests after it
// list a token as small as it was.
func (f *fixture) clearToken() {
	ctx := context.Background()
	tok, err := hsm.Open(ctx, hsm.Config{
		Module: f.soft.Module, TokenLabel: f.soft.Label, PIN: f.soft.PIN,
		Storage: hsm.StorageToken, LabelPrefix: f.prefix, Sessions: 2,
	})
	if err != nil {
		f.t.Errorf("opening the token to clear it: %v", err)
		return
	}
	defer tok.Close()
	objs, err := tok.List(ctx)
	if err != nil {
		f.t.Errorf("listing the token to clear it: %v", err)
		return
	}
	for _, o := range objs {
		if err := tok.DestroyObject(ctx, o); err != nil {
			f.t.Errorf("clearing the token: %v", err)
		}
	}
}

// dumpOnFailure logs the warnings and errors of the fixture's daemons when
// the test failed. A daemon that printed something other than log lines (a
// crash's trace: every goroutine, see start) has its whole stderr kept in a
// file that outlives the test, whose path is logged.
func (f *fixture) dumpOnFailure() {
	if !f.t.Failed() {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, p := range f.procs {
		stderr := p.stderr.String()
		if strings.Contains(stderr, "\ngoroutine ") {
			if path, err := keepLog(stderr); err != nil {
				f.t.Logf("daemon %d: keeping its stderr: %v", i+1, err)
			} else {
				f.t.Logf("daemon %d: its whole stderr, crash trace included, is kept in %s", i+1, path)
			}
		}
		n := 0
		for _, line := range strings.Split(stderr, "\n") {
			// Warnings, errors, and what is not a log line: a panic's trace.
			if strings.Contains(line, `"level":"WARN"`) || strings.Contains(line, `"level":"ERROR"`) ||
				line != "" && !strings.HasPrefix(line, "{") {
				if n++; n <= 80 {
					f.t.Logf("daemon %d: %s", i+1, line)
				}
			}
		}
	}
}

// keepLog writes a daemon's stderr to a new file in the temporary directory
// and returns its path.
func keepLog(stderr string) (string, error) {
	f, err := os.CreateTemp("", "keyissuerd-stderr-*.log")
	if err != nil {
		return "", err
	}
	if _, err := f.WriteString(stderr); err != nil {
		f.Close()
		return "", err
	}
	return f.Name(), f.Close()
}

// password returns a fresh password, remembered as a secret that must
// never appear in a log, the audit trail or the store.
func (f *fixture) password() string {
	pw := "pw-" + rand.Text()[:16]
	f.mu.Lock()
	f.secrets = append(f.secrets, pw)
	f.mu.Unlock()
	owners.Store(pw, f)
	return pw
}

// encodings are the forms a secret is searched in: as is, and as a log line
// or a metric would carry bytes. The unpadded base64 forms are prefixes of
// the padded ones.
var encodings = []struct {
	name string
	enc  func([]byte) string
}{
	{"", func(b []byte) string { return string(b) }},
	{" in base64", base64.RawStdEncoding.EncodeToString},
	{" in base64url", base64.RawURLEncoding.EncodeToString},
	{" in hex", hex.EncodeToString},
	{" in HEX", func(b []byte) string { return strings.ToUpper(hex.EncodeToString(b)) }},
}

// secretsToScan are the PIN and every plaintext the test produced: each
// password alone, and each password sealed to a key with that key's salt
// in every layout, each in every encoding.
func (f *fixture) secretsToScan() map[string]string {
	plain := map[string][]byte{"the PIN": []byte(f.soft.PIN)}
	for _, pw := range f.secrets {
		plain["password "+pw] = []byte(pw)
	}
	for pt := range f.sealed {
		plain[fmt.Sprintf("plaintext %q", pt)] = []byte(pt)
	}
	secrets := map[string]string{}
	for name, pt := range plain {
		for _, e := range encodings {
			secrets[name+e.name] = e.enc(pt)
		}
	}
	return secrets
}

// findSecrets returns the names of the secrets that occur in data, in one
// pass over it: each secret is looked up by its first scanKey bytes.
func findSecrets(data []byte, secrets map[string]string) []string {
	const scanKey = 16
	byPrefix := map[string][]string{}
	for name, s := range secrets {
		if len(s) < scanKey {
			panic(fmt.Sprintf("secret %s shorter than %d bytes", name, scanKey))
		}
		byPrefix[s[:scanKey]] = append(byPrefix[s[:scanKey]], name)
	}
	var found []string
	for i := 0; i+scanKey <= len(data); i++ {
		names, ok := byPrefix[string(data[i:i+scanKey])]
		if !ok {
			continue
		}
		for _, name := range names {
			if bytes.HasPrefix(data[i:], []byte(secrets[name])) && !slices.Contains(found, name) {
				found = append(found, name)
			}
		}
	}
	return found
}

// checkSecrets scans everything the fixture's daemons wrote: logs (of
// killed daemons too), what their admin listeners served (scraped before
// every kill and stop), the audit trail, the store and the ledger. Salts
// are in the store by design; no secret of secretsToScan may be anywhere.
func (f *fixture) checkSecrets() {
	t := f.t
	f.mu.Lock()
	defer f.mu.Unlock()
	type place struct {
		name string
		data []byte
	}
	var places []place
	for i, p := range f.procs {
		places = append(places, place{fmt.Sprintf("daemon %d's log", i+1), []byte(p.stderr.String())})
		if m := p.scrape.String(); m != "" {
			places = append(places, place{fmt.Sprintf("daemon %d's metrics and status", i+1), []byte(m)})
		}
	}
	for i, l := range f.logs {
		places = append(places, place{fmt.Sprintf("in-process daemon %d's log", i+1), []byte(l.String())})
	}
	for _, name := range []string{f.audit, f.dbPath, f.ledger} {
		if b, err := os.ReadFile(name); err == nil {
			places = append(places, place{filepath.Base(name), b})
		}
	}
	secrets := f.secretsToScan()
	found, size := 0, 0
	for _, p := range places {
		size += len(p.data)
		for _, name := range findSecrets(p.data, secrets) {
			t.Errorf("SECRET LEAKED: %s appears in %s", name, p.name)
			found++
		}
	}
	t.Logf("secret scan: %d secrets (%d passwords, %d sealed plaintexts, the PIN; %d encodings each) in %d places (%d bytes): %d found",
		len(secrets), len(f.secrets), len(f.sealed), len(encodings), len(places), size, found)
}

// proc is one run of the daemon.
type proc struct {
	t      testing.TB
	f      *fixture // where decrypt notes what the clients saw; nil: nowhere
	cmd    *exec.Cmd
	stderr *daemontest.SyncBuffer
	events chan string // the child's stdout: "crash <point>", "paused <point> <id>"
	api    string      // applyPublicKey URL
	admin  string      // the admin listener's URL
	socket string
	scrape daemontest.SyncBuffer // what the admin listener served, for the secret scans
	exited chan struct{}
	err    error // the exit status, once exited

	apiClient, sockClient *http.Client
	clientKey             *rsa.PrivateKey // sign applies as clientID, if set
	crashed               atomic.Bool     // the child announced a planned crash
	orderly               bool            // stopped by SIGTERM, and exited cleanly
	scrapes               atomic.Int64    // pages scraped from the admin listener
}

// errExited: the daemon exited before it served.
var errExited = errors.New("the daemon exited before serving")

// start runs the daemon with the extra environment and waits until it
// serves. It returns errExited if the daemon died first (as a planned
// crash at start-up does), and fails the test on other errors.
func (f *fixture) start(env ...string) (*proc, error) {
	t := f.t
	t.Helper()
	p := &proc{t: t, f: f, stderr: &daemontest.SyncBuffer{}, events: make(chan string, 64), exited: make(chan struct{}), clientKey: f.clientKey}
	if _, set := os.LookupEnv("GOTRACEBACK"); !set {
		// A crash prints every goroutine, not only the one that
		// crashed: what the others were doing is the evidence of a race.
		env = append(env, "GOTRACEBACK=all")
	}
	p.cmd = daemontest.Command(f.cfgPath, append(env, ledgerEnv+"="+f.ledger)...)
	p.cmd.Stderr = p.stderr
	// The daemon dies with the test binary, however that ends.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.procs = append(f.procs, p)
	f.mu.Unlock()
	lines := make(chan struct{})
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "crash ") {
				p.crashed.Store(true)
			}
			select {
			case p.events <- sc.Text():
			default: // nobody listens: drop
			}
		}
	}()
	go func() {
		<-lines // Wait closes stdout: read it all first
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() { p.kill() })

	deadline := time.Now().Add(hangLimit)
	for time.Now().Before(deadline) {
		for _, line := range strings.Split(p.stderr.String(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "serving" {
				p.api, _ = m["api"].(string)
				p.socket, _ = m["decrypt_socket"].(string)
				p.admin, _ = m["admin"].(string)
				p.apiClient = &http.Client{Timeout: hangLimit}
				p.sockClient = &http.Client{Timeout: hangLimit, Transport: &http.Transport{
					DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
						var d net.Dialer
						return d.DialContext(ctx, "unix", p.socket)
					},
				}}
				return p, nil
			}
		}
		select {
		case <-p.exited:
			return p, fmt.Errorf("%w: %v", errExited, p.err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("the daemon did not serve within %s:\n%s", hangLimit, p.stderr.String())
	return nil, nil
}

// mustStart is start for a daemon that must come up.
func (f *fixture) mustStart(env ...string) *proc {
	f.t.Helper()
	p, err := f.start(env...)
	if err != nil {
		f.t.Fatalf("%v\n%s", err, p.stderr.String())
	}
	return p
}

// alive reports whether the daemon is still running.
func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// dies reports whether the daemon is gone or going within a moment: a
// request that failed in transport is expected then.
func (p *proc) dies() bool {
	select {
	case <-p.exited:
		return true
	case <-time.After(2 * time.Second):
		return false
	}
}

// kill scrapes the admin listener of a live daemon for the secret scans,
// then sends SIGKILL and waits for the process to be gone.
func (p *proc) kill() {
	if p.alive() {
		p.scrapeAdmin()
		p.cmd.Process.Signal(syscall.SIGKILL)
	}
	<-p.exited
	if p.sockClient != nil {
		p.sockClient.CloseIdleConnections()
		p.apiClient.CloseIdleConnections()
	}
}

// stop scrapes the admin listener for the secret scans, then sends SIGTERM
// and requires an orderly exit.
func (p *proc) stop() {
	p.t.Helper()
	p.scrapeAdmin()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		if p.err != nil {
			p.t.Errorf("the daemon's exit after SIGTERM: %v\n%s", p.err, p.stderr.String())
		}
		p.orderly = p.err == nil
	case <-time.After(hangLimit):
		p.t.Fatalf("the daemon did not stop within %s of SIGTERM", hangLimit)
	}
}

// scrapeAdmin keeps what the admin listener serves: metrics and status.
// A daemon that dies meanwhile (a planned crash) is no error.
func (p *proc) scrapeAdmin() {
	if p.admin == "" {
		return
	}
	c := &http.Client{Timeout: hangLimit}
	for _, path := range []string{admin.MetricsPath, admin.StatusPath} {
		resp, err := c.Get(p.admin + path)
		if err != nil {
			if !p.dies() {
				p.t.Errorf("scraping %s: %v", path, err)
			}
			return
		}
		if resp.StatusCode != http.StatusOK {
			p.t.Errorf("scraping %s: HTTP %d", path, resp.StatusCode)
		}
		io.Copy(&p.scrape, resp.Body)
		resp.Body.Close()
		p.scrapes.Add(1)
	}
}

// lastReap is when the daemon's last reaper pass ended, as its admin
// status says; zero before the first.
func (p *proc) lastReap() time.Time {
	resp, err := (&http.Client{Timeout: hangLimit}).Get(p.admin + admin.StatusPath)
	if err != nil {
		p.t.Fatalf("admin status: %v", err)
	}
	defer resp.Body.Close()
	var st admin.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		p.t.Fatalf("admin status: %v", err)
	}
	return st.Reaper.LastRun
}

// vmRSS is the daemon's resident memory in bytes, from /proc.
func (p *proc) vmRSS() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kb int64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%d kB", &kb); err != nil {
				return 0, err
			}
			return kb << 10, nil
		}
	}
	return 0, errors.New("no VmRSS in /proc status")
}

// keyInfo is what applyPublicKey returns, and what the test made of it.
type keyInfo struct {
	UniqueID, Salt, PublicKey string
	pub                       *rsa.PublicKey
	asked                     time.Time // when the apply was sent: the daemon issued it after
}

// applyResult is one applyPublicKey answer.
type applyResult struct {
	status             int
	code, resultStatus string
	key                keyInfo
}

// apply calls applyPublicKey with body (JSON); a transport error is
// returned as err.
func (p *proc) applyBody(body string) (applyResult, error) {
	req, _ := http.NewRequest(http.MethodPost, p.api, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if p.clientKey != nil {
		if err := apisig.SignRequest(req, clientID, 1, p.clientKey, []byte(body), time.Now()); err != nil {
			return applyResult{}, err
		}
	}
	return p.doApply(req)
}

func (p *proc) doApply(req *http.Request) (applyResult, error) {
	asked := time.Now()
	resp, err := p.apiClient.Do(req)
	if err != nil {
		return applyResult{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return applyResult{}, err
	}
	var out struct {
		Result        struct{ ResultCode, ResultStatus, ResultMessage string }
		PublicKeyInfo keyInfo
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return applyResult{status: resp.StatusCode}, fmt.Errorf("applyPublicKey answered %d with a body that is not JSON: %q", resp.StatusCode, b)
	}
	r := applyResult{status: resp.StatusCode, code: out.Result.ResultCode, resultStatus: out.Result.ResultStatus, key: out.PublicKeyInfo}
	if r.code == "SUCCESS" {
		der, err := base64.StdEncoding.DecodeString(r.key.PublicKey)
		if err != nil {
			return r, fmt.Errorf("publicKey is not base64: %w", err)
		}
		pub, err := x509.ParsePKIXPublicKey(der)
		if err != nil {
			return r, fmt.Errorf("publicKey does not parse: %w", err)
		}
		r.key.pub = pub.(*rsa.PublicKey)
		r.key.asked = asked
	}
	return r, nil
}

// apply applies for a key as customer (a fresh customerId if empty).
func (p *proc) apply(customer string) (applyResult, error) {
	if customer == "" {
		customer = newCustomerID()
	}
	return p.applyBody(fmt.Sprintf(`{"customerId":%q}`, customer))
}

// newCustomerID returns a fresh customerId, so that per-customer caps do
// not bind unless a test wants them to.
func newCustomerID() string {
	b := make([]byte, 14)
	rand.Read(b)
	id := []byte("21")
	for _, c := range b {
		id = append(id, '0'+c%10)
	}
	return string(id)
}

// decryptResult is one answer of the decrypt socket.
type decryptResult struct {
	status   int
	code     string
	password string
}

func (p *proc) decryptBody(body string) (decryptResult, error) {
	resp, err := p.sockClient.Post("http://keyissuer/v1/decrypt", "application/json", strings.NewReader(body))
	if err != nil {
		return decryptResult{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return decryptResult{}, err
	}
	var out struct {
		Password string
		Error    struct{ Code, Message string }
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return decryptResult{status: resp.StatusCode}, fmt.Errorf("decrypt answered %d with a body that is not JSON: %q", resp.StatusCode, b)
	}
	pw, err := base64.StdEncoding.DecodeString(out.Password)
	if err != nil {
		return decryptResult{status: resp.StatusCode}, fmt.Errorf("password is not base64: %q", out.Password)
	}
	return decryptResult{status: resp.StatusCode, code: out.Error.Code, password: string(pw)}, nil
}

// decrypt asks to decrypt ct with key id, and notes for the ledger's check
// what the client saw.
func (p *proc) decrypt(id string, ct []byte) (decryptResult, error) {
	res, err := p.decryptBody(fmt.Sprintf(`{"uniqueId":%q,"ciphertext":%q}`, id, base64.StdEncoding.EncodeToString(ct)))
	if p.f != nil {
		switch {
		case err != nil:
			p.f.mayHaveDecrypted(id) // the answer was lost
		case res.status == http.StatusOK:
			p.f.mu.Lock()
			p.f.clientOK[id]++
			p.f.mu.Unlock()
		case res.code == "DECRYPT_FAILED":
			p.f.mayHaveDecrypted(id) // the token may have decrypted a wrong salt
		}
	}
	return res, err
}

// mayHaveDecrypted notes that the token may have decrypted with key id and
// no client saw it succeed: its answer was lost, or the daemon refused the
// plaintext the token gave it.
func (f *fixture) mayHaveDecrypted(id string) {
	f.mu.Lock()
	f.tokenMay[id] = true
	f.mu.Unlock()
}

// getJSON GETs path on the socket into v and returns the status.
func (p *proc) getJSON(path string, v any) (int, error) {
	resp, err := p.sockClient.Get("http://keyissuer" + path)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	return resp.StatusCode, json.NewDecoder(resp.Body).Decode(v)
}

// health is the socket's /v1/health.
type health struct {
	Status          string
	TokenReady      bool
	PoolReady       int
	PoolSize        int
	OutstandingKeys int
	PendingDestroys int
}

func (p *proc) health() (health, int, error) {
	var h health
	st, err := p.getJSON("/v1/health", &h)
	return h, st, err
}

// state is the state of a key as the daemon reports it.
func (p *proc) state(id string) (string, error) {
	var rec struct{ State string }
	st, err := p.getJSON("/v1/keys/"+id, &rec)
	if err == nil && st != http.StatusOK {
		err = fmt.Errorf("GET /v1/keys/%s: %d", id, st)
	}
	return rec.State, err
}

// seal encrypts password+salt to the key, as a merchant does, and notes
// the plaintext, in every layout, for the secret scans of the fixture whose
// password it is.
func seal(t testing.TB, k keyInfo, password string) []byte {
	t.Helper()
	v, ok := owners.Load(password)
	if !ok {
		t.Fatalf("seal: %q is not a password of fixture.password: the secret scans would not know it", password)
	}
	f := v.(*fixture)
	f.mu.Lock()
	for _, l := range issuer.Layouts() {
		if pt := l.Plaintext([]byte(password), k.Salt); !bytes.Equal(pt, []byte(password)) {
			f.sealed[string(pt)] = true
		}
	}
	f.mu.Unlock()
	ct, err := hsm.Encrypt(k.pub, hsm.OAEPSHA256, []byte(password+k.Salt))
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// tokenObjects counts the daemon's key objects in the token by key id,
// from every object the token holds (hsmtest.Objects: PKCS#11 directly, all
// classes, any label, a session of this process), not through hsm.List,
// which reconciliation itself uses. An object that appeared since the
// fixture was made and is not a key object labelled prefix+id (CKA_LABEL
// and CKA_ID) fails the test as a leak. Token objects only: run it when the
// daemon is dead, or accept that a running one's pool is there too.
func (f *fixture) tokenObjects() map[string]int {
	f.t.Helper()
	f.mu.Lock()
	live := slices.ContainsFunc(f.procs, (*proc).alive)
	killed := len(f.procs) > 0 && !f.procs[len(f.procs)-1].orderly
	f.mu.Unlock()
	f.halfMadeLeft = 0
	ids := map[string]int{}
	for _, o := range hsmtest.Added(f.baseline, hsmtest.Objects(f.t, f.soft)) {
		id, ok := f.keyID(o)
		if !ok && live && o.Label == "" && o.ID == "" {
			// A live daemon's key being made: SoftHSM writes its
			// attributes after creating it. Judged once it is dead.
			continue
		}
		if !ok && halfMade(o) && f.dedicated && !live && killed {
			// Left by the kill: the next start must destroy it, which
			// crashRun.checkVanished checks. After an orderly stop it
			// is a leak like any other.
			f.halfMadeLeft++
			continue
		}
		if !ok {
			f.mu.Lock()
			fresh := !f.foreign[o]
			f.foreign[o] = true
			f.mu.Unlock()
			if fresh {
				hint := ""
				if o.Label == "" && o.ID == "" {
					// SoftHSM writes a new object's attributes after
					// creating it: a kill in between leaves this, and
					// reconciliation, which goes by label, cannot see it.
					hint = "; no label nor id: half of a C_GenerateKeyPair cut short by a kill?"
				}
				f.t.Errorf("LEAKED OBJECT: the token holds a %s, which is no key object of the daemon's (label prefix %q)%s", o, f.prefix, hint)
			}
			continue
		}
		ids[id]++
	}
	return ids
}

// halfMade reports whether o has the shape of an object SoftHSM was still
// making when a kill came (hsm/halfmade.go): no class, or a key object with
// no label nor id.
func halfMade(o hsmtest.Object) bool {
	return o.Label == "" && o.ID == "" &&
		(o.Class == hsmtest.Classless || o.Class == pkcs11.CKO_PRIVATE_KEY || o.Class == pkcs11.CKO_PUBLIC_KEY)
}

// reconciled returns what the daemon's start-up said it did with
// half-made objects, from its log: ok is false if it logged no
// reconciliation.
func (p *proc) reconciled() (destroyed, left int, ok bool) {
	for _, line := range strings.Split(p.stderr.String(), "\n") {
		var rec struct {
			Msg       string
			Destroyed *int `json:"half_made_destroyed"`
			Left      *int `json:"half_made_left"`
		}
		if json.Unmarshal([]byte(line), &rec) != nil || rec.Msg != "reconciled token and records" {
			continue
		}
		if rec.Destroyed == nil || rec.Left == nil {
			return 0, 0, false
		}
		return *rec.Destroyed, *rec.Left, true
	}
	return 0, 0, false
}

// listKeys lists the objects under the fixture's prefix through hsm.List,
// from a Token of this process: for the regression tests of List itself.
func (f *fixture) listKeys() []hsm.Object {
	f.t.Helper()
	tok, err := hsm.Open(context.Background(), hsm.Config{
		Module: f.soft.Module, TokenLabel: f.soft.Label, PIN: f.soft.PIN,
		Storage: hsm.StorageToken, LabelPrefix: f.prefix, Sessions: 2,
	})
	if err != nil {
		f.t.Fatalf("opening the token to list its objects: %v", err)
	}
	defer tok.Close()
	objs, err := tok.List(context.Background())
	if err != nil {
		f.t.Fatalf("listing the token's objects: %v", err)
	}
	return objs
}

// keyID returns the key id of a key object the daemon made, labelled
// prefix+id in both CKA_LABEL and CKA_ID.
func (f *fixture) keyID(o hsmtest.Object) (string, bool) {
	id, ok := strings.CutPrefix(o.Label, f.prefix)
	if !ok || o.ID != o.Label || id == "" ||
		o.Class != pkcs11.CKO_PRIVATE_KEY && o.Class != pkcs11.CKO_PUBLIC_KEY {
		return "", false
	}
	return id, true
}

// checkObjects runs once every daemon of the fixture is dead: whatever
// appeared in the token since the fixture was made must be the daemon's
// key objects (tokenObjects), and after an orderly stop exactly a private
// and a public key for each issued record, nothing else. A daemon killed
// last may leave its pool behind: the next start destroys it (the crash
// harness checks that), and clearToken does here.
func (f *fixture) checkObjects() {
	t := f.t
	f.mu.Lock()
	orderly := len(f.procs) == 0 || f.procs[len(f.procs)-1].orderly
	f.mu.Unlock()
	objs := hsmtest.Added(f.baseline, hsmtest.Objects(t, f.soft))
	byID := f.tokenObjects()
	if !orderly {
		t.Logf("token check: %d objects added, the daemon's keys of %d ids, %d other objects (the last daemon was killed: its pool may remain)",
			len(objs), len(byID), len(f.foreign))
		return
	}
	// Session objects die with their daemon: in session storage no key
	// object of the daemon may remain.
	issued := map[string]bool{}
	if _, err := os.Stat(f.dbPath); err == nil && f.storage == "token" {
		_, active := f.records(nil)
		for _, r := range active {
			if r.State == store.Issued {
				issued[r.UniqueID] = true
			}
		}
	}
	pairs := map[string][2]int{}
	for _, o := range objs {
		if id, ok := f.keyID(o); ok {
			n := pairs[id]
			if o.Class == pkcs11.CKO_PRIVATE_KEY {
				n[0]++
			} else {
				n[1]++
			}
			pairs[id] = n
		}
	}
	leaked := 0
	for id, n := range pairs {
		if !issued[id] || n != [2]int{1, 1} {
			t.Errorf("LEAKED OBJECTS after the orderly stop: key %s has %d private and %d public objects in the token; its record is issued: %v",
				id, n[0], n[1], issued[id])
			leaked++
		}
	}
	for id := range issued {
		if _, ok := pairs[id]; !ok {
			t.Errorf("LOST KEY: %s is issued, and the token has none of its objects", id)
		}
	}
	leaked += len(f.foreign) // reported by tokenObjects
	t.Logf("token check: %d objects before, %d added, %d issued keys in %s storage: %d leaked",
		len(f.baseline), len(objs), len(issued), f.storage, leaked)
}

// records opens the store, as the next start would (so it must open after
// any kill), and returns the records of ids and every active record.
// Call it only while no daemon runs.
func (f *fixture) records(ids []string) (got map[string]store.Record, active []store.Record) {
	f.t.Helper()
	st, err := bolt.Open(f.dbPath, bolt.Options{})
	if err != nil {
		f.t.Fatalf("the store does not open: %v", err)
	}
	defer st.Close()
	ctx := context.Background()
	got = map[string]store.Record{}
	for _, id := range ids {
		r, err := st.Get(ctx, id)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			f.t.Fatalf("record %s: %v", id, err)
		}
		got[id] = r
	}
	active, err = st.Active(ctx, time.Unix(0, math.MaxInt64), 0)
	if err != nil {
		f.t.Fatalf("scanning active records: %v", err)
	}
	return got, active
}

// ledger is what the child's ledger says of each key: the decrypts that
// reached the token and did not come back unavailable (those gave the key
// back untouched), those that succeeded there, and those a kill cut short.
type ledger struct {
	attempts, oks, cut map[string]int
	lines              int
}

// decryptLedger reads the child's ledger. It must exist: every child of a
// fixture opens it at start-up, and fails to start if it cannot.
func (f *fixture) decryptLedger() ledger {
	f.t.Helper()
	l := ledger{attempts: map[string]int{}, oks: map[string]int{}, cut: map[string]int{}}
	b, err := os.ReadFile(f.ledger)
	if err != nil {
		f.t.Fatalf("the decrypt ledger: %v (every child writes it)", err)
	}
	open := map[string]int{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" {
			continue
		}
		l.lines++
		fields := strings.Fields(line)
		switch {
		case len(fields) == 2 && fields[0] == "begin":
			l.attempts[fields[1]]++
			open[fields[1]]++
		case len(fields) == 3 && fields[0] == "end":
			open[fields[1]]--
			switch fields[2] {
			case "unavailable":
				l.attempts[fields[1]]--
			case "ok":
				l.oks[fields[1]]++
			}
		default:
			f.t.Errorf("the decrypt ledger: malformed line %q", line)
		}
	}
	for id, n := range open {
		if n > 0 {
			l.cut[id] = n
		}
	}
	return l
}

// checkLedger holds the ledger to what the clients saw: no key reached the
// token's decrypt twice; every success a client saw is a success in the
// ledger; and every success in the ledger is one a client saw, or one
// whose answer may not have come (mayHaveDecrypted). So a ledger that was
// not written fails as surely as a double decrypt. Call it while no
// daemon runs. It returns how many keys decrypted twice.
func (f *fixture) checkLedger() (doubles int) {
	t := f.t
	t.Helper()
	l := f.decryptLedger()
	f.mu.Lock()
	defer f.mu.Unlock()
	seen := 0
	for id, n := range f.clientOK {
		seen += n
		if l.oks[id] != n {
			t.Errorf("LEDGER: clients saw %d successful decrypts of %s, the ledger has %d", n, id, l.oks[id])
		}
	}
	ok, unseen := 0, 0
	for id, n := range l.oks {
		ok += n
		if f.clientOK[id] == 0 {
			unseen++
			if !f.tokenMay[id] {
				t.Errorf("LEDGER: the token decrypted with %s, and no client saw it or lost its answer", id)
			}
		}
	}
	reached := 0
	for id, n := range l.attempts {
		reached += n
		if n > 1 || l.oks[id] > 1 {
			doubles++
			t.Errorf("DOUBLE DECRYPT: %s reached the token's decrypt %d times (%d succeeded)", id, n, l.oks[id])
		}
	}
	for id := range l.cut {
		if !f.tokenMay[id] {
			t.Errorf("LEDGER: a decrypt with %s was cut short, and no client lost its answer", id)
		}
	}
	f.ledgerSummary = fmt.Sprintf("ledger: %d lines; %d keys reached the token's decrypt, %d decrypted there, %d cut short; clients saw %d successes; %d decrypted without a success seen (answer lost, or the salt refused)",
		l.lines, reached, ok, len(l.cut), seen, unseen)
	return doubles
}

// checkLedgerAtEnd checks the ledger once every child of the fixture is
// dead. In-process daemons keep none.
func (f *fixture) checkLedgerAtEnd() {
	f.mu.Lock()
	children := len(f.procs)
	f.mu.Unlock()
	if children > 0 {
		f.checkLedger()
		f.t.Log(f.ledgerSummary)
	}
}

// waitFor polls cond until it holds or hangLimit passes.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(hangLimit); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("%s: not within %s", what, hangLimit)
}
