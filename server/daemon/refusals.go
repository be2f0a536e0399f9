package daemon

import (
	"cmp"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/metrics"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// Refused applyPublicKey requests cost the daemon a counter each, not a
// synced audit line: anyone who reaches api.listen can send them. They are
// summed by reason and written as one audit line and one log line every
// audit.summary_interval, with the few addresses that sent the most. A
// verified client refused by the blocklist or an outstanding-key cap gets a
// line of its own, as before: the client's rate limit bounds those.

// maxOffenders bounds the addresses counted in one interval; past it,
// refusals are still counted by reason, only not by address.
const (
	maxOffenders   = 1024
	offendersShown = 5
)

type refusals struct {
	mu        sync.Mutex
	since     time.Time
	counts    map[string]int
	offenders map[string]*audit.Offender
	unplaced  int // refusals from addresses past maxOffenders
}

func newRefusals() *refusals {
	return &refusals{since: time.Now(), counts: map[string]int{}, offenders: map[string]*audit.Offender{}}
}

// add counts one refusal from remote (host:port); clientID is unverified.
func (s *refusals) add(reason, remote, clientID string) {
	host := remote
	if h, _, err := net.SplitHostPort(remote); err == nil {
		host = h
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts[reason]++
	o := s.offenders[host]
	if o == nil {
		if len(s.offenders) >= maxOffenders {
			s.unplaced++
			return
		}
		o = &audit.Offender{Remote: host}
		s.offenders[host] = o
	}
	o.Count++
	if clientID != "" {
		o.ClientIDUnverified = clientID
	}
}

// take returns the summary of the refusals since the last take and starts
// anew; ok is false when there were none.
func (s *refusals) take(now time.Time) (e audit.Event, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.counts) == 0 {
		s.since = now
		return audit.Event{}, false
	}
	top := make([]audit.Offender, 0, len(s.offenders))
	for _, o := range s.offenders {
		top = append(top, *o)
	}
	slices.SortFunc(top, func(a, b audit.Offender) int {
		return cmp.Or(cmp.Compare(b.Count, a.Count), cmp.Compare(a.Remote, b.Remote))
	})
	e = audit.Event{
		Type:   audit.RefusalSummary,
		API:    metrics.APIApply,
		Counts: s.counts,
		Detail: fmt.Sprintf("refused applyPublicKey requests from %s to %s, from %d addresses or more",
			s.since.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), len(s.offenders)+min(s.unplaced, 1)),
		Offenders: top[:min(len(top), offendersShown)],
	}
	s.since, s.counts, s.offenders, s.unplaced = now, map[string]int{}, map[string]*audit.Offender{}, 0
	return e, true
}

// onRefused is the public API's [publicapi.Config.OnRefused].
func (d *Daemon) onRefused(r *http.Request, f publicapi.Refusal) {
	d.ops.metrics.Refused(f.Reason)
	if f.Verified && (f.Reason == publicapi.ReasonBlocklist || f.Reason == publicapi.ReasonQuota) {
		d.record(audit.Event{Type: audit.RequestRefused, API: metrics.APIApply, Code: f.Code,
			Remote: r.RemoteAddr, ClientID: f.ClientID, Reason: f.Reason})
		return
	}
	id := ""
	if !f.Verified {
		id = f.ClientID
	}
	d.ops.refusals.add(f.Reason, r.RemoteAddr, id)
}

// summariseRefusals writes the refusals since the last summary, if any, to
// the audit trail and the log.
func (d *Daemon) summariseRefusals() {
	e, ok := d.ops.refusals.take(time.Now())
	if !ok {
		return
	}
	d.log.Warn("applyPublicKey requests refused", "counts", e.Counts, "offenders", e.Offenders, "detail", e.Detail)
	d.record(e)
}
