package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keyissuer/keyissuer/issuer/store/pgtest"
)

// pgDatabase is a database on the benchmark's PostgreSQL, as a keyissuerd
// configuration names it.
type pgDatabase struct {
	DSN          string // without the password
	PasswordFile string
	password     string
}

// postgres starts the benchmark's PostgreSQL on first use, as the tests'
// harness does (Debian's package, initdb and pg_ctl in a temporary
// directory, a free loopback port, an unprivileged user), but with its
// commits flushed (fsync and synchronous_commit on), as in production.
func (b *bench) postgres() (*pgtest.Server, error) {
	if b.pg != nil || b.pgErr != nil {
		return b.pg, b.pgErr
	}
	b.progress("starting PostgreSQL (fsync on, synchronous_commit on) on loopback")
	b.pg, b.pgErr = pgtest.StartDurable()
	return b.pg, b.pgErr
}

// database creates a fresh database on the benchmark's PostgreSQL.
func (b *bench) database(name string) (*pgDatabase, error) {
	s, err := b.postgres()
	if err != nil {
		return nil, err
	}
	db, err := s.CreateDatabase(name)
	if err != nil {
		return nil, err
	}
	pw := filepath.Join(b.tmp, name+".pg-password")
	if err := os.WriteFile(pw, []byte(db.Password+"\n"), 0o600); err != nil {
		return nil, err
	}
	return &pgDatabase{DSN: db.DSN, PasswordFile: pw, password: db.Password}, nil
}

// skipOrFail records rows ids as SKIPPED when PostgreSQL is not installed,
// outside CI (it is a report, not a failure), and as failed otherwise.
func (b *bench) skipOrFail(err error, ids ...string) {
	if skip, why := pgSkip(err, os.Getenv("CI") == "true"); skip {
		for _, id := range ids {
			b.progress("row %s skipped: %s", id, why)
			b.add(row{ID: id, What: "(needs PostgreSQL)", Verdict: "SKIPPED", Short: why})
		}
		return
	}
	b.fail(ids[0], err)
}

// pgSkip says whether err, from starting PostgreSQL, skips the rows that
// need it: only when PostgreSQL is not installed, and never in CI, where
// .ci/run installs it.
func pgSkip(err error, ci bool) (bool, string) {
	if ci || !errors.Is(err, pgtest.ErrNotInstalled) {
		return false, ""
	}
	return true, err.Error()
}

// rowPostgres is row 8: apply and decrypt p50 at concurrency 1 with the
// postgres backend against bbolt, both on token storage, side by side, and
// the postgres floor in the same runs: one round trip and one commit (an
// INSERT of a record-sized row, autocommitted, synchronous_commit on) on
// the same server.
func (b *bench) rowPostgres(ctx context.Context) {
	n := b.sz.PGP50
	b.progress("row 8: apply and decrypt p50, postgres against bbolt (%d of each per run)", n)
	if _, err := b.postgres(); err != nil {
		b.skipOrFail(err, "8 apply", "8 decrypt", "8 floor")
		return
	}
	db, err := b.database("row8")
	if err != nil {
		b.fail("8 apply", err)
		return
	}
	bolt, err := b.startDaemon(ctx, daemonSpec{Name: "bolt-token", Storage: "token", PoolSize: n, Generators: 2})
	if err != nil {
		b.fail("8 apply", err)
		return
	}
	defer bolt.stop()
	pg, err := b.startDaemon(ctx, daemonSpec{Name: "pg-token", PoolSize: n, Generators: 2, Postgres: db, InstanceID: "bench-1"})
	if err != nil {
		b.fail("8 apply", err)
		return
	}
	defer pg.stop()
	conn, err := pgx.Connect(ctx, db.DSN+" password="+db.password)
	if err != nil {
		b.fail("8 floor", err)
		return
	}
	defer conn.Close(context.Background())
	// A row the size of a key's record: an id, a state, times, the client.
	if _, err := conn.Exec(ctx, `CREATE TABLE bench_floor (id text PRIMARY KEY, state text NOT NULL,
		created timestamptz NOT NULL, client text NOT NULL, customer text NOT NULL)`); err != nil {
		b.fail("8 floor", err)
		return
	}
	var floor []float64
	var floorL []time.Duration
	seq := 0
	measureFloor := func() error {
		run := countedRun(ctx, 1, n, func(ctx context.Context, _, _ int) error {
			seq++
			_, err := conn.Exec(ctx, `INSERT INTO bench_floor VALUES ($1, 'issued', now(), 'bench', $2)`,
				fmt.Sprintf("floor-%08d", seq), randomID(16))
			return err
		})
		if run.Errors > 0 {
			return fmt.Errorf("postgres floor: %w", run.FirstErr)
		}
		floor = append(floor, ms(percentile(run.Latencies, 50)))
		floorL = append(floorL, run.Latencies...)
		return nil
	}
	sides := []*p50Side{{d: bolt}, {d: pg}}
	err = b.p50Runs(ctx, n, sides, measureFloor, func(r int) {
		b.progress("  run %d/%d: apply p50 %.2f ms (postgres) vs %.2f ms (bbolt); decrypt p50 %.2f vs %.2f ms; floor %.2f ms",
			r+1, b.sz.Runs, last(sides[1].apply), last(sides[0].apply), last(sides[1].decrypt), last(sides[0].decrypt), last(floor))
	})
	if err != nil {
		b.fail("8 apply", err)
		return
	}
	fl := summarize(floor)
	for _, m := range p50Compared(sides[1], sides[0]) {
		rw := pgRow(m.name, n, m.p50, m.baseP50, fl)
		rw.Detail["postgres"], rw.Detail["bbolt"] = latencies(m.lat), latencies(m.baseLat)
		rw.Notes = append(rw.Notes, fmt.Sprintf("latency postgres %s; bbolt %s", latencyText(m.lat), latencyText(m.baseLat)))
		b.add(rw)
	}
	b.add(row{ID: "8 floor", What: "postgres floor: one round trip and one commit (an autocommitted INSERT of a record-sized row, synchronous_commit on), concurrency 1: p50",
		Unit: " ms", Cells: []string{spreadText(fl, msText)}, Target: "the floor of row 8", Verdict: "REPORT",
		Detail: map[string]any{"perRun": n, "p50Ms": fl, "latency": latencies(floorL)},
		Notes:  []string{"floor latency " + latencyText(floorL)}})
	b.profilePostgres(ctx, n)
}

// profilePostgres profiles a postgres daemon under row 8's load, n applies
// and then n decrypts one at a time, with a pprof build: on a fresh
// database and a daemon of its own, after the timed runs, so that the
// profiler touches none of them.
func (b *bench) profilePostgres(ctx context.Context, n int) {
	if b.pprofBin == "" {
		return
	}
	b.progress("row 8 profile: the postgres daemon under row 8's load (%d applies, %d decrypts)", n, n)
	fail := func(err error) { b.note("row 8 profile failed: %v", err) }
	db, err := b.database("row8_profile")
	if err != nil {
		fail(err)
		return
	}
	d, err := b.startDaemon(ctx, daemonSpec{Name: "pg-profile", PoolSize: n, Generators: 2, Postgres: db, InstanceID: "bench-profile", Profile: true})
	if err != nil {
		fail(err)
		return
	}
	defer d.stop()
	dir := filepath.Join(b.runDir, "profiles")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fail(err)
		return
	}
	err = b.waitPool(ctx, d)
	if err == nil {
		err = d.client.warmConnections(ctx, d.api, d.apiURL, 1)
	}
	if err != nil {
		fail(err)
		return
	}
	reqs, err := b.client.requests(ctx, n)
	if err != nil {
		fail(err)
		return
	}
	keys := make([]issuedKey, n)
	b.profileLoad(ctx, d, dir, "postgres-apply-c1", func() loadRun {
		return countedRun(ctx, 1, n, func(ctx context.Context, _, i int) error {
			k, err := d.apply(ctx, reqs[i])
			keys[i] = k
			return err
		})
	})
	for i := range keys {
		if err := keys[i].encrypt(); err != nil {
			fail(err)
			return
		}
	}
	if err := b.waitPool(ctx, d); err != nil {
		fail(err)
		return
	}
	b.profileLoad(ctx, d, dir, "postgres-decrypt-c1", func() loadRun {
		return countedRun(ctx, 1, n, func(ctx context.Context, _, i int) error { return d.decrypt(ctx, keys[i]) })
	})
}

// pgAddedTarget is row 8's target: what PostgreSQL on loopback may add to
// a request's p50, over bbolt.
const pgAddedTarget = 1.0 // ms

// pgRow judges row 8 for apply or decrypt: p50 with the postgres backend
// against bbolt, run by run (ms); PostgreSQL may add pgAddedTarget. floor
// is the postgres floor's p50 over the same runs, as context.
func pgRow(name string, perRun int, pg, bolt []float64, floor summary) row {
	added := make([]float64, 0, len(pg))
	for i := range min(len(pg), len(bolt)) {
		added = append(added, pg[i]-bolt[i])
	}
	k, bs, a := summarize(pg), summarize(bolt), summarize(added)
	rw := row{ID: "8 " + name, What: fmt.Sprintf("%s p50 at concurrency 1, postgres backend (token storage): ms", name), Unit: " ms",
		BaselineWhat: "bbolt backend (token storage)", Cells: []string{spreadText(k, msText)}, BaselineCell: spreadText(bs, msText),
		Target: fmt.Sprintf("≤ +%.0f ms", pgAddedTarget),
		Detail: map[string]any{"perRun": perRun, "postgresP50Ms": k, "bboltP50Ms": bs, "addedMs": a, "floorP50Ms": floor}}
	if len(a.Runs) == 0 {
		rw.Verdict, rw.Short = "ERROR", "no runs"
		return rw
	}
	rw.RatioCell = spreadText(a, func(v float64) string { return fmt.Sprintf("%+.2f ms", v) })
	rw.judge(a.Median <= pgAddedTarget, fmt.Sprintf("%.2f ms over", a.Median-pgAddedTarget))
	if len(floor.Runs) > 0 {
		rw.Notes = append(rw.Notes, fmt.Sprintf("postgres's p50 is %+.2f ms from bbolt's (median of the runs' differences); the postgres floor, one round trip and one commit, is %.2f ms in the same runs",
			a.Median, floor.Median))
	}
	return rw
}

func msText(v float64) string { return fmt.Sprintf("%.2f ms", v) }

// clusterSizes are row 9's numbers of keyissuerd instances on the token.
var clusterSizes = []int{1, 2, 3}

// rowCluster is row 9: sustained issuance (every apply waiting for a fresh
// key) with 1, 2 and 3 keyissuerd instances on the one token and one
// PostgreSQL, each with the default 2 generators and a pool of 2, the
// applies spread over the instances: keys generated per second across the
// cluster.
func (b *bench) rowCluster(ctx context.Context) {
	const gens = 2
	if _, err := b.postgres(); err != nil {
		b.skipOrFail(err, "9")
		return
	}
	// A few keys per window at the least, or the curve is noise.
	window := max(b.sz.ScaleWindow, 3*time.Second)
	rates := map[int][]float64{}
	var notes []string
	for r := range b.sz.ScaleRuns {
		var measures []func() error
		for _, n := range clusterSizes {
			measures = append(measures, func() error {
				name := fmt.Sprintf("cluster%d-run%d", n, r+1)
				db, err := b.database(strings.ReplaceAll(name, "-", "_"))
				if err != nil {
					return err
				}
				ds := make([]*daemon, 0, n)
				defer func() {
					for _, d := range ds {
						d.stop()
					}
				}()
				for i := range n {
					d, err := b.startDaemon(ctx, daemonSpec{Name: fmt.Sprintf("%s-%d", name, i+1), Prefix: name,
						PoolSize: gens, Generators: gens, Postgres: db, InstanceID: "bench-" + strconv.Itoa(i+1)})
					if err != nil {
						return err
					}
					ds = append(ds, d)
				}
				rate, err := b.issueFresh(ctx, ds, 2*gens+2, window, fmt.Sprintf("%d instance(s), across the cluster", n), &notes)
				rates[n] = append(rates[n], rate)
				return err
			})
		}
		b.progress("row 9: issuance with 1, 2 and 3 instances on one token, run %d/%d", r+1, b.sz.ScaleRuns)
		if err := b.sideBySide(r, measures...); err != nil {
			b.fail("9", err)
			return
		}
	}
	rw, pts := clusterRow(rates)
	rw.Notes = append(rw.Notes, notes...)
	b.add(rw)
	b.res.Curves.Cluster = pts
}

// clusterRow reports row 9's curve, keys/s across the cluster by number of
// instances, each against linear scaling from one instance, and its chart's
// points.
func clusterRow(rates map[int][]float64) (row, []curvePoint) {
	rw := row{ID: "9", What: "issuance with 1, 2 and 3 keyissuerd instances on one token and one PostgreSQL: keys/s across the cluster",
		Target: "report the curve", Verdict: "REPORT", Detail: map[string]any{}}
	one := summarize(rates[1])
	var pts []curvePoint
	for _, n := range clusterSizes {
		s := summarize(rates[n])
		if len(s.Runs) == 0 {
			continue
		}
		cell := fmt.Sprintf("%d: %s", n, spreadText(s, perSecText))
		pt := curvePoint{X: n, PerSecond: map[string]summary{seriesCluster: s}}
		if len(one.Runs) > 0 && one.Median > 0 {
			linear := float64(n) * one.Median
			pt.PerSecond[seriesLinear] = summary{Median: linear, Min: linear, Max: linear, Runs: []float64{linear}}
			if n > 1 {
				cell += fmt.Sprintf(" (%.0f%% of %d × one)", 100*s.Median/linear, n)
			}
		}
		rw.Cells = append(rw.Cells, cell)
		rw.Detail[strconv.Itoa(n)] = s
		pts = append(pts, pt)
	}
	if len(pts) == 0 {
		rw.Verdict, rw.Short = "ERROR", "no runs"
		return rw, nil
	}
	if len(one.Runs) > 0 && one.Median > 0 {
		best := pts[len(pts)-1]
		rw.Short = fmt.Sprintf("%d instances: %.2f× one", best.X, best.PerSecond[seriesCluster].Median/one.Median)
	}
	return rw, pts
}
