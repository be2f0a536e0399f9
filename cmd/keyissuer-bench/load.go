package main

import (
	"context"
	"errors"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// op is one request of a load run: worker w (0 to workers-1) performs its
// request number i (0 to n-1 in a counted run).
type op func(ctx context.Context, w, i int) error

// loadRun is what one closed-loop run observed.
type loadRun struct {
	Workers   int
	Ops       int             // successful ops counted
	Errors    int             // failed ops counted
	FirstErr  error           `json:"-"`
	Elapsed   time.Duration   // the measured span
	Latencies []time.Duration `json:"-"` // of the successful ops counted
}

// PerSecond is the throughput of successful ops.
func (r loadRun) PerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Ops) / r.Elapsed.Seconds()
}

// Err is the run's first error, if any op failed.
func (r loadRun) Err() error { return r.FirstErr }

// tally is what one worker of a run counted, merged into the run at its end.
type tally struct {
	lats     []time.Duration // of the successful ops
	errs     int
	firstErr error
}

func (t *tally) add(lat time.Duration, err error) {
	if err != nil {
		t.errs++
		if t.firstErr == nil {
			t.firstErr = err
		}
		return
	}
	t.lats = append(t.lats, lat)
}

// merge adds a worker's tally to r; the caller serialises the merges.
func (r *loadRun) merge(t tally) {
	r.Latencies = append(r.Latencies, t.lats...)
	r.Errors += t.errs
	if r.FirstErr == nil {
		r.FirstErr = t.firstErr
	}
}

// countedRun is the closed-loop load generator used for keyissuer and for
// every baseline alike: workers goroutines each perform one op at a time and
// start the next the moment it returns, until n ops have been started. The
// span runs from the first op's start to the last op's end.
func countedRun(ctx context.Context, workers, n int, fn op) loadRun {
	workers = max(1, min(workers, n))
	var (
		next    atomic.Int64
		mu      sync.Mutex
		run     = loadRun{Workers: workers, Latencies: make([]time.Duration, 0, n)}
		wg      sync.WaitGroup
		lastEnd time.Time
	)
	start := time.Now()
	for w := range workers {
		wg.Go(func() {
			t := tally{lats: make([]time.Duration, 0, n/workers+1)}
			var end time.Time
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					break
				}
				t0 := time.Now()
				err := fn(ctx, w, i)
				end = time.Now()
				t.add(end.Sub(t0), err)
			}
			mu.Lock()
			defer mu.Unlock()
			run.merge(t)
			if end.After(lastEnd) {
				lastEnd = end
			}
		})
	}
	wg.Wait()
	run.Ops = len(run.Latencies)
	run.Elapsed = lastEnd.Sub(start)
	if ctx.Err() != nil && run.FirstErr == nil {
		run.FirstErr = ctx.Err()
	}
	return run
}

// timedRun is the same closed loop run for warm+window: every worker keeps
// one op in flight from the start, and only the ops that end inside the
// window (after warm) are counted, so that both sides are measured in a
// steady state. Ops still running at the window's end are waited for but not
// counted.
func timedRun(ctx context.Context, workers int, warm, window time.Duration, fn op) loadRun {
	var (
		mu  sync.Mutex
		run = loadRun{Workers: workers, Elapsed: window}
		wg  sync.WaitGroup
		seq atomic.Int64
	)
	start := time.Now()
	from, to := start.Add(warm), start.Add(warm+window)
	for w := range workers {
		wg.Go(func() {
			var t tally
			for time.Now().Before(to) && ctx.Err() == nil {
				t0 := time.Now()
				err := fn(ctx, w, int(seq.Add(1)-1))
				end := time.Now()
				if end.Before(from) || !end.Before(to) {
					continue
				}
				t.add(end.Sub(t0), err)
			}
			mu.Lock()
			defer mu.Unlock()
			run.merge(t)
		})
	}
	wg.Wait()
	run.Ops = len(run.Latencies)
	if ctx.Err() != nil && run.FirstErr == nil {
		run.FirstErr = ctx.Err()
	}
	return run
}

// percentile returns the p-th percentile (0 < p <= 100) of ds by the
// nearest-rank method, or 0 for no samples. ds need not be sorted.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	return s[min(max(rank, 1), len(s))-1]
}

// summary is a measurement repeated over runs: its median and spread.
type summary struct {
	Runs   []float64 `json:"runs"`
	Median float64   `json:"median"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
}

func summarize(runs []float64) summary {
	if len(runs) == 0 {
		return summary{Runs: []float64{}}
	}
	s := slices.Clone(runs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return summary{Runs: runs, Median: med, Min: s[0], Max: s[len(s)-1]}
}

// ratios pairs the runs of a and b, measured side by side, and returns
// a[i]/b[i] for each.
func ratios(a, b []float64) []float64 {
	n := min(len(a), len(b))
	out := make([]float64, 0, n)
	for i := range n {
		if b[i] == 0 {
			continue
		}
		out = append(out, a[i]/b[i])
	}
	return out
}

var errBadResponse = errors.New("unexpected response")
