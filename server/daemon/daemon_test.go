package daemon_test

import (
	"bufio"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
	"github.com/keyissuer/keyissuer/server/daemon/internal/daemontest"
)

// End-to-end tests: keyissuerd runs as a child process (this test binary,
// re-executed) on a SoftHSM token, and is driven over HTTP and its socket,
// killed and restarted as an operator or a crash would.

// claimPauseEnv makes the child pause after a decrypt's claim: for a
// duration, or "while:<path>" as long as the file path exists (at most a
// minute), so that the parent decides when the decrypt goes on.
const claimPauseEnv = "KEYISSUERD_TEST_CLAIM_PAUSE"

func TestMain(m *testing.M) { daemontest.Main(m, childOptions) }

// childOptions are keyissuerd's, with a test hook: after a decrypt claims
// its record the child says so on stdout and pauses, so the parent can kill
// it there.
func childOptions(path string, cfg config.Config) (daemon.Options, error) {
	level := new(slog.LevelVar)
	level.UnmarshalText([]byte(cfg.Log.Level))
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	opts := daemon.Options{Log: log, LogLevel: level, ConfigPath: path, ReloadSignal: hup}
	if hold, ok := strings.CutPrefix(os.Getenv(claimPauseEnv), "while:"); ok {
		opts.AfterClaim = func(id string) {
			fmt.Printf("claimed %s\n", id)
			for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				if _, err := os.Stat(hold); err != nil {
					return
				}
			}
		}
	} else if p, err := time.ParseDuration(os.Getenv(claimPauseEnv)); err == nil {
		opts.AfterClaim = func(id string) {
			fmt.Printf("claimed %s\n", id)
			time.Sleep(p)
		}
	}
	return opts, nil
}

// setup writes a config for a daemon on the package's SoftHSM token.
func setup(t *testing.T, storage string) (cfgPath string, prefix string) {
	t.Helper()
	return setupOn(t, hsmtest.Shared(t), storage)
}

// setupOn writes a config for a daemon on softTok.
func setupOn(t *testing.T, softTok hsmtest.Token, storage string) (cfgPath string, prefix string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "kid") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	pinFile := filepath.Join(dir, "pin")
	if err := os.WriteFile(pinFile, []byte(softTok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	prefix = softTok.Prefix + "e2e-" + filepath.Base(dir) + ":"
	cfg := fmt.Sprintf(`
[token]
module = %q
label = %q
pin_file = "pin"
storage = %q
label_prefix = %q
sessions = 4
[keys]
ttl = "1m"
[pool]
size = 4
generators = 1
apply_wait = "20s"
[store]
path = "data/keyissuer.db"
[api]
listen = "127.0.0.1:0"
# Above pool.apply_wait: an apply that waits for a key on a loaded machine
# must not meet the server's write timeout (an EOF to the client).
write_timeout = "30s"
allow_unsigned = true
[decrypt]
socket = "run/decrypt.sock"
[log]
level = "debug"
format = "json"
[admin]
listen = "127.0.0.1:0"
`, softTok.Module, softTok.Label, storage, prefix)
	cfgPath = filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfgPath, prefix
}

type child struct {
	t      *testing.T
	cmd    *exec.Cmd
	stderr *daemontest.SyncBuffer
	claims chan string
	api    string
	socket string
	admin  string // http://host:port of the admin listener
	done   chan error
}

// start runs the daemon and waits until it serves.
func start(t *testing.T, cfgPath string, env ...string) *child {
	t.Helper()
	c := &child{t: t, stderr: &daemontest.SyncBuffer{}, claims: make(chan string, 16), done: make(chan error, 1)}
	// A race-built child otherwise sleeps a second at every clean exit.
	c.cmd = daemontest.Command(cfgPath, append(env, "GORACE=atexit_sleep_ms=0")...)
	c.cmd.Stderr = c.stderr
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if id, ok := strings.CutPrefix(sc.Text(), "claimed "); ok {
				c.claims <- id
			}
		}
	}()
	go func() { c.done <- c.cmd.Wait() }()
	t.Cleanup(func() { c.cmd.Process.Kill(); <-c.done })

	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		for _, line := range strings.Split(c.stderr.String(), "\n") {
			var raw map[string]any
			json.Unmarshal([]byte(line), &raw)
			if raw["msg"] == "serving" {
				c.api, _ = raw["api"].(string)
				c.socket, _ = raw["decrypt_socket"].(string)
				c.admin, _ = raw["admin"].(string)
				return c
			}
		}
		select {
		case err := <-c.done:
			t.Fatalf("daemon exited before serving: %v\n%s", err, c.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("daemon did not start serving:\n%s", c.stderr.String())
	return nil
}

func (c *child) kill() {
	c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
	c.done <- nil // for the cleanup
}

// stop sends SIGTERM and requires a clean exit.
func (c *child) stop() {
	c.t.Helper()
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-c.done:
		c.done <- err
		if err != nil {
			c.t.Errorf("daemon exit: %v\n%s", err, c.stderr.String())
		}
	case <-time.After(30 * time.Second):
		c.t.Fatal("daemon did not stop within 30s of SIGTERM")
	}
}

type publicKeyInfo struct {
	UniqueID, Salt, PublicKey string
}

func (c *child) apply(customerID string) publicKeyInfo {
	c.t.Helper()
	body := `{}`
	if customerID != "" {
		body = fmt.Sprintf(`{"customerId":%q}`, customerID)
	}
	resp, err := http.Post(c.api, "application/json", strings.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Result        struct{ ResultCode, ResultStatus, ResultMessage string }
		PublicKeyInfo publicKeyInfo
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		c.t.Fatal(err)
	}
	if out.Result.ResultCode != "SUCCESS" || out.Result.ResultStatus != "S" {
		c.t.Fatalf("apply: %+v", out.Result)
	}
	return out.PublicKeyInfo
}

func (c *child) socketClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", c.socket)
		},
	}}
}

// decrypt returns the HTTP status, the error code (if any) and the password.
func (c *child) decrypt(id string, ct []byte) (int, string, string, error) {
	body := fmt.Sprintf(`{"uniqueId":%q,"ciphertext":%q}`, id, base64.StdEncoding.EncodeToString(ct))
	resp, err := c.socketClient().Post("http://keyissuer/v1/decrypt", "application/json", strings.NewReader(body))
	if err != nil {
		return 0, "", "", err
	}
	defer resp.Body.Close()
	var out struct {
		Password string
		Error    struct{ Code, Message string }
	}
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &out); err != nil {
		return resp.StatusCode, "", "", fmt.Errorf("bad body %q: %w", b, err)
	}
	pw, _ := base64.StdEncoding.DecodeString(out.Password)
	return resp.StatusCode, out.Error.Code, string(pw), nil
}

func (c *child) getJSON(path string, v any) int {
	c.t.Helper()
	resp, err := c.socketClient().Get("http://keyissuer" + path)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	json.NewDecoder(resp.Body).Decode(v)
	return resp.StatusCode
}

func encryptFor(t *testing.T, k publicKeyInfo, password string) []byte {
	t.Helper()
	der, err := base64.StdEncoding.DecodeString(k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		t.Fatal(err)
	}
	ct, err := hsm.Encrypt(pub.(*rsa.PublicKey), hsm.OAEPSHA256, []byte(password+k.Salt))
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// tokenObjects lists the objects under prefix, from a fresh Token in this
// process: for token storage, once the daemon is gone.
func tokenObjects(t *testing.T, prefix string) map[string]int {
	t.Helper()
	return tokenObjectsOn(t, hsmtest.Shared(t), prefix)
}

// tokenObjectsOn is tokenObjects on softTok.
func tokenObjectsOn(t *testing.T, softTok hsmtest.Token, prefix string) map[string]int {
	t.Helper()
	tok, err := hsm.Open(context.Background(), hsm.Config{
		Module: softTok.Module, TokenLabel: softTok.Label, PIN: softTok.PIN,
		Storage: hsm.StorageToken, LabelPrefix: prefix, Sessions: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	objs, err := tok.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]int{}
	for _, o := range objs {
		ids[o.ID]++
	}
	return ids
}

// TestEndToEnd runs on each token (subtests named by token, then storage).
func TestEndToEnd(t *testing.T) { hsmtest.ForEach(t, testEndToEnd) }

func testEndToEnd(t *testing.T, softTok hsmtest.Token) {
	for _, storage := range []string{"session", "token"} {
		t.Run(storage, func(t *testing.T) {
			cfgPath, prefix := setupOn(t, softTok, storage)
			c := start(t, cfgPath)
			fi, err := os.Stat(c.socket)
			if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
				t.Errorf("socket %s: mode %v, %v; want a 0600 socket", c.socket, fi.Mode(), err)
			}

			k := c.apply("2188000000000042")
			if len(k.UniqueID) != 32 || len(k.Salt) != 12 || !strings.HasPrefix(k.PublicKey, "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA") {
				t.Errorf("publicKeyInfo %+v", k)
			}
			const password = "pässwörd 42"
			ct := encryptFor(t, k, password)
			status, code, pw, err := c.decrypt(k.UniqueID, ct)
			if err != nil || status != 200 || pw != password {
				t.Fatalf("decrypt: %d %s %q %v", status, code, pw, err)
			}
			status, code, _, err = c.decrypt(k.UniqueID, ct)
			if err != nil || status != 410 || code != "KEY_CONSUMED" {
				t.Errorf("second decrypt: %d %s %v; want 410 KEY_CONSUMED", status, code, err)
			}
			var rec map[string]string
			if st := c.getJSON("/v1/keys/"+k.UniqueID, &rec); st != 200 || rec["state"] != "consumed" || rec["customerId"] != "2188000000000042" {
				t.Errorf("key record: %d %v", st, rec)
			}
			var health map[string]any
			if st := c.getJSON("/v1/health", &health); st != 200 || health["outstandingKeys"] != float64(0) {
				t.Errorf("health: %d %v", st, health)
			}

			// A second daemon on the same socket refuses to start, and
			// leaves the first one's socket alone.
			cfg2 := strings.Replace(mustRead(t, cfgPath), `path = "data/keyissuer.db"`, `path = "data2/keyissuer.db"`, 1)
			cfg2Path := filepath.Join(filepath.Dir(cfgPath), "second.toml")
			os.WriteFile(cfg2Path, []byte(cfg2), 0o600)
			second := daemontest.Command(cfg2Path)
			out, err := second.CombinedOutput()
			if err == nil || !strings.Contains(string(out), "another server is answering") {
				t.Errorf("second daemon: %v\n%s", err, out)
			}
			if _, err := os.Stat(c.socket); err != nil {
				t.Errorf("the first daemon's socket is gone: %v", err)
			}

			c.stop()
			if _, err := os.Stat(c.socket); !os.IsNotExist(err) {
				t.Errorf("socket left behind after stop: %v", err)
			}
			// Secrets never reach the log.
			logs := c.stderr.String()
			for name, secret := range map[string]string{"PIN": softTok.PIN, "password": password} {
				if strings.Contains(logs, secret) {
					t.Errorf("the %s appears in the daemon's log", name)
				}
			}
			if !strings.Contains(logs, `"msg":"token open"`) {
				t.Errorf("no start-up log of the token:\n%s", logs)
			}
			if storage == "token" {
				if objs := tokenObjectsOn(t, softTok, prefix); len(objs) != 0 {
					t.Errorf("objects left in the token after stop: %v", objs)
				}
			}
		})
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// The invariant under the worst crash: the daemon is killed with SIGKILL
// after a decrypt has claimed its key and before the token has decrypted.
// After a restart the key must never decrypt, and its objects must be gone.
func TestKill9DuringDecryptTokenStorage(t *testing.T) {
	cfgPath, prefix := setup(t, "token")
	c := start(t, cfgPath, claimPauseEnv+"=1m")
	k := c.apply("")
	other := c.apply("")
	ct := encryptFor(t, k, "first try")

	result := make(chan error, 1)
	go func() {
		_, _, _, err := c.decrypt(k.UniqueID, ct)
		result <- err
	}()
	select {
	case id := <-c.claims:
		if id != k.UniqueID {
			t.Fatalf("claimed %s, want %s", id, k.UniqueID)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the decrypt never claimed its key")
	}
	c.kill()
	if err := <-result; err == nil {
		t.Error("the decrypt in flight answered although the daemon was killed")
	}
	if objs := tokenObjects(t, prefix); objs[k.UniqueID] != 2 {
		t.Fatalf("before restart the claimed key has %d objects, want 2 (the kill came before the decrypt)", objs[k.UniqueID])
	}

	c2 := start(t, cfgPath)
	for _, ct := range [][]byte{ct, encryptFor(t, k, "second try")} {
		status, code, pw, err := c2.decrypt(k.UniqueID, ct)
		if err != nil || status != 410 || code != "KEY_CONSUMED" || pw != "" {
			t.Errorf("decrypt after restart: %d %s %q %v; want 410 KEY_CONSUMED", status, code, pw, err)
		}
	}
	// The other key, untouched by the crash, still decrypts once.
	if status, _, pw, err := c2.decrypt(other.UniqueID, encryptFor(t, other, "ok")); err != nil || status != 200 || pw != "ok" {
		t.Errorf("other key after restart: %d %q %v", status, pw, err)
	}
	c2.stop()
	if objs := tokenObjects(t, prefix); len(objs) != 0 {
		t.Errorf("objects left in the token: %v", objs)
	}
}
