package publicapi

import (
	"container/list"
	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Gate is the limit every request meets before anything else is done for
// it, authentication included: a token bucket per source address, and one
// bucket shared by every address that has not sent a verified request
// lately. An address from which a signed request verified (and was not a
// replay) within [VerifiedFor] skips the shared bucket, so a flood from
// addresses that never authenticate cannot crowd out the merchants; its own
// bucket still applies.
//
// The addresses are the TCP peers (X-Forwarded-For is not trusted): behind
// a reverse proxy they are all the proxy's. At most Addresses of them are
// remembered; when that many are, the one idle longest is forgotten,
// unverified ones first, so a flood from many addresses cannot push a
// merchant's out. A forgotten address starts again with a full bucket and
// unverified.
//
// A Gate outlives the handlers built on it (a reload builds a new handler):
// pass the same one. It is safe for concurrent use.
type Gate struct {
	cfg GateConfig

	mu         sync.Mutex
	overall    *rate.Limiter
	addrs      map[string]*list.Element
	unverified *list.List // of *addrEntry, least recently seen first
	verified   *list.List
}

// GateConfig sizes a Gate.
type GateConfig struct {
	// AddressRate and AddressBurst are each source address's bucket.
	AddressRate  rate.Limit
	AddressBurst int
	// UnverifiedRate and UnverifiedBurst are the bucket shared by all
	// addresses not verified lately.
	UnverifiedRate  rate.Limit
	UnverifiedBurst int
	// Addresses bounds the addresses remembered (default 10000).
	Addresses int
	// VerifiedFor is how long a verified request vouches for its address
	// (default 1h).
	VerifiedFor time.Duration
	Now         func() time.Time // the clock (time.Now)
}

type addrEntry struct {
	addr          string
	limiter       *rate.Limiter
	verifiedUntil time.Time
}

// Why a Gate turned a request away.
const (
	GateAddress    = "address"    // the address's own bucket is empty
	GateUnverified = "unverified" // the shared bucket of unverified addresses is empty
)

// NewGate returns a Gate.
func NewGate(cfg GateConfig) *Gate {
	if cfg.Addresses <= 0 {
		cfg.Addresses = 10000
	}
	if cfg.VerifiedFor <= 0 {
		cfg.VerifiedFor = time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Gate{
		cfg:        cfg,
		overall:    rate.NewLimiter(cfg.UnverifiedRate, max(cfg.UnverifiedBurst, 1)),
		addrs:      map[string]*list.Element{},
		unverified: list.New(),
		verified:   list.New(),
	}
}

// hostOf is the address of a request's RemoteAddr, without the port.
func hostOf(remote string) string {
	if h, _, err := net.SplitHostPort(remote); err == nil {
		return h
	}
	return remote
}

// Allow takes a token for one request from remote (host:port) and says
// why not ("" when allowed).
func (g *Gate) Allow(remote string) string {
	now := g.cfg.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	e := g.entry(hostOf(remote), now)
	if !e.limiter.AllowN(now, 1) {
		return GateAddress
	}
	if now.Before(e.verifiedUntil) {
		return ""
	}
	if !g.overall.AllowN(now, 1) {
		return GateUnverified
	}
	return ""
}

// Verified notes that a request from remote was verified.
func (g *Gate) Verified(remote string) {
	now := g.cfg.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	el := g.entryElement(hostOf(remote), now)
	e := el.Value.(*addrEntry)
	if e.verifiedUntil.IsZero() {
		g.unverified.Remove(el)
		g.addrs[e.addr] = g.verified.PushBack(e)
	}
	e.verifiedUntil = now.Add(g.cfg.VerifiedFor)
}

// Len is how many addresses are remembered.
func (g *Gate) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.addrs)
}

func (g *Gate) entry(addr string, now time.Time) *addrEntry {
	return g.entryElement(addr, now).Value.(*addrEntry)
}

// listOf is the list e is on. An entry whose verification lapsed stays on
// the verified list until it is seen again or evicted.
func (g *Gate) listOf(e *addrEntry) *list.List {
	if e.verifiedUntil.IsZero() {
		return g.unverified
	}
	return g.verified
}

// entryElement finds or makes addr's entry and marks it the most recently
// seen. With g.mu held.
func (g *Gate) entryElement(addr string, now time.Time) *list.Element {
	if el, ok := g.addrs[addr]; ok {
		e := el.Value.(*addrEntry)
		if !e.verifiedUntil.IsZero() && !now.Before(e.verifiedUntil) {
			// Lapsed: back to the unverified.
			g.verified.Remove(el)
			e.verifiedUntil = time.Time{}
			el = g.unverified.PushBack(e)
			g.addrs[addr] = el
			return el
		}
		g.listOf(e).MoveToBack(el)
		return el
	}
	for len(g.addrs) >= g.cfg.Addresses {
		victim := g.unverified.Front()
		l := g.unverified
		if victim == nil {
			victim, l = g.verified.Front(), g.verified
		}
		delete(g.addrs, l.Remove(victim).(*addrEntry).addr)
	}
	e := &addrEntry{addr: addr, limiter: rate.NewLimiter(g.cfg.AddressRate, max(g.cfg.AddressBurst, 1))}
	el := g.unverified.PushBack(e)
	g.addrs[addr] = el
	return el
}
