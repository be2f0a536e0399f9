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
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
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

	mu      sync.Mutex
	procs   []*proc
	secrets []string // passwords the test sent; none may appear anywhere
}

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
		t:       t,
		soft:    soft,
		dir:     dir,
		cfgPath: filepath.Join(dir, "config.toml"),
		prefix:  cmp.Or(fc.prefix, "rel-"+filepath.Base(dir)+":"),
		dbPath:  filepath.Join(dir, "data", "keyissuer.db"),
		audit:   filepath.Join(dir, "data", "audit.jsonl"),
		ledger:  filepath.Join(dir, "ledger"),
	}
	if err := os.WriteFile(filepath.Join(dir, "pin"), []byte(soft.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	unsigned := "true"
	if fc.signed {
		unsigned = "false"
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		f.clientKey = key
		fc.extra += fmt.Sprintf("\n[[clients]]\nid = %q\n[clients.public_keys]\n1 = %q\n", clientID, base64.StdEncoding.EncodeToString(der))
	}
	cfg := fmt.Sprintf(`
[token]
module = %q
label = %q
pin_file = "pin"
storage = %q
label_prefix = %q
sessions = %d
[keys]
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
%s`, soft.Module, soft.Label, fc.storage, f.prefix, fc.generators+3,
		fc.ttl, fc.reap, fc.poolSize, fc.generators, fc.applyWait, fc.store, unsigned, fc.api, fc.extra)
	if err := os.WriteFile(f.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.clearToken) // runs last, once every daemon is dead
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
// the test failed.
func (f *fixture) dumpOnFailure() {
	if !f.t.Failed() {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, p := range f.procs {
		n := 0
		for _, line := range strings.Split(p.stderr.String(), "\n") {
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

// password returns a fresh password, remembered as a secret that must
// never appear in a log, the audit trail or the store.
func (f *fixture) password() string {
	pw := "pw-" + rand.Text()[:16]
	f.mu.Lock()
	f.secrets = append(f.secrets, pw)
	f.mu.Unlock()
	return pw
}

// checkSecrets scans everything the fixture's daemons wrote: the PIN and
// every password the test sent (also in base64, as the decrypt answer
// carries it) must be in none of it. Salts are in the store by design;
// a password next to its salt is caught by the password.
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
	for _, name := range []string{f.audit, f.dbPath, f.ledger} {
		if b, err := os.ReadFile(name); err == nil {
			places = append(places, place{filepath.Base(name), b})
		}
	}
	secrets := map[string]string{"the PIN": f.soft.PIN}
	for _, pw := range f.secrets {
		secrets["password "+pw] = pw
		secrets["password "+pw+" in base64"] = base64.StdEncoding.EncodeToString([]byte(pw))
	}
	for _, p := range places {
		for name, s := range secrets {
			if bytes.Contains(p.data, []byte(s)) {
				t.Errorf("%s appears in %s", name, p.name)
			}
		}
	}
	t.Logf("secret scan: %d secrets in %d places (%d bytes), none found", len(secrets), len(places), func() (n int) {
		for _, p := range places {
			n += len(p.data)
		}
		return n
	}())
}

// proc is one run of the daemon.
type proc struct {
	t      testing.TB
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
}

// errExited: the daemon exited before it served.
var errExited = errors.New("the daemon exited before serving")

// start runs the daemon with the extra environment and waits until it
// serves. It returns errExited if the daemon died first (as a planned
// crash at start-up does), and fails the test on other errors.
func (f *fixture) start(env ...string) (*proc, error) {
	t := f.t
	t.Helper()
	p := &proc{t: t, stderr: &daemontest.SyncBuffer{}, events: make(chan string, 64), exited: make(chan struct{}), clientKey: f.clientKey}
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

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill() {
	if p.alive() {
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
	case <-time.After(hangLimit):
		p.t.Fatalf("the daemon did not stop within %s of SIGTERM", hangLimit)
	}
}

// scrapeAdmin keeps what the admin listener serves: metrics and status.
func (p *proc) scrapeAdmin() {
	if p.admin == "" {
		return
	}
	c := &http.Client{Timeout: hangLimit}
	for _, path := range []string{admin.MetricsPath, admin.StatusPath} {
		resp, err := c.Get(p.admin + path)
		if err != nil {
			p.t.Errorf("scraping %s: %v", path, err)
			continue
		}
		if resp.StatusCode != http.StatusOK {
			p.t.Errorf("scraping %s: HTTP %d", path, resp.StatusCode)
		}
		io.Copy(&p.scrape, resp.Body)
		resp.Body.Close()
	}
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
	got                       time.Time // when the answer came
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
		r.key.got = time.Now()
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

func (p *proc) decrypt(id string, ct []byte) (decryptResult, error) {
	return p.decryptBody(fmt.Sprintf(`{"uniqueId":%q,"ciphertext":%q}`, id, base64.StdEncoding.EncodeToString(ct)))
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

// seal encrypts password+salt to the key, as a merchant does.
func seal(t testing.TB, k keyInfo, password string) []byte {
	t.Helper()
	ct, err := hsm.Encrypt(k.pub, hsm.OAEPSHA256, []byte(password+k.Salt))
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// tokenObjects counts the objects under the fixture's prefix by key id,
// through a Token of this process. Token objects only: run it when the
// daemon is dead, or accept that a running one's pool is there too.
func (f *fixture) tokenObjects() map[string]int {
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
	ids := map[string]int{}
	for _, o := range objs {
		ids[o.ID]++
	}
	return ids
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

// decryptLedger reads the child's ledger: for each key, the decrypts that
// reached the token and did not come back unavailable (those gave the key
// back untouched), and those that succeeded.
func (f *fixture) decryptLedger() (attempts, oks map[string]int) {
	f.t.Helper()
	attempts, oks = map[string]int{}, map[string]int{}
	b, err := os.ReadFile(f.ledger)
	if errors.Is(err, os.ErrNotExist) {
		return attempts, oks
	}
	if err != nil {
		f.t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Fields(line)
		switch {
		case len(fields) == 2 && fields[0] == "begin":
			attempts[fields[1]]++
		case len(fields) == 3 && fields[0] == "end" && fields[2] == "unavailable":
			attempts[fields[1]]--
		case len(fields) == 3 && fields[0] == "end" && fields[2] == "ok":
			oks[fields[1]]++
		}
	}
	return attempts, oks
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
