package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// row is one line of the results table.
type row struct {
	ID           string         `json:"id"`
	What         string         `json:"what"`
	Unit         string         `json:"unit,omitempty"`
	KeyIssuer    *summary       `json:"keyissuer,omitempty"`
	BaselineWhat string         `json:"baselineWhat,omitempty"`
	Baseline     *summary       `json:"baseline,omitempty"`
	Ratio        *summary       `json:"ratio,omitempty"`
	Cells        []string       `json:"cells,omitempty"`        // the keyissuer column of rows without a baseline
	BaselineCell string         `json:"baselineCell,omitempty"` // the baseline column of rows without a baseline summary
	RatioCell    string         `json:"ratioCell,omitempty"`
	Target       string         `json:"target"`
	Verdict      string         `json:"verdict"` // PASS, FALL SHORT, REPORT, n/a, ERROR
	Short        string         `json:"short,omitempty"`
	Detail       map[string]any `json:"detail,omitempty"`
	Notes        []string       `json:"notes,omitempty"`
}

func (r *row) judge(pass bool, short string) {
	if pass {
		r.Verdict = "PASS"
		return
	}
	r.Verdict, r.Short = "FALL SHORT", short
}

// ratioRow compares keyissuer's runs with the baseline's, run by run. With
// higherBetter the ratio must reach target (keyissuer/baseline ≥ target);
// otherwise it must not exceed it (a latency ratio).
func ratioRow(id, what, baselineWhat, unit string, kis, base []float64, target float64, higherBetter bool) row {
	k, b, r := summarize(kis), summarize(base), summarize(ratios(kis, base))
	rw := row{ID: id, What: what, Unit: unit, KeyIssuer: &k, BaselineWhat: baselineWhat, Baseline: &b, Ratio: &r}
	if len(r.Runs) == 0 {
		rw.Verdict, rw.Short = "ERROR", "no runs"
		return rw
	}
	if higherBetter {
		rw.Target = fmt.Sprintf("≥ %.0f%%", 100*target)
		rw.judge(r.Median >= target, fmt.Sprintf("%.0f points short", 100*(target-r.Median)))
	} else {
		rw.Target = fmt.Sprintf("≤ %.0f%% slower", 100*(target-1))
		rw.judge(r.Median <= target, fmt.Sprintf("%.0f%% slower, %.0f points over", 100*(r.Median-1), 100*(r.Median-target)))
	}
	return rw
}

func (r row) cells() (kis, base, ratio string) {
	val := func(v float64) string {
		switch {
		case r.Unit == "/s" && v < 100:
			return fmt.Sprintf("%.1f/s", v)
		case r.Unit == "/s":
			return fmt.Sprintf("%.0f/s", v)
		default:
			return fmt.Sprintf("%.2f%s", v, r.Unit)
		}
	}
	spread := func(s summary, f func(float64) string) string {
		if len(s.Runs) < 2 {
			return f(s.Median)
		}
		return fmt.Sprintf("%s [%s–%s]", f(s.Median), f(s.Min), f(s.Max))
	}
	pct := func(v float64) string { return fmt.Sprintf("%.0f%%", 100*v) }
	switch {
	case r.KeyIssuer != nil:
		kis = spread(*r.KeyIssuer, val)
		base = spread(*r.Baseline, val)
		ratio = spread(*r.Ratio, pct)
	default:
		kis, base, ratio = strings.Join(r.Cells, "; "), "—", "—"
		if r.BaselineCell != "" {
			base = r.BaselineCell
		}
		if r.RatioCell != "" {
			ratio = r.RatioCell
		}
	}
	return kis, base, ratio
}

// results is the JSON file.
type results struct {
	Machine  machine   `json:"machine"`
	Scale    float64   `json:"benchScale"`
	Runs     int       `json:"runs"`
	KeyBits  int       `json:"keyBits"`
	Storage  string    `json:"storage"`
	Sizes    sizes     `json:"sizes"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
	Rows     []row     `json:"rows"`
	Profiles []string  `json:"profiles,omitempty"`
	Curves   curves    `json:"curves"` // what the charts draw
	Notes    []string  `json:"notes,omitempty"`
}

func (res *results) writeTable(w io.Writer) {
	m := res.Machine
	fmt.Fprintf(w, "\nkeyissuer benchmark, %s (%s elapsed)\n", res.Finished.Format(time.RFC3339), res.Finished.Sub(res.Started).Round(time.Second))
	fmt.Fprintf(w, "machine: %d cores, %s, %d MiB; Linux %s; %s; SoftHSM %s\n", m.Cores, m.CPUModel, m.MemoryMiB, m.Kernel, m.GoVersion, m.SoftHSMVersion)
	fmt.Fprintf(w, "load average before/after: %s / %s\n", m.LoadBefore, m.LoadAfter)
	fmt.Fprintf(w, "RSA %d-bit keys, oaep-sha256; storage %s; BENCH_SCALE=%g; %d runs per comparison, interleaved (median [min–max])\n\n",
		res.KeyBits, res.Storage, res.Scale, res.Runs)
	fmt.Fprintln(w, "| # | keyissuer measures | keyissuer | against, in the same run | baseline | ratio | target | result |")
	fmt.Fprintln(w, "| --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, r := range res.Rows {
		kis, base, ratio := r.cells()
		verdict := r.Verdict
		if r.Short != "" {
			verdict += " (" + r.Short + ")"
		}
		bw := r.BaselineWhat
		if bw == "" {
			bw = "—"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", r.ID, r.What, kis, bw, base, ratio, r.Target, verdict)
	}
	fmt.Fprintln(w)
	for _, r := range res.Rows {
		for _, n := range r.Notes {
			fmt.Fprintf(w, "- %s: %s\n", r.ID, n)
		}
	}
	for _, n := range res.Notes {
		fmt.Fprintf(w, "- %s\n", n)
	}
}

func (res *results) save(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return "", err
	}
	name := filepath.Join(dir, res.Started.UTC().Format("20060102T150405Z")+".json")
	if err := os.WriteFile(name, b, 0o644); err != nil {
		return "", err
	}
	return name, os.WriteFile(filepath.Join(dir, "latest.json"), b, 0o644)
}
