// Package daemontest runs keyissuerd as a child process in the tests of
// server/daemon and its packages: the test binary, re-executed by
// [Command], serves as the daemon, with the test hooks its package sets in
// [daemon.Options], so that a test can kill it and start it again as an
// operator or a crash would. Each package keeps its own side of the
// parent: what it reads of the child and how it waits for it.
//
//	func TestMain(m *testing.M) {
//		daemontest.Main(m, func(path string, cfg config.Config) (daemon.Options, error) {
//			return daemon.Options{Log: ...}, nil
//		})
//	}
package daemontest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"testing"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer/store/pgtest"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
)

// childEnv carries the config file's path to a re-executed test binary:
// set, [Main] runs the daemon instead of the tests.
const childEnv = "KEYISSUERD_TEST_CHILD"

// Main is TestMain for a package that starts children: in a child it runs
// the daemon until SIGINT or SIGTERM and exits with 1 if it failed, and
// otherwise runs the tests with [hsmtest.Main], and a PostgreSQL from
// [pgtest] for the tests that ask for one. options builds the child's
// daemon.Options from the config file's path and contents; it must set Log.
func Main(m *testing.M, options func(path string, cfg config.Config) (daemon.Options, error)) {
	if path := os.Getenv(childEnv); path != "" {
		os.Exit(runChild(path, options))
	}
	os.Exit(hsmtest.Run(pgtest.Wrap(m)))
}

// runChild is keyissuerd's main, with the package's options.
func runChild(path string, options func(string, config.Config) (daemon.Options, error)) int {
	cfg, err := config.Load(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	opts, err := options(path, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	d, err := daemon.New(ctx, cfg, opts)
	if err != nil {
		opts.Log.Error("start failed", "err", err)
		return 1
	}
	if err := d.Run(ctx); err != nil {
		opts.Log.Error("run failed", "err", err)
		return 1
	}
	return 0
}

// Command returns the command that runs the test binary as the daemon on
// the config file at cfgPath, with env added to this process's environment.
// The test binary's TestMain must call [Main].
func Command(cfgPath string, env ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), append(env, childEnv+"="+cfgPath)...)
	return cmd
}

// SyncBuffer is a bytes.Buffer safe for concurrent use: a child's stderr,
// which os/exec writes while the test reads it.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
