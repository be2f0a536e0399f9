package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Series names, shared by the JSON's curves and the charts' legends.
const (
	seriesKeyissuer = "keyissuer"
	seriesCeiling   = "token signing ceiling"    // row 2's floor: raw C_Sign
	seriesBare      = "bare net/http handler"    // row 2's context
	seriesFloor     = "durable floor"            // row 3's floor: raw decrypt + destroys + fdatasync
	seriesRaw       = "raw C_Decrypt + destroys" // row 3's context, and its baseline at c=8
	seriesKeygen    = "raw C_GenerateKeyPair"    // rows 1 and 6
	seriesCluster   = "keyissuer cluster"        // row 9: keys/s across the instances
	seriesLinear    = "N × one instance"         // row 9: linear scaling, what a token that scales would allow
	// What keyissuer must reach, where it has a target.
	seriesApplyTarget   = "target: 80% of the ceiling"
	seriesDecryptTarget = "target: 85% floor, 70% raw"
	seriesP99Target     = "p99 target at c=64" // row 2's latency target
	seriesP50           = "p50"
	seriesP99           = "p99"
	seriesP999          = "p99.9"
)

// curves are the measurements the charts draw, kept in the JSON so that
// `-redraw` can draw them again from a saved run.
type curves struct {
	Apply   []curvePoint            `json:"apply,omitempty"`   // row 2, by concurrency
	Decrypt map[string][]curvePoint `json:"decrypt,omitempty"` // row 3, by storage, then concurrency
	Keygen  []curvePoint            `json:"keygen,omitempty"`  // rows 1 and 6, by generators
	Cluster []curvePoint            `json:"cluster,omitempty"` // row 9, by instances
	// P99TargetMs is row 2's latency target at concurrency 64,
	// 2 × (64 / ceiling), in milliseconds.
	P99TargetMs float64 `json:"p99TargetMs,omitempty"`
}

// curvePoint is one x of a curve: throughput (median and spread over the
// runs) of every side measured there, keyissuer's latencies, and the target
// keyissuer's throughput is judged against, if any.
type curvePoint struct {
	X         int                `json:"x"`
	PerSecond map[string]summary `json:"perSecond"`
	Latency   *latencySummary    `json:"latency,omitempty"` // keyissuer's
	Target    float64            `json:"target,omitempty"`  // requests/s
}

// chartFile is one SVG the benchmark writes.
type chartFile struct {
	Name  string // file name suffix, without .svg
	Chart chart
}

// charts are the pictures of a run: throughput against concurrency with the
// floor drawn in (applies; decrypts in each storage), keyissuer's latency
// percentiles, and the key-generation curve. Only the rows measured get a
// chart.
func (cv curves) charts() []chartFile {
	var out []chartFile
	if len(cv.Apply) > 0 {
		out = append(out, chartFile{"apply", throughputChart(
			"Row 2: warm-pool applies against the token's signing ceiling", "concurrency", "requests/s", cv.Apply,
			[]seriesSpec{{seriesKeyissuer, styleLine}, {seriesCeiling, styleFloor}, {seriesBare, styleContext}}, seriesApplyTarget)})
	}
	for _, storage := range []string{"session", "token"} {
		pts := cv.Decrypt[storage]
		if len(pts) == 0 {
			continue
		}
		out = append(out, chartFile{"decrypt-" + storage, throughputChart(
			fmt.Sprintf("Row 3: decrypt + destroy, %s storage, against the durable floor", storage), "concurrency", "decrypts/s", pts,
			[]seriesSpec{{seriesKeyissuer, styleLine}, {seriesFloor, styleFloor}, {seriesRaw, styleContext}}, seriesDecryptTarget)})
	}
	if lat := cv.latencyChart(); len(lat.Categories) > 0 {
		out = append(out, chartFile{"latency", lat})
	}
	if len(cv.Keygen) > 0 {
		out = append(out, chartFile{"keygen", throughputChart(
			"Rows 1 and 6: key generation against a raw C_GenerateKeyPair loop", "generators (sessions)", "keys/s", cv.Keygen,
			[]seriesSpec{{seriesKeyissuer, styleLine}, {seriesKeygen, styleFloor}}, "")})
	}
	if len(cv.Cluster) > 0 {
		out = append(out, chartFile{"cluster", throughputChart(
			"Row 9: key generation across keyissuerd instances on one token", "instances (2 generators each)", "keys/s", cv.Cluster,
			[]seriesSpec{{seriesCluster, styleLine}, {seriesLinear, styleContext}}, "")})
	}
	return out
}

type seriesSpec struct {
	name  string
	style seriesStyle
}

// throughputChart draws the medians of each side with keyissuer's spread
// as whiskers, and the targets as marks where there are any.
func throughputChart(title, xlabel, ylabel string, pts []curvePoint, specs []seriesSpec, targetName string) chart {
	c := chart{Title: title, XLabel: xlabel, YLabel: ylabel}
	for _, p := range pts {
		c.Categories = append(c.Categories, strconv.Itoa(p.X))
	}
	for _, sp := range specs {
		s := series{Name: sp.name, Style: sp.style}
		for _, p := range pts {
			sum, ok := p.PerSecond[sp.name]
			if !ok || len(sum.Runs) == 0 {
				s.Values, s.Low, s.High = append(s.Values, math.NaN()), append(s.Low, math.NaN()), append(s.High, math.NaN())
				continue
			}
			s.Values, s.Low, s.High = append(s.Values, sum.Median), append(s.Low, sum.Min), append(s.High, sum.Max)
		}
		c.Series = append(c.Series, s)
	}
	target := series{Name: targetName, Style: styleTarget}
	has := false
	for _, p := range pts {
		if p.Target > 0 {
			target.Values, has = append(target.Values, p.Target), true
		} else {
			target.Values = append(target.Values, math.NaN())
		}
	}
	if has {
		c.Series = append(c.Series, target)
	}
	return c
}

// latencyChart is keyissuer's p50, p99 and p99.9 for every load of rows 2
// and 3, on a log axis, with row 2's p99 target.
func (cv curves) latencyChart() chart {
	c := chart{Title: "keyissuer's latency percentiles", XLabel: "load", YLabel: "ms (log scale)", LogY: true, Width: 1000}
	p50 := series{Name: seriesP50, Style: styleBar}
	p99 := series{Name: seriesP99, Style: styleBar}
	p999 := series{Name: seriesP999, Style: styleBar}
	target := series{Name: seriesP99Target, Style: styleTarget}
	addPoint := func(label string, p curvePoint, tgt float64) {
		if p.Latency == nil || p.Latency.Samples == 0 {
			return
		}
		c.Categories = append(c.Categories, label)
		p50.Values = append(p50.Values, p.Latency.P50)
		p99.Values = append(p99.Values, p.Latency.P99)
		p999.Values = append(p999.Values, p.Latency.P999)
		target.Values = append(target.Values, tgt)
	}
	for _, p := range cv.Apply {
		tgt := math.NaN()
		if p.X == 64 && cv.P99TargetMs > 0 {
			tgt = cv.P99TargetMs
		}
		addPoint(fmt.Sprintf("apply c=%d", p.X), p, tgt)
	}
	for _, storage := range []string{"session", "token"} {
		for _, p := range cv.Decrypt[storage] {
			addPoint(fmt.Sprintf("decrypt %s c=%d", storage, p.X), p, math.NaN())
		}
	}
	c.Series = []series{p50, p99, p999}
	if cv.P99TargetMs > 0 && len(cv.Apply) > 0 {
		c.Series = append(c.Series, target)
	}
	return c
}

// writeCharts writes the run's charts beside its JSON file: for
// bench-results/<time>.json, bench-results/<time>-<chart>.svg, and the same
// as latest-<chart>.svg when latest is set. It returns the paths written.
func (res *results) writeCharts(jsonPath string, latest bool) ([]string, error) {
	dir, base := filepath.Split(jsonPath)
	stem := strings.TrimSuffix(base, ".json")
	var paths []string
	for _, cf := range res.Curves.charts() {
		b, err := cf.Chart.svg()
		if err != nil {
			return paths, fmt.Errorf("chart %s: %w", cf.Name, err)
		}
		p := filepath.Join(dir, stem+"-"+cf.Name+".svg")
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return paths, err
		}
		paths = append(paths, p)
		if latest {
			if err := os.WriteFile(filepath.Join(dir, "latest-"+cf.Name+".svg"), b, 0o644); err != nil {
				return paths, err
			}
		}
	}
	return paths, nil
}

// redrawCharts draws the charts of a saved run again, beside its JSON file
// (not as latest-*.svg).
func redrawCharts(jsonPath string) error {
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		return err
	}
	var res results
	if err := json.Unmarshal(b, &res); err != nil {
		return fmt.Errorf("%s: %w", jsonPath, err)
	}
	paths, err := res.writeCharts(jsonPath, false)
	for _, p := range paths {
		fmt.Println(p)
	}
	return err
}
