package issuer

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"
)

// eventLog collects events for a test.
type eventLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *eventLog) add(_ context.Context, e Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

// of returns the events of kind, for key id ("" for any).
func (l *eventLog) of(kind EventKind, id string) []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Event
	for _, e := range l.events {
		if e.Kind == kind && (id == "" || e.UniqueID == id) {
			out = append(out, e)
		}
	}
	return out
}

func TestEvents(t *testing.T) {
	ctx := context.Background()
	var log eventLog
	h := newHarness(t, func(c *Config) { c.OnEvent = log.add })
	h.start(t)

	used := h.apply(t)
	if _, err := h.is.Decrypt(ctx, used.UniqueID, seal(t, used.PublicKey, "pw", used.Salt)); err != nil {
		t.Fatal(err)
	}
	if _, err := h.is.Decrypt(ctx, used.UniqueID, seal(t, used.PublicKey, "pw", used.Salt)); !errors.Is(err, ErrConsumed) {
		t.Fatalf("second Decrypt() = %v", err)
	}
	idle := h.apply(t)
	h.clock.Advance(11 * time.Minute)
	h.is.Reap(ctx)

	tests := []struct {
		name string
		kind EventKind
		id   string
		want func([]Event) bool
	}{
		{"generated", EventGenerated, "", func(es []Event) bool { return len(es) >= 2 && es[0].Duration > 0 && es[0].Err == nil }},
		{"issued", EventIssued, used.UniqueID, func(es []Event) bool {
			return len(es) == 1 && es[0].CustomerID == "customer-1" && es[0].ClientID == "client-1"
		}},
		{"decrypts", EventDecrypt, used.UniqueID, func(es []Event) bool {
			return len(es) == 2 && es[0].Err == nil && errors.Is(es[1].Err, ErrConsumed)
		}},
		{"consumed key destroyed", EventDestroyed, used.UniqueID, func(es []Event) bool { return len(es) == 1 && es[0].Reason == ReasonConsumed }},
		{"expired", EventExpired, idle.UniqueID, func(es []Event) bool { return len(es) == 1 }},
		{"expired key destroyed", EventDestroyed, idle.UniqueID, func(es []Event) bool { return len(es) == 1 && es[0].Reason == ReasonExpired }},
		{"reaped", EventReaped, "", func(es []Event) bool { return len(es) == 1 }},
	}
	for _, tt := range tests {
		if got := log.of(tt.kind, tt.id); !tt.want(got) {
			t.Errorf("%s: events %+v", tt.name, got)
		}
	}
	// Expiry is reported before the destroy it causes.
	log.mu.Lock()
	i := slices.IndexFunc(log.events, func(e Event) bool { return e.Kind == EventExpired })
	j := slices.IndexFunc(log.events, func(e Event) bool { return e.Kind == EventDestroyed && e.UniqueID == idle.UniqueID })
	log.mu.Unlock()
	if i > j {
		t.Errorf("expired at %d after destroyed at %d", i, j)
	}
}

func TestEventsDestroyFailedAndDrained(t *testing.T) {
	ctx := context.Background()
	var log eventLog
	h := newHarness(t, func(c *Config) { c.OnEvent = log.add })
	h.start(t)
	iss := h.apply(t)
	h.tok.set(func(f *fakeToken) { f.failDestroy = errors.New("CKR_DEVICE_ERROR") })
	h.is.Decrypt(ctx, iss.UniqueID, seal(t, iss.PublicKey, "pw", iss.Salt))
	if es := log.of(EventDestroyFailed, iss.UniqueID); len(es) != 1 || es[0].Err == nil || es[0].Reason != ReasonConsumed {
		t.Errorf("destroy-failed events %+v", es)
	}
	h.tok.set(func(f *fakeToken) { f.failDestroy = nil })
	h.is.Reap(ctx)
	if es := log.of(EventDestroyed, iss.UniqueID); len(es) != 1 || es[0].Reason != ReasonConsumed {
		t.Errorf("destroyed events after the retry %+v", es)
	}

	for h.is.Stats().PoolReady < 2 {
		time.Sleep(5 * time.Millisecond)
	}
	h.is.drain(ctx)
	if es := log.of(EventDrained, ""); len(es) != 1 || es[0].Count < 2 {
		t.Errorf("drained events %+v", es)
	}
}
