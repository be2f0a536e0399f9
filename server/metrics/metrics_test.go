package metrics

import (
	"context"
	"errors"
	"io"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
)

type fakeIssuer struct{ s issuer.Stats }

func (f *fakeIssuer) Stats() issuer.Stats { return f.s }

type fakeToken struct {
	ready  bool
	faults hsm.Faults
}

func (f *fakeToken) Ready() bool        { return f.ready }
func (f *fakeToken) Faults() hsm.Faults { return f.faults }

// scrape returns the text exposition as "name{labels}" → value.
func scrape(t testing.TB, m *Metrics) map[string]string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	out := map[string]string{}
	for _, l := range strings.Split(string(body), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		out[l[:i]] = l[i+1:]
	}
	return out
}

func TestMetrics(t *testing.T) {
	is := &fakeIssuer{s: issuer.Stats{PoolReady: 3, PoolSize: 8, Outstanding: 2, Generated: 5, Issued: 4, Decrypts: 1}}
	tok := &fakeToken{ready: true, faults: hsm.Faults{Down: 2, Recovered: 1, SessionsRetired: 7}}
	m := New(is, tok, "v1.2.3")
	ctx := context.Background()
	for _, e := range []issuer.Event{
		{Kind: issuer.EventGenerated, Duration: 150 * time.Millisecond},
		{Kind: issuer.EventGenerated, Err: errors.New("CKR_DEVICE_ERROR")},
		{Kind: issuer.EventExpired, UniqueID: "a"},
		{Kind: issuer.EventDestroyed, UniqueID: "a", Reason: issuer.ReasonExpired},
		{Kind: issuer.EventDestroyed, UniqueID: "b", Reason: issuer.ReasonConsumed},
		{Kind: issuer.EventDestroyFailed, UniqueID: "c"},
		{Kind: issuer.EventLost, UniqueID: "d"},
		{Kind: issuer.EventReaped},
		{Kind: issuer.EventReconciled, Reconciled: issuer.ReconcileCounts{Adopted: 1, Destroyed: 4}},
	} {
		m.IssuerEvent(ctx, e)
	}
	m.Request(APIApply, "SUCCESS", 2*time.Millisecond)
	m.Request(APIApply, "PARAM_ILLEGAL", time.Millisecond)
	m.Request(APIDecrypt, "OK", 30*time.Millisecond)
	m.Request(APIDecrypt, "KEY_CONSUMED", time.Millisecond)
	m.Request(APIDecrypt, "<script>", time.Millisecond)
	m.Request(APIHealth, "OK", time.Millisecond)
	m.Reload(nil)
	m.Reload(errors.New("bad"))
	m.AuditWrite(nil)

	got := scrape(t, m)
	want := map[string]string{
		`keyissuer_pool_keys_ready`:                                          "3",
		`keyissuer_pool_keys_target`:                                         "8",
		`keyissuer_keys_outstanding`:                                         "2",
		`keyissuer_keys_generated_total`:                                     "5",
		`keyissuer_keys_issued_total`:                                        "4",
		`keyissuer_decrypts_total`:                                           "1",
		`keyissuer_token_up`:                                                 "1",
		`keyissuer_token_faults_total`:                                       "2",
		`keyissuer_token_recoveries_total`:                                   "1",
		`keyissuer_token_sessions_retired_total`:                             "7",
		`keyissuer_key_generation_seconds_count`:                             "1",
		`keyissuer_key_generation_seconds_bucket{le="0.2"}`:                  "1",
		`keyissuer_key_generation_seconds_bucket{le="0.1"}`:                  "0",
		`keyissuer_key_generation_errors_total`:                              "1",
		`keyissuer_keys_expired_total`:                                       "1",
		`keyissuer_keys_lost_total`:                                          "1",
		`keyissuer_keys_destroyed_total{reason="expired"}`:                   "1",
		`keyissuer_keys_destroyed_total{reason="consumed"}`:                  "1",
		`keyissuer_keys_destroyed_total{reason="reconciled"}`:                "0",
		`keyissuer_key_destroy_failures_total`:                               "1",
		`keyissuer_reaper_runs_total`:                                        "1",
		`keyissuer_reconciled_total{result="adopted"}`:                       "1",
		`keyissuer_reconciled_total{result="destroyed"}`:                     "4",
		`keyissuer_apply_requests_total{code="SUCCESS"}`:                     "1",
		`keyissuer_apply_requests_total{code="PARAM_ILLEGAL"}`:               "1",
		`keyissuer_decrypt_requests_total{code="OK"}`:                        "1",
		`keyissuer_decrypt_requests_total{code="KEY_CONSUMED"}`:              "1",
		`keyissuer_decrypt_requests_total{code="OTHER"}`:                     "1",
		`keyissuer_request_duration_seconds_count{api="decrypt"}`:            "3",
		`keyissuer_request_duration_seconds_count{api="health"}`:             "1",
		`keyissuer_config_reloads_total{result="ok"}`:                        "1",
		`keyissuer_config_reloads_total{result="refused"}`:                   "1",
		`keyissuer_audit_events_total{result="ok"}`:                          "1",
		`keyissuer_build_info{version="v1.2.3"}`:                             "1",
		`keyissuer_request_duration_seconds_bucket{api="apply",le="0.0025"}`: "2",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if got["keyissuer_reaper_last_run_timestamp_seconds"] == "0" {
		t.Error("reaper_last_run_timestamp_seconds not set")
	}

	tok.ready = false
	if got := scrape(t, m); got["keyissuer_token_up"] != "0" {
		t.Errorf("token_up = %s with the token down, want 0", got["keyissuer_token_up"])
	}
}

// TestStoreUpAndCluster: keyissuer_store_up follows the daemon's answer at
// each scrape; the cluster's gauges are this instance's, unlabelled.
func TestStoreUpAndCluster(t *testing.T) {
	m := New(&fakeIssuer{}, &fakeToken{ready: true}, "v1")
	var up atomic.Bool
	up.Store(true)
	m.StoreUp(up.Load)
	beat := time.Now().Add(-30 * time.Second)
	m.Cluster(func() int { return 2 }, func() time.Time { return beat })
	got := scrape(t, m)
	if got["keyissuer_store_up"] != "1" || got["keyissuer_cluster_instances_live"] != "2" {
		t.Errorf("store_up = %q, cluster_instances_live = %q; want 1 and 2", got["keyissuer_store_up"], got["keyissuer_cluster_instances_live"])
	}
	if age, err := strconv.ParseFloat(got["keyissuer_cluster_heartbeat_age_seconds"], 64); err != nil || age < 30 {
		t.Errorf("cluster_heartbeat_age_seconds = %q, want at least 30", got["keyissuer_cluster_heartbeat_age_seconds"])
	}
	up.Store(false)
	if got := scrape(t, m); got["keyissuer_store_up"] != "0" {
		t.Errorf("store_up = %q with the store down, want 0", got["keyissuer_store_up"])
	}
}

type nopStore struct{ issuer.Store }

func (nopStore) Create(context.Context, store.Record) error { return nil }
func (nopStore) Transition(_ context.Context, id string, from, to store.State, _ time.Time) (store.Record, error) {
	if from == store.Consumed {
		return store.Record{}, &store.StateError{Want: from}
	}
	return store.Record{}, errors.New("disk on fire")
}

func TestStoreTiming(t *testing.T) {
	m := New(&fakeIssuer{}, &fakeToken{}, "")
	s := m.Store(nopStore{})
	ctx := context.Background()
	s.Create(ctx, store.Record{})
	s.Transition(ctx, "x", store.Consumed, store.Lost, time.Now()) // a lost CAS still committed nothing but took the time
	s.Transition(ctx, "x", store.Issued, store.Lost, time.Now())   // a failed write is not a commit
	got := scrape(t, m)
	if got[`keyissuer_store_commit_duration_seconds_count{op="create"}`] != "1" ||
		got[`keyissuer_store_commit_duration_seconds_count{op="transition"}`] != "1" {
		t.Errorf("commit counts: create %s, transition %s; want 1, 1",
			got[`keyissuer_store_commit_duration_seconds_count{op="create"}`],
			got[`keyissuer_store_commit_duration_seconds_count{op="transition"}`])
	}
}
