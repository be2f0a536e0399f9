package publicapi

import (
	"container/heap"
	"context"
	"crypto/sha256"
	"errors"
	"sync"
	"time"
)

// ReplayGuard remembers accepted request signatures until they expire. Safe for concurrent use.
type ReplayGuard interface {
	// FirstUse records digest until expires and reports whether it was not already recorded (unexpired).
	FirstUse(ctx context.Context, digest []byte, expires time.Time) (first bool, err error)
}

// ErrReplayGuardFull is MemoryReplayGuard's answer when it holds as many
// unexpired digests as it may: it refuses rather than forget one, which
// would let that request be replayed.
var ErrReplayGuardFull = errors.New("the replay cache is full")

// replayDigest is what a ReplayGuard remembers of a signed request: the
// SHA-256 of the client and the signature's bytes. The signature covers
// method, path, Client-Id, Request-Time and body, and RSASSA-PKCS1-v1_5
// is deterministic, so one digest is one request.
func replayDigest(clientID string, sig []byte) []byte {
	h := sha256.New()
	h.Write([]byte(clientID))
	h.Write([]byte{0})
	h.Write(sig)
	return h.Sum(nil)
}

// MemoryReplayGuard is the single-host [ReplayGuard]: a map of digests and
// a heap of their expiries, pruned as it is used. It holds at most Max
// unexpired digests and refuses new ones past that
// ([ErrReplayGuardFull]). Size it from the rate limits
// ([ReplayCapacity]): signed requests are recorded only once they passed
// the client's and the global rate limits, so no more than the global rate
// are recorded per second, and each is kept at most twice the clock skew.
type MemoryReplayGuard struct {
	mu   sync.Mutex
	max  int
	now  func() time.Time
	seen map[[sha256.Size]byte]int64 // digest → expiry, Unix nanoseconds
	exp  expiryHeap
}

var _ ReplayGuard = (*MemoryReplayGuard)(nil)

// NewMemoryReplayGuard returns a guard of at most max digests; now is its
// clock (nil: time.Now).
func NewMemoryReplayGuard(max int, now func() time.Time) *MemoryReplayGuard {
	if now == nil {
		now = time.Now
	}
	return &MemoryReplayGuard{max: max, now: now, seen: map[[sha256.Size]byte]int64{}}
}

// ReplayCapacity is how many digests can be unexpired at once when at most
// rate signed requests per second, and burst at once, are recorded, each
// until its Request-Time plus skew (a Request-Time may be skew ahead).
func ReplayCapacity(rate float64, burst int, skew time.Duration) int {
	return int(rate*2*skew.Seconds()) + burst + 1
}

// SetMax changes the bound; digests already held are kept.
func (g *MemoryReplayGuard) SetMax(max int) {
	g.mu.Lock()
	g.max = max
	g.mu.Unlock()
}

// Len is how many digests are held, expired ones not yet pruned included.
func (g *MemoryReplayGuard) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.seen)
}

// FirstUse implements [ReplayGuard].
func (g *MemoryReplayGuard) FirstUse(_ context.Context, digest []byte, expires time.Time) (bool, error) {
	key := sha256.Sum256(digest)
	if len(digest) == sha256.Size {
		copy(key[:], digest)
	}
	now := g.now().UnixNano()
	g.mu.Lock()
	defer g.mu.Unlock()
	for len(g.exp) > 0 && g.exp[0].at <= now {
		e := heap.Pop(&g.exp).(expiry)
		if at, ok := g.seen[e.key]; ok && at == e.at {
			delete(g.seen, e.key)
		}
	}
	if at, ok := g.seen[key]; ok && at > now {
		return false, nil
	}
	if !expires.After(time.Unix(0, now)) {
		// Expired already: the request could not have been accepted.
		return true, nil
	}
	if len(g.seen) >= g.max {
		return false, ErrReplayGuardFull
	}
	at := expires.UnixNano()
	g.seen[key] = at
	heap.Push(&g.exp, expiry{at: at, key: key})
	return true, nil
}

type expiry struct {
	at  int64
	key [sha256.Size]byte
}

type expiryHeap []expiry

func (h expiryHeap) Len() int           { return len(h) }
func (h expiryHeap) Less(i, j int) bool { return h[i].at < h[j].at }
func (h expiryHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *expiryHeap) Push(x any)        { *h = append(*h, x.(expiry)) }
func (h *expiryHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}
