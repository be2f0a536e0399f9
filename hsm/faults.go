package hsm

import "sync/atomic"

// Faults counts the token's failures since Open, for metrics and alerts.
type Faults struct {
	// Down counts the times the token was found down (it failed a health
	// check); Recovered the times it came back.
	Down, Recovered uint64
	// SessionsRetired counts sessions found dead and replaced. In session
	// storage each took its keys with it.
	SessionsRetired uint64
}

type faultCounts struct {
	down, recovered, retired atomic.Uint64
}

// Faults returns the fault counters. Safe for concurrent use.
func (t *Token) Faults() Faults {
	return Faults{
		Down:            t.faults.down.Load(),
		Recovered:       t.faults.recovered.Load(),
		SessionsRetired: t.faults.retired.Load(),
	}
}
