// Package metrics exposes keyissuerd's Prometheus metrics. Gauges and the
// issuer's and token's own counters are read at scrape time, so the hot
// paths pay nothing for them; histograms and per-reason counters are fed by
// [Metrics.IssuerEvent], [Metrics.Request] and a timing wrapper of the
// record store. No label takes an unbounded value: no uniqueId, customerId
// or client in a label, only fixed sets (API names, wire result codes,
// reasons).
package metrics

import (
	"context"
	"errors"
	"net/http"
	"regexp"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
)

const namespace = "keyissuer"

// Issuer is what the metrics read of the issuer at scrape time;
// [*issuer.Issuer] implements it. Stats is safe for concurrent use.
type Issuer interface {
	Stats() issuer.Stats
}

// Token is what the metrics read of the token at scrape time; [*hsm.Token]
// implements it. Both methods are safe for concurrent use.
type Token interface {
	Ready() bool
	Faults() hsm.Faults
}

var (
	_ Issuer = (*issuer.Issuer)(nil)
	_ Token  = (*hsm.Token)(nil)
)

// Metrics holds the registry and the metrics fed by events. It is safe for
// concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	genSeconds      prometheus.Histogram
	genErrors       prometheus.Counter
	requestSeconds  *prometheus.HistogramVec
	applies         *prometheus.CounterVec
	decrypts        *prometheus.CounterVec
	expired         prometheus.Counter
	lost            prometheus.Counter
	destroyed       *prometheus.CounterVec
	destroyFailures prometheus.Counter
	reaperRuns      prometheus.Counter
	reaperLast      prometheus.Gauge
	reconciled      *prometheus.CounterVec
	commitSeconds   *prometheus.HistogramVec
	auditEvents     *prometheus.CounterVec
	reloads         *prometheus.CounterVec
	refusals        *prometheus.CounterVec
}

// New registers every metric. is and tok are read at each scrape.
func New(is Issuer, tok Token, version string) *Metrics {
	reg := prometheus.NewRegistry()
	f := factory{reg}
	m := &Metrics{
		reg: reg,
		genSeconds: f.histogram("key_generation_seconds",
			"Time the token took to generate a key pair that joined the pool.",
			[]float64{.01, .025, .05, .1, .2, .4, .8, 1.6, 3.2, 6.4, 12.8}),
		genErrors: f.counter("key_generation_errors_total", "Key generations that failed."),
		requestSeconds: f.histogramVec("request_duration_seconds",
			"Time to answer a request, by API: apply (public), decrypt, key and health (socket).",
			[]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}, "api"),
		applies: f.counterVec("apply_requests_total",
			"applyPublicKey answers by resultCode.", "code"),
		decrypts: f.counterVec("decrypt_requests_total",
			"Decrypt answers by code (OK for a decrypted password).", "code"),
		expired:   f.counter("keys_expired_total", "Issued keys whose time to live ran out unused."),
		lost:      f.counter("keys_lost_total", "Issued keys the token lost (a session or the daemon died)."),
		destroyed: f.counterVec("keys_destroyed_total", "Key pairs destroyed in the token, by reason.", "reason"),
		destroyFailures: f.counter("key_destroy_failures_total",
			"Key destroys that failed and were queued for the reaper to retry."),
		reaperRuns: f.counter("reaper_runs_total", "Reaper passes."),
		reaperLast: f.gauge("reaper_last_run_timestamp_seconds", "When the last reaper pass finished (Unix time)."),
		reconciled: f.counterVec("reconciled_total",
			"What start-up reconciliation did: adopted keys, lost and consumed records, destroyed objects.", "result"),
		commitSeconds: f.histogramVec("store_commit_duration_seconds",
			"Time of a durable (fsync'd) record store write, by operation.",
			[]float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1}, "op"),
		auditEvents: f.counterVec("audit_events_total",
			"Audit trail writes, by result (ok or error).", "result"),
		reloads: f.counterVec("config_reloads_total",
			"SIGHUP configuration reloads, by result (ok or refused).", "result"),
		refusals: f.counterVec("apply_refusals_total",
			"Refused applyPublicKey requests, by reason (a fixed set; gate_* before authentication).", "reason"),
	}
	for _, c := range []string{"ok", "refused"} {
		m.reloads.WithLabelValues(c)
	}
	for _, c := range []string{"ok", "error"} {
		m.auditEvents.WithLabelValues(c)
	}
	for _, r := range []string{issuer.ReasonConsumed, issuer.ReasonExpired, issuer.ReasonLost, issuer.ReasonReconciled, issuer.ReasonUnissued} {
		m.destroyed.WithLabelValues(r)
	}

	stats := func(fn func(issuer.Stats) float64) func() float64 {
		return func() float64 { return fn(is.Stats()) }
	}
	f.gaugeFunc("pool_keys_ready", "Keys generated and waiting in the pool.",
		stats(func(s issuer.Stats) float64 { return float64(s.PoolReady) }))
	f.gaugeFunc("pool_keys_target", "The pool's size: keys kept ready (pool.size).",
		stats(func(s issuer.Stats) float64 { return float64(s.PoolSize) }))
	f.gaugeFunc("keys_outstanding", "Issued keys waiting for their decrypt: key pairs in the token somebody holds a public key for.",
		stats(func(s issuer.Stats) float64 { return float64(s.Outstanding) }))
	f.gaugeFunc("destroys_pending", "Key destroys that failed and wait for a retry.",
		stats(func(s issuer.Stats) float64 { return float64(s.PendingDestroys) }))
	f.counterFunc("keys_generated_total", "Key pairs generated into the pool.",
		stats(func(s issuer.Stats) float64 { return float64(s.Generated) }))
	f.counterFunc("keys_issued_total", "Keys issued by applyPublicKey.",
		stats(func(s issuer.Stats) float64 { return float64(s.Issued) }))
	f.counterFunc("decrypts_total", "Decrypts that reached the token (each consumed its key).",
		stats(func(s issuer.Stats) float64 { return float64(s.Decrypts) }))
	f.gaugeFunc("token_up", "1 when the token answers and is logged in, else 0.", func() float64 {
		if tok.Ready() {
			return 1
		}
		return 0
	})
	f.counterFunc("token_faults_total", "Times the token was found down.",
		func() float64 { return float64(tok.Faults().Down) })
	f.counterFunc("token_recoveries_total", "Times the token came back after being down.",
		func() float64 { return float64(tok.Faults().Recovered) })
	f.counterFunc("token_sessions_retired_total", "PKCS#11 sessions found dead and replaced.",
		func() float64 { return float64(tok.Faults().SessionsRetired) })
	bi := f.gaugeVec("build_info", "The running version; always 1.", "version")
	bi.WithLabelValues(version).Set(1)

	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// CertExpiry exports keyissuer_api_tls_cert_expiry_seconds: the seconds
// from the scrape to the notAfter of the public listener's certificate,
// read at scrape time (negative once expired). Call it once, with HTTPS on.
func (m *Metrics) CertExpiry(notAfter func() time.Time) {
	factory{m.reg}.gaugeFunc("api_tls_cert_expiry_seconds",
		"Seconds until the public listener's TLS certificate expires (its notAfter); negative once expired.",
		func() float64 { return time.Until(notAfter()).Seconds() })
}

// Registry is the registry, for tests.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorLog: nil, Timeout: 10 * time.Second})
}

// IssuerEvent has the signature of [issuer.Config.OnEvent].
func (m *Metrics) IssuerEvent(_ context.Context, e issuer.Event) {
	switch e.Kind {
	case issuer.EventGenerated:
		if e.Err != nil {
			m.genErrors.Inc()
		} else {
			m.genSeconds.Observe(e.Duration.Seconds())
		}
	case issuer.EventExpired:
		m.expired.Inc()
	case issuer.EventLost:
		m.lost.Inc()
	case issuer.EventDestroyed:
		m.destroyed.WithLabelValues(e.Reason).Inc()
	case issuer.EventDestroyFailed:
		m.destroyFailures.Inc()
	case issuer.EventReaped:
		m.reaperRuns.Inc()
		m.reaperLast.SetToCurrentTime()
	case issuer.EventReconciled:
		r := e.Reconciled
		m.reconciled.WithLabelValues("adopted").Add(float64(r.Adopted))
		m.reconciled.WithLabelValues("lost").Add(float64(r.Lost))
		m.reconciled.WithLabelValues("consumed").Add(float64(r.Consumed))
		m.reconciled.WithLabelValues("destroyed").Add(float64(r.Destroyed))
	}
}

// APIs with their own request metrics.
const (
	APIApply   = "apply"   // applyPublicKey
	APIDecrypt = "decrypt" // POST /v1/decrypt
	APIKey     = "key"     // GET /v1/keys/{uniqueId}
	APIHealth  = "health"  // GET /v1/health
	APIOther   = "other"   // anything else on either listener
)

var codeRE = regexp.MustCompile(`^[A-Z][A-Z0-9_]{0,39}$`)

// Request records one answered request: its API (one of the API*
// constants), its wire result code, and how long it took. A code that is
// not a wire code (upper case, at most 40 characters) counts as OTHER.
func (m *Metrics) Request(api, code string, d time.Duration) {
	m.requestSeconds.WithLabelValues(api).Observe(d.Seconds())
	if !codeRE.MatchString(code) {
		code = "OTHER"
	}
	switch api {
	case APIApply:
		m.applies.WithLabelValues(code).Inc()
	case APIDecrypt:
		m.decrypts.WithLabelValues(code).Inc()
	}
}

// Refused counts a refused applyPublicKey request by its reason, one of a
// fixed set.
func (m *Metrics) Refused(reason string) { m.refusals.WithLabelValues(reason).Inc() }

// RefusalReasons makes the refusal counter of each reason exist at zero, so
// that a rate over it has a series from the start.
func (m *Metrics) RefusalReasons(reasons []string) {
	for _, r := range reasons {
		m.refusals.WithLabelValues(r)
	}
}

// Signatures registers keyissuer_token_signatures_total, read from fn at
// each scrape: the signatures the token was asked for.
func (m *Metrics) Signatures(fn func() uint64) {
	factory{m.reg}.counterFunc("token_signatures_total",
		"Signatures the token was asked for with the response-signing key (C_Sign calls).",
		func() float64 { return float64(fn()) })
}

// AuditWrite counts an audit trail write.
func (m *Metrics) AuditWrite(err error) {
	if err != nil {
		m.auditEvents.WithLabelValues("error").Inc()
		return
	}
	m.auditEvents.WithLabelValues("ok").Inc()
}

// Reload counts a configuration reload.
func (m *Metrics) Reload(err error) {
	if err != nil {
		m.reloads.WithLabelValues("refused").Inc()
		return
	}
	m.reloads.WithLabelValues("ok").Inc()
}

// Cluster registers the metrics of a cluster instance (cluster mode only):
// the instances with a live lease, and the time since this instance's
// heartbeat last succeeded. Both are read at each scrape.
func (m *Metrics) Cluster(live func() int, lastHeartbeat func() time.Time) {
	f := factory{m.reg}
	f.gaugeFunc("cluster_instances_live", "Cluster instances with a live lease, as this instance last counted them.",
		func() float64 { return float64(live()) })
	f.gaugeFunc("cluster_heartbeat_age_seconds", "Seconds since this instance last renewed its cluster lease.",
		func() float64 { return time.Since(lastHeartbeat()).Seconds() })
}

// StoreUp registers keyissuer_store_up, read from up at each scrape: 1
// while the record store answers (bolt: while it is open; PostgreSQL: the
// last heartbeat reached it), else 0.
func (m *Metrics) StoreUp(up func() bool) {
	factory{m.reg}.gaugeFunc("store_up", "1 while the record store answers (PostgreSQL: this instance's last heartbeat reached it), else 0.",
		func() float64 {
			if up() {
				return 1
			}
			return 0
		})
}

// Store wraps an [issuer.Store] and times its durable writes. Reads pass
// through untimed.
func (m *Metrics) Store(s issuer.Store) issuer.Store { return &timedStore{Store: s, m: m} }

type timedStore struct {
	issuer.Store
	m *Metrics
}

func (s *timedStore) observe(op string, start time.Time, err error) {
	if err == nil || errors.As(err, new(*store.StateError)) {
		s.m.commitSeconds.WithLabelValues(op).Observe(time.Since(start).Seconds())
	}
}

func (s *timedStore) Create(ctx context.Context, r store.Record) error {
	start := time.Now()
	err := s.Store.Create(ctx, r)
	s.observe("create", start, err)
	return err
}

func (s *timedStore) Transition(ctx context.Context, id string, from, to store.State, at time.Time) (store.Record, error) {
	start := time.Now()
	r, err := s.Store.Transition(ctx, id, from, to, at)
	s.observe("transition", start, err)
	return r, err
}

func (s *timedStore) Prune(ctx context.Context, before time.Time, limit int) (int, error) {
	start := time.Now()
	n, err := s.Store.Prune(ctx, before, limit)
	s.observe("prune", start, err)
	return n, err
}

// factory registers metrics in the keyissuer namespace.
type factory struct{ reg *prometheus.Registry }

func (f factory) register(c prometheus.Collector) { f.reg.MustRegister(c) }

func (f factory) counter(name, help string) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help})
	f.register(c)
	return c
}

func (f factory) counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, labels)
	f.register(c)
	return c
}

func (f factory) gauge(name, help string) prometheus.Gauge {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help})
	f.register(g)
	return g
}

func (f factory) gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, labels)
	f.register(g)
	return g
}

func (f factory) histogram(name, help string, buckets []float64) prometheus.Histogram {
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: name, Help: help, Buckets: buckets})
	f.register(h)
	return h
}

func (f factory) histogramVec(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: name, Help: help, Buckets: buckets}, labels)
	f.register(h)
	return h
}

func (f factory) gaugeFunc(name, help string, fn func() float64) {
	f.register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, fn))
}

func (f factory) counterFunc(name, help string, fn func() float64) {
	f.register(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, fn))
}
