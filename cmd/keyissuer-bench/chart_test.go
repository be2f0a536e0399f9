package main

import (
	"bytes"
	"encoding/xml"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// sampleCurves are the curves of a made-up run with every row measured.
func sampleCurves() curves {
	sum := func(vs ...float64) summary { return summarize(vs) }
	lat := func(p50, p99 float64) *latencySummary {
		return &latencySummary{Samples: 480, P50: p50, P99: p99, P999: p99 * 1.2, Max: p99 * 1.3}
	}
	dec := func(scale float64) []curvePoint {
		return []curvePoint{
			{X: 1, PerSecond: map[string]summary{seriesKeyissuer: sum(440*scale, 420*scale, 470*scale),
				seriesFloor: sum(520 * scale), seriesRaw: sum(1590 * scale)}, Latency: lat(2.3, 4.1), Target: 0.85 * 520 * scale},
			{X: 8, PerSecond: map[string]summary{seriesKeyissuer: sum(1105 * scale),
				seriesFloor: sum(900 * scale), seriesRaw: sum(2832 * scale)}, Latency: lat(7.2, 20), Target: 0.7 * 2832 * scale},
		}
	}
	return curves{
		Apply: []curvePoint{
			{X: 1, PerSecond: map[string]summary{seriesKeyissuer: sum(237, 232, 324), seriesCeiling: sum(638), seriesBare: sum(2658)}, Latency: lat(3.5, 9)},
			{X: 16, PerSecond: map[string]summary{seriesKeyissuer: sum(644), seriesCeiling: sum(1019), seriesBare: sum(4025)}, Latency: lat(22, 54), Target: 815},
			{X: 64, PerSecond: map[string]summary{seriesKeyissuer: sum(860), seriesCeiling: sum(1516), seriesBare: sum(6188)}, Latency: lat(65, 107), Target: 1213},
		},
		Decrypt:     map[string][]curvePoint{"session": dec(1), "token": dec(0.3)},
		Keygen:      []curvePoint{{X: 1, PerSecond: map[string]summary{seriesKeyissuer: sum(4.2), seriesKeygen: sum(3.8)}}, {X: 2, PerSecond: map[string]summary{seriesKeyissuer: sum(7.0), seriesKeygen: sum(7.8)}}, {X: 4, PerSecond: map[string]summary{seriesKeyissuer: sum(8.2), seriesKeygen: sum(7.6)}}},
		P99TargetMs: 84.4,
	}
}

// parsedSVG is what the test reads back from a chart.
type parsedSVG struct {
	series map[string]int // data-series name → drawn elements in its group
	texts  []string
}

// parseSVG parses b strictly as XML and checks that it is an SVG document.
func parseSVG(t *testing.T, b []byte) parsedSVG {
	t.Helper()
	if bytes.Contains(b, []byte("NaN")) || bytes.Contains(b, []byte("Inf")) {
		t.Errorf("a non-finite number reached the SVG:\n%s", b)
	}
	p := parsedSVG{series: map[string]int{}}
	dec := xml.NewDecoder(bytes.NewReader(b))
	dec.Strict = true
	var stack []string // the data-series of each open element, "" outside a series
	root := true
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("the SVG does not parse: %v", err)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			if root {
				if tok.Name.Local != "svg" || tok.Name.Space != "http://www.w3.org/2000/svg" {
					t.Fatalf("root element %v, want svg in the SVG namespace", tok.Name)
				}
				root = false
			}
			cur := ""
			if len(stack) > 0 {
				cur = stack[len(stack)-1]
			}
			for _, a := range tok.Attr {
				if a.Name.Local == "data-series" {
					cur = a.Value
					p.series[cur] += 0
				}
			}
			if cur != "" && slices.Contains([]string{"polyline", "circle", "rect", "line"}, tok.Name.Local) {
				p.series[cur]++
			}
			stack = append(stack, cur)
		case xml.EndElement:
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if s := strings.TrimSpace(string(tok)); s != "" {
				p.texts = append(p.texts, s)
			}
		}
	}
	if root {
		t.Fatal("empty SVG")
	}
	return p
}

// TestChartsParse writes the charts of a full run and reads each back: it
// is an SVG document, and every series it should draw is there, drawn, and
// named in the legend.
func TestChartsParse(t *testing.T) {
	dir := t.TempDir()
	res := results{Curves: sampleCurves()}
	paths, err := res.writeCharts(filepath.Join(dir, "20261205T000000Z.json"), true)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"apply":           {seriesKeyissuer, seriesCeiling, seriesBare, seriesApplyTarget},
		"decrypt-session": {seriesKeyissuer, seriesFloor, seriesRaw, seriesDecryptTarget},
		"decrypt-token":   {seriesKeyissuer, seriesFloor, seriesRaw, seriesDecryptTarget},
		"latency":         {seriesP50, seriesP99, seriesP999, seriesP99Target},
		"keygen":          {seriesKeyissuer, seriesKeygen},
	}
	if len(paths) != len(want) {
		t.Errorf("wrote %v, want %d charts", paths, len(want))
	}
	for name, names := range want {
		t.Run(name, func(t *testing.T) {
			for _, path := range []string{filepath.Join(dir, "20261205T000000Z-"+name+".svg"), filepath.Join(dir, "latest-"+name+".svg")} {
				b, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				p := parseSVG(t, b)
				for _, s := range names {
					if p.series[s] == 0 {
						t.Errorf("%s: series %q drawn with %d elements (all series: %v)", path, s, p.series[s], p.series)
					}
					if !slices.Contains(p.texts, s) {
						t.Errorf("%s: series %q not in the legend", path, s)
					}
				}
				if len(p.series) != len(names) {
					t.Errorf("%s: series %v, want %v", path, p.series, names)
				}
			}
		})
	}
}

// TestChartMissingValues: a missing value breaks a line instead of drawing
// a point at zero, and a chart with nothing measured still parses.
func TestChartMissingValues(t *testing.T) {
	c := chart{Title: "t <&> \"quoted\"", Categories: []string{"1", "8", "64"},
		Series: []series{{Name: "a & b", Values: []float64{1, math.NaN(), 3}}}}
	b, err := c.svg()
	if err != nil {
		t.Fatal(err)
	}
	p := parseSVG(t, b)
	if got := p.series["a & b"]; got != 4 { // two polylines of one point each, two markers
		t.Errorf("%d elements drawn, want 4 (2 markers, a line broken in two)", got)
	}
	if !slices.Contains(p.texts, "t <&> \"quoted\"") {
		t.Error("the title did not survive escaping")
	}
	empty := chart{Title: "nothing", LogY: true, Categories: []string{"x"}, Series: []series{{Name: "s", Style: styleBar, Values: []float64{math.NaN()}}}}
	b, err = empty.svg()
	if err != nil {
		t.Fatal(err)
	}
	if p := parseSVG(t, b); !slices.Contains(p.texts, "no measurement") {
		t.Error("an empty chart does not say so")
	}
}

// TestRedraw: the charts can be drawn again from a saved JSON file.
func TestRedraw(t *testing.T) {
	dir := t.TempDir()
	res := results{Curves: sampleCurves(), Started: time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)}
	path, err := res.save(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := redrawCharts(path); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"apply", "decrypt-session", "decrypt-token", "latency", "keygen"} {
		b, err := os.ReadFile(strings.TrimSuffix(path, ".json") + "-" + name + ".svg")
		if err != nil {
			t.Fatal(err)
		}
		parseSVG(t, b)
	}
}

func TestFloorVerdicts(t *testing.T) {
	runs := func(v ...float64) []float64 { return v }
	lat := func(d time.Duration, n int) []time.Duration { return slices.Repeat([]time.Duration{d}, n) }
	t.Run("apply against the signing ceiling", func(t *testing.T) {
		tests := []struct {
			c         int
			kis, sign []float64
			want      string
		}{
			{c: 16, kis: runs(850, 820), sign: runs(1000, 1000), want: "PASS"},
			{c: 64, kis: runs(700, 790), sign: runs(1000, 1000), want: "FALL SHORT"},
			{c: 1, kis: runs(100), sign: runs(1000), want: "REPORT"},
			{c: 16, want: "ERROR"},
		}
		for _, tt := range tests {
			r := applyRow(tt.c, 10, tt.kis, tt.sign, runs(5000, 5000), nil, nil, nil)
			if r.Verdict != tt.want {
				t.Errorf("c=%d %v vs %v: %s (%s), want %s", tt.c, tt.kis, tt.sign, r.Verdict, r.Short, tt.want)
			}
			if !strings.Contains(r.BaselineWhat, "C_Sign") {
				t.Errorf("baseline %q, want the signing ceiling", r.BaselineWhat)
			}
		}
	})
	t.Run("p99 against twice the ideal latency", func(t *testing.T) {
		// A ceiling of 2000/s puts 64 requests at 32 ms: the bound is 64 ms.
		if r := p99Row(lat(60*time.Millisecond, 100), runs(2000, 1900, 2100)); r.Verdict != "PASS" || r.Detail["boundMs"] != 64.0 {
			t.Errorf("60 ms: %s (%s), detail %v", r.Verdict, r.Short, r.Detail)
		}
		if r := p99Row(lat(70*time.Millisecond, 100), runs(2000)); r.Verdict != "FALL SHORT" || !strings.Contains(r.Short, "6.00 ms over") {
			t.Errorf("70 ms: %s (%s)", r.Verdict, r.Short)
		}
		if r := p99Row(nil, nil); r.Verdict != "ERROR" {
			t.Errorf("no runs: %s", r.Verdict)
		}
	})
	t.Run("decrypt against the durable floor, then raw", func(t *testing.T) {
		// At c=1 the floor is the baseline (90% of it passes though it is
		// 30% of raw); at c=8 raw is (60% of raw fails though it beats the
		// floor).
		if r := decryptRow("session", 1, 10, runs(450), runs(500), runs(1500), nil, nil, nil); r.Verdict != "PASS" || r.Baseline.Median != 500 {
			t.Errorf("c=1: %s against %v", r.Verdict, r.Baseline)
		}
		if r := decryptRow("token", 8, 10, runs(600), runs(500), runs(1000), nil, nil, nil); r.Verdict != "FALL SHORT" || r.Baseline.Median != 1000 {
			t.Errorf("c=8: %s against %v", r.Verdict, r.Baseline)
		}
	})
}

// TestDurableLog: the durable floor appends whole lines.
func TestDurableLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "floor.log")
	l, err := openDurableLog(path)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := l.write(); err != nil {
			t.Fatal(err)
		}
	}
	l.close()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(b), "\n") != 3 || len(b) != 3*len(l.line) {
		t.Errorf("%d bytes, %d lines; want 3 lines of %d", len(b), strings.Count(string(b), "\n"), len(l.line))
	}
}
