package main

import (
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// The verdicts of rows 2 and 3 are taken against what physics allows a
// correct keyissuer, measured in the same run: its floors.
//
// Row 2's floor is the token's signing ceiling. Every applyPublicKey answer
// is signed in the token, so raw C_Sign on as many sessions as the daemon
// has is the most applies the token can answer; keyissuer must reach
// applyTarget of it at concurrency 16 and 64, and its p99 at 64 must stay
// within p99Factor times the ideal latency the ceiling implies (64 requests
// in flight at the ceiling's rate: 64 / ceiling, by Little's law). The bare
// net/http handler, the former baseline, stays as context: it measures how
// fast SoftHSM signs, not what keyissuer adds.
//
// Row 3's floor is durable: raw C_Decrypt and the two C_DestroyObject, plus
// one fdatasync of a line appended to a file on the store's filesystem per
// decrypt, as a correct keyissuer must make at least one durable write
// before it answers. keyissuer must reach decryptFloorTarget of it at
// concurrency 1; at concurrency 8, where concurrent requests can share a
// commit and so beat one flush each, it must reach decryptRawTarget of the
// raw decrypt that writes nothing.
const (
	applyTarget        = 0.80
	p99Concurrency     = 64
	p99Factor          = 2.0
	decryptFloorTarget = 0.85
	decryptRawTarget   = 0.70
)

// applyRow is row 2 at concurrency c: keyissuer's applies against the
// token's signing ceiling, run by run, with the bare handler as context.
func applyRow(c, perRun int, kis, sign, bare []float64, kisLat, bareLat []time.Duration, notes []string) row {
	sessions := min(c, tokenSessions)
	rw := ratioRow(fmt.Sprintf("2 c=%d", c), fmt.Sprintf("warm-pool apply, concurrency %d: requests/s", c),
		fmt.Sprintf("token's signing ceiling: raw C_Sign, %d session(s)", sessions), "/s", kis, sign, applyTarget, true)
	if !applyJudged(c) && rw.Verdict != "ERROR" {
		rw.Verdict, rw.Short, rw.Target = "REPORT", "", "report (targets at 16 and 64)"
	}
	vsBare := summarize(ratios(kis, bare))
	rw.Detail = map[string]any{
		"requestsPerRun":  perRun,
		"keyissuer":       latencies(kisLat),
		"bare":            latencies(bareLat),
		"barePerSec":      summarize(bare),
		"ofBare":          vsBare,
		"tokenSignPerSec": summarize(sign),
		"signSessions":    sessions,
	}
	rw.Notes = append(rw.Notes,
		fmt.Sprintf("latency keyissuer %s; bare %s", latencyText(kisLat), latencyText(bareLat)),
		fmt.Sprintf("context: the bare net/http handler (canned answer, no token) ran at %s in the same runs; keyissuer reached %s of it",
			spreadText(summarize(bare), perSecText), spreadText(vsBare, pctText)))
	if c == p99Concurrency {
		rw.Notes = append(rw.Notes, notes...)
	}
	return rw
}

// applyJudged says whether row 2 has a throughput target at concurrency c.
func applyJudged(c int) bool { return c == 16 || c == 64 }

// p99Row is row 2's latency target: keyissuer's p99 at concurrency 64, over
// every run, against p99Factor × (64 / the median signing ceiling at 64).
func p99Row(lat []time.Duration, ceiling []float64) row {
	rw := row{ID: "2 p99", What: fmt.Sprintf("warm-pool apply, concurrency %d: p99 latency", p99Concurrency),
		BaselineWhat: fmt.Sprintf("ideal latency at the signing ceiling: %d / ceiling", p99Concurrency),
		Target:       fmt.Sprintf("≤ %g × (%d / ceiling)", p99Factor, p99Concurrency)}
	ceil := summarize(ceiling).Median
	if len(lat) == 0 || ceil <= 0 {
		rw.Verdict, rw.Short = "ERROR", "no runs"
		return rw
	}
	p99 := ms(percentile(lat, 99))
	ideal := 1000 * float64(p99Concurrency) / ceil
	bound := p99Factor * ideal
	rw.Cells = []string{fmt.Sprintf("%.2f ms (%d samples)", p99, len(lat))}
	rw.BaselineCell = fmt.Sprintf("%.2f ms (ceiling %.0f/s)", ideal, ceil)
	rw.RatioCell = fmt.Sprintf("%.2f×", p99/ideal)
	rw.Target = fmt.Sprintf("≤ %g × (%d / ceiling) = %.1f ms", p99Factor, p99Concurrency, bound)
	rw.Detail = map[string]any{"p99Ms": p99, "samples": len(lat), "idealMs": ideal, "boundMs": bound, "ceilingPerSec": ceil}
	rw.judge(p99 <= bound, fmt.Sprintf("%.2f ms over", p99-bound))
	return rw
}

// decryptRow is row 3 in one storage at concurrency c: keyissuer against
// the durable floor at concurrency 1, against the raw decrypt at higher
// concurrency; the other baseline is context.
func decryptRow(storage string, c, perRun int, kis, floor, raw []float64, kisLat, floorLat, rawLat []time.Duration) row {
	id := fmt.Sprintf("3 %s c=%d", storage, c)
	what := fmt.Sprintf("decrypt + destroy over the socket, %s storage, concurrency %d: decrypts/s", storage, c)
	floorWhat := "durable floor: raw C_Decrypt + 2 × C_DestroyObject + 1 fdatasync'd line"
	rawWhat := "raw C_Decrypt + 2 × C_DestroyObject"
	vsFloor, vsRaw := summarize(ratios(kis, floor)), summarize(ratios(kis, raw))
	var rw row
	if c == 1 {
		rw = ratioRow(id, what, floorWhat, "/s", kis, floor, decryptFloorTarget, true)
		rw.Notes = append(rw.Notes, fmt.Sprintf("context: %s (no durable write) ran at %s; keyissuer reached %s of it",
			rawWhat, spreadText(summarize(raw), perSecText), spreadText(vsRaw, pctText)))
	} else {
		rw = ratioRow(id, what, rawWhat+" (concurrent commits can be shared)", "/s", kis, raw, decryptRawTarget, true)
		rw.Notes = append(rw.Notes, fmt.Sprintf("context: the durable floor (one fdatasync per decrypt, none shared) ran at %s; keyissuer reached %s of it",
			spreadText(summarize(floor), perSecText), spreadText(vsFloor, pctText)))
	}
	rw.Detail = map[string]any{"decryptsPerRun": perRun,
		"keyissuer": latencies(kisLat), "floor": latencies(floorLat), "raw": latencies(rawLat),
		"floorPerSec": summarize(floor), "rawPerSec": summarize(raw), "ofFloor": vsFloor, "ofRaw": vsRaw}
	rw.Notes = append(rw.Notes, fmt.Sprintf("latency keyissuer %s; durable floor %s; raw %s",
		latencyText(kisLat), latencyText(floorLat), latencyText(rawLat)))
	return rw
}

// decryptTarget is the throughput row 3 asks of keyissuer at concurrency c,
// for the charts.
func decryptTarget(c int, floor, raw summary) float64 {
	if c == 1 {
		return decryptFloorTarget * floor.Median
	}
	return decryptRawTarget * raw.Median
}

func perSecText(v float64) string {
	if v < 100 {
		return fmt.Sprintf("%.1f/s", v)
	}
	return fmt.Sprintf("%.0f/s", v)
}

func pctText(v float64) string { return fmt.Sprintf("%.0f%%", 100*v) }

// spreadText is a summary as the table shows it: median [min–max].
func spreadText(s summary, f func(float64) string) string {
	if len(s.Runs) < 2 {
		return f(s.Median)
	}
	return fmt.Sprintf("%s [%s–%s]", f(s.Median), f(s.Min), f(s.Max))
}

// durableLog is the durable floor's write: a line, the size of an audit
// line, appended to a file beside the daemon's store and made durable with
// fdatasync, once per decrypt. Concurrent workers append to the one file,
// each flushing its own line, as a log without group commit would.
type durableLog struct {
	f    *os.File
	line []byte
}

func openDurableLog(path string) (*durableLog, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	line := make([]byte, 320)
	for i := range line {
		line[i] = 'a' + byte(i%26)
	}
	line[len(line)-1] = '\n'
	return &durableLog{f: f, line: line}, nil
}

// write appends one line and waits for it to be on disk.
func (l *durableLog) write() error {
	if _, err := l.f.Write(l.line); err != nil {
		return fmt.Errorf("durable floor: %w", err)
	}
	rc, err := l.f.SyscallConn()
	if err != nil {
		return err
	}
	var syncErr error
	if err := rc.Control(func(fd uintptr) { syncErr = unix.Fdatasync(int(fd)) }); err != nil {
		return err
	}
	if syncErr != nil {
		return fmt.Errorf("durable floor: fdatasync: %w", syncErr)
	}
	return nil
}

func (l *durableLog) close() error { return l.f.Close() }
