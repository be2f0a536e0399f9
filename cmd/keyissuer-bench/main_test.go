package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	ms := func(vs ...int) []time.Duration {
		out := make([]time.Duration, len(vs))
		for i, v := range vs {
			out[i] = time.Duration(v) * time.Millisecond
		}
		return out
	}
	tests := []struct {
		name string
		ds   []time.Duration
		p    float64
		want time.Duration
	}{
		{name: "empty", ds: nil, p: 50, want: 0},
		{name: "one", ds: ms(7), p: 99.9, want: 7 * time.Millisecond},
		{name: "median of unsorted", ds: ms(5, 1, 4, 2, 3), p: 50, want: 3 * time.Millisecond},
		{name: "p99 of 100", ds: ms(100, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88, 87, 86, 85, 84, 83, 82, 81, 80, 79, 78, 77, 76, 75, 74, 73, 72, 71, 70, 69, 68, 67, 66, 65, 64, 63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1), p: 99, want: 99 * time.Millisecond},
		{name: "max", ds: ms(3, 9, 1), p: 100, want: 9 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := percentile(tt.ds, tt.p); got != tt.want {
				t.Errorf("percentile(%v) = %v, want %v", tt.p, got, tt.want)
			}
		})
	}
}

func TestSummarize(t *testing.T) {
	tests := []struct {
		name           string
		runs           []float64
		med, min, maxv float64
	}{
		{name: "odd", runs: []float64{3, 1, 2}, med: 2, min: 1, maxv: 3},
		{name: "even", runs: []float64{4, 1, 3, 2}, med: 2.5, min: 1, maxv: 4},
		{name: "empty", runs: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := summarize(tt.runs)
			if s.Median != tt.med || s.Min != tt.min || s.Max != tt.maxv {
				t.Errorf("summarize(%v) = %+v, want median %v in [%v, %v]", tt.runs, s, tt.med, tt.min, tt.maxv)
			}
		})
	}
}

func TestRatioRow(t *testing.T) {
	tests := []struct {
		name         string
		kis, base    []float64
		target       float64
		higherBetter bool
		want         string
	}{
		{name: "throughput reached", kis: []float64{95, 91, 99}, base: []float64{100, 100, 100}, target: 0.9, higherBetter: true, want: "PASS"},
		{name: "throughput short", kis: []float64{50, 60, 70}, base: []float64{100, 100, 100}, target: 0.9, higherBetter: true, want: "FALL SHORT"},
		{name: "paired by run", kis: []float64{45, 90}, base: []float64{50, 100}, target: 0.9, higherBetter: true, want: "PASS"},
		{name: "latency within", kis: []float64{1.1}, base: []float64{1.0}, target: 1.2, higherBetter: false, want: "PASS"},
		{name: "latency over", kis: []float64{1.5}, base: []float64{1.0}, target: 1.2, higherBetter: false, want: "FALL SHORT"},
		{name: "no runs", target: 0.9, higherBetter: true, want: "ERROR"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := ratioRow("x", "what", "baseline", "/s", tt.kis, tt.base, tt.target, tt.higherBetter)
			if r.Verdict != tt.want {
				t.Errorf("verdict %s (%s), want %s", r.Verdict, r.Short, tt.want)
			}
			if r.Verdict == "FALL SHORT" && r.Short == "" {
				t.Error("a FALL SHORT must say by how much")
			}
		})
	}
}

func TestCountedRun(t *testing.T) {
	boom := errors.New("boom")
	seen := make([]int, 10)
	run := countedRun(context.Background(), 3, 10, func(_ context.Context, w, i int) error {
		if w < 0 || w >= 3 {
			t.Errorf("worker %d out of range", w)
		}
		seen[i]++
		if i%5 == 0 {
			return boom
		}
		return nil
	})
	if run.Ops != 8 || run.Errors != 2 || !errors.Is(run.FirstErr, boom) {
		t.Errorf("run = %d ops, %d errors (%v); want 8, 2, boom", run.Ops, run.Errors, run.FirstErr)
	}
	for i, n := range seen {
		if n != 1 {
			t.Errorf("op %d ran %d times", i, n)
		}
	}
	if len(run.Latencies) != run.Ops {
		t.Errorf("%d latencies for %d ops", len(run.Latencies), run.Ops)
	}
}

// TestTimedRun checks the bookkeeping of a timed run; how many ops fit in
// the window is the machine's business, not the test's.
func TestTimedRun(t *testing.T) {
	boom := errors.New("boom")
	var calls atomic.Int64
	run := timedRun(context.Background(), 2, 5*time.Millisecond, 20*time.Millisecond, func(context.Context, int, int) error {
		if calls.Add(1)%2 == 0 {
			return boom
		}
		return nil
	})
	if len(run.Latencies) != run.Ops || run.Elapsed != 20*time.Millisecond || int64(run.Ops+run.Errors) > calls.Load() {
		t.Errorf("run = %d ops, %d errors, %d latencies, elapsed %s; %d calls", run.Ops, run.Errors, len(run.Latencies), run.Elapsed, calls.Load())
	}
	if run.Errors > 0 && !errors.Is(run.FirstErr, boom) {
		t.Errorf("first error %v, want boom", run.FirstErr)
	}
}

func TestSideBySideAlternates(t *testing.T) {
	var b bench
	var order []string
	a := func() error { order = append(order, "a"); return nil }
	c := func() error { order = append(order, "b"); return nil }
	for turn := range 2 {
		if err := b.sideBySide(turn, a, c); err != nil {
			t.Fatal(err)
		}
	}
	if got := strings.Join(order, ""); got != "abba" {
		t.Errorf("order %q, want abba", got)
	}
}

// TestSmoke runs the benchmark end to end at a tiny scale, on row 5: a
// SoftHSM token, two real keyissuerd processes (one on a store written
// with Import), signed applies and decrypts over the socket, the table and
// the JSON file. It checks that everything ran, never how fast.
func TestSmoke(t *testing.T) {
	// Without what it needs it skips on a developer's machine, and fails
	// in CI (CI=true), where make test runs without -short and .ci/run
	// installs SoftHSM.
	skip := func(msg string) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; in CI it must run")
		}
		t.Skip(msg)
	}
	if testing.Short() {
		skip("-short: it builds keyissuerd and runs it on SoftHSM")
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		skip("no go command to build keyissuerd with")
	}
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		skip("SoftHSM is not installed: run ./softhsm-setup.sh")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "keyissuerd")
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race") // shares the test's build cache
	}
	build := exec.Command(gobin, append(args, "github.com/keyissuer/keyissuer/cmd/keyissuerd")...)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build keyissuerd: %v\n%s", err, out)
	}
	res, err := run(context.Background(), options{scale: 0.001, runs: 1, rows: "5", out: filepath.Join(dir, "out"), daemonBin: bin})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Rows) != 2 {
		t.Fatalf("%d rows, want 2 (apply and decrypt of row 5)", len(res.Rows))
	}
	for _, r := range res.Rows {
		if r.KeyIssuer == nil || r.Baseline == nil || len(r.KeyIssuer.Runs) != 1 || r.KeyIssuer.Median <= 0 {
			t.Errorf("row %s: %+v", r.ID, r)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "out", "latest.json")); err != nil {
		t.Error(err)
	}
}

// TestRunRefusesBadOptions: nonsense flags fail before any token is made.
func TestRunRefusesBadOptions(t *testing.T) {
	for _, o := range []options{
		{scale: 0, runs: 1},
		{scale: 1, runs: 0},
		{scale: 1, runs: 1, profileOps: -1},
	} {
		if _, err := run(context.Background(), o); err == nil || !strings.Contains(err.Error(), "must be positive") {
			t.Errorf("run(%+v) = %v, want an error saying what must be positive", o, err)
		}
	}
}
