package reliability

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// Floods, on loopback, bounded in count and in time.

// TestApplyFlood sends applies from many connections far faster than the
// token makes keys (a few per second): every answer is SUCCESS or a
// retryable refusal (the rate limit, the outstanding-key cap, the empty
// pool), the daemon's memory stays bounded, the token never holds more
// than pool.size + limits.max_outstanding keys, and once the flood stops
// the daemon serves as before.
func TestApplyFlood(t *testing.T) {
	const (
		poolSize, maxOutstanding = 4, 10
		workers, perWorker       = 48, 40
		floodFor                 = 4 * time.Second
		rssGrowthLimit           = 256 << 20 // the race detector's shadow memory included
	)
	f := newFixture(t, fixtureConfig{
		storage: "token", poolSize: poolSize, generators: 1,
		ttl: "1m", reap: "200ms", applyWait: "200ms",
		extra: fmt.Sprintf("[limits]\nrate = 150.0\nburst = 50\nmax_outstanding = %d\nmax_outstanding_per_customer = 3\n", maxOutstanding),
	})
	p := f.mustStart()
	waitFor(t, "a full pool", func() bool {
		h, _, err := p.health()
		return err == nil && h.PoolReady == h.PoolSize
	})
	rss0, err := p.vmRSS()
	if err != nil {
		t.Fatal(err)
	}

	// Watch memory and the token while the flood runs.
	base := map[uint]int{}
	for _, o := range f.baseline {
		base[o.Class]++
	}
	var (
		watch              sync.WaitGroup
		stopWatch          = make(chan struct{})
		maxRSS             = rss0
		maxKeys, maxHalves int
	)
	watch.Go(func() {
		for {
			if rss, err := p.vmRSS(); err == nil {
				maxRSS = max(maxRSS, rss)
			}
			// Counted by search alone: reading the attributes of a
			// key the daemon is still writing would damage it
			// (hsmtest.Count). Leaked objects are looked for once
			// the daemon is dead.
			n := hsmtest.Count(t, f.soft, pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY)
			priv, pub := n[pkcs11.CKO_PRIVATE_KEY]-base[pkcs11.CKO_PRIVATE_KEY], n[pkcs11.CKO_PUBLIC_KEY]-base[pkcs11.CKO_PUBLIC_KEY]
			maxKeys = max(maxKeys, priv, pub)
			maxHalves = max(maxHalves, priv+pub)
			select {
			case <-stopWatch:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	})

	var (
		mu        sync.Mutex
		codes     = map[string]int{}
		issued    []keyInfo
		latencies []time.Duration
		wg        sync.WaitGroup
		deadline  = time.Now().Add(floodFor)
		sticky    = newCustomerID() // one customer who asks again and again
	)
	for w := range workers {
		wg.Go(func() {
			// Each worker its own connection.
			c := &proc{api: p.api, apiClient: &http.Client{Timeout: hangLimit, Transport: &http.Transport{}}}
			defer c.apiClient.CloseIdleConnections()
			for i := 0; i < perWorker && time.Now().Before(deadline); i++ {
				customer := ""
				if w%8 == 0 {
					customer = sticky
				}
				start := time.Now()
				r, err := c.apply(customer)
				d := time.Since(start)
				mu.Lock()
				latencies = append(latencies, d)
				switch {
				case err != nil:
					t.Errorf("apply during the flood: %v", err)
				case r.status != http.StatusOK:
					t.Errorf("apply during the flood: HTTP %d %s", r.status, r.code)
				default:
					codes[r.code+"/"+r.resultStatus]++
					if r.code == "SUCCESS" {
						issued = append(issued, r.key)
					}
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(stopWatch)
	watch.Wait()

	slices.Sort(latencies)
	q := func(f float64) time.Duration {
		return latencies[int(f*float64(len(latencies)-1))].Round(time.Millisecond)
	}
	t.Logf("flood: %d applies from %d connections in %s: %v; latency p50 %s, p99 %s, max %s; "+
		"VmRSS %d MiB before, %d MiB at most; at most %d keys (%d objects) in the token",
		len(latencies), workers, floodFor, codes, q(0.5), q(0.99), q(1),
		rss0>>20, maxRSS>>20, maxKeys, maxHalves)

	for code, n := range codes {
		switch code {
		case "SUCCESS/S", "REQUEST_TRAFFIC_EXCEED_LIMIT/U", "UNKNOWN_EXCEPTION/U":
		default:
			t.Errorf("%d answers %s; want SUCCESS/S or a retryable refusal", n, code)
		}
	}
	if codes["REQUEST_TRAFFIC_EXCEED_LIMIT/U"] == 0 {
		t.Error("no apply was refused by the rate limit or the cap")
	}
	// Nothing was decrypted and keys live a minute: every key issued is
	// still outstanding.
	if len(issued) > maxOutstanding {
		t.Errorf("%d keys issued, more than limits.max_outstanding = %d", len(issued), maxOutstanding)
	}
	if maxKeys > poolSize+maxOutstanding || maxHalves > 2*(poolSize+maxOutstanding) {
		t.Errorf("the token held %d keys (%d objects); pool.size + limits.max_outstanding = %d",
			maxKeys, maxHalves, poolSize+maxOutstanding)
	}
	if maxRSS-rss0 > rssGrowthLimit {
		t.Errorf("VmRSS grew by %d MiB during the flood; bound %d MiB", (maxRSS-rss0)>>20, rssGrowthLimit>>20)
	}

	// The flood is over: the daemon serves as before. Every key decrypts
	// once, and then applies succeed again. (Listing the token from this
	// process while the daemon writes to it can cost the daemon a short
	// false outage, a SoftHSM limit: see RELIABILITY.md. It recovers.)
	waitFor(t, "the token to be ready after the flood", func() bool {
		h, st, err := p.health()
		return err == nil && st == http.StatusOK && h.TokenReady
	})
	for _, k := range issued {
		pw := f.password()
		if res, err := p.decrypt(k.UniqueID, seal(t, k, pw)); err != nil || res.status != http.StatusOK || res.password != pw {
			t.Errorf("decrypt after the flood: %+v, %v", res, err)
		}
	}
	waitFor(t, "an apply to succeed after the flood", func() bool {
		r, err := p.apply("")
		return err == nil && r.code == "SUCCESS"
	})
	if h, st, err := p.health(); err != nil || st != http.StatusOK || !h.TokenReady {
		t.Errorf("health after the flood: %d %+v %v", st, h, err)
	}
	p.stop()
}

// TestConcurrentDecryptsOneKey sends the right ciphertext for one key from
// many connections at once: exactly one succeeds, every other answer is
// KEY_CONSUMED.
func TestConcurrentDecryptsOneKey(t *testing.T) {
	const conns, rounds = 32, 3
	f := newFixture(t, fixtureConfig{
		storage: "token", poolSize: rounds, generators: 1,
		ttl: "1m", reap: "1s", applyWait: "20s",
	})
	p := f.mustStart()
	for round := range rounds {
		r, err := p.apply("")
		if err != nil || r.code != "SUCCESS" {
			t.Fatalf("apply: %+v, %v", r, err)
		}
		pw := f.password()
		ct := seal(t, r.key, pw)
		var (
			wg      sync.WaitGroup
			mu      sync.Mutex
			answers = map[string]int{}
			gate    = make(chan struct{})
			clients []*proc
		)
		for range conns {
			// Its own transport: its own connection, dialled before the gate.
			c := &proc{f: f, sockClient: &http.Client{Timeout: hangLimit, Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "unix", p.socket)
				},
			}}}
			if _, _, err := c.health(); err != nil {
				t.Fatal(err)
			}
			clients = append(clients, c)
		}
		for _, c := range clients {
			wg.Go(func() {
				defer c.sockClient.CloseIdleConnections()
				<-gate
				res, err := c.decrypt(r.key.UniqueID, ct)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err != nil:
					t.Errorf("decrypt: %v", err)
				case res.status == http.StatusOK && res.password == pw:
					answers["200"]++
				default:
					answers[fmt.Sprintf("%d %s", res.status, res.code)]++
				}
			})
		}
		close(gate)
		wg.Wait()
		if answers["200"] != 1 || answers["410 KEY_CONSUMED"] != conns-1 {
			t.Errorf("round %d: %d connections decrypting one key: %v; want one 200, the rest 410 KEY_CONSUMED", round, conns, answers)
		}
	}
	p.stop()
	// Each key reached the token's decrypt once, and succeeded there: the
	// ledger has exactly the successes the clients saw.
	f.checkLedger()
	l := f.decryptLedger()
	if len(l.attempts) != rounds || len(l.oks) != rounds {
		t.Errorf("the ledger has decrypts of %d keys, %d successful; want %d of each", len(l.attempts), len(l.oks), rounds)
	}
	for id, n := range l.attempts {
		if n != 1 || l.oks[id] != 1 {
			t.Errorf("%s reached the token's decrypt %d times (%d succeeded), want once", id, n, l.oks[id])
		}
	}
}
