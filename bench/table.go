package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
)

// cell is one server's result on one row: the samples of each repetition,
// reported as their median. capped means at least one sample hit its time
// limit, so the value is a lower bound.
type cell struct {
	samples []float64
	capped  bool
	note    string // shown instead of a value when nothing was measured
}

func (c *cell) add(v float64) { c.samples = append(c.samples, v) }

func (c *cell) median() float64 { return median(c.samples) }

func (c *cell) measured() bool { return len(c.samples) > 0 }

// row is one line of the table. Berth's median must not exceed goal.
type row struct {
	metric string
	format string // for values, e.g. "%.3f"
	berth  cell
	dist   cell
	goal   float64
	goalIs string // how the goal reads; empty means "≤ goal"
	noGoal bool   // informational rows
}

type table struct {
	rows []*row
}

func newTable() *table { return &table{} }

// add appends a row and returns it for its cells to be filled.
func (t *table) add(metric, format string) *row {
	r := &row{metric: metric, format: format}
	t.rows = append(t.rows, r)
	return r
}

func (r *row) withGoal(max float64) *row {
	r.goal = max
	return r
}

func (r *row) informational() *row {
	r.noGoal = true
	return r
}

func (r *row) value(c *cell) string {
	switch {
	case !c.measured() && c.note != "":
		return c.note
	case !c.measured():
		return "—"
	case c.capped:
		return "> " + fmt.Sprintf(r.format, c.median())
	default:
		return fmt.Sprintf(r.format, c.median())
	}
}

func (r *row) goalText() string {
	switch {
	case r.noGoal:
		return "—"
	case r.goalIs != "":
		return r.goalIs
	default:
		return "≤ " + trimFloat(fmt.Sprintf(r.format, r.goal))
	}
}

func (r *row) met() string {
	switch {
	case r.noGoal:
		return ""
	case !r.berth.measured():
		return "—"
	case !r.berth.capped && r.berth.median() <= r.goal:
		return "yes"
	default:
		return "**no**"
	}
}

func trimFloat(s string) string {
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

// write prints the table in Markdown, then every row's samples, so a noisy
// median can be told from a steady one.
func (t *table) write(w io.Writer) {
	header := []string{"metric", "berth", "distribution proxy", "goal", "met?"}
	lines := [][]string{header}
	for _, r := range t.rows {
		lines = append(lines, []string{r.metric, r.value(&r.berth), r.value(&r.dist), r.goalText(), r.met()})
	}
	widths := make([]int, len(header))
	for _, l := range lines {
		for i, c := range l {
			widths[i] = max(widths[i], displayWidth(c))
		}
	}
	for i, l := range lines {
		writeLine(w, l, widths)
		if i == 0 {
			sep := make([]string, len(l))
			for j := range sep {
				sep[j] = strings.Repeat("-", widths[j])
			}
			writeLine(w, sep, widths)
		}
	}
	header = nil
	for _, r := range t.rows {
		if len(r.berth.samples) < 2 && len(r.dist.samples) < 2 {
			continue
		}
		if header == nil {
			header = []string{"samples"}
			fmt.Fprintln(w, "\nsamples (each repetition, in run order):")
		}
		fmt.Fprintf(w, "  %s: berth %s; distribution %s\n", r.metric, samples(r.format, r.berth.samples), samples(r.format, r.dist.samples))
	}
}

func writeLine(w io.Writer, cells []string, widths []int) {
	var sb strings.Builder
	sb.WriteString("|")
	for i, c := range cells {
		sb.WriteString(" ")
		sb.WriteString(c)
		sb.WriteString(strings.Repeat(" ", widths[i]-displayWidth(c)))
		sb.WriteString(" |")
	}
	fmt.Fprintln(w, sb.String())
}

func displayWidth(s string) int { return len([]rune(s)) }

func samples(format string, v []float64) string {
	if len(v) == 0 {
		return "—"
	}
	parts := make([]string, len(v))
	for i, x := range v {
		parts[i] = fmt.Sprintf(format, x)
	}
	return strings.Join(parts, " ")
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
