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
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
	"github.com/keyissuer/keyissuer/issuer/store/postgres"
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
	store  recordStore
	issuer *issuer.Issuer

	apiLn, sockLn net.Listener
	sockMade      bool // the socket file is ours to remove

	access access // clients, response signing, blocklist (access.go)

	tls *serverTLS // nil: plain HTTP (tls.go)

	ops *ops // admin listener, metrics, audit trail (ops.go)

	// Cluster mode (cluster.go): nil and "" on one host.
	cluster    *postgres.Cluster
	instanceID string
	instances  atomic.Int32 // live instances, for the rate limits' share
	storeOK    atomic.Bool  // the last heartbeat reached PostgreSQL
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
	if err := d.openTLS(); err != nil {
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
		// Key objects a crash left half-made: see OPERATIONS.md.
		SweepHalfMade: cfg.Token.Dedicated,
		HalfMadeGrace: cfg.Token.HalfMadeGrace,
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
		"padding_default", cfg.Keys.Paddings[0], slog.Group("paddings", methods...), "signing", info.Signing,
		"layout", cfg.Keys.Layout)
	d.started()

	if d.store, err = openStore(ctx, cfg); err != nil {
		return err
	}
	if err := d.joinCluster(ctx); err != nil {
		return err
	}
	d.ops.metrics.StoreUp(d.storeUp)
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
		Cluster:      d.issuerCluster(),
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

// recordStore is a record store the daemon opens and closes.
type recordStore interface {
	issuer.Store
	Close() error
}

// openStore opens the record store store.backend names.
func openStore(ctx context.Context, cfg config.Config) (recordStore, error) {
	// A nil *Store in a non-nil interface would be closed: return nil.
	if !cfg.Clustered() {
		s, err := bolt.Open(cfg.Store.Path, bolt.Options{CommitDelay: cfg.Store.CommitDelay})
		if err != nil {
			return nil, err
		}
		return s, nil
	}
	pw, err := cfg.Store.ReadStorePassword()
	if err != nil {
		return nil, err
	}
	s, err := postgres.Open(ctx, postgres.Options{DSN: cfg.Store.DSN, Password: pw, MaxConns: int32(cfg.Store.MaxConns)})
	if err != nil {
		return nil, err
	}
	return s, nil
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

	if d.tls != nil {
		api.TLSConfig = d.tls.config
	}
	d.log.Info("serving", "api", d.apiScheme()+"://"+d.APIAddr()+publicapi.ApplyPath, "decrypt_socket", d.cfg.Decrypt.Socket,
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
			var err error
			if s.srv.TLSConfig != nil {
				err = s.srv.ServeTLS(s.ln, "", "") // the certificate comes from TLSConfig.GetCertificate
			} else {
				err = s.srv.Serve(s.ln)
			}
			if !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	g.Go(func() error { d.watchBlocklist(gctx); return nil })
	if d.cluster != nil {
		g.Go(func() error { return d.heartbeat(gctx) })
		g.Go(func() error { d.pruneReplay(gctx, d.store.(*postgres.Store)); return nil })
	}
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
	d.leaveCluster(ctx)
	d.sockLn, d.apiLn = nil, nil // closed by Shutdown
	return err
}

func (d *Daemon) close() {
	for _, ln := range []net.Listener{d.apiLn, d.sockLn} {
		if ln != nil {
			ln.Close()
		}
	}
	d.sealAudit() // signed while the token is open
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
