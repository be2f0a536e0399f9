package daemon_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/admin"
	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
)

// Operations tests: metrics, the audit trail, readiness, reload and
// shutdown, on a real SoftHSM token.

// waitFor polls cond until it holds; the deadline only stops a hung test.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// scrape returns the admin listener's metrics as "name{labels}" → value.
func scrape(t testing.TB, adminURL string) map[string]string {
	t.Helper()
	resp, err := http.Get(adminURL + admin.MetricsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		out[l[:i]] = l[i+1:]
	}
	return out
}

func getStatus(t testing.TB, adminURL string) admin.Status {
	t.Helper()
	resp, err := http.Get(adminURL + admin.StatusPath)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var s admin.Status
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

func readyz(t testing.TB, adminURL string) (int, admin.Readiness) {
	t.Helper()
	resp, err := http.Get(adminURL + admin.ReadyzPath)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var rd admin.Readiness
	json.NewDecoder(resp.Body).Decode(&rd)
	return resp.StatusCode, rd
}

// auditLine is the part of an audit line the tests look at.
type auditLine struct {
	Seq        uint64         `json:"seq"`
	Event      string         `json:"event"`
	UniqueID   string         `json:"unique_id"`
	CustomerID string         `json:"customer_id"`
	Remote     string         `json:"remote"`
	Peer       *audit.Peer    `json:"peer"`
	Outcome    string         `json:"outcome"`
	Reason     string         `json:"reason"`
	Count      *int           `json:"count"`
	Counts     map[string]int `json:"counts"`
	Detail     string         `json:"detail"`
}

func readAudit(t testing.TB, path string) []auditLine {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []auditLine
	for _, l := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
		var a auditLine
		if err := json.Unmarshal(l, &a); err != nil {
			t.Fatalf("audit line %q: %v", l, err)
		}
		out = append(out, a)
	}
	return out
}

// find returns the audit lines of event (for key id, if not "").
func find(lines []auditLine, event, id string) []auditLine {
	var out []auditLine
	for _, l := range lines {
		if l.Event == event && (id == "" || l.UniqueID == id) {
			out = append(out, l)
		}
	}
	return out
}

// clock is a settable daemon clock.
type clock struct {
	mu sync.Mutex
	d  time.Duration
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.d)
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.d += d
}

// inProcess runs a daemon in the test process, where its clock can be
// moved, and returns it with the function that stops it and returns Run's
// error.
func inProcess(t *testing.T, storage string, now func() time.Time) (*daemon.Daemon, config.Config, func() error) {
	t.Helper()
	cfgPath, _ := setup(t, storage)
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Keys.ReapInterval = 100 * time.Millisecond
	cfg.API.AllowUnsigned = true
	d, stop := runDaemon(t, cfg, daemon.Options{Log: slog.New(slog.DiscardHandler), Now: now})
	return d, cfg, stop
}

// runDaemon runs a daemon on cfg in the test process and returns it with
// the function that stops it and returns Run's error (called at cleanup
// too).
func runDaemon(t *testing.T, cfg config.Config, opts daemon.Options) (*daemon.Daemon, func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, cfg, opts)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(60 * time.Second):
				t.Fatal("the daemon did not stop")
			}
		})
		return runErr
	}
	t.Cleanup(func() { stop() })
	return d, stop
}

// The scripted sequence of the issue: apply, decrypt, a second decrypt, a
// bad apply, expiry; then metrics and the audit trail say exactly that.
func TestMetricsAndAuditAfterApplyDecryptExpire(t *testing.T) {
	clk := &clock{}
	d, cfg, stop := inProcess(t, "session", clk.Now)
	adminURL := "http://" + d.AdminAddr()
	c := &child{t: t, api: "http://" + d.APIAddr() + "/ams/api/v1/customer/applyPublicKey", socket: cfg.Decrypt.Socket}

	used := c.apply("2188000000000001")
	idle := c.apply("2188000000000002")
	ct := encryptFor(t, used, "correct horse")
	if status, code, pw, err := c.decrypt(used.UniqueID, ct); err != nil || status != 200 || pw != "correct horse" {
		t.Fatalf("decrypt: %d %s %v", status, code, err)
	}
	if _, code, _, _ := c.decrypt(used.UniqueID, ct); code != "KEY_CONSUMED" {
		t.Fatalf("second decrypt: %s, want KEY_CONSUMED", code)
	}
	resp, err := http.Post(c.api, "application/json", strings.NewReader(`{"customerId": 42}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	clk.Advance(2 * time.Minute) // past the 1m ttl: the reaper expires idle
	waitFor(t, "the reaper to expire the idle key", func() bool {
		return scrape(t, adminURL)["keyissuer_keys_expired_total"] == "1"
	})
	waitFor(t, "a full pool", func() bool { return scrape(t, adminURL)["keyissuer_pool_keys_ready"] == "4" })

	got := scrape(t, adminURL)
	want := map[string]string{
		`keyissuer_apply_requests_total{code="SUCCESS"}`:                        "2",
		`keyissuer_apply_requests_total{code="PARAM_ILLEGAL"}`:                  "1",
		`keyissuer_decrypt_requests_total{code="OK"}`:                           "1",
		`keyissuer_decrypt_requests_total{code="KEY_CONSUMED"}`:                 "1",
		`keyissuer_keys_issued_total`:                                           "2",
		`keyissuer_decrypts_total`:                                              "1",
		`keyissuer_keys_expired_total`:                                          "1",
		`keyissuer_keys_lost_total`:                                             "0",
		`keyissuer_keys_destroyed_total{reason="consumed"}`:                     "1",
		`keyissuer_keys_destroyed_total{reason="expired"}`:                      "1",
		`keyissuer_keys_outstanding`:                                            "0",
		`keyissuer_destroys_pending`:                                            "0",
		`keyissuer_pool_keys_ready`:                                             "4",
		`keyissuer_pool_keys_target`:                                            "4",
		`keyissuer_keys_generated_total`:                                        "6",
		`keyissuer_key_generation_seconds_count`:                                "6",
		`keyissuer_token_up`:                                                    "1",
		`keyissuer_token_faults_total`:                                          "0",
		`keyissuer_request_duration_seconds_count{api="apply"}`:                 "3",
		`keyissuer_request_duration_seconds_count{api="decrypt"}`:               "2",
		`keyissuer_store_commit_duration_seconds_count{op="create"}`:            "2",
		`keyissuer_reconciled_total{result="lost"}`:                             "0",
		`keyissuer_audit_events_total{result="error"}`:                          "0",
		`keyissuer_key_generation_errors_total`:                                 "0",
		`keyissuer_store_commit_duration_seconds_bucket{op="create",le="+Inf"}`: "2",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	for k := range got {
		if strings.Contains(k, used.UniqueID) || strings.Contains(k, "2188000000000001") {
			t.Errorf("metric %s has an unbounded label value", k)
		}
	}
	st := getStatus(t, adminURL)
	if st.Records.Issued != 2 || st.Records.Decrypts != 1 || st.Records.Expired != 1 || st.Reaper.LastRun.IsZero() ||
		st.Token.Label == "" || st.Token.Storage != "session" || st.Pool.Target != 4 || st.Audit.Seq == 0 {
		t.Errorf("status %+v", st)
	}

	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	lines := readAudit(t, cfg.Audit.Path)
	issued := find(lines, audit.KeyIssued, used.UniqueID)
	if len(issued) != 1 || issued[0].CustomerID != "2188000000000001" || !strings.HasPrefix(issued[0].Remote, "127.0.0.1:") {
		t.Errorf("key.issued lines %+v", issued)
	}
	decrypts := find(lines, audit.KeyDecrypt, used.UniqueID)
	me := &audit.Peer{UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), PID: int32(os.Getpid())}
	if len(decrypts) != 2 || decrypts[0].Outcome != "ok" || decrypts[1].Outcome != "consumed" ||
		decrypts[0].Peer == nil || *decrypts[0].Peer != *me {
		t.Errorf("key.decrypt lines %+v, want ok then consumed, from peer %+v", decrypts, me)
	}
	if l := find(lines, audit.KeyDestroyed, used.UniqueID); len(l) != 1 || l[0].Reason != "consumed" {
		t.Errorf("key.destroyed lines of the used key %+v", l)
	}
	if l := find(lines, audit.KeyExpired, idle.UniqueID); len(l) != 1 {
		t.Errorf("key.expired lines %+v", l)
	}
	if l := find(lines, audit.KeyDestroyed, idle.UniqueID); len(l) != 1 || l[0].Reason != "expired" {
		t.Errorf("key.destroyed lines of the idle key %+v", l)
	}
	for _, e := range []string{audit.DaemonStarted, audit.Reconciled, audit.DaemonStopped} {
		if len(find(lines, e, "")) != 1 {
			t.Errorf("want one %s line", e)
		}
	}
	if l := find(lines, audit.DaemonStopped, ""); len(l) == 1 && (l[0].Count == nil || *l[0].Count != 4) {
		t.Errorf("daemon.stopped %+v, want 4 pooled keys destroyed", l[0])
	}
	raw, _ := os.ReadFile(cfg.Audit.Path)
	if bytes.Contains(raw, []byte("correct horse")) || bytes.Contains(raw, []byte(used.Salt)) {
		t.Error("a password or a salt is in the audit trail")
	}

	// The trail verifies, and an edited line breaks it.
	if _, err := audit.Verify(bytes.NewReader(raw)); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	edited := bytes.Replace(raw, []byte(`"outcome":"consumed"`), []byte(`"outcome":"ok"`), 1)
	var ve *audit.VerifyError
	if _, err := audit.Verify(bytes.NewReader(edited)); !errors.As(err, &ve) {
		t.Errorf("Verify of an edited trail: %v, want a VerifyError", err)
	}
}

// /readyz turns 503 when the token goes away and 200 when it is back, and
// the outage is counted and audited.
func TestReadinessFollowsTheToken(t *testing.T) {
	d, cfg, stop := inProcess(t, "token", nil)
	adminURL := "http://" + d.AdminAddr()
	waitFor(t, "readiness", func() bool { code, _ := readyz(t, adminURL); return code == 200 })

	restore := hsmtest.MoveTokenDir(t)
	waitFor(t, "readiness to fail with the token gone", func() bool {
		code, rd := readyz(t, adminURL)
		return code == 503 && !rd.Token
	})
	if resp, err := http.Get(adminURL + admin.HealthzPath); err != nil || resp.StatusCode != 200 {
		t.Errorf("healthz during the outage: %v %v, want 200: the process is alive", resp, err)
	}
	if m := scrape(t, adminURL); m["keyissuer_token_up"] != "0" || m["keyissuer_token_faults_total"] != "1" {
		t.Errorf("token_up %s, token_faults_total %s during the outage", m["keyissuer_token_up"], m["keyissuer_token_faults_total"])
	}
	restore()
	waitFor(t, "readiness after the token came back", func() bool {
		code, rd := readyz(t, adminURL)
		return code == 200 && rd.Token && rd.Store && rd.PoolReady > 0
	})
	if m := scrape(t, adminURL); m["keyissuer_token_up"] != "1" || m["keyissuer_token_recoveries_total"] != "1" {
		t.Errorf("token_up %s, token_recoveries_total %s after the outage", m["keyissuer_token_up"], m["keyissuer_token_recoveries_total"])
	}
	waitFor(t, "the token.up audit line", func() bool { return len(find(readAudit(t, cfg.Audit.Path), audit.TokenUp, "")) == 1 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	lines := readAudit(t, cfg.Audit.Path)
	if len(find(lines, audit.TokenDown, "")) != 1 || len(find(lines, audit.TokenUp, "")) != 1 {
		t.Errorf("want one token.down and one token.up line")
	}
}

// notifySocket listens where a child's sd_notify goes and returns the
// messages as they come.
func notifySocket(t *testing.T) (path string, msgs <-chan string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "ntf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path = filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ch := make(chan string, 64)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(ch)
				return
			}
			ch <- string(buf[:n])
		}
	}()
	return path, ch
}

func waitMsg(t *testing.T, msgs <-chan string, want string) {
	t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		select {
		case m := <-msgs:
			if m == want {
				return
			}
		case <-timeout:
			t.Fatalf("no %q from sd_notify", want)
		}
	}
}

// SIGTERM: the daemon stops accepting, finishes the request in flight,
// destroys its pooled keys, marks the records, tells systemd, and exits 0.
func TestSIGTERMGracefulShutdown(t *testing.T) {
	cfgPath, _ := setup(t, "session")
	notifyPath, msgs := notifySocket(t)
	// The decrypt in flight waits after its claim until the shutdown is
	// under way: hold goes then.
	hold := filepath.Join(t.TempDir(), "hold")
	if err := os.WriteFile(hold, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c := start(t, cfgPath, claimPauseEnv+"=while:"+hold, "NOTIFY_SOCKET="+notifyPath)
	waitMsg(t, msgs, "READY=1")

	inFlight := c.apply("")
	outstanding := c.apply("")
	waitFor(t, "a full pool", func() bool { return getStatus(t, c.admin).Pool.Ready == 4 })
	result := make(chan string, 1)
	go func() {
		_, code, pw, err := c.decrypt(inFlight.UniqueID, encryptFor(t, inFlight, "in flight"))
		result <- fmt.Sprint(code, pw, err)
	}()
	select {
	case <-c.claims:
	case <-time.After(60 * time.Second):
		t.Fatal("the decrypt never claimed its key")
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	waitMsg(t, msgs, "STOPPING=1")
	waitFor(t, "the API to stop accepting", func() bool {
		resp, err := http.Post(c.api, "application/json", strings.NewReader(`{}`))
		if err == nil {
			resp.Body.Close()
		}
		return err != nil
	})
	// The shutdown has begun and the decrypt is still held after its
	// claim: it is in flight. Let it go on.
	select {
	case got := <-result:
		t.Fatalf("the decrypt returned %q before the shutdown let it go: it was not in flight", got)
	default:
	}
	if err := os.Remove(hold); err != nil {
		t.Fatal(err)
	}
	if got := <-result; got != "in flight<nil>" {
		t.Errorf("the request in flight got %q, want its password", got)
	}
	select {
	case err := <-c.done:
		c.done <- err
		if err != nil {
			t.Fatalf("exit: %v\n%s", err, c.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the daemon did not exit after SIGTERM")
	}

	dir := filepath.Dir(cfgPath)
	lines := readAudit(t, filepath.Join(dir, "data", "audit.jsonl"))
	stopped := find(lines, audit.DaemonStopped, "")
	if len(stopped) != 1 || stopped[0].Count == nil || *stopped[0].Count != 4 {
		t.Errorf("daemon.stopped %+v, want the 4 pooled keys destroyed", stopped)
	}
	st, err := store.Open(filepath.Join(dir, "data", "keyissuer.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for id, want := range map[string]store.State{inFlight.UniqueID: store.Consumed, outstanding.UniqueID: store.Lost} {
		if r, err := st.Get(context.Background(), id); err != nil || r.State != want {
			t.Errorf("record %s: %s %v, want %s", id, r.State, err, want)
		}
	}
}

// SIGHUP: a bad file is refused and the running configuration kept; a good
// one changes the log level, says which changes need a restart, and the
// audit trail is reopened where logrotate left it.
func TestSIGHUPReload(t *testing.T) {
	cfgPath, _ := setup(t, "session")
	good := mustRead(t, cfgPath)
	c := start(t, cfgPath)
	auditPath := filepath.Join(filepath.Dir(cfgPath), "data", "audit.jsonl")

	os.WriteFile(cfgPath, []byte(strings.Replace(good, `level = "debug"`, `level = "loud"`, 1)), 0o600)
	c.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the reload to be refused", func() bool { return getStatus(t, c.admin).Config.LastReloadErr != "" })
	if st := getStatus(t, c.admin); st.Config.LogLevel != "debug" || !strings.Contains(st.Config.LastReloadErr, "log.level") {
		t.Errorf("after a bad reload: level %q, error %q; want debug kept and the reason", st.Config.LogLevel, st.Config.LastReloadErr)
	}
	c.apply("") // still serving

	if err := os.Rename(auditPath, auditPath+".1"); err != nil { // logrotate
		t.Fatal(err)
	}
	changed := strings.Replace(good, `level = "debug"`, `level = "warn"`, 1)
	changed = strings.Replace(changed, "size = 4", "size = 5", 1)
	changed += "[limits]\nmax_outstanding_per_customer = 1\n"
	os.WriteFile(cfgPath, []byte(changed), 0o600)
	c.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the reload", func() bool { return getStatus(t, c.admin).Config.LogLevel == "warn" })
	st := getStatus(t, c.admin)
	if st.Config.LastReloadErr != "" || len(st.Config.RestartPending) != 1 || st.Config.RestartPending[0] != "pool.size" || st.Pool.Target != 4 {
		t.Errorf("after a good reload: %+v, pool target %d; want pool.size pending a restart and the pool untouched", st.Config, st.Pool.Target)
	}
	// The new limit holds at once: one outstanding key per customer.
	c.apply("2188000000000077")
	resp, err := http.Post(c.api, "application/json", strings.NewReader(`{"customerId": "2188000000000077"}`))
	if err != nil {
		t.Fatal(err)
	}
	var out struct{ Result struct{ ResultCode string } }
	json.NewDecoder(resp.Body).Decode(&out)
	resp.Body.Close()
	if out.Result.ResultCode != "REQUEST_TRAFFIC_EXCEED_LIMIT" {
		t.Errorf("a second key for the customer after the reload: %s, want REQUEST_TRAFFIC_EXCEED_LIMIT", out.Result.ResultCode)
	}
	if m := scrape(t, c.admin); m[`keyissuer_config_reloads_total{result="ok"}`] != "1" || m[`keyissuer_config_reloads_total{result="refused"}`] != "1" {
		t.Errorf("reload counters %s ok, %s refused", m[`keyissuer_config_reloads_total{result="ok"}`], m[`keyissuer_config_reloads_total{result="refused"}`])
	}
	c.stop()

	old := readAudit(t, auditPath+".1")
	cur := readAudit(t, auditPath)
	if len(find(old, audit.ConfigReloadFailed, "")) != 1 {
		t.Errorf("no config.reload_failed line before the rotation")
	}
	if l := find(cur, audit.RequestRefused, ""); len(l) != 1 || l[0].Detail != "" {
		t.Errorf("request.refused lines %+v, want the quota refusal", l)
	}
	if cur[0].Event != audit.AuditReopened || len(find(cur, audit.ConfigReloaded, "")) != 1 {
		t.Errorf("the new file starts with %s and has %d config.reloaded lines", cur[0].Event, len(find(cur, audit.ConfigReloaded, "")))
	}
	both, _ := os.Open(auditPath + ".1")
	defer both.Close()
	curF, _ := os.Open(auditPath)
	defer curF.Close()
	if _, err := audit.Verify(io.MultiReader(both, curF)); err != nil {
		t.Errorf("the rotated trail does not chain: %v", err)
	}
	if logs := c.stderr.String(); !strings.Contains(logs, "configuration reload refused") {
		t.Errorf("the refused reload is not logged")
	}
}
