// Command keyissuer-bench measures keyissuer against the limits of the
// token under it. It makes a fresh SoftHSM token in a temporary directory,
// starts real keyissuerd processes on it, drives them with a closed-loop
// load generator, and runs the same load generator against each baseline
// (raw PKCS#11 calls through miekg/pkcs11 in this process, or a bare
// net/http handler) in the same run, interleaved, so that the ratios hold on
// a noisy machine. It prints a table and writes the results as JSON.
//
// Usage (`make bench` builds the binaries and runs it):
//
//	keyissuer-bench [-scale F] [-runs N] [-rows 1,2,3,4,5,6,7,8,9] [-out DIR]
//	                [-keyissuerd PATH] [-keyissuerd-pprof PATH]
//	keyissuer-bench -redraw bench-results/<time>.json
//
// Rows 2 and 3 are judged against floors measured in the same run: the
// token's signing ceiling (raw C_Sign) for applies, and for decrypts the
// durable floor (raw C_Decrypt, the destroys and one fdatasync'd line per
// decrypt). Beside bench-results/<time>.json it writes SVG charts,
// bench-results/<time>-<chart>.svg, and latest-<chart>.svg: throughput
// against concurrency with the floor drawn in, latency percentiles, and the
// key-generation curve.
//
// Rows 8 and 9 run keyissuerd on the postgres backend, against a
// PostgreSQL the benchmark starts (Debian's package, on loopback, commits
// flushed): apply and decrypt p50 against bbolt and the postgres floor (one
// round trip and one commit), and issuance with 1, 2 and 3 instances on the
// one token. Without PostgreSQL installed they report SKIPPED, except in CI.
//
// BENCH_SCALE (or -scale) stretches or shrinks every window, run and pool;
// at 1 the whole benchmark takes some 12 minutes on 2 cores, most of it
// SoftHSM generating keys for the pools, untimed.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store/pgtest"
)

const (
	keyBits = 2048
	// signingLabel is the response-signing key pair the benchmark makes in
	// its token, as `keyissuer signing-key -create` would.
	signingLabel = "keyissuer-bench-signing"
)

type bench struct {
	sz        sizes
	tmp       string // temporary: the token, the daemons' stores and sockets
	runDir    string // bench-results/<time>: logs and profiles
	logDir    string
	daemonBin string
	pprofBin  string
	selfBin   string
	hsm       *softHSM
	raw       *rawToken
	client    *apiClient
	seq       int
	daemons   []*daemon
	pg        *pgtest.Server // rows 8 and 9, started on first use
	pgErr     error
	profiles  []string
	res       results
	start     time.Time
}

func main() {
	bareListen := flag.String("bare-listen", "", "internal: serve row 2's bare handler on this address")
	bareResponse := flag.String("bare-response", "", "internal: the bare handler's canned response")
	scale := flag.Float64("scale", envScale(), "scale of every window, run and pool (default $BENCH_SCALE or 1)")
	runs := flag.Int("runs", 3, "runs of each side-by-side comparison")
	rowsFlag := flag.String("rows", "1,2,3,4,5,6,7,8,9", "rows of the table to measure")
	out := flag.String("out", "bench-results", "directory of the JSON results, logs and profiles")
	daemonBin := flag.String("keyissuerd", "bin/keyissuerd", "the keyissuerd binary to measure")
	pprofBin := flag.String("keyissuerd-pprof", "", "a keyissuerd built with -tags pprof: adds a profile pass")
	profileOps := flag.Int("profile-ops", 0, "requests per profile in the profile pass (default 60 × scale); a longer profile costs as many keys")
	redraw := flag.String("redraw", "", "draw the charts of a saved results JSON again, beside it, and exit")
	flag.Parse()
	if *redraw != "" {
		if err := redrawCharts(*redraw); err != nil {
			fmt.Fprintln(os.Stderr, "keyissuer-bench:", err)
			os.Exit(1)
		}
		return
	}
	if *bareListen != "" {
		if err := serveBare(*bareListen, *bareResponse); err != nil {
			fmt.Fprintln(os.Stderr, "keyissuer-bench:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	_, err := run(ctx, options{scale: *scale, runs: *runs, rows: *rowsFlag, out: *out, daemonBin: *daemonBin, pprofBin: *pprofBin,
		profileOps: *profileOps})
	if err != nil {
		fmt.Fprintln(os.Stderr, "keyissuer-bench:", err)
		os.Exit(1)
	}
}

func envScale() float64 {
	if v, err := strconv.ParseFloat(os.Getenv("BENCH_SCALE"), 64); err == nil && v > 0 {
		return v
	}
	return 1
}

// options are the command's flags.
type options struct {
	scale     float64
	runs      int
	rows      string // comma-separated row numbers
	out       string
	daemonBin string
	pprofBin  string
	// profileOps, when positive, replaces the scaled size of the profile
	// pass, so that a profile can be longer without the whole run.
	profileOps int
}

// run measures the rows asked for, prints the table and saves the results.
func run(ctx context.Context, o options) (*results, error) {
	if o.scale <= 0 || o.runs < 1 || o.profileOps < 0 {
		return nil, fmt.Errorf("scale %g, runs %d and profile-ops %d must be positive", o.scale, o.runs, o.profileOps)
	}
	want := map[string]bool{}
	for _, r := range strings.Split(o.rows, ",") {
		want[strings.TrimSpace(r)] = true
	}
	scale, runs, out, daemonBin, pprofBin := o.scale, o.runs, o.out, o.daemonBin, o.pprofBin
	b := &bench{sz: sizesFor(scale, runs), start: time.Now()}
	if o.profileOps > 0 {
		b.sz.Profile = max(o.profileOps, 16)
	}
	var err error
	for _, p := range []*string{&daemonBin, &pprofBin} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return nil, err
			}
			if _, err := os.Stat(*p); err != nil {
				return nil, fmt.Errorf("%w (build it with `make bench`)", err)
			}
		}
	}
	b.daemonBin, b.pprofBin = daemonBin, pprofBin
	if b.selfBin, err = os.Executable(); err != nil {
		return nil, err
	}
	b.res = results{Machine: describeMachine(), Scale: scale, Runs: runs, KeyBits: keyBits,
		Storage: "session (row 3: session and token)", Sizes: b.sz, Started: b.start}
	b.runDir = filepath.Join(out, b.start.UTC().Format("20060102T150405Z"))
	b.logDir = filepath.Join(b.runDir, "logs")
	if err := os.MkdirAll(b.logDir, 0o755); err != nil {
		return nil, err
	}
	if b.tmp, err = os.MkdirTemp("", "keyissuer-bench-"); err != nil {
		return nil, err
	}
	defer os.RemoveAll(b.tmp)
	defer func() {
		for _, d := range b.daemons {
			d.stop()
		}
		if b.pg != nil {
			if err := b.pg.Close(); err != nil {
				b.progress("%v", err)
			}
		}
	}()
	m := b.res.Machine
	b.progress("keyissuer-bench: %d cores, %s, SoftHSM %s, load %s; BENCH_SCALE=%g, %d runs per comparison",
		m.Cores, m.CPUModel, m.SoftHSMVersion, m.LoadBefore, scale, runs)
	if b.hsm, err = newSoftHSM(filepath.Join(b.tmp, "softhsm")); err != nil {
		return nil, err
	}
	if b.raw, err = openRaw(b.hsm); err != nil {
		return nil, err
	}
	defer b.raw.close()
	if b.client, err = newClient(ctx, b.hsm); err != nil {
		return nil, err
	}

	for _, step := range []struct {
		on bool
		fn func()
	}{
		{want["1"] || want["6"], func() { b.rowKeygen(ctx, want["6"]) }},
		{want["2"] || want["4"], func() { b.rowApply(ctx, want["4"]) }},
		{want["3"], func() { b.rowDecrypt(ctx) }},
		{want["5"], func() { b.rowBigStore(ctx) }},
		{want["7"], func() { b.rowTokens(ctx) }},
		{want["8"], func() { b.rowPostgres(ctx) }},
		{want["9"], func() { b.rowCluster(ctx) }},
		{true, func() { b.profilePass(ctx) }},
	} {
		if err := ctx.Err(); err != nil {
			return nil, err // interrupted: no table
		}
		if step.on {
			step.fn()
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	b.res.Finished = time.Now()
	b.res.Machine.LoadAfter = loadavg()
	b.res.Profiles = b.profiles
	slices.SortStableFunc(b.res.Rows, func(x, y row) int { return strings.Compare(x.ID[:1], y.ID[:1]) })
	b.res.writeTable(os.Stdout)
	path, err := b.res.save(out)
	if err != nil {
		return nil, err
	}
	fmt.Printf("\nresults: %s (and %s); daemon logs: %s\n", path, filepath.Join(out, "latest.json"), b.logDir)
	charts, err := b.res.writeCharts(path, true)
	if err != nil {
		return nil, err
	}
	for _, c := range charts {
		fmt.Printf("chart: %s\n", c)
	}
	for _, r := range b.res.Rows {
		if r.Verdict == "ERROR" {
			return &b.res, fmt.Errorf("row %s failed: %s", r.ID, r.Short)
		}
	}
	return &b.res, nil
}

func (b *bench) progress(format string, args ...any) {
	el := time.Since(b.start).Round(time.Second)
	fmt.Fprintf(os.Stderr, "[%5s] %s\n", el, fmt.Sprintf(format, args...))
}

func (b *bench) add(r row) {
	b.res.Rows = append(b.res.Rows, r)
}

func (b *bench) fail(id string, err error) {
	b.progress("row %s failed: %v", id, err)
	b.add(row{ID: id, What: "(failed)", Verdict: "ERROR", Short: err.Error()})
}

func (b *bench) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	b.progress("%s", msg)
	b.res.Notes = append(b.res.Notes, msg)
}

// newClient makes the merchant client's key pair and keyissuer's
// response-signing key in the token.
func newClient(ctx context.Context, h *softHSM) (*apiClient, error) {
	key, err := rsa.GenerateKey(rand.Reader, keyBits)
	if err != nil {
		return nil, err
	}
	t, err := hsm.Open(ctx, hsm.Config{Module: h.Module, TokenLabel: h.Label, PIN: h.PIN, Sessions: 2})
	if err != nil {
		return nil, err
	}
	defer t.Close()
	s, _, err := t.CreateSigningKey(ctx, signingLabel, keyBits)
	if err != nil {
		return nil, err
	}
	return &apiClient{id: "bench", key: key, serverPub: s.Public()}, nil
}
