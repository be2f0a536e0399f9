package main

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// chart is one SVG picture of the results: a categorical x axis
// (concurrency levels, generator counts, or named loads) and one or more
// series drawn over it. It is drawn by hand with encoding/xml, which also
// escapes every name, so the benchmark needs no plotting library.
type chart struct {
	Title      string
	XLabel     string
	YLabel     string
	LogY       bool     // a logarithmic y axis (latencies spanning decades)
	Width      float64  // in pixels; 0 for the default
	Categories []string // the x axis, left to right
	Series     []series
}

// seriesStyle says how a series is drawn.
type seriesStyle int

const (
	styleLine    seriesStyle = iota // keyissuer: a solid line with markers and min–max whiskers
	styleFloor                      // the floor keyissuer is judged against: a thick dashed line
	styleContext                    // a baseline shown for context: a thin grey line
	styleTarget                     // a target: a short bar at each category that has one
	styleBar                        // grouped bars (latency percentiles)
)

// series is one named set of values, one per category; NaN where the
// series has no value. Low and High, when set, are the spread (min–max over
// the runs) drawn as whiskers.
type series struct {
	Name      string
	Style     seriesStyle
	Values    []float64
	Low, High []float64
}

// palette: keyissuer first, then floors, then context.
var palette = []string{"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"}

// el is an SVG element; encoding/xml marshals the tree and escapes its
// attribute values and text.
type el struct {
	XMLName xml.Name
	Attrs   []xml.Attr `xml:",any,attr"`
	Text    string     `xml:",chardata"`
	Kids    []*el      `xml:",any"`
}

func node(name string, kv ...string) *el {
	e := &el{XMLName: xml.Name{Local: name}}
	for i := 0; i+1 < len(kv); i += 2 {
		e.Attrs = append(e.Attrs, xml.Attr{Name: xml.Name{Local: kv[i]}, Value: kv[i+1]})
	}
	return e
}

func (e *el) add(kids ...*el) *el {
	e.Kids = append(e.Kids, kids...)
	return e
}

func text(x, y float64, anchor, s string, kv ...string) *el {
	t := node("text", append([]string{"x", num(x), "y", num(y), "text-anchor", anchor}, kv...)...)
	t.Text = s
	return t
}

func num(v float64) string { return strconv.FormatFloat(v, 'f', 1, 64) }

const (
	defaultWidth, svgH                   = 760.0, 420.0
	marginL, marginR, marginT, marginB   = 72.0, 230.0, 44.0, 64.0
	plotX0, plotY0, plotY1               = marginL, marginT, svgH - marginB
	legendY, legendRowHeight             = marginT + 4, 20.0
	fontFamily                           = "sans-serif"
	axisColour, gridColour, contextColor = "#333", "#ddd", "#888"
)

func (c chart) width() float64 {
	if c.Width > 0 {
		return c.Width
	}
	return defaultWidth
}

// plotX1 is the right edge of the plot; the legend is to its right.
func (c chart) plotX1() float64 { return c.width() - marginR }

// svg draws the chart. A chart with no finite value at all is drawn with
// its axes and a note, so that a failed row still leaves a picture that
// says so.
func (c chart) svg() ([]byte, error) {
	svgW, plotX1 := c.width(), c.plotX1()
	root := node("svg", "xmlns", "http://www.w3.org/2000/svg", "width", num(svgW), "height", num(svgH),
		"viewBox", fmt.Sprintf("0 0 %s %s", num(svgW), num(svgH)), "font-family", fontFamily, "font-size", "12")
	root.add(node("rect", "x", "0", "y", "0", "width", num(svgW), "height", num(svgH), "fill", "white"))
	root.add(text(svgW/2, 22, "middle", c.Title, "font-size", "15", "font-weight", "bold"))

	lo, hi, ok := c.yRange()
	y := c.yScale(lo, hi)
	axes := node("g", "class", "axes", "stroke", axisColour)
	for _, t := range c.ticks(lo, hi) {
		py := y(t)
		axes.add(node("line", "x1", num(plotX0), "x2", num(plotX1), "y1", num(py), "y2", num(py), "stroke", gridColour))
		axes.add(text(plotX0-6, py+4, "end", tickLabel(t), "stroke", "none", "fill", axisColour))
	}
	axes.add(node("line", "x1", num(plotX0), "x2", num(plotX0), "y1", num(plotY0), "y2", num(plotY1)))
	axes.add(node("line", "x1", num(plotX0), "x2", num(plotX1), "y1", num(plotY1), "y2", num(plotY1)))
	for i, cat := range c.Categories {
		// A long label goes on two lines: "decrypt session" over "c=8".
		first, second := cat, ""
		if j := strings.LastIndexByte(cat, ' '); j > 0 && len(cat) > 8 {
			first, second = cat[:j], cat[j+1:]
		}
		axes.add(text(c.x(i), plotY1+16, "middle", first, "stroke", "none", "fill", axisColour))
		if second != "" {
			axes.add(text(c.x(i), plotY1+30, "middle", second, "stroke", "none", "fill", axisColour))
		}
	}
	axes.add(text((plotX0+plotX1)/2, svgH-12, "middle", c.XLabel, "stroke", "none", "fill", axisColour))
	axes.add(text(18, (plotY0+plotY1)/2, "middle", c.YLabel, "stroke", "none", "fill", axisColour,
		"transform", fmt.Sprintf("rotate(-90 18 %s)", num((plotY0+plotY1)/2))))
	root.add(axes)
	if !ok {
		root.add(text((plotX0+plotX1)/2, (plotY0+plotY1)/2, "middle", "no measurement", "fill", contextColor))
	}

	bars := 0
	for _, s := range c.Series {
		if s.Style == styleBar {
			bars++
		}
	}
	bar := 0
	for i, s := range c.Series {
		colour := palette[i%len(palette)]
		if s.Style == styleContext {
			colour = contextColor
		}
		g := node("g", "class", "series", "data-series", s.Name)
		switch s.Style {
		case styleBar:
			g.add(c.bars(s, y, colour, bar, bars)...)
			bar++
		case styleTarget:
			g.add(c.targets(s, y, colour)...)
		default:
			g.add(c.line(s, y, colour)...)
		}
		root.add(g)
		root.add(legendEntry(plotX1+16, i, s, colour))
	}
	var buf bytes.Buffer
	buf.WriteString(xml.Header)
	enc := xml.NewEncoder(&buf)
	enc.Indent("", " ")
	if err := enc.Encode(root); err != nil {
		return nil, err
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

// x is the centre of category i.
func (c chart) x(i int) float64 {
	return plotX0 + (float64(i)+0.5)*(c.plotX1()-plotX0)/float64(max(1, len(c.Categories)))
}

// finite returns the series' values that can be drawn at category i.
func finite(v []float64, i int) (float64, bool) {
	if i >= len(v) || math.IsNaN(v[i]) || math.IsInf(v[i], 0) {
		return 0, false
	}
	return v[i], true
}

// yRange is the span of the y axis: from 0 (or, on a log axis, the decade
// below the smallest value) to a round number above the largest value.
func (c chart) yRange() (lo, hi float64, ok bool) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, s := range c.Series {
		for _, vs := range [][]float64{s.Values, s.Low, s.High} {
			for i := range vs {
				if v, fin := finite(vs, i); fin && (!c.LogY || v > 0) {
					lo, hi = min(lo, v), max(hi, v)
				}
			}
		}
	}
	if math.IsInf(hi, -1) {
		if c.LogY {
			return 1, 10, false
		}
		return 0, 1, false
	}
	if c.LogY {
		return logStepDown(lo), niceStep(hi * 1.0001), true
	}
	step := niceStep(hi * 1.1 / 5)
	return 0, math.Max(step, math.Ceil(hi*1.1/step)*step), true
}

func (c chart) yScale(lo, hi float64) func(float64) float64 {
	if c.LogY {
		a, b := math.Log10(lo), math.Log10(hi)
		return func(v float64) float64 {
			v = math.Max(v, lo)
			return plotY1 - (math.Log10(v)-a)/(b-a)*(plotY1-plotY0)
		}
	}
	return func(v float64) float64 { return plotY1 - (v-lo)/(hi-lo)*(plotY1-plotY0) }
}

// ticks are the y axis's labelled values: five round steps, or 1, 2 and 5
// in each decade of a log axis.
func (c chart) ticks(lo, hi float64) []float64 {
	var out []float64
	if c.LogY {
		for d := math.Pow(10, math.Floor(math.Log10(lo))); d < hi*1.0001; d *= 10 {
			for _, m := range []float64{1, 2, 5} {
				if v := d * m; v >= lo*0.9999 && v <= hi*1.0001 {
					out = append(out, v)
				}
			}
		}
		return out
	}
	step := niceStep((hi - lo) / 5)
	for v := lo; v <= hi+step/1000; v += step {
		out = append(out, v)
	}
	return out
}

// logStepDown rounds v down to 1, 2 or 5 times a power of ten.
func logStepDown(v float64) float64 {
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{5, 2, 1} {
		if m*p <= v {
			return m * p
		}
	}
	return p
}

// niceStep rounds a step up to 1, 2 or 5 times a power of ten.
func niceStep(raw float64) float64 {
	if raw <= 0 || math.IsNaN(raw) || math.IsInf(raw, 0) {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

func tickLabel(v float64) string {
	switch {
	case v == 0:
		return "0"
	case math.Abs(v) >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	default:
		return strings.TrimRight(strings.TrimRight(strconv.FormatFloat(v, 'f', 3, 64), "0"), ".")
	}
}

// line draws a series as a polyline through its finite values (broken where
// one is missing), a marker at each, and its whiskers.
func (c chart) line(s series, y func(float64) float64, colour string) []*el {
	var out []*el
	width, dash := "2", ""
	switch s.Style {
	case styleFloor:
		width, dash = "3", "8 5"
	case styleContext:
		width, dash = "1.5", "3 3"
	}
	var pts []string
	flush := func() {
		if len(pts) > 0 {
			p := node("polyline", "points", strings.Join(pts, " "), "fill", "none", "stroke", colour, "stroke-width", width)
			if dash != "" {
				p.Attrs = append(p.Attrs, xml.Attr{Name: xml.Name{Local: "stroke-dasharray"}, Value: dash})
			}
			out = append(out, p)
		}
		pts = nil
	}
	for i, cat := range c.Categories {
		v, ok := finite(s.Values, i)
		if !ok {
			flush()
			continue
		}
		x, py := c.x(i), y(v)
		pts = append(pts, num(x)+","+num(py))
		dot := node("circle", "cx", num(x), "cy", num(py), "r", "3.5", "fill", colour)
		dot.add(&el{XMLName: xml.Name{Local: "title"}, Text: fmt.Sprintf("%s, %s: %s", s.Name, cat, valueLabel(v))})
		out = append(out, dot)
		lo, okL := finite(s.Low, i)
		hi, okH := finite(s.High, i)
		if okL && okH && s.Style == styleLine {
			out = append(out,
				node("line", "x1", num(x), "x2", num(x), "y1", num(y(lo)), "y2", num(y(hi)), "stroke", colour, "stroke-width", "1"),
				node("line", "x1", num(x-5), "x2", num(x+5), "y1", num(y(lo)), "y2", num(y(lo)), "stroke", colour, "stroke-width", "1"),
				node("line", "x1", num(x-5), "x2", num(x+5), "y1", num(y(hi)), "y2", num(y(hi)), "stroke", colour, "stroke-width", "1"))
		}
	}
	flush()
	return out
}

// targets draws a short horizontal bar at each category with a target.
func (c chart) targets(s series, y func(float64) float64, colour string) []*el {
	var out []*el
	half := 0.3 * (c.plotX1() - plotX0) / float64(max(1, len(c.Categories)))
	for i, cat := range c.Categories {
		v, ok := finite(s.Values, i)
		if !ok {
			continue
		}
		x, py := c.x(i), y(v)
		l := node("line", "x1", num(x-half), "x2", num(x+half), "y1", num(py), "y2", num(py), "stroke", colour,
			"stroke-width", "2", "stroke-dasharray", "2 2")
		l.add(&el{XMLName: xml.Name{Local: "title"}, Text: fmt.Sprintf("%s, %s: %s", s.Name, cat, valueLabel(v))})
		out = append(out, l)
	}
	return out
}

// bars draws bar number k of n in each category's group.
func (c chart) bars(s series, y func(float64) float64, colour string, k, n int) []*el {
	var out []*el
	group := 0.8 * (c.plotX1() - plotX0) / float64(max(1, len(c.Categories)))
	w := group / float64(max(1, n))
	for i, cat := range c.Categories {
		v, ok := finite(s.Values, i)
		if !ok {
			continue
		}
		x := c.x(i) - group/2 + float64(k)*w
		top := y(v)
		r := node("rect", "x", num(x), "y", num(top), "width", num(w*0.9), "height", num(math.Max(0, plotY1-top)), "fill", colour)
		r.add(&el{XMLName: xml.Name{Local: "title"}, Text: fmt.Sprintf("%s, %s: %s", s.Name, cat, valueLabel(v))})
		out = append(out, r)
	}
	return out
}

func valueLabel(v float64) string {
	if v >= 100 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

func legendEntry(legendX float64, i int, s series, colour string) *el {
	y := legendY + float64(i)*legendRowHeight
	g := node("g", "class", "legend")
	switch s.Style {
	case styleBar:
		g.add(node("rect", "x", num(legendX), "y", num(y-5), "width", "18", "height", "10", "fill", colour))
	default:
		l := node("line", "x1", num(legendX), "x2", num(legendX+18), "y1", num(y), "y2", num(y), "stroke", colour, "stroke-width", "2")
		switch s.Style {
		case styleFloor:
			l.Attrs = append(l.Attrs, xml.Attr{Name: xml.Name{Local: "stroke-dasharray"}, Value: "8 5"})
		case styleContext:
			l.Attrs = append(l.Attrs, xml.Attr{Name: xml.Name{Local: "stroke-dasharray"}, Value: "3 3"})
		case styleTarget:
			l.Attrs = append(l.Attrs, xml.Attr{Name: xml.Name{Local: "stroke-dasharray"}, Value: "2 2"})
		}
		g.add(l)
	}
	g.add(text(legendX+24, y+4, "start", s.Name))
	return g
}
