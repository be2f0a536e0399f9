// Package pgtest gives a test binary a real PostgreSQL server: Debian's
// postgresql package, started once per test binary with initdb and pg_ctl
// in a private temporary directory, on a free loopback port, as an
// unprivileged user (PostgreSQL refuses to run as root: a root test binary
// runs it as the postgres system user). Each test gets a fresh database.
//
// A test package opts in from TestMain:
//
//	func TestMain(m *testing.M) { pgtest.Main(m) }
//
//	func TestSomething(t *testing.T) {
//		db := pgtest.NewDatabase(t)
//		// connect with db.DSN and db.Password
//	}
//
// The server starts on the first NewDatabase, so tests that need none cost
// nothing, and stops when the tests end. Without PostgreSQL installed,
// NewDatabase skips the test on a developer's machine and fails it under
// CI=true, where .ci/run installs it.
//
// A program that is not a test (the benchmark) starts its own server with
// [StartDurable], whose commits are flushed as in production.
package pgtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// User is the role tests connect as; its password is [Server.Password].
const User = "keyissuer"

const installHint = "run `apt-get install postgresql` (as root)"

// Database is a fresh, empty database on the test binary's server.
type Database struct {
	Name     string
	DSN      string // libpq key/value form, without the password
	Password string
	Server   *Server
}

// Server is a running PostgreSQL owned by the test binary.
type Server struct {
	Dir      string // the temporary directory: data, socket, log
	Port     int
	Password string

	bin     string // directory of initdb, pg_ctl, postgres
	uid     int    // who runs the server; -1: this process's user
	gid     int
	durable bool // fsync on: commits are flushed, as in production
	mu      sync.Mutex
	down    bool
}

var (
	mu       sync.Mutex
	mainUsed bool
	started  bool
	server   *Server
	startErr error
	seq      int
)

// Main runs the tests and stops the server if one was started. Use it from
// TestMain.
func Main(m *testing.M) { os.Exit(Wrap(m).Run()) }

// Wrap returns m with the server's life around its Run, for a TestMain
// that needs another harness too:
//
//	func TestMain(m *testing.M) { os.Exit(hsmtest.Run(pgtest.Wrap(m))) }
func Wrap(m interface{ Run() int }) interface{ Run() int } { return wrapped{m} }

type wrapped struct{ m interface{ Run() int } }

func (w wrapped) Run() int {
	mu.Lock()
	mainUsed = true
	mu.Unlock()
	code := w.m.Run()
	mu.Lock()
	s := server
	mu.Unlock()
	if s != nil {
		if err := s.stop("immediate"); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: %v\n", err)
		}
		os.RemoveAll(s.Dir)
	}
	return code
}

// Bin returns the directory of Debian's PostgreSQL binaries (the newest
// version installed), or an error saying how to install them. PG_BIN
// overrides it.
func Bin() (string, error) {
	if d := os.Getenv("PG_BIN"); d != "" {
		return d, nil
	}
	ms, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(ms) == 0 {
		return "", errors.New("PostgreSQL not found in /usr/lib/postgresql/*/bin: " + installHint)
	}
	sort.Slice(ms, func(i, j int) bool { return version(ms[i]) < version(ms[j]) })
	return filepath.Dir(ms[len(ms)-1]), nil
}

func version(initdb string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(initdb))))
	return n
}

// unavailable skips t on a developer's machine and fails it under CI.
func unavailable(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("pgtest: %v", err)
	}
	t.Skipf("pgtest: %v", err)
}

// Get returns the test binary's server, starting it on first use.
func Get(t testing.TB) *Server {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if !mainUsed {
		t.Fatal("pgtest: call pgtest.Main from TestMain, so the server is stopped when the tests end")
	}
	if !started {
		started = true
		server, startErr = start(false)
	}
	if startErr != nil {
		if errors.Is(startErr, ErrNotInstalled) {
			unavailable(t, startErr)
		}
		t.Fatalf("pgtest: %v", startErr)
	}
	return server
}

// ErrNotInstalled is wrapped by [StartDurable]'s error when Debian's
// PostgreSQL is not installed.
var ErrNotInstalled = errors.New("not installed")

// StartDurable starts a server outside a test, for a program such as the
// benchmark, in a new temporary directory. Unlike the tests' server it
// flushes its commits (fsync on, synchronous_commit on), so a commit costs
// what it costs in production. Close stops it and removes its directory.
func StartDurable() (*Server, error) { return start(true) }

// Close stops a server from [StartDurable] and removes its directory.
func (s *Server) Close() error {
	err := s.stop("fast")
	os.RemoveAll(s.Dir)
	return err
}

// NewDatabase creates a fresh database on the test binary's server.
func NewDatabase(t testing.TB) Database {
	t.Helper()
	s := Get(t)
	mu.Lock()
	seq++
	name := fmt.Sprintf("test_%d", seq)
	mu.Unlock()
	db, err := s.CreateDatabase(name)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return db
}

// CreateDatabase creates an empty database called name on the server.
func (s *Server) CreateDatabase(name string) (Database, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := pgx.Connect(ctx, s.dsn("postgres")+" password="+s.Password)
	if err != nil {
		return Database{}, fmt.Errorf("failed to connect: %w", err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return Database{}, fmt.Errorf("failed to create database %s: %w", name, err)
	}
	return Database{Name: name, DSN: s.dsn(name), Password: s.Password, Server: s}, nil
}

func (s *Server) dsn(db string) string {
	return fmt.Sprintf("host=127.0.0.1 port=%d user=%s dbname=%s sslmode=disable connect_timeout=5", s.Port, User, db)
}

// start initialises a cluster in a new temporary directory and starts it.
func start(durable bool) (*Server, error) {
	bin, err := Bin()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotInstalled, err)
	}
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		return nil, err
	}
	s := &Server{Dir: dir, bin: bin, uid: -1, gid: -1, durable: durable}
	if err := s.init(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := s.run(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

func (s *Server) init() error {
	if os.Geteuid() == 0 {
		// PostgreSQL refuses root: run it as the postgres system user.
		u, err := user.Lookup("postgres")
		if err != nil {
			return fmt.Errorf("running as root, and no postgres user to run PostgreSQL as (%v): %s", err, installHint)
		}
		s.uid, _ = strconv.Atoi(u.Uid)
		s.gid, _ = strconv.Atoi(u.Gid)
	}
	pw := make([]byte, 16)
	rand.Read(pw)
	s.Password = hex.EncodeToString(pw)
	if err := os.WriteFile(filepath.Join(s.Dir, "pwfile"), []byte(s.Password+"\n"), 0o600); err != nil {
		return err
	}
	if err := os.Mkdir(filepath.Join(s.Dir, "sock"), 0o700); err != nil {
		return err
	}
	if s.uid >= 0 {
		for _, p := range []string{s.Dir, filepath.Join(s.Dir, "pwfile"), filepath.Join(s.Dir, "sock")} {
			if err := os.Chown(p, s.uid, s.gid); err != nil {
				return err
			}
		}
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	s.Port = port
	out, err := s.command("initdb", "-D", filepath.Join(s.Dir, "data"), "-U", User,
		"--pwfile="+filepath.Join(s.Dir, "pwfile"), "--auth-local=trust", "--auth-host=scram-sha-256",
		"-E", "UTF8", "--locale=C", "--no-sync").CombinedOutput()
	if err != nil {
		return fmt.Errorf("initdb failed: %v\n%s", err, out)
	}
	return nil
}

// freePort asks the kernel for a free loopback port.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// command runs a PostgreSQL binary as the server's user.
func (s *Server) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.bin, name), args...)
	cmd.Dir = s.Dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if s.uid >= 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(s.uid), Gid: uint32(s.gid)}}
	}
	return cmd
}

// run starts the server and waits until it accepts connections.
func (s *Server) run() error {
	fsync := "fsync=off" // a test server: a crash loses nothing a test needs
	if s.durable {
		fsync = "fsync=on"
	}
	opts := strings.Join([]string{
		"-p", strconv.Itoa(s.Port),
		"-k", filepath.Join(s.Dir, "sock"),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "max_connections=200",
		"-c", fsync,
		"-c", "synchronous_commit=on",
		"-c", "shared_buffers=32MB",
	}, " ")
	cmd := s.command("pg_ctl", "-D", filepath.Join(s.Dir, "data"), "-l", filepath.Join(s.Dir, "log"),
		"-o", opts, "-w", "-t", "60", "start")
	// pg_ctl leaves the server running in the background: it must not hold
	// the test's output pipes.
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		log, _ := os.ReadFile(filepath.Join(s.Dir, "log"))
		return fmt.Errorf("pg_ctl start failed: %v\n%s\n%s", err, out.Bytes(), log)
	}
	s.mu.Lock()
	s.down = false
	s.mu.Unlock()
	return nil
}

func (s *Server) stop(mode string) error {
	out, err := s.command("pg_ctl", "-D", filepath.Join(s.Dir, "data"), "-m", mode, "-w", "-t", "60", "stop").CombinedOutput()
	if err != nil {
		return fmt.Errorf("pg_ctl stop failed: %v\n%s", err, out)
	}
	s.mu.Lock()
	s.down = true
	s.mu.Unlock()
	return nil
}

// Stop stops the server at once (immediate mode: connections are cut, as
// when the host fails), for tests of an outage. Start brings it back on the
// same port with its data.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	if err := s.stop("immediate"); err != nil {
		t.Fatal(err)
	}
}

// Start starts a server stopped by Stop.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	if err := s.run(); err != nil {
		t.Fatal(err)
	}
}
