package daemon

// Operations: the admin listener (metrics, probes, status), the audit
// trail, configuration reloads, systemd notification and the warm-up
// progress. Kept apart from daemon.go, which wires the key path.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/admin"
	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/metrics"
	"github.com/keyissuer/keyissuer/server/peercred"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// ops is the daemon's operational state.
type ops struct {
	metrics *metrics.Metrics
	audit   *audit.Log
	adminLn net.Listener
	started time.Time
	version string

	lastReap atomic.Int64 // Unix nanoseconds of the last reaper pass
	drained  atomic.Int64 // pooled keys destroyed at shutdown

	public   swapHandler // applyPublicKey, rebuilt by a reload of the access rules
	refusals *refusals   // applyPublicKey's refusals since the last summary (refusals.go)

	mu        sync.Mutex // guards the reload state below and d.cfg's reloadable parts
	reloadAt  time.Time
	reloadErr string
	pending   []string // changed keys that need a restart
}

// openOps binds the admin listener and opens the audit trail. Call it after
// the other listeners are bound and before the token is opened.
func (d *Daemon) openOps() error {
	o := &ops{started: time.Now(), version: buildVersion(), refusals: newRefusals()}
	d.ops = o
	var err error
	if o.adminLn, err = net.Listen("tcp", d.cfg.Admin.Listen); err != nil {
		return fmt.Errorf("failed to listen on admin.listen %s: %w", d.cfg.Admin.Listen, err)
	}
	o.audit, err = audit.Open(d.cfg.Audit.Path, audit.Options{
		Sync:     audit.Sync(d.cfg.Audit.Fsync),
		Interval: d.cfg.Audit.FsyncInterval,
	})
	if err != nil {
		return fmt.Errorf("audit.path: %w", err)
	}
	o.metrics = metrics.New(issuerStats{d}, tokenState{d}, o.version)
	o.metrics.RefusalReasons(publicapi.Reasons)
	return nil
}

// issuerStats and tokenState let the metrics exist before the issuer and
// the token do.
type issuerStats struct{ d *Daemon }

func (s issuerStats) Stats() issuer.Stats {
	if s.d.issuer == nil {
		return issuer.Stats{}
	}
	return s.d.issuer.Stats()
}

type tokenState struct{ d *Daemon }

func (s tokenState) Ready() bool { return s.d.token != nil && s.d.token.Ready() }
func (s tokenState) Faults() hsm.Faults {
	if s.d.token == nil {
		return hsm.Faults{}
	}
	return s.d.token.Faults()
}

// AdminAddr is the admin listener's bound address.
func (d *Daemon) AdminAddr() string { return d.ops.adminLn.Addr().String() }

// record writes an audit event; a failure is logged and counted, and the
// request goes on: the trail's health is an alert, not an outage.
func (d *Daemon) record(e audit.Event) {
	e.Instance = d.instanceID
	err := d.ops.audit.Record(e)
	d.ops.metrics.AuditWrite(err)
	if err != nil {
		d.log.Error("failed to write the audit trail", "event", e.Type, "err", err)
	}
}

// appendAudit writes an audit event without waiting for the disk: for a
// line that a record of the same request follows at once.
func (d *Daemon) appendAudit(e audit.Event) {
	e.Instance = d.instanceID
	err := d.ops.audit.Append(e)
	d.ops.metrics.AuditWrite(err)
	if err != nil {
		d.log.Error("failed to write the audit trail", "event", e.Type, "err", err)
	}
}

// onIssuerEvent is the issuer's OnEvent: metrics, then the audit trail.
func (d *Daemon) onIssuerEvent(ctx context.Context, e issuer.Event) {
	d.ops.metrics.IssuerEvent(ctx, e)
	switch e.Kind {
	case issuer.EventIssued:
		d.record(audit.Event{Type: audit.KeyIssued, UniqueID: e.UniqueID, CustomerID: e.CustomerID,
			ClientID: e.ClientID, Remote: remoteFrom(ctx)})
	case issuer.EventDecrypt:
		d.record(audit.Event{Type: audit.KeyDecrypt, UniqueID: e.UniqueID, Peer: peerFrom(ctx), Outcome: outcome(e.Err)})
	case issuer.EventExpired:
		d.record(audit.Event{Type: audit.KeyExpired, UniqueID: e.UniqueID})
	case issuer.EventLost:
		d.record(audit.Event{Type: audit.KeyLost, UniqueID: e.UniqueID})
	case issuer.EventDestroyed:
		ae := audit.Event{Type: audit.KeyDestroyed, UniqueID: e.UniqueID, Reason: e.Reason}
		if e.Reason == issuer.ReasonConsumed && inDecryptRequest(ctx) {
			// Inside a decrypt request, whose key.decrypt line follows
			// at once: its fsync covers this line too (one per decrypt).
			d.appendAudit(ae)
			break
		}
		d.record(ae)
	case issuer.EventDestroyFailed:
		d.record(audit.Event{Type: audit.KeyDestroyFailed, UniqueID: e.UniqueID, Reason: e.Reason, Detail: errText(e.Err)})
	case issuer.EventReconciled:
		r := e.Reconciled
		d.record(audit.Event{Type: audit.Reconciled, Counts: map[string]int{
			"adopted": r.Adopted, "lost": r.Lost, "consumed": r.Consumed, "destroyed": r.Destroyed}})
	case issuer.EventReaped:
		d.ops.lastReap.Store(time.Now().UnixNano())
	case issuer.EventDrained:
		d.ops.drained.Add(int64(e.Count))
	}
	if d.opts.AfterAudit != nil {
		d.opts.AfterAudit(e)
	}
}

// outcome names a decrypt's result for the audit trail.
func outcome(err error) string {
	for _, o := range []struct {
		err  error
		name string
	}{
		{issuer.ErrNotFound, "not_found"},
		{issuer.ErrConsumed, "consumed"},
		{issuer.ErrExpired, "expired"},
		{issuer.ErrLost, "lost"},
		{issuer.ErrDecrypt, "decrypt_failed"},
		{issuer.ErrAbandoned, "decrypt_abandoned"}, // the key is consumed, nothing decrypted
		{issuer.ErrCiphertext, "bad_ciphertext"},
		{issuer.ErrPadding, "bad_padding"},
		{issuer.ErrUnavailable, "unavailable"},
		{context.Canceled, "canceled"},
		{context.DeadlineExceeded, "canceled"},
	} {
		if errors.Is(err, o.err) {
			return o.name
		}
	}
	if err == nil {
		return "ok"
	}
	return "error"
}

// errText is an error for the audit trail: errors never carry secrets
// (house rule), and a line stays short.
func errText(err error) string {
	if err == nil {
		return ""
	}
	s := err.Error()
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}

type remoteKey struct{}

// remoteFrom is the public API caller's address that instrument put in ctx.
func remoteFrom(ctx context.Context) string {
	s, _ := ctx.Value(remoteKey{}).(string)
	return s
}

// inDecryptRequest reports whether ctx is a request on the decrypt socket,
// whose connections carry their peer's credentials (or the failure to get
// them).
func inDecryptRequest(ctx context.Context) bool {
	_, err := peercred.FromContext(ctx)
	return !errors.Is(err, peercred.ErrNoCred)
}

// peerFrom is the decrypt socket's peer, when the kernel said.
func peerFrom(ctx context.Context) *audit.Peer {
	c, err := peercred.FromContext(ctx)
	if err != nil {
		return nil
	}
	return &audit.Peer{UID: c.UID, GID: c.GID, PID: c.PID}
}

// Readiness implements [admin.Source]: ready when the token is up, the
// store answers and the pool has a key.
func (d *Daemon) Readiness(ctx context.Context) admin.Readiness {
	s := d.issuer.Stats()
	_, err := d.store.Get(ctx, "readyz")
	rd := admin.Readiness{
		Token:     d.token.Ready(),
		Store:     err == nil || errors.Is(err, store.ErrNotFound),
		PoolReady: s.PoolReady,
	}
	rd.Ready = rd.Token && rd.Store && rd.PoolReady > 0
	return rd
}

// Status implements [admin.Source]. Everything in it is cheap: counters and
// one step of the store's expiry index, never a scan of the records.
func (d *Daemon) Status(ctx context.Context) admin.Status {
	s := d.issuer.Stats()
	info := d.token.Info()
	faults := d.token.Faults()
	paddings := map[string]string{}
	for p, m := range info.Methods {
		paddings[string(p)] = string(m)
	}
	st := admin.Status{
		Version:   d.ops.version,
		StartedAt: d.ops.started.UTC(),
		Token: admin.Token{
			Label: info.Label, Serial: info.Serial, Model: info.Model, Manufacturer: info.Manufacturer,
			Ready: d.token.Ready(), Storage: string(info.Storage), KeyBits: info.KeyBits,
			Paddings: paddings, Faults: faults.Down, Recoveries: faults.Recovered,
		},
		Pool: admin.Pool{Ready: s.PoolReady, Target: s.PoolSize, Generated: s.Generated, GenerateErrors: s.GenerateErrors},
		Keys: admin.Keys{Outstanding: s.Outstanding, PendingDestroys: s.PendingDestroys},
		Records: admin.Records{Scope: "since start", Issued: s.Issued, Decrypts: s.Decrypts,
			Expired: s.Expired, Lost: s.Lost},
		Reaper:    admin.Reaper{Interval: d.cfg.Keys.ReapInterval.String()},
		Listeners: admin.Listeners{API: d.APIAddr(), Decrypt: d.cfg.Decrypt.Socket, Admin: d.AdminAddr()},
	}
	if d.access.signer != nil {
		st.Token.Signing = string(d.access.signer.Method())
	}
	if s.Generated > 0 {
		st.Pool.AvgGenerateSec = math.Round(s.GenerateTime.Seconds()/float64(s.Generated)*1000) / 1000
	}
	if recs, err := d.store.Active(ctx, time.Unix(0, math.MaxInt64), 1); err == nil && len(recs) == 1 {
		st.Keys.OldestActiveIssuedAt = recs[0].IssuedAt.UTC()
		st.Keys.OldestActiveAgeSec = math.Round(time.Since(recs[0].IssuedAt).Seconds())
	}
	if t := d.ops.lastReap.Load(); t != 0 {
		st.Reaper.LastRun = time.Unix(0, t).UTC()
	}
	st.Audit.Path = d.ops.audit.Path()
	st.Audit.Seq, st.Audit.Head = d.ops.audit.Head()
	st.Cluster = d.clusterStatus(ctx)
	d.ops.mu.Lock()
	st.Config = admin.Config{Path: d.opts.ConfigPath, LogLevel: d.cfg.Log.Level, LastReload: d.ops.reloadAt,
		LastReloadErr: d.ops.reloadErr, RestartPending: d.ops.pending}
	d.ops.mu.Unlock()
	return st
}

// runOps serves the admin listener and watches the token until ctx is
// done, then shuts the admin server down; it returns when all is stopped.
// ready is closed once the daemon serves.
func (d *Daemon) runOps(ctx context.Context) {
	srv := &http.Server{
		Handler:           admin.New(d, d.ops.metrics.Handler()),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := srv.Serve(d.ops.adminLn); !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("admin listener failed", "err", err)
		}
	})
	wg.Go(func() { d.watchToken(ctx) })
	wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-d.opts.ReloadSignal: // nil: never
				d.ReloadFile(d.opts.ConfigPath)
				d.reloadCert() // the running paths, whether the file reloaded or not
			}
		}
	})
	wg.Go(func() { d.warmUp(ctx) })
	wg.Go(func() { every(ctx, d.cfg.Audit.SummaryInterval, d.summariseRefusals) })
	wg.Go(func() {
		d.checkpoint("start")
		every(ctx, d.cfg.Audit.CheckpointInterval, func() { d.checkpoint("periodic") })
	})
	notify("READY=1")
	<-ctx.Done()
	notify("STOPPING=1")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.opts.ShutdownTimeout)
	defer cancel()
	srv.Shutdown(sctx)
	wg.Wait()
	d.ops.adminLn = nil
}

// every calls fn every interval until ctx is done.
func every(ctx context.Context, interval time.Duration, fn func()) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			fn()
		}
	}
}

// watchToken writes token.down and token.up audit lines from the token's
// fault counters, which miss no outage however short.
func (d *Daemon) watchToken(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	last := d.token.Faults()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		f := d.token.Faults()
		info := d.token.Info()
		tok := info.Label + "/" + info.Serial
		for range f.Down - last.Down {
			d.record(audit.Event{Type: audit.TokenDown, Token: tok, Detail: "the token failed its health check; see the log"})
		}
		for range f.Recovered - last.Recovered {
			d.record(audit.Event{Type: audit.TokenUp, Token: tok})
		}
		last = f
	}
}

// sealAudit writes the last audit lines and signs the head: before the
// token is closed.
func (d *Daemon) sealAudit() {
	if d.ops == nil || d.ops.audit == nil {
		return
	}
	d.summariseRefusals()
	if d.issuer != nil {
		n := int(d.ops.drained.Load())
		d.record(audit.Event{Type: audit.DaemonStopped, Count: &n, Detail: "pooled keys destroyed: count"})
	}
	d.checkpoint("shutdown")
}

// closeOps closes the admin listener and the audit trail; after the token
// is closed.
func (d *Daemon) closeOps() {
	if d.ops == nil {
		return
	}
	if d.ops.adminLn != nil {
		d.ops.adminLn.Close()
	}
	if d.ops.audit != nil {
		d.ops.audit.Close()
	}
}

// checkpointTimeout bounds the token's signature of a checkpoint.
const checkpointTimeout = 10 * time.Second

// checkpoint signs the audit trail's head with the response-signing key
// into an audit.checkpoint line, and logs a copy: the copy outside the file
// is what shows a cut of the file's tail. Nothing without a signing key, or
// when the last line is a checkpoint already.
func (d *Daemon) checkpoint(why string) {
	s := d.access.signer
	if s == nil || d.ops == nil || d.ops.audit == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), checkpointTimeout)
	defer cancel()
	e, ok, err := d.ops.audit.Checkpoint(func(msg []byte) ([]byte, error) { return s.Sign(ctx, msg) }, audit.KeyID(s.Public()))
	d.ops.metrics.AuditWrite(err)
	switch {
	case err != nil:
		d.log.Error("failed to write an audit checkpoint", "why", why, "err", err)
	case ok:
		d.log.Info("audit checkpoint", "why", why, "path", d.ops.audit.Path(), "seq", e.CheckpointSeq,
			"head", e.CheckpointHead, "signature", e.Signature, "key_id", e.KeyID)
	}
}

// started writes the daemon.started audit line.
func (d *Daemon) started() {
	info := d.token.Info()
	d.record(audit.Event{Type: audit.DaemonStarted, Token: info.Label + "/" + info.Serial,
		Detail: fmt.Sprintf("version %s, storage %s, pool %d", d.ops.version, info.Storage, d.cfg.Pool.Size)})
}

// reloadable lists the configuration keys a reload applies. Others that
// changed wait for a restart, and say so.
var reloadable = map[string]bool{
	"log.level": true,
	// The access rules of applyPublicKey: a new handler replaces the old
	// one; clients' request-rate buckets start afresh, outstanding-key
	// counts (kept by the issuer) carry on.
	"clients":                             true,
	"limits.rate":                         true,
	"limits.burst":                        true,
	"limits.max_outstanding":              true,
	"limits.max_outstanding_per_customer": true,
	"api.allow_unsigned":                  true,
	"api.clock_skew":                      true,
	// The blocklist file is re-read on its own when it changes
	// (api.blocklist_poll); the file's path is not reloadable.
}

// Reload applies the reloadable parts of cfg, which config.Load has
// validated: the log level and applyPublicKey's clients and limits; and the
// audit file is reopened (log rotation). Changed keys that cannot change
// without a restart are logged and kept as they were. It never touches the
// pool, the token or a connection. If a part cannot be applied, nothing is.
func (d *Daemon) Reload(cfg config.Config) error {
	d.ops.mu.Lock()
	defer d.ops.mu.Unlock()
	changed := diff(d.cfg, cfg, "")
	var applied, pending []string
	access := false
	for _, k := range changed {
		switch {
		case k == "log.level":
			applied = append(applied, k)
		case reloadable[k]:
			applied, access = append(applied, k), true
		default:
			pending = append(pending, k)
		}
	}
	// Prepare everything, then apply.
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.Log.Level)); err != nil {
		return d.refuseLocked(fmt.Errorf("log.level: %w", err)) // config.Validate makes this unreachable
	}
	clients, err := clientsOf(cfg.Clients)
	if err != nil {
		return d.refuseLocked(err)
	}
	if d.opts.LogLevel != nil {
		d.opts.LogLevel.Set(level)
	}
	d.cfg.Log.Level = cfg.Log.Level
	if access {
		d.cfg.Clients, d.cfg.Limits = cfg.Clients, cfg.Limits
		d.cfg.API.AllowUnsigned, d.cfg.API.ClockSkew = cfg.API.AllowUnsigned, cfg.API.ClockSkew
		d.access.clients = clients
		if d.access.memReplay != nil {
			d.access.memReplay.SetMax(d.replayCapacity(d.cfg))
		}
		d.ops.public.set(d.publicHandler())
		if cfg.API.AllowUnsigned {
			d.log.Warn("api.allow_unsigned is true: applyPublicKey accepts requests without a signature")
		}
	}
	d.ops.reloadAt, d.ops.reloadErr, d.ops.pending = time.Now().UTC(), "", pending
	if err := d.ops.audit.Reopen(); err != nil {
		d.log.Error("failed to reopen the audit trail", "path", d.ops.audit.Path(), "err", err)
	}
	if len(pending) > 0 {
		d.log.Warn("configuration reloaded; some changes need a restart", "applied", applied, "restart_needed", pending)
	} else {
		d.log.Info("configuration reloaded", "applied", applied)
	}
	d.ops.metrics.Reload(nil)
	d.record(audit.Event{Type: audit.ConfigReloaded, Detail: fmt.Sprintf("applied [%s]; restart needed for [%s]",
		strings.Join(applied, " "), strings.Join(pending, " "))})
	return nil
}

// ReloadFile loads the configuration at path and applies it with Reload.
// An invalid file is refused, the running configuration kept, and the
// reason logged and audited. For SIGHUP.
func (d *Daemon) ReloadFile(path string) error {
	cfg, err := config.Load(path)
	if err != nil {
		d.ops.mu.Lock()
		defer d.ops.mu.Unlock()
		return d.refuseLocked(err)
	}
	return d.Reload(cfg)
}

// refuseLocked records a refused reload; the running configuration stays.
// The audit file is reopened all the same: rotation must not wait for a
// good config.
func (d *Daemon) refuseLocked(err error) error {
	d.ops.reloadAt, d.ops.reloadErr = time.Now().UTC(), err.Error()
	d.log.Error("configuration reload refused; keeping the running configuration", "err", err)
	d.ops.metrics.Reload(err)
	d.record(audit.Event{Type: audit.ConfigReloadFailed, Detail: errText(err)})
	if rerr := d.ops.audit.Reopen(); rerr != nil {
		d.log.Error("failed to reopen the audit trail", "err", rerr)
	}
	return err
}

// swapHandler serves the handler set last; a reload sets a new one while
// requests in flight finish on the old.
type swapHandler struct{ h atomic.Pointer[http.Handler] }

func (s *swapHandler) set(h http.Handler) http.Handler {
	s.h.Store(&h)
	return s
}

func (s *swapHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	(*s.h.Load()).ServeHTTP(w, r)
}

// diff lists the dotted TOML keys whose values differ between a and b.
func diff(a, b any, prefix string) []string {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	var out []string
	for i := range va.NumField() {
		f := va.Type().Field(i)
		name := f.Tag.Get("toml")
		if name == "" || name == "-" {
			continue
		}
		fa, fb := va.Field(i), vb.Field(i)
		if f.Type.Kind() == reflect.Struct && f.Type != reflect.TypeFor[time.Time]() {
			out = append(out, diff(fa.Interface(), fb.Interface(), prefix+name+".")...)
			continue
		}
		if !reflect.DeepEqual(fa.Interface(), fb.Interface()) {
			out = append(out, prefix+name)
		}
	}
	return out
}

func buildVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 && (v == "" || v == "(devel)") {
			v = s.Value[:12]
		}
	}
	return v
}
