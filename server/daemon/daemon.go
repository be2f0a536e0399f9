// Package daemon wires keyissuerd together from its configuration: the
// token, the record store, the issuer, the public API listener and the
// decrypt socket; and runs them until its context ends.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/decryptapi"
	"github.com/keyissuer/keyissuer/server/peercred"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// Options carry what is not in the configuration file.
type Options struct {
	Log *slog.Logger
	// AfterClaim is passed to [issuer.Config.AfterClaim]: tests only.
	AfterClaim func(uniqueID string)
	// WrapToken and WrapStore, if set, wrap the token and the record store
	// that the issuer uses, reconciliation included: tests only, to inject
	// faults and to crash at chosen instants (server/daemon/reliability).
	WrapToken func(issuer.Token) issuer.Token
	WrapStore func(issuer.Store) issuer.Store
	// AfterAudit, if set, runs after the daemon has counted and audited
	// each of the issuer's events (for a decrypt: its line is durable, the
	// answer not yet written): tests only, to crash at that instant.
	AfterAudit func(issuer.Event)
	// ShutdownTimeout bounds the wait for requests in flight (default 10s).
	ShutdownTimeout time.Duration

	// Operations (ops.go). LogLevel, if set, is the level [Daemon.Reload]
	// changes. Each value on ReloadSignal (SIGHUP) reloads ConfigPath.
	// Console, if set, is the terminal the log writes to: it shows the
	// warm-up progress and what to try. Now is the issuer's clock (tests).
	LogLevel     *slog.LevelVar
	ConfigPath   string
	ReloadSignal <-chan os.Signal
	Console      *Console
	Now          func() time.Time
}

// Daemon is a wired keyissuerd, ready to Run.
type Daemon struct {
	cfg    config.Config
	opts   Options
	log    *slog.Logger
	token  *hsm.Token
	store  *store.Bolt
	issuer *issuer.Issuer

	apiLn, sockLn net.Listener
	sockMade      bool // the socket file is ours to remove

	access access // clients, response signing, blocklist (access.go)

	ops *ops // admin listener, metrics, audit trail (ops.go)
}

// New binds the listeners, opens the token and the store, and reconciles
// them. Nothing is served until Run.
func New(ctx context.Context, cfg config.Config, opts Options) (*Daemon, error) {
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.ShutdownTimeout == 0 {
		opts.ShutdownTimeout = 10 * time.Second
	}
	d := &Daemon{cfg: cfg, opts: opts, log: opts.Log}
	if err := d.open(ctx); err != nil {
		d.close()
		return nil, err
	}
	return d, nil
}

func (d *Daemon) open(ctx context.Context) error {
	cfg := d.cfg

	pin, err := cfg.Token.ReadPIN()
	if err != nil {
		return err
	}
	// Listeners first: a second daemon pointed at the same socket must stop
	// here, before its reconciliation destroys the first one's keys.
	mode, _ := cfg.SocketMode()
	gid, err := cfg.SocketGroup()
	if err != nil {
		return fmt.Errorf("decrypt.group: %w", err)
	}
	if d.sockLn, err = ListenUnix(cfg.Decrypt.Socket, mode, gid); err != nil {
		return err
	}
	d.sockMade = true
	if d.apiLn, err = net.Listen("tcp", cfg.API.Listen); err != nil {
		return fmt.Errorf("failed to listen on api.listen %s: %w", cfg.API.Listen, err)
	}
	if err := d.openOps(); err != nil {
		return err
	}
	var is atomic.Pointer[issuer.Issuer]
	d.token, err = hsm.Open(ctx, hsm.Config{
		Module:      cfg.Token.Module,
		TokenLabel:  cfg.Token.Label,
		TokenSerial: cfg.Token.Serial,
		PIN:         pin,
		Storage:     hsm.Storage(cfg.Token.Storage),
		LabelPrefix: cfg.Token.LabelPrefix,
		KeyBits:     cfg.Keys.Bits,
		Sessions:    cfg.Token.Sessions,
		Paddings:    cfg.Paddings(),
		OnLost: func(ids []string) {
			if i := is.Load(); i != nil {
				i.KeysLost(ids)
			}
		},
		Log: d.log,
	})
	if err != nil {
		return fmt.Errorf("failed to open token: %w", err)
	}
	info := d.token.Info()
	// Each padding with how the token does it: native, or raw RSA and
	// the daemon's own constant-time decoding.
	var methods []any
	for _, p := range cfg.Paddings() {
		methods = append(methods, slog.String(string(p), string(info.Methods[p])))
	}
	d.log.Info("token open", "label", info.Label, "serial", info.Serial, "model", info.Model,
		"manufacturer", info.Manufacturer, "storage", info.Storage, "key_bits", info.KeyBits,
		"padding_default", cfg.Keys.Paddings[0], slog.Group("paddings", methods...),
		"layout", cfg.Keys.Layout)
	d.started()

	d.store, err = store.Open(cfg.Store.Path, store.Options{CommitDelay: cfg.Store.CommitDelay})
	if err != nil {
		return err
	}
	var (
		tok issuer.Token = d.token
		st  issuer.Store = d.ops.metrics.Store(d.store) // timed
	)
	if d.opts.WrapToken != nil {
		tok = d.opts.WrapToken(tok)
	}
	if d.opts.WrapStore != nil {
		st = d.opts.WrapStore(st)
	}
	d.issuer, err = issuer.New(issuer.Config{
		Token:        tok,
		Store:        st,
		Storage:      hsm.Storage(cfg.Token.Storage),
		Paddings:     cfg.Paddings(),
		Layout:       issuer.Layout(cfg.Keys.Layout),
		Log:          d.log,
		TTL:          cfg.Keys.TTL,
		PoolSize:     cfg.Pool.Size,
		Generators:   cfg.Pool.Generators,
		ApplyWait:    cfg.Pool.ApplyWait,
		Retention:    cfg.Keys.Retention,
		ReapInterval: cfg.Keys.ReapInterval,
		AfterClaim:   d.opts.AfterClaim,
		OnEvent:      d.onIssuerEvent, // metrics and audit
		Now:          d.opts.Now,
	})
	if err != nil {
		return err
	}
	is.Store(d.issuer)
	// Records and token must agree before any request is served.
	if err := d.issuer.Reconcile(ctx); err != nil {
		return fmt.Errorf("failed to reconcile token and records: %w", err)
	}
	if err := d.openAccess(ctx); err != nil {
		return err
	}

	return nil
}

// APIAddr is the public API's bound address (useful with port 0).
func (d *Daemon) APIAddr() string { return d.apiLn.Addr().String() }

// Issuer is the daemon's issuer, for tests and status.
func (d *Daemon) Issuer() *issuer.Issuer { return d.issuer }

// Token is the daemon's token, for tests and status.
func (d *Daemon) Token() *hsm.Token { return d.token }

// Run serves until ctx is done, then stops accepting, finishes requests in
// flight within the shutdown timeout, destroys the pool's keys, and closes
// the token and the store.
func (d *Daemon) Run(ctx context.Context) error {
	defer d.close()
	api := &http.Server{
		Handler:           d.instrument(listenerPublic, http.MaxBytesHandler(d.ops.public.set(d.publicHandler()), d.cfg.API.MaxBodyBytes)),
		ReadHeaderTimeout: d.cfg.API.ReadTimeout,
		ReadTimeout:       d.cfg.API.ReadTimeout,
		WriteTimeout:      d.cfg.API.WriteTimeout,
		IdleTimeout:       d.cfg.API.IdleTimeout,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
	sock := &http.Server{
		Handler: d.instrument(listenerSocket, decryptapi.New(d.issuer, decryptapi.Config{
			Log:                d.log,
			Peers:              peercred.Policy{UIDs: d.cfg.Decrypt.AllowedUIDs, GIDs: d.cfg.Decrypt.AllowedGIDs},
			AllowClientPadding: d.cfg.Decrypt.AllowClientPadding,
		})),
		ConnContext:       peercred.ConnContext, // who is calling, from the kernel
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
	issuerCtx, stopIssuer := context.WithCancel(context.WithoutCancel(ctx))
	defer stopIssuer()
	issuerDone := make(chan struct{})
	go func() {
		defer close(issuerDone)
		d.issuer.Run(issuerCtx)
	}()

	d.log.Info("serving", "api", "http://"+d.APIAddr()+publicapi.ApplyPath, "decrypt_socket", d.cfg.Decrypt.Socket,
		"admin", "http://"+d.AdminAddr())
	opsCtx, stopOps := context.WithCancel(ctx)
	opsDone := make(chan struct{})
	go func() {
		defer close(opsDone)
		d.runOps(opsCtx)
	}()
	g, gctx := errgroup.WithContext(ctx)
	for _, s := range []struct {
		srv *http.Server
		ln  net.Listener
	}{{api, d.apiLn}, {sock, d.sockLn}} {
		g.Go(func() error {
			if err := s.srv.Serve(s.ln); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	g.Go(func() error { d.watchBlocklist(gctx); return nil })
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.opts.ShutdownTimeout)
		defer cancel()
		return errors.Join(api.Shutdown(sctx), sock.Shutdown(sctx))
	})
	err := g.Wait()
	stopOps()
	<-opsDone
	d.log.Info("stopping: destroying pooled keys")
	stopIssuer()
	<-issuerDone
	d.sockLn, d.apiLn = nil, nil // closed by Shutdown
	return err
}

func (d *Daemon) close() {
	for _, ln := range []net.Listener{d.apiLn, d.sockLn} {
		if ln != nil {
			ln.Close()
		}
	}
	if d.token != nil {
		d.token.Close()
	}
	if d.store != nil {
		d.store.Close()
	}
	d.closeOps()
	if d.sockMade {
		os.Remove(d.cfg.Decrypt.Socket)
	}
}

// ListenUnix listens on a Unix socket at path with the given mode and, if
// gid is not -1, group. It refuses to start when a live server answers
// there, removes only a stale socket file, and never removes anything that
// is not a socket. A directory it has to create gets mode 0750 and the same
// group, so that the group can reach the socket.
func ListenUnix(path string, mode os.FileMode, gid int) (net.Listener, error) {
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); os.IsNotExist(err) {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("failed to create socket directory: %w", err)
		}
		if err := os.Chown(dir, -1, gid); err != nil {
			return nil, fmt.Errorf("failed to give socket directory %s group %d: %w", dir, gid, err)
		}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("decrypt.socket %s exists and is not a socket; refusing to remove it", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("decrypt.socket %s: another server is answering there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("failed to remove stale socket %s: %w", path, err)
		}
	}
	// The socket is born with the umask's permissions: keep them closed
	// until the chmod below.
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("failed to listen on decrypt.socket %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false) // close() removes it, after the token is closed
	if err := os.Chown(path, -1, gid); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("failed to give %s group %d (keyissuerd must be root or a member): %w", path, gid, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("failed to set mode of %s: %w", path, err)
	}
	return ln, nil
}
