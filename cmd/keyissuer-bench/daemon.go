package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// daemonSpec is one keyissuerd configuration the benchmark runs.
type daemonSpec struct {
	Name       string // also the label prefix and the directory name
	Storage    string // session or token
	PoolSize   int
	Generators int
	StorePath  string // "" for a fresh store in the daemon's directory
	Profile    bool   // run the pprof build and serve profiles on loopback
	// Postgres, when set, is the record store instead of bbolt (with token
	// storage, as cluster mode requires); the instances of a cluster share
	// it, and their Prefix, and each has its own InstanceID.
	Postgres   *pgDatabase
	Prefix     string // token.label_prefix without the colon; "" for Name
	InstanceID string
}

// daemon is a keyissuerd child process.
type daemon struct {
	spec      daemonSpec
	dir       string
	cmd       *exec.Cmd
	exited    chan struct{}
	exitErr   error
	logPath   string
	apiURL    string
	socket    string
	pprofURL  string
	client    *apiClient   // the registered merchant client
	api       *http.Client // TCP, keep-alive, room for 64+ connections
	sock      *http.Client // the decrypt socket
	StartedIn time.Duration
}

// startDaemon writes the daemon's configuration, starts it and waits until
// it answers on its socket (the token is open and reconciliation is done).
func (b *bench) startDaemon(ctx context.Context, spec daemonSpec) (*daemon, error) {
	b.seq++
	dir := filepath.Join(b.tmp, fmt.Sprintf("%02d-%s", b.seq, spec.Name))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	adminPort, err := freePort()
	if err != nil {
		return nil, err
	}
	d := &daemon{
		client:  b.client,
		spec:    spec,
		dir:     dir,
		exited:  make(chan struct{}),
		logPath: filepath.Join(b.logDir, fmt.Sprintf("%02d-%s.log", b.seq, spec.Name)),
		apiURL:  "http://127.0.0.1:" + strconv.Itoa(port) + applyPath,
		socket:  filepath.Join(dir, "decrypt.sock"),
	}
	storePath := spec.StorePath
	if storePath == "" {
		storePath = filepath.Join(dir, "keyissuer.db")
	}
	storage := spec.Storage
	if storage == "" {
		storage = "session"
	}
	prefix := spec.Prefix
	if prefix == "" {
		prefix = spec.Name
	}
	storeConf := fmt.Sprintf("path = %q\n", storePath)
	if pg := spec.Postgres; pg != nil {
		storage = "token"
		storeConf += fmt.Sprintf("backend = \"postgres\"\ndsn = %q\npassword_file = %q\n\n[cluster]\ninstance_id = %q\n",
			pg.DSN, pg.PasswordFile, spec.InstanceID)
	}
	clientKey, err := x509.MarshalPKIXPublicKey(&b.client.key.PublicKey)
	if err != nil {
		return nil, err
	}
	// The production settings of the merchant API: a registered client
	// whose requests are signed, answers signed by the key in the token,
	// the audit trail fsync'd before each answer. Only the rate limits and
	// quotas are lifted, as the benchmark is the flood they exist for.
	conf := fmt.Sprintf(`# written by keyissuer-bench
[token]
module = %q
label = %q
pin_file = %q
storage = %q
label_prefix = %q
sessions = %d

[keys]
bits = %d
ttl = "2h"

[pool]
size = %d
generators = %d
apply_wait = "60s"

[store]
%s
[api]
listen = "127.0.0.1:%d"
signing_key_label = %q

[decrypt]
socket = %q

[admin]
listen = "127.0.0.1:%d"

[audit]
path = %q

[log]
level = "info"
format = "json"

[limits]
rate = 1000000.0
burst = 10000000
max_outstanding = 10000000
max_outstanding_per_customer = 1000
address_rate = 1000000.0
address_burst = 10000000
unverified_rate = 1000000.0
unverified_burst = 10000000

[[clients]]
id = %q
public_keys = { "1" = %q }
rate = 1000000.0
burst = 10000000
`, b.hsm.Module, b.hsm.Label, b.hsm.PINFile, storage, prefix+":", max(8, spec.Generators+2),
		keyBits, spec.PoolSize, spec.Generators, storeConf, port, signingLabel, d.socket, adminPort,
		filepath.Join(dir, "audit.jsonl"), b.client.id, base64.StdEncoding.EncodeToString(clientKey))
	confPath := filepath.Join(dir, "keyissuerd.toml")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(d.logPath)
	if err != nil {
		return nil, err
	}
	bin := b.daemonBin
	if spec.Profile {
		bin = b.pprofBin
		pport, err := freePort()
		if err != nil {
			logf.Close()
			return nil, err
		}
		d.pprofURL = "http://127.0.0.1:" + strconv.Itoa(pport)
	}
	d.cmd = exec.Command(bin, "-config", confPath)
	d.cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+b.hsm.Conf)
	if d.pprofURL != "" {
		d.cmd.Env = append(d.cmd.Env, "KEYISSUERD_PPROF="+strings.TrimPrefix(d.pprofURL, "http://"))
	}
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	start := time.Now()
	if err := d.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("failed to start %s: %w", bin, err)
	}
	go func() {
		d.exitErr = d.cmd.Wait()
		logf.Close()
		close(d.exited)
	}()
	d.api = &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{
			MaxIdleConns:        256,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     time.Minute,
		},
	}
	d.sock = &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var dl net.Dialer
				return dl.DialContext(ctx, "unix", d.socket)
			},
			MaxIdleConns:        256,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     time.Minute,
		},
	}
	// Opening a store of a million records takes a while: be patient.
	deadline := time.Now().Add(10 * time.Minute)
	for {
		if _, err := d.health(ctx); err == nil {
			break
		}
		select {
		case <-d.exited:
			return nil, fmt.Errorf("keyissuerd %s exited at start-up (%v); its log: %s\n%s", spec.Name, d.exitErr, d.logPath, tail(d.logPath, 15))
		case <-ctx.Done():
			d.stop()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.stop()
			return nil, fmt.Errorf("keyissuerd %s did not answer within 10 minutes; its log: %s", spec.Name, d.logPath)
		}
	}
	d.StartedIn = time.Since(start)
	b.daemons = append(b.daemons, d)
	return d, nil
}

// stop ends the daemon with SIGTERM, as an operator would, and waits for it
// to destroy its pooled keys and exit.
func (d *daemon) stop() error {
	select {
	case <-d.exited:
		return nil
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(2 * time.Minute):
		d.cmd.Process.Kill()
		<-d.exited
		return fmt.Errorf("keyissuerd %s did not stop within 2 minutes; killed", d.spec.Name)
	}
	d.api.CloseIdleConnections()
	d.sock.CloseIdleConnections()
	return nil
}

type health struct {
	Status          string `json:"status"`
	TokenReady      bool   `json:"tokenReady"`
	PoolReady       int    `json:"poolReady"`
	PoolSize        int    `json:"poolSize"`
	OutstandingKeys int    `json:"outstandingKeys"`
	PendingDestroys int    `json:"pendingDestroys"`
}

func (d *daemon) health(ctx context.Context) (health, error) {
	var h health
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://keyissuerd/v1/health", nil)
	resp, err := d.sock.Do(req)
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return h, fmt.Errorf("health: HTTP %d", resp.StatusCode)
	}
	return h, json.NewDecoder(resp.Body).Decode(&h)
}

// waitPool waits, untimed, until the daemon's pool is full, so that no key
// generation runs during the next timed run. It prints progress.
func (b *bench) waitPool(ctx context.Context, ds ...*daemon) error {
	start := time.Now()
	lastPrint := start
	var first int = -1
	for {
		ready, size := 0, 0
		for _, d := range ds {
			h, err := d.health(ctx)
			if err != nil {
				select {
				case <-d.exited:
					return fmt.Errorf("keyissuerd %s exited (%v); its log: %s\n%s", d.spec.Name, d.exitErr, d.logPath, tail(d.logPath, 15))
				default:
				}
				return err
			}
			ready += h.PoolReady
			size += h.PoolSize
		}
		if first < 0 {
			first = ready
		}
		if ready >= size {
			if time.Since(start) > 2*time.Second {
				b.progress("  pool full: %d keys (%.0fs, %.1f keys/s)", size, time.Since(start).Seconds(),
					float64(ready-first)/time.Since(start).Seconds())
			}
			return nil
		}
		if time.Since(lastPrint) >= 10*time.Second {
			lastPrint = time.Now()
			rate := float64(ready-first) / time.Since(start).Seconds()
			eta := "?"
			if rate > 0 {
				eta = fmt.Sprintf("~%.0fs left", float64(size-ready)/rate)
			}
			b.progress("  filling pool (untimed): %d/%d keys, %.1f keys/s, %s", ready, size, rate, eta)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Since(start) > 60*time.Minute {
			return errors.New("the pool did not fill within an hour")
		}
	}
}

// peakRSS is VmHWM of the daemon's process, in bytes.
func (d *daemon) peakRSS() (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", d.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmHWM in /proc/<pid>/status")
}

// paddingMethod reads how the daemon said it performs its padding: "raw"
// (CKM_RSA_X_509 and decoding in the daemon) or "native".
func (d *daemon) paddingMethod() string {
	b, _ := os.ReadFile(d.logPath)
	for line := range bytes.Lines(b) {
		var l struct {
			Msg      string            `json:"msg"`
			Method   string            `json:"padding_method"`
			Paddings map[string]string `json:"paddings"`
		}
		if json.Unmarshal(line, &l) == nil && l.Msg == "token open" {
			if m, ok := l.Paddings["oaep-sha256"]; ok {
				return m
			}
			return l.Method
		}
	}
	return ""
}

// cpuProfile starts a CPU profile at hz in a pprof build of the daemon;
// the returned function stops it and writes it to path.
func (d *daemon) cpuProfile(ctx context.Context, hz int, path string) (func() error, error) {
	if d.pprofURL == "" {
		return nil, errors.New("not a profiling daemon")
	}
	resp, err := d.api.Post(d.pprofURL+"/debug/cpu/start?hz="+strconv.Itoa(hz), "", nil)
	if err != nil {
		return nil, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("start profile: HTTP %d", resp.StatusCode)
	}
	return func() error {
		resp, err := d.api.Post(d.pprofURL+"/debug/cpu/stop", "", nil)
		if err != nil {
			return err
		}
		return save(resp, "stop profile", path)
	}, nil
}

// trace writes an execution trace of the next d of the daemon (a pprof
// build) to path.
func (d *daemon) trace(ctx context.Context, span time.Duration, path string) error {
	if d.pprofURL == "" {
		return errors.New("not a profiling daemon")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet,
		fmt.Sprintf("%s/debug/pprof/trace?seconds=%g", d.pprofURL, span.Seconds()), nil)
	if err != nil {
		return err
	}
	resp, err := d.api.Do(req)
	if err != nil {
		return err
	}
	return save(resp, "trace", path)
}

// save writes the body of resp, which must be a 200, to path, and closes it.
func save(resp *http.Response, what, path string) error {
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: HTTP %d", what, resp.StatusCode)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
