package reliability

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
	"github.com/keyissuer/keyissuer/server/daemon/internal/daemontest"
)

// The child: this test binary re-executed as keyissuerd, with fault points
// set from its environment.

const (
	crashEnv  = "KEYISSUERD_CRASH"  // point:nth:jitter: SIGKILL itself there
	ledgerEnv = "KEYISSUERD_LEDGER" // file noting every decrypt that reaches the token
	pauseEnv  = "KEYISSUERD_PAUSE"  // point:dir: wait there while dir/pause-<id> exists
)

func TestMain(m *testing.M) { daemontest.Main(m, childOptions) }

// childOptions are keyissuerd's with the fault points of faultsFromEnv.
// The child logs JSON at debug level, the most talkative, so that the
// secret scans see everything the daemon could ever log.
func childOptions(_ string, _ config.Config) (daemon.Options, error) {
	f, err := faultsFromEnv()
	if err != nil {
		return daemon.Options{}, err
	}
	return daemon.Options{
		Log:        slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})),
		AfterClaim: func(string) { f.crash.at("claim") },
		WrapToken:  func(t issuer.Token) issuer.Token { return &faultToken{Token: t, f: f} },
		WrapStore:  func(s issuer.Store) issuer.Store { return &faultStore{Store: s, f: f} },
		AfterAudit: func(e issuer.Event) {
			if e.Kind == issuer.EventDecrypt {
				f.crash.at("audited") // the decrypt's audit line is durable, the answer not written
			}
		},
	}, nil
}

// faults are the child's fault points.
type faults struct {
	crash     *crashPlan
	ledger    *os.File // nil: no ledger
	pausePt   string
	resumeDir string
}

func faultsFromEnv() (*faults, error) {
	f := &faults{}
	if v := os.Getenv(crashEnv); v != "" {
		p, err := parseCrashPlan(v)
		if err != nil {
			return nil, err
		}
		f.crash = p
	}
	if path := os.Getenv(ledgerEnv); path != "" {
		l, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, err
		}
		f.ledger = l
	}
	if v := os.Getenv(pauseEnv); v != "" {
		pt, dir, ok := strings.Cut(v, ":")
		if !ok {
			return nil, fmt.Errorf("%s=%q: want point:dir", pauseEnv, v)
		}
		f.pausePt, f.resumeDir = pt, dir
	}
	return f, nil
}

// note appends a line to the ledger in one write(2): O_APPEND keeps lines
// whole, and the page cache keeps them when the process is killed. A
// ledger that cannot be written ends the child at once, loudly: the
// parent's checks trust it, and an unplanned death fails them.
func (f *faults) note(format string, args ...any) {
	if f.ledger == nil {
		return
	}
	line := fmt.Sprintf(format, args...) + "\n"
	if n, err := f.ledger.WriteString(line); err != nil || n != len(line) {
		fmt.Fprintf(os.Stderr, "LEDGER WRITE FAILED (%d of %d bytes): %v\n", n, len(line), err)
		os.Exit(70)
	}
}

// pause stops the caller at point while the file resumeDir/pause-<id>
// exists, telling the parent on stdout.
func (f *faults) pause(point, id string) {
	if f.pausePt != point {
		return
	}
	hold := filepath.Join(f.resumeDir, "pause-"+id)
	if _, err := os.Stat(hold); err != nil {
		return
	}
	os.Stdout.WriteString("paused " + point + " " + id + "\n")
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(hold); err != nil {
			return
		}
	}
}

// crashPlan kills the process with SIGKILL at the nth visit of a fault
// point: at once, or after a jitter while the work goes on, so that the
// kill lands inside the operation.
type crashPlan struct {
	point  string
	nth    int64
	jitter time.Duration
	seen   atomic.Int64
}

func parseCrashPlan(v string) (*crashPlan, error) {
	parts := strings.Split(v, ":")
	if len(parts) != 3 {
		return nil, fmt.Errorf("%s=%q: want point:nth:jitter", crashEnv, v)
	}
	nth, err := strconv.ParseInt(parts[1], 10, 64)
	if err != nil {
		return nil, err
	}
	jitter, err := time.ParseDuration(parts[2])
	if err != nil {
		return nil, err
	}
	return &crashPlan{point: parts[0], nth: nth, jitter: jitter}, nil
}

func (p *crashPlan) at(point string) {
	if p == nil || point != p.point || p.seen.Add(1) != p.nth {
		return
	}
	// The parent learns that the death is planned before it happens.
	os.Stdout.WriteString("crash " + point + "\n")
	if p.jitter == 0 {
		die()
	}
	go func() {
		time.Sleep(p.jitter)
		die()
	}()
}

func die() {
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // SIGKILL cannot be caught; nothing runs after it
}

// faultToken wraps the daemon's token with fault points and the ledger.
type faultToken struct {
	issuer.Token
	f *faults
}

// Rescan passes through, as Find.
func (t *faultToken) Rescan(ctx context.Context) error {
	return t.Token.(interface{ Rescan(context.Context) error }).Rescan(ctx)
}

// Find passes through: cluster mode finds neighbours' keys with it.
func (t *faultToken) Find(ctx context.Context, id string) (*hsm.Key, error) {
	return t.Token.(interface {
		Find(context.Context, string) (*hsm.Key, error)
	}).Find(ctx, id)
}

func (t *faultToken) Generate(ctx context.Context, id string) (*hsm.Key, error) {
	t.f.crash.at("generate")
	return t.Token.Generate(ctx, id)
}

// Decrypt notes each attempt before it reaches the token and its outcome
// after: an attempt without an outcome was cut short by a kill, and counts
// as a decrypt.
func (t *faultToken) Decrypt(ctx context.Context, k *hsm.Key, p hsm.Padding, ct []byte) ([]byte, error) {
	t.f.crash.at("decrypt")
	t.f.note("begin %s", k.ID)
	pt, err := t.Token.Decrypt(ctx, k, p, ct)
	outcome := "ok"
	switch {
	case err == nil:
	case errors.Is(err, hsm.ErrUnavailable):
		outcome = "unavailable" // nothing was decrypted; the key is given back
	default:
		outcome = "failed"
	}
	t.f.note("end %s %s", k.ID, outcome)
	if err == nil {
		t.f.crash.at("decrypted")
		t.f.pause("decrypted", k.ID)
	}
	return pt, err
}

func (t *faultToken) Destroy(ctx context.Context, k *hsm.Key) error {
	t.f.crash.at("destroy")
	err := t.Token.Destroy(ctx, k)
	if err == nil {
		t.f.crash.at("destroyed")
	}
	return err
}

func (t *faultToken) DestroyObject(ctx context.Context, o hsm.Object) error {
	t.f.crash.at("reconcile")
	return t.Token.DestroyObject(ctx, o)
}

// faultStore wraps the daemon's record store with fault points: "create",
// "to-<state>" for each transition, "settle-<state>" for each settled one.
type faultStore struct {
	issuer.Store
	f *faults
}

func (s *faultStore) Create(ctx context.Context, r store.Record) error {
	s.f.crash.at("create")
	return s.Store.Create(ctx, r)
}

// Settle queues a record's last move and returns at once: "settle-<state>"
// arms the kill as it is queued, so that it lands around its commit.
func (s *faultStore) Settle(id string, from, to store.State, at time.Time) {
	s.f.crash.at("settle-" + string(to))
	s.Store.Settle(id, from, to, at)
}

func (s *faultStore) Transition(ctx context.Context, id string, from, to store.State, at time.Time) (store.Record, error) {
	s.f.crash.at("to-" + string(to))
	return s.Store.Transition(ctx, id, from, to, at)
}
