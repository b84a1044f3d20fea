package coordinator

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Policy is a completion policy (--require): all nodes, at least N
// nodes, or at least P percent of them.
type Policy struct {
	All     bool
	N       int
	Percent float64
	text    string
}

// ParsePolicy reads "all", "N" (a count) or "P%" (a percentage).
func ParsePolicy(s string) (Policy, error) {
	s = strings.TrimSpace(s)
	switch {
	case s == "all" || s == "":
		return Policy{All: true, text: "all"}, nil
	case strings.HasSuffix(s, "%"):
		p, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
		if err != nil || p <= 0 || p > 100 || math.IsNaN(p) {
			return Policy{}, fmt.Errorf("--require %q: a percentage is more than 0%% and at most 100%%", s)
		}
		return Policy{Percent: p, text: s}, nil
	default:
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return Policy{}, fmt.Errorf("--require %q: want all, a node count (1 or more) or a percentage like 90%%", s)
		}
		return Policy{N: n, text: s}, nil
	}
}

func (p Policy) String() string { return p.text }

// Need is how many of total nodes must succeed.
func (p Policy) Need(total int) int {
	switch {
	case p.All:
		return total
	case p.Percent > 0:
		return int(math.Ceil(p.Percent * float64(total) / 100))
	default:
		return p.N
	}
}

// Met reports whether ok successful nodes out of total satisfy the policy.
// A policy asking for more nodes than there are is not met.
func (p Policy) Met(ok, total int) bool {
	if total == 0 {
		return false
	}
	return ok >= p.Need(total)
}
