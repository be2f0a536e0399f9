package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
	"github.com/keyissuer/keyissuer/server/apisig"
)

// tokenSessions is keyissuerd's token.sessions in the benchmark's
// configuration: at most that many token calls run at once.
const tokenSessions = 8

// sizes are the benchmark's dimensions at a given BENCH_SCALE. At scale 1
// the token's key generation (some 7 keys/s on 2 cores) dominates: rows 1
// and 6 generate for about 2.5 minutes, and the pools of rows 2, 3 and 5 and
// of the profiles take some 1,800 keys, 4 to 7 minutes of untimed
// generation, so that `make bench` ends within 15 minutes even on a busy
// machine. Row 2's runs
// are as long as their pool allows: 70, 110 and 160 requests at
// concurrency 1, 16 and 64, 1,020 keys over 3 runs, which also gives row 4
// its 1,000 outstanding keys.
type sizes struct {
	Runs        int           // repetitions of each side-by-side comparison
	GenWarm     time.Duration // rows 1 and 6: untimed lead-in of each window
	GenWindow   time.Duration // row 1: the counted window
	ScaleRuns   int           // row 6: repetitions at 1 and 4 sessions
	ScaleWindow time.Duration // row 6: the counted window
	Apply       map[int]int   // row 2: requests per run by concurrency
	Decrypts    int           // row 3: decrypts per run
	Outstanding int           // row 4: outstanding keys
	Records     int           // row 5: records in the big store
	P50         int           // row 5: applies and decrypts per run
	PGP50       int           // row 8: applies, decrypts and floor commits per run, each side
	Profile     int           // the profile pass: requests per profile
}

var (
	applyConcurrency   = []int{1, 16, 64}
	decryptConcurrency = []int{1, 8}
)

func sizesFor(scale float64, runs int) sizes {
	n := func(base int, least int) int { return max(least, int(float64(base)*scale+0.5)) }
	d := func(base time.Duration, least time.Duration) time.Duration {
		return max(least, time.Duration(float64(base)*scale))
	}
	s := sizes{
		Runs:        runs,
		GenWarm:     d(2*time.Second, 500*time.Millisecond),
		GenWindow:   d(10*time.Second, time.Second),
		ScaleRuns:   max(1, runs-1),
		ScaleWindow: d(6*time.Second, time.Second),
		Apply:       map[int]int{1: n(70, 4), 16: n(110, 32), 64: n(160, 128)},
		Decrypts:    n(30, 8),
		Outstanding: n(1000, 10),
		Records:     n(1_000_000, 1000),
		P50:         n(30, 5),
		PGP50:       n(30, 5),
		Profile:     n(60, 16),
	}
	s.Outstanding = min(s.Outstanding, 1000)
	s.Records = min(s.Records, 1_000_000)
	return s
}

// rowKeygen measures rows 1 and 6: applies per second when every apply
// waits for a fresh key, against a raw C_GenerateKeyPair loop with the same
// number of sessions, at 2 (row 1: the default) and at 1 and 4 generators.
func (b *bench) rowKeygen(ctx context.Context, withScaling bool) {
	gens := []int{2}
	if withScaling {
		gens = []int{2, 1, 4}
	}
	kis := map[int][]float64{}
	raw := map[int][]float64{}
	var notes []string
	runsOf := func(g int) int {
		if g == 2 {
			return b.sz.Runs
		}
		return b.sz.ScaleRuns
	}
	for r := range b.sz.Runs {
		for gi, g := range gens {
			if r >= runsOf(g) {
				continue
			}
			window := b.sz.GenWindow
			if g != 2 {
				window = b.sz.ScaleWindow
			}
			measureKIS := func() error {
				d, err := b.startDaemon(ctx, daemonSpec{Name: fmt.Sprintf("gen%d", g), PoolSize: g, Generators: g})
				if err != nil {
					return err
				}
				defer d.stop()
				rate, err := b.issueFresh(ctx, []*daemon{d}, 2*g+2, window, fmt.Sprintf("keyissuer, %d generators", g), &notes)
				kis[g] = append(kis[g], rate)
				return err
			}
			measureRaw := func() error {
				run, err := b.raw.keygen(ctx, g, b.sz.GenWarm, window)
				if err != nil {
					return err
				}
				raw[g] = append(raw[g], run.PerSecond())
				b.progress("  raw C_GenerateKeyPair, %d sessions: %.2f keys/s (%d in %s)", g, run.PerSecond(), run.Ops, window)
				return nil
			}
			b.progress("rows 1/6: key generation, %d session(s), run %d/%d", g, r+1, runsOf(g))
			if err := b.sideBySide(r+gi, measureKIS, measureRaw); err != nil {
				b.fail("1", err)
				return
			}
		}
	}
	row1 := ratioRow("1", "sustained issuance: applies/s over HTTP, every apply waiting for a fresh key (2 generators)",
		"raw C_GenerateKeyPair loop, 2 sessions", "/s", kis[2], raw[2], 0.90, true)
	row1.Notes = notes
	b.add(row1)
	for _, g := range []int{1, 2, 4} {
		if len(kis[g]) == 0 {
			continue
		}
		b.res.Curves.Keygen = append(b.res.Curves.Keygen, curvePoint{X: g,
			PerSecond: map[string]summary{seriesKeyissuer: summarize(kis[g]), seriesKeygen: summarize(raw[g])}})
	}
	if !withScaling {
		return
	}
	curve := map[string]any{}
	best, bestRate := 0, 0.0
	for _, g := range []int{1, 2, 4} {
		k, r := summarize(kis[g]), summarize(raw[g])
		curve[strconv.Itoa(g)] = map[string]any{"keyissuer": k, "raw": r, "ratio": summarize(ratios(kis[g], raw[g]))}
		if k.Median > bestRate*1.05 { // more generators only for a clear gain
			best, bestRate = g, k.Median
		}
	}
	row6 := row{
		ID:     "6",
		What:   "key generation scaling: keys/s with 1, 2 and 4 generators",
		Target: "report the curve; choose the default",
		Detail: map[string]any{"curve": curve, "bestGenerators": best},
	}
	for _, g := range []int{1, 2, 4} {
		k, r := summarize(kis[g]), summarize(raw[g])
		row6.Cells = append(row6.Cells, fmt.Sprintf("%d: %.1f vs raw %.1f (%.0f%%)", g, k.Median, r.Median,
			100*summarize(ratios(kis[g], raw[g])).Median))
	}
	row6.Verdict = "REPORT"
	row6.Short = fmt.Sprintf("best: %d generators (the default is 2)", best)
	if best != 2 {
		row6.Short += fmt.Sprintf("; %d measured %.0f%% of the best", 2, 100*summarize(kis[2]).Median/bestRate)
	}
	b.add(row6)
}

// issueFresh measures the load of rows 1 and 9, sustained issuance: with
// every pool of ds full, perDaemon closed-loop workers on each daemon
// (2 × generators + 2 keeps an apply waiting for each generator), every
// apply waiting for a fresh key, counted over window after b.sz.GenWarm. It
// returns applies/s and notes failed applies under what.
func (b *bench) issueFresh(ctx context.Context, ds []*daemon, perDaemon int, window time.Duration, what string, notes *[]string) (float64, error) {
	if err := b.waitPool(ctx, ds...); err != nil {
		return 0, err
	}
	for _, d := range ds {
		if err := d.client.warmConnections(ctx, d.api, d.apiURL, perDaemon); err != nil {
			return 0, err
		}
	}
	// Signed inside the loop: at 7 applies/s the client's signatures cost
	// next to nothing.
	run := timedRun(ctx, perDaemon*len(ds), b.sz.GenWarm, window, func(ctx context.Context, w, _ int) error {
		_, err := ds[w%len(ds)].applyNow(ctx)
		return err
	})
	if run.Errors > 0 {
		*notes = append(*notes, fmt.Sprintf("%s: %d applies failed: %v", what, run.Errors, run.FirstErr))
	}
	b.progress("  %s: %.2f applies/s, a fresh key each (%d in %s)", what, run.PerSecond(), run.Ops, window)
	return run.PerSecond(), nil
}

// rowApply measures row 2, warm-pool applies at concurrency 1, 16 and 64
// against a bare net/http handler serving a canned response of the same
// size, and then row 4, the daemon's peak RSS.
func (b *bench) rowApply(ctx context.Context, withRSS bool) {
	pool := 0
	for _, n := range b.sz.Apply {
		pool = max(pool, n)
	}
	b.progress("row 2: warm-pool applies (pool of %d keys; %d requests per run at concurrency 1, 16, 64)",
		pool, b.sz.Apply[1]+b.sz.Apply[16]+b.sz.Apply[64])
	d, err := b.startDaemon(ctx, daemonSpec{Name: "apply", PoolSize: pool, Generators: 2})
	if err != nil {
		b.fail("2", err)
		return
	}
	defer d.stop()
	if err := b.waitPool(ctx, d); err != nil {
		b.fail("2", err)
		return
	}
	sr, err := b.client.request()
	if err != nil {
		b.fail("2", err)
		return
	}
	_, body, hdr, err := b.client.post(ctx, d.api, d.apiURL, sr)
	if err != nil {
		b.fail("2", err)
		return
	}
	answer := canned{Header: http.Header{}, Body: body}
	for _, k := range []string{"Content-Type", "Cache-Control", "Client-Id", "Response-Time", "Signature"} {
		if v := hdr.Values(k); len(v) > 0 {
			answer.Header[k] = v
		}
	}
	bare, bareURL, stopBare, err := b.startBare(ctx, answer)
	if err != nil {
		b.fail("2", err)
		return
	}
	defer stopBare()
	signKey, err := b.raw.signer(signingLabel)
	if err != nil {
		b.fail("2", err)
		return
	}
	signed := len(apisig.Content(http.MethodPost, applyPath, b.client.id, hdr.Get("Response-Time"), body))

	kisRate, bareRate, signRate := map[int][]float64{}, map[int][]float64{}, map[int][]float64{}
	kisLat, bareLat := map[int][]time.Duration{}, map[int][]time.Duration{}
	kisCPU, bareCPU, signCPU := map[int]*cpuTally{}, map[int]*cpuTally{}, map[int]*cpuTally{}
	for _, c := range applyConcurrency {
		kisCPU[c], bareCPU[c], signCPU[c] = &cpuTally{}, &cpuTally{}, &cpuTally{}
	}
	var notes []string
	for r := range b.sz.Runs {
		for ci, c := range applyConcurrency {
			n := b.sz.Apply[c]
			reqs, err := b.client.requests(ctx, n) // untimed; the bare handler gets the same
			if err != nil {
				b.fail("2", err)
				return
			}
			measureKIS := func() error {
				if err := b.waitPool(ctx, d); err != nil {
					return err
				}
				if err := d.client.warmConnections(ctx, d.api, d.apiURL, c); err != nil {
					return err
				}
				var run loadRun
				kisCPU[c].add(metered(d.cmd.Process.Pid, func() {
					run = countedRun(ctx, c, n, func(ctx context.Context, _, i int) error {
						_, err := d.apply(ctx, reqs[i])
						return err
					})
				}), n)
				if run.Errors > 0 {
					notes = append(notes, fmt.Sprintf("c=%d: %d applies failed: %v", c, run.Errors, run.FirstErr))
				}
				kisRate[c] = append(kisRate[c], run.PerSecond())
				kisLat[c] = append(kisLat[c], run.Latencies...)
				return nil
			}
			// Every side starts with the daemon's pool full: after
			// keyissuer's run the daemon refills what it drained, and
			// that key generation must not take the cores from the
			// baselines measured next.
			measureBare := func() error {
				if err := b.waitPool(ctx, d); err != nil {
					return err
				}
				if err := b.client.warmConnections(ctx, bare, bareURL, c); err != nil {
					return err
				}
				var run loadRun
				bareCPU[c].add(metered(0, func() {
					run = countedRun(ctx, c, n, func(ctx context.Context, _, i int) error {
						ar, _, _, err := b.client.post(ctx, bare, bareURL, reqs[i])
						if err == nil && ar.Result.ResultCode != "SUCCESS" {
							err = errBadResponse
						}
						return err
					})
				}), n)
				if run.Errors > 0 {
					return fmt.Errorf("bare handler: %d errors: %w", run.Errors, run.FirstErr)
				}
				bareRate[c] = append(bareRate[c], run.PerSecond())
				bareLat[c] = append(bareLat[c], run.Latencies...)
				return nil
			}
			measureSign := func() error {
				if err := b.waitPool(ctx, d); err != nil {
					return err
				}
				var run loadRun
				var err error
				signCPU[c].add(metered(0, func() {
					run, err = b.raw.sign(ctx, min(c, tokenSessions), n, signKey, signed)
				}), n)
				if err != nil {
					return err
				}
				signRate[c] = append(signRate[c], run.PerSecond())
				return nil
			}
			if err := b.sideBySide(r+ci, measureKIS, measureBare, measureSign); err != nil {
				b.fail("2", err)
				return
			}
			b.progress("  run %d/%d, c=%d: keyissuer %.0f/s, bare %.0f/s, token C_Sign %.0f/s (%d requests each)", r+1, b.sz.Runs, c,
				last(kisRate[c]), last(bareRate[c]), last(signRate[c]), n)
		}
	}
	for _, c := range applyConcurrency {
		rw := applyRow(c, b.sz.Apply[c], kisRate[c], signRate[c], bareRate[c], kisLat[c], bareLat[c], notes)
		applyCPUNotes(&rw, summarize(signRate[c]).Median, *kisCPU[c], *bareCPU[c], *signCPU[c])
		b.add(rw)
		k, ceil, bare := summarize(kisRate[c]), summarize(signRate[c]), summarize(bareRate[c])
		pt := curvePoint{X: c, PerSecond: map[string]summary{seriesKeyissuer: k, seriesCeiling: ceil, seriesBare: bare}}
		if applyJudged(c) {
			pt.Target = applyTarget * ceil.Median
		}
		l := latencies(kisLat[c])
		pt.Latency = &l
		b.res.Curves.Apply = append(b.res.Curves.Apply, pt)
	}
	lat := p99Row(kisLat[64], signRate[64])
	if bound, ok := lat.Detail["boundMs"].(float64); ok {
		b.res.Curves.P99TargetMs = bound
	}
	b.add(lat)

	if !withRSS {
		return
	}
	b.rowRSS(ctx, d)
}

// rowRSS is row 4: the apply daemon's peak RSS once it holds the target's
// outstanding keys, and its full pool.
func (b *bench) rowRSS(ctx context.Context, d *daemon) {
	h, err := d.health(ctx)
	if err != nil {
		b.fail("4", err)
		return
	}
	if short := b.sz.Outstanding - h.OutstandingKeys; short > 0 {
		b.progress("row 4: applying %d more keys to reach %d outstanding (untimed)", short, b.sz.Outstanding)
		for short > 0 {
			n := min(short, d.spec.PoolSize)
			if _, err := d.applyMany(ctx, n, 8); err != nil {
				b.fail("4", err)
				return
			}
			short -= n
		}
	}
	if err := b.waitPool(ctx, d); err != nil {
		b.fail("4", err)
		return
	}
	if h, err = d.health(ctx); err != nil {
		b.fail("4", err)
		return
	}
	rss, err := d.peakRSS()
	if err != nil {
		b.fail("4", err)
		return
	}
	const limit = 64 << 20
	rw := row{
		ID:     "4",
		What:   fmt.Sprintf("peak RSS (VmHWM) of keyissuerd with %d outstanding keys and a %d-key pool", h.OutstandingKeys, h.PoolReady),
		Target: "≤ 64 MiB",
		Cells:  []string{fmt.Sprintf("%.1f MiB", float64(rss)/(1<<20))},
		Detail: map[string]any{"vmHWMBytes": rss, "outstanding": h.OutstandingKeys, "pool": h.PoolReady},
	}
	if h.PoolReady > 64 {
		rw.Notes = append(rw.Notes, fmt.Sprintf("measured on row 2's daemon: its pool holds %d keys, more than the target's 64, so the figure is an upper bound", h.PoolReady))
	}
	if h.OutstandingKeys < 1000 {
		rw.Verdict = "n/a"
		rw.Short = fmt.Sprintf("only %d outstanding keys at this BENCH_SCALE", h.OutstandingKeys)
	} else {
		rw.judge(rss <= limit, fmt.Sprintf("%.1f MiB over", float64(rss-limit)/(1<<20)))
	}
	b.add(rw)
}

// rowDecrypt is row 3: decrypt and destroy over the Unix socket, at
// concurrency 1 and 8, in session and token storage, against the durable
// floor (raw C_Decrypt, two C_DestroyObject and one fdatasync'd line in a
// file beside the daemon's store) and the raw decrypt that writes nothing,
// three sides of one comparison.
func (b *bench) rowDecrypt(ctx context.Context) {
	material, err := keyMaterial(4)
	if err != nil {
		b.fail("3", err)
		return
	}
	n := b.sz.Decrypts
	for _, storage := range []string{"session", "token"} {
		b.progress("row 3: decrypt + destroy, %s storage (%d decrypts per run, pool of %d)", storage, n, n+1)
		d, err := b.startDaemon(ctx, daemonSpec{Name: "decrypt-" + storage, Storage: storage, PoolSize: n + 1, Generators: 2})
		if err != nil {
			b.fail("3", err)
			return
		}
		// The floor's file sits beside the daemon's store, on the same
		// filesystem.
		durable, err := openDurableLog(filepath.Join(d.dir, "durable-floor.log"))
		if err != nil {
			d.stop()
			b.fail("3", err)
			return
		}
		mech := decryptMechanism(d.paddingMethod())
		kisRate, rawRate, floorRate := map[int][]float64{}, map[int][]float64{}, map[int][]float64{}
		kisLat, rawLat, floorLat := map[int][]time.Duration{}, map[int][]time.Duration{}, map[int][]time.Duration{}
		kisCPU, floorCPU := map[int]*cpuTally{}, map[int]*cpuTally{}
		rttRate := map[int][]float64{} // no-op requests over the same socket and client
		for _, c := range decryptConcurrency {
			kisCPU[c], floorCPU[c] = &cpuTally{}, &cpuTally{}
		}
		for r := range b.sz.Runs {
			for ci, c := range decryptConcurrency {
				measureKIS := func() error {
					if err := b.waitPool(ctx, d); err != nil {
						return err
					}
					keys, err := d.applyMany(ctx, n+1, 8)
					if err != nil {
						return err
					}
					if err := b.waitPool(ctx, d); err != nil { // the refill the applies started
						return err
					}
					countedRun(ctx, c, c, func(ctx context.Context, _, _ int) error { _, err := d.health(ctx); return err })
					if err := d.decrypt(ctx, keys[0]); err != nil { // warm-up, untimed
						return err
					}
					// The client's path alone: as many no-op requests
					// (health) over the same socket, client and
					// concurrency, which the floors do not pay.
					rtt := countedRun(ctx, c, n, func(ctx context.Context, _, _ int) error { _, err := d.health(ctx); return err })
					if rtt.Errors > 0 {
						return fmt.Errorf("health requests: %d errors: %w", rtt.Errors, rtt.FirstErr)
					}
					rttRate[c] = append(rttRate[c], rtt.PerSecond())
					var run loadRun
					kisCPU[c].add(metered(d.cmd.Process.Pid, func() {
						run = countedRun(ctx, c, n, func(ctx context.Context, _, i int) error {
							return d.decrypt(ctx, keys[1+i])
						})
					}), n)
					if run.Errors > 0 {
						return fmt.Errorf("keyissuer decrypts: %d errors: %w", run.Errors, run.FirstErr)
					}
					kisRate[c] = append(kisRate[c], run.PerSecond())
					kisLat[c] = append(kisLat[c], run.Latencies...)
					return nil
				}
				// measureRaw times the raw decrypt, and with a durable log
				// the durable floor.
				measureRaw := func(log *durableLog, rate map[int][]float64, lat map[int][]time.Duration) func() error {
					return func() error {
						keys, err := b.raw.importKeys(n+1, storage == "token", material)
						if err != nil {
							return err
						}
						if _, err := b.raw.decryptDestroy(ctx, 1, keys[:1], mech, log); err != nil { // warm-up
							return err
						}
						var run loadRun
						u := metered(0, func() { run, err = b.raw.decryptDestroy(ctx, c, keys[1:], mech, log) })
						if err != nil {
							return err
						}
						if log != nil {
							floorCPU[c].add(u, len(keys)-1)
						}
						rate[c] = append(rate[c], run.PerSecond())
						lat[c] = append(lat[c], run.Latencies...)
						return nil
					}
				}
				if err := b.sideBySide(r+ci, measureKIS, measureRaw(durable, floorRate, floorLat), measureRaw(nil, rawRate, rawLat)); err != nil {
					durable.close()
					d.stop()
					b.fail("3", err)
					return
				}
				b.progress("  run %d/%d, c=%d: keyissuer %.0f/s, durable floor %.0f/s, raw %.0f/s", r+1, b.sz.Runs, c,
					last(kisRate[c]), last(floorRate[c]), last(rawRate[c]))
			}
		}
		durable.close()
		d.stop()
		if b.res.Curves.Decrypt == nil {
			b.res.Curves.Decrypt = map[string][]curvePoint{}
		}
		for _, c := range decryptConcurrency {
			rw := decryptRow(storage, c, n, kisRate[c], floorRate[c], rawRate[c], kisLat[c], floorLat[c], rawLat[c])
			decryptCPUNotes(&rw, *kisCPU[c], *floorCPU[c])
			decryptRTTNotes(&rw, kisRate[c], floorRate[c], rttRate[c])
			b.add(rw)
			k, fl, raw := summarize(kisRate[c]), summarize(floorRate[c]), summarize(rawRate[c])
			l := latencies(kisLat[c])
			b.res.Curves.Decrypt[storage] = append(b.res.Curves.Decrypt[storage], curvePoint{X: c, Latency: &l,
				PerSecond: map[string]summary{seriesKeyissuer: k, seriesFloor: fl, seriesRaw: raw},
				Target:    decryptTarget(c, fl, raw)})
		}
	}
}

// rowBigStore is row 5: apply and decrypt p50 at concurrency 1 with a
// million records in the store against an empty store, two daemons side by
// side.
func (b *bench) rowBigStore(ctx context.Context) {
	dir := filepath.Join(b.tmp, "bigstore")
	path := filepath.Join(dir, "keyissuer.db")
	start := time.Now()
	if err := b.makeStore(ctx, path, b.sz.Records); err != nil {
		b.fail("5", err)
		return
	}
	fi, _ := os.Stat(path)
	b.progress("  store of %d records: %.0f MiB, written in %s (untimed)", b.sz.Records, float64(fi.Size())/(1<<20), time.Since(start).Round(time.Second))
	n := b.sz.P50
	empty, err := b.startDaemon(ctx, daemonSpec{Name: "store-empty", PoolSize: n, Generators: 2})
	if err != nil {
		b.fail("5", err)
		return
	}
	defer empty.stop()
	big, err := b.startDaemon(ctx, daemonSpec{Name: "store-1m", PoolSize: n, Generators: 2, StorePath: path})
	if err != nil {
		b.fail("5", err)
		return
	}
	defer big.stop()
	b.progress("  keyissuerd started in %s on the empty store, %s on the big one (open and reconciliation)",
		empty.StartedIn.Round(time.Millisecond), big.StartedIn.Round(time.Millisecond))

	sides := []*p50Side{{d: empty}, {d: big}}
	err = b.p50Runs(ctx, n, sides, nil, func(r int) {
		b.progress("  run %d/%d: apply p50 %.2f ms (1M) vs %.2f ms (empty); decrypt p50 %.2f vs %.2f ms", r+1, b.sz.Runs,
			last(sides[1].apply), last(sides[0].apply), last(sides[1].decrypt), last(sides[0].decrypt))
	})
	if err != nil {
		b.fail("5", err)
		return
	}
	for _, m := range p50Compared(sides[1], sides[0]) {
		rw := ratioRow("5 "+m.name, fmt.Sprintf("%s p50 at concurrency 1 with %d records in the store: ms", m.name, b.sz.Records),
			"the same on an empty store", " ms", m.p50, m.baseP50, 1.20, false)
		rw.Detail = map[string]any{"records": b.sz.Records, "perRun": n,
			"bigStore": latencies(m.lat), "emptyStore": latencies(m.baseLat),
			"startup": map[string]string{"empty": empty.StartedIn.String(), "big": big.StartedIn.String()}}
		rw.Notes = append(rw.Notes, fmt.Sprintf("keyissuerd start-up (token open, store open, reconciliation): %s with the big store, %s empty",
			big.StartedIn.Round(time.Millisecond), empty.StartedIn.Round(time.Millisecond)))
		if b.sz.Records < 1_000_000 {
			rw.Verdict, rw.Short = "n/a", fmt.Sprintf("only %d records at this BENCH_SCALE", b.sz.Records)
		}
		b.add(rw)
	}
}

// p50Side is one daemon of a comparison of apply and decrypt p50 at
// concurrency 1: the p50 of each run, in ms, and every latency.
type p50Side struct {
	d                *daemon
	apply, decrypt   []float64
	applyL, decryptL []time.Duration
}

// p50Measure is one measure, apply or decrypt, of a p50 comparison: a
// side's p50 per run and latencies, and the baseline side's.
type p50Measure struct {
	name         string
	p50, baseP50 []float64
	lat, baseLat []time.Duration
}

// p50Compared pairs side s with the baseline side base, apply then decrypt.
func p50Compared(s, base *p50Side) []p50Measure {
	return []p50Measure{
		{"apply", s.apply, base.apply, s.applyL, base.applyL},
		{"decrypt", s.decrypt, base.decrypt, s.decryptL, base.decryptL},
	}
}

// p50Runs measures b.sz.Runs runs of n applies and then n decrypts of the
// keys issued, one at a time, on each side in turn, with every pool full
// before each timed run, the order rotating from one run to the next.
// extra, if set, is a baseline measured in the same rotation; after, if
// set, reports each run.
func (b *bench) p50Runs(ctx context.Context, n int, sides []*p50Side, extra func() error, after func(r int)) error {
	ds := make([]*daemon, len(sides))
	for i, s := range sides {
		ds[i] = s.d
	}
	for r := range b.sz.Runs {
		var measures []func() error
		for _, s := range sides {
			measures = append(measures, func() error { return b.p50Run(ctx, n, s, ds) })
		}
		if extra != nil {
			measures = append(measures, extra)
		}
		if err := b.sideBySide(r, measures...); err != nil {
			return err
		}
		if after != nil {
			after(r)
		}
	}
	return nil
}

// p50Run is one run of p50Runs on one side.
func (b *bench) p50Run(ctx context.Context, n int, s *p50Side, all []*daemon) error {
	if err := b.waitPool(ctx, all...); err != nil {
		return err
	}
	if err := s.d.client.warmConnections(ctx, s.d.api, s.d.apiURL, 1); err != nil {
		return err
	}
	reqs, err := b.client.requests(ctx, n)
	if err != nil {
		return err
	}
	keys := make([]issuedKey, n)
	run := countedRun(ctx, 1, n, func(ctx context.Context, _, i int) error {
		k, err := s.d.apply(ctx, reqs[i])
		keys[i] = k
		return err
	})
	if run.Errors > 0 {
		return run.FirstErr
	}
	s.apply = append(s.apply, ms(percentile(run.Latencies, 50)))
	s.applyL = append(s.applyL, run.Latencies...)
	for i := range keys {
		if err := keys[i].encrypt(); err != nil {
			return err
		}
	}
	if err := b.waitPool(ctx, all...); err != nil {
		return err
	}
	if _, err := s.d.health(ctx); err != nil {
		return err
	}
	run = countedRun(ctx, 1, n, func(ctx context.Context, _, i int) error { return s.d.decrypt(ctx, keys[i]) })
	if run.Errors > 0 {
		return run.FirstErr
	}
	s.decrypt = append(s.decrypt, ms(percentile(run.Latencies, 50)))
	s.decryptL = append(s.decryptL, run.Latencies...)
	return nil
}

// makeStore writes n finished records, closed over the last 20 days (inside
// the default retention, so the reaper prunes none), directly with the store
// package. Ids are generated sorted, and closing times rise with them, so
// that both the records and the closed index load by appending.
func (b *bench) makeStore(ctx context.Context, path string, n int) error {
	b.progress("row 5: writing a store of %d records (untimed)", n)
	st, err := bolt.Open(path, bolt.Options{})
	if err != nil {
		return err
	}
	defer st.Close()
	ids := make([]string, n)
	for i := range ids {
		if i%10000 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		ids[i] = randomID(32)
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	now := time.Now().UTC()
	span := 20 * 24 * time.Hour
	states := []store.State{store.Consumed, store.Consumed, store.Consumed, store.Consumed, store.Consumed,
		store.Consumed, store.Consumed, store.Consumed, store.Expired, store.Lost}
	const batch = 50_000
	last := time.Now()
	for i := 0; i < len(ids); i += batch {
		recs := make([]store.Record, 0, batch)
		for j := i; j < min(i+batch, len(ids)); j++ {
			closed := now.Add(-span + time.Duration(float64(span)*float64(j)/float64(len(ids))))
			issued := closed.Add(-time.Duration(j%600) * time.Second)
			recs = append(recs, store.Record{
				UniqueID:   ids[j],
				Salt:       randomID(12),
				CustomerID: "21" + strconv.FormatInt(int64(8000000000000000+j), 10)[:14],
				State:      states[j%len(states)],
				IssuedAt:   issued,
				ExpiresAt:  issued.Add(10 * time.Minute),
				ClosedAt:   closed,
			})
		}
		if err := st.Import(ctx, recs); err != nil {
			return err
		}
		if time.Since(last) > 10*time.Second {
			last = time.Now()
			b.progress("  %d/%d records", i+len(recs), len(ids))
		}
	}
	return nil
}

const idAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// randomID returns n characters of [A-Za-z0-9], without modulo bias, like
// keyissuer's uniqueIds and salts.
func randomID(n int) string {
	out := make([]byte, 0, n)
	buf := make([]byte, n+n/2)
	for len(out) < n {
		rand.Read(buf)
		for _, c := range buf {
			if c < 248 && len(out) < n { // 248 = 4*62
				out = append(out, idAlphabet[c%62])
			}
		}
	}
	return string(out)
}

// profilePass profiles the daemon (a pprof build) under the loads of rows 2
// and 3: applies at concurrency 1 and 64, decrypts at 1 and 8. Each gets a
// CPU profile, sampled at 250 Hz (the kernel's tick here bounds a thread's
// CPU-time timer: asking for more gives fewer samples than it claims), and
// an execution trace of its first second, from which the time spent blocked in system
// calls (fsync) and on locks and channels is drawn: what a CPU profile
// cannot show. Its figures are not published, as profiling slows the
// daemon.
func (b *bench) profilePass(ctx context.Context) {
	if b.pprofBin == "" {
		return
	}
	n := b.sz.Profile
	b.progress("profiles: keyissuerd under load (pool of %d keys)", n)
	d, err := b.startDaemon(ctx, daemonSpec{Name: "profile", PoolSize: n, Generators: 2, Profile: true})
	if err != nil {
		b.note("profile pass failed: %v", err)
		return
	}
	defer d.stop()
	profDir := filepath.Join(b.runDir, "profiles")
	if err := os.MkdirAll(profDir, 0o755); err != nil {
		b.note("profile pass failed: %v", err)
		return
	}
	profile := func(name string, load func() loadRun) { b.profileLoad(ctx, d, profDir, name, load) }
	waitApply := func(count int) ([]signedRequest, bool) {
		if err := b.waitPool(ctx, d); err != nil {
			b.note("profile pass failed: %v", err)
			return nil, false
		}
		reqs, err := b.client.requests(ctx, count)
		if err != nil {
			b.note("profile pass failed: %v", err)
			return nil, false
		}
		return reqs, true
	}
	if err := d.client.warmConnections(ctx, d.api, d.apiURL, 64); err != nil {
		b.note("profile pass failed: %v", err)
		return
	}
	for _, c := range []int{1, 64} {
		count := n
		if c == 1 {
			count = n / 2
		}
		reqs, ok := waitApply(count)
		if !ok {
			return
		}
		profile(fmt.Sprintf("apply-c%d", c), func() loadRun {
			return countedRun(ctx, c, count, func(ctx context.Context, _, i int) error { _, err := d.apply(ctx, reqs[i]); return err })
		})
	}
	for _, c := range decryptConcurrency {
		if err := b.waitPool(ctx, d); err != nil {
			b.note("profile pass failed: %v", err)
			return
		}
		keys, err := d.applyMany(ctx, n/2, 8)
		if err != nil {
			b.note("profile pass failed: %v", err)
			return
		}
		if err := b.waitPool(ctx, d); err != nil {
			b.note("profile pass failed: %v", err)
			return
		}
		profile(fmt.Sprintf("decrypt-c%d", c), func() loadRun {
			return countedRun(ctx, c, len(keys), func(ctx context.Context, _, i int) error { return d.decrypt(ctx, keys[i]) })
		})
	}
}

// profileLoad takes a CPU profile (250 Hz) and an execution trace (its
// first second) of d, a profiling daemon, under load, into dir as
// name.pprof and name.trace, with their summaries.
func (b *bench) profileLoad(ctx context.Context, d *daemon, dir, name string, load func() loadRun) {
	path := filepath.Join(dir, name+".pprof")
	stop, err := d.cpuProfile(ctx, 250, path)
	if err != nil {
		b.note("profile %s: %v", name, err)
		return
	}
	tracePath := filepath.Join(dir, name+".trace")
	traced := make(chan error, 1)
	go func() { traced <- d.trace(ctx, time.Second, tracePath) }()
	run := load()
	if err := stop(); err != nil {
		b.note("profile %s: %v", name, err)
		return
	}
	if err := <-traced; err != nil {
		b.note("trace %s: %v", name, err)
	}
	b.progress("  %s: %d ops, %.0f/s under the profiler, p50 %.2f ms -> %s", name, run.Ops, run.PerSecond(),
		ms(percentile(run.Latencies, 50)), path)
	b.profiles = append(b.profiles, path, tracePath)
	b.summarizeProfile(dir, name)
}

// summarizeProfile writes the top of a CPU profile and of the blocking
// profiles drawn from its trace, as text, with the go command if there is
// one.
func (b *bench) summarizeProfile(dir, name string) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		return
	}
	top := func(profile, out string) {
		if txt, err := exec.Command(gobin, "tool", "pprof", "-top", "-nodecount=40", b.pprofBin, profile).Output(); err == nil {
			os.WriteFile(out, txt, 0o644)
		}
	}
	top(filepath.Join(dir, name+".pprof"), filepath.Join(dir, name+".cpu.txt"))
	for _, kind := range []string{"syscall", "sync", "net"} {
		prof := filepath.Join(dir, name+"."+kind+".pprof")
		out, err := exec.Command(gobin, "tool", "trace", "-pprof="+kind, filepath.Join(dir, name+".trace")).Output()
		if err != nil || os.WriteFile(prof, out, 0o644) != nil {
			continue
		}
		top(prof, filepath.Join(dir, name+"."+kind+".txt"))
	}
}

// startBare runs the bare handler of row 2 as a child process of this
// binary and returns a client and URL for it.
func (b *bench) startBare(ctx context.Context, answer canned) (*http.Client, string, func(), error) {
	path := filepath.Join(b.tmp, "canned.json")
	js, err := json.Marshal(answer)
	if err != nil {
		return nil, "", nil, err
	}
	if err := os.WriteFile(path, js, 0o600); err != nil {
		return nil, "", nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, "", nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	cmd := exec.Command(b.selfBin, "-bare-listen", addr, "-bare-response", path)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, "", nil, err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	stop := func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}
	c := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256, IdleConnTimeout: time.Minute}}
	url := "http://" + addr + applyPath
	sr, err := b.client.rejected()
	if err != nil {
		stop()
		return nil, "", nil, err
	}
	for i := 0; ; i++ {
		if _, _, _, err := b.client.post(ctx, c, url, sr); err == nil {
			break
		}
		if i > 200 {
			stop()
			return nil, "", nil, fmt.Errorf("the bare handler did not answer on %s", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return c, url, stop, nil
}

// sideBySide runs the measurements of one comparison back to back,
// rotating which goes first from one run to the next, so that a drift in
// the machine's load favours no side.
func (b *bench) sideBySide(turn int, measures ...func() error) error {
	for i := range measures {
		if err := measures[(turn+i)%len(measures)](); err != nil {
			return err
		}
	}
	return nil
}

func last(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	return v[len(v)-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

type latencySummary struct {
	Samples int     `json:"samples"`
	P50     float64 `json:"p50Ms"`
	P99     float64 `json:"p99Ms"`
	P999    float64 `json:"p999Ms"`
	Max     float64 `json:"maxMs"`
}

func latencies(ds []time.Duration) latencySummary {
	return latencySummary{Samples: len(ds), P50: ms(percentile(ds, 50)), P99: ms(percentile(ds, 99)),
		P999: ms(percentile(ds, 99.9)), Max: ms(percentile(ds, 100))}
}

func latencyText(ds []time.Duration) string {
	l := latencies(ds)
	s := fmt.Sprintf("p50 %.2f / p99 %.2f / p99.9 %.2f ms", l.P50, l.P99, l.P999)
	if l.Samples < 1000 {
		s += fmt.Sprintf(" (%d samples: p99.9 is the max)", l.Samples)
	}
	return s
}
