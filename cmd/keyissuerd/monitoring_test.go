package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/metrics"
)

// The operators' kit in deploy/: Prometheus alert rules and a Grafana
// dashboard (OPERATIONS.md, "Alert rules and dashboard").
const (
	alertRules     = "deploy/prometheus-alerts.yml"
	alertRuleTests = "deploy/prometheus-alerts.test.yml"
	dashboard      = "deploy/grafana-dashboard.json"
)

// TestAlertRules checks the rules with promtool and runs their unit tests
// (deploy/prometheus-alerts.test.yml): each alert fires on the series that
// should raise it and stays silent on healthy ones. Without promtool
// (Debian package prometheus) it skips, except under CI=true.
func TestAlertRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		msg := fmt.Sprintf("promtool not found (Debian package prometheus): %v", err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; .ci/run should have installed it")
		}
		t.Skip(msg)
	}
	for _, args := range [][]string{
		{"check", "rules", strings.TrimPrefix(alertRules, "deploy/")},
		{"test", "rules", strings.TrimPrefix(alertRuleTests, "deploy/")},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "deploy" // the tests name the rules file relative to themselves
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// TestAlertRulesCoverEveryAlert: every alert in the rules has a unit test,
// so that a new rule cannot go untested.
func TestAlertRulesCoverEveryAlert(t *testing.T) {
	rules, err := os.ReadFile(alertRules)
	if err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile(alertRuleTests)
	if err != nil {
		t.Fatal(err)
	}
	alerts := regexp.MustCompile(`(?m)^\s*- alert:\s*(\S+)`).FindAllSubmatch(rules, -1)
	if len(alerts) == 0 {
		t.Fatal("no alert in the rules")
	}
	for _, a := range alerts {
		name := string(a[1])
		if !regexp.MustCompile(`(?m)^\s*alertname:\s*` + regexp.QuoteMeta(name) + `\s*$`).Match(tests) {
			t.Errorf("alert %s has no test in %s", name, alertRuleTests)
		}
		// A test that only shows an alert silent proves nothing.
		if !regexp.MustCompile(`(?m)^\s*alertname:\s*` + regexp.QuoteMeta(name) + `\s*\n\s*exp_alerts:\s*\n\s*- exp_labels:`).Match(tests) {
			t.Errorf("no test of %s shows it firing", name)
		}
	}
}

// TestMonitoringMetricsExist: every metric the dashboard queries is one
// keyissuerd exports (server/metrics), and so is every metric the alert
// rules use.
func TestMonitoringMetricsExist(t *testing.T) {
	exported := exportedSeries(t)
	for _, file := range []string{dashboard, alertRules} {
		t.Run(file, func(t *testing.T) {
			var exprs []string
			if file == dashboard {
				exprs = dashboardExprs(t)
			} else {
				b, err := os.ReadFile(file)
				if err != nil {
					t.Fatal(err)
				}
				for _, m := range regexp.MustCompile(`(?m)^\s*expr:\s*(.+)$`).FindAllStringSubmatch(string(b), -1) {
					exprs = append(exprs, m[1])
				}
			}
			used := map[string]bool{}
			for _, e := range exprs {
				for _, name := range metricNames(e) {
					used[name] = true
				}
			}
			if len(used) < 5 {
				t.Fatalf("only %d metrics found in %s: %v", len(used), file, used)
			}
			for name := range used {
				if !exported[name] {
					t.Errorf("%s queries %s, which keyissuerd does not export", file, name)
				}
			}
		})
	}
}

// TestDashboardShowsEveryMetric: no keyissuer metric is left off the
// dashboard (a histogram counts when its buckets are queried).
func TestDashboardShowsEveryMetric(t *testing.T) {
	used := map[string]bool{}
	for _, e := range dashboardExprs(t) {
		for _, name := range metricNames(e) {
			used[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")] = true
		}
	}
	for name := range exportedSeries(t) {
		if strings.HasPrefix(name, "keyissuer_") && !strings.HasSuffix(name, "_bucket") && !strings.HasSuffix(name, "_sum") &&
			!strings.HasSuffix(name, "_count") && !used[name] {
			t.Errorf("%s is not on the dashboard", name)
		}
	}
}

// TestDashboardShape: the dashboard parses as Grafana expects it: unique
// panel ids, every panel placed on the grid, every query with a refId and
// the data source variable.
func TestDashboardShape(t *testing.T) {
	d := readDashboard(t)
	if d.UID == "" || d.Title == "" || d.SchemaVersion == 0 {
		t.Errorf("uid %q, title %q, schemaVersion %d: all three are required", d.UID, d.Title, d.SchemaVersion)
	}
	ids := map[int]bool{}
	queries := 0
	for _, p := range d.Panels {
		if ids[p.ID] || p.ID == 0 {
			t.Errorf("panel %q: id %d is not unique", p.Title, p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q: gridPos %+v off the 24-column grid", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		refs := map[string]bool{}
		for _, q := range p.Targets {
			queries++
			if q.RefID == "" || refs[q.RefID] {
				t.Errorf("panel %q: refId %q missing or repeated", p.Title, q.RefID)
			}
			refs[q.RefID] = true
			if q.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q: query %s on data source %q, want ${datasource}", p.Title, q.RefID, q.Datasource.UID)
			}
		}
	}
	if queries == 0 {
		t.Error("no queries")
	}
}

type grafanaDashboard struct {
	UID           string `json:"uid"`
	Title         string `json:"title"`
	SchemaVersion int    `json:"schemaVersion"`
	Panels        []struct {
		ID      int    `json:"id"`
		Type    string `json:"type"`
		Title   string `json:"title"`
		GridPos struct {
			X, Y, W, H int
		} `json:"gridPos"`
		Targets []struct {
			Expr       string `json:"expr"`
			RefID      string `json:"refId"`
			Datasource struct {
				UID string `json:"uid"`
			} `json:"datasource"`
		} `json:"targets"`
	} `json:"panels"`
	Templating struct {
		List []struct {
			Definition string `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
}

func readDashboard(t *testing.T) grafanaDashboard {
	t.Helper()
	b, err := os.ReadFile(dashboard)
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("%s: %v", dashboard, err)
	}
	return d
}

// dashboardExprs are the PromQL expressions of every panel and variable.
func dashboardExprs(t *testing.T) []string {
	d := readDashboard(t)
	var out []string
	for _, p := range d.Panels {
		for _, q := range p.Targets {
			out = append(out, q.Expr)
		}
	}
	for _, v := range d.Templating.List {
		out = append(out, v.Definition)
	}
	return out
}

var (
	// metricRE finds metric names in PromQL; label names inside braces,
	// functions and keywords are filtered out by metricNames.
	metricRE  = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	bracesRE  = regexp.MustCompile(`\{[^}]*\}|"[^"]*"|\[[^\]]*\]|\$\w+`)
	groupByRE = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
)

// metricNames returns the names in expr that look like metrics of ours or
// of the Go client (keyissuer_*, process_*, go_*).
func metricNames(expr string) []string {
	expr = groupByRE.ReplaceAllString(bracesRE.ReplaceAllString(expr, " "), " ")
	var out []string
	for _, w := range metricRE.FindAllString(expr, -1) {
		if strings.HasPrefix(w, "keyissuer_") || strings.HasPrefix(w, "process_") || strings.HasPrefix(w, "go_") {
			out = append(out, w)
		}
	}
	return out
}

type stubIssuer struct{}

func (stubIssuer) Stats() issuer.Stats { return issuer.Stats{} }

type stubToken struct{}

func (stubToken) Ready() bool        { return true }
func (stubToken) Faults() hsm.Faults { return hsm.Faults{} }

type stubStore struct{ issuer.Store }

func (stubStore) Create(context.Context, store.Record) error { return nil }

// exportedSeries returns the series names keyissuerd's metrics produce,
// with every labelled family touched once so that it shows, and the
// _bucket, _sum and _count series of each histogram.
func exportedSeries(t *testing.T) map[string]bool {
	t.Helper()
	m := metrics.New(stubIssuer{}, stubToken{}, "test")
	ctx := context.Background()
	for _, api := range []string{metrics.APIApply, metrics.APIDecrypt, metrics.APIKey, metrics.APIHealth} {
		m.Request(api, "OK", time.Millisecond)
	}
	m.IssuerEvent(ctx, issuer.Event{Kind: issuer.EventGenerated, Duration: time.Millisecond})
	m.IssuerEvent(ctx, issuer.Event{Kind: issuer.EventReconciled})
	m.IssuerEvent(ctx, issuer.Event{Kind: issuer.EventReaped})
	if err := m.Store(stubStore{}).Create(ctx, store.Record{}); err != nil {
		t.Fatal(err)
	}
	// What the daemon registers: the store's health always, the cluster's
	// metrics in cluster mode.
	m.StoreUp(func() bool { return true })
	m.Cluster(func() int { return 3 }, time.Now)
	families, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, f := range families {
		name := f.GetName()
		out[name] = true
		switch f.GetType().String() {
		case "HISTOGRAM":
			out[name+"_bucket"], out[name+"_sum"], out[name+"_count"] = true, true, true
		case "SUMMARY":
			out[name+"_sum"], out[name+"_count"] = true, true
		}
	}
	for _, want := range []string{"keyissuer_store_commit_duration_seconds_bucket", "keyissuer_apply_requests_total", "process_resident_memory_bytes",
		"keyissuer_store_up", "keyissuer_cluster_heartbeat_age_seconds"} {
		if !out[want] {
			t.Fatalf("%s not gathered: the list of exported series is incomplete", want)
		}
	}
	return out
}

func TestMetricNames(t *testing.T) {
	got := metricNames(`histogram_quantile(0.99, sum by (api, le) (rate(keyissuer_request_duration_seconds_bucket{job=~"$job",instance=~"$instance"}[$__rate_interval]))) and on (instance) go_goroutines > 0 or process_open_fds`)
	want := []string{"keyissuer_request_duration_seconds_bucket", "go_goroutines", "process_open_fds"}
	if !slices.Equal(got, want) {
		t.Errorf("metricNames = %v, want %v", got, want)
	}
}
