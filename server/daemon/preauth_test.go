package daemon_test

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
)

// clientFrom is an HTTP client whose connections come from ip, one of the
// loopback addresses: each a source address of its own to the daemon.
func clientFrom(ip string) *http.Client {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	return &http.Client{Transport: &http.Transport{DialContext: d.DialContext}, Timeout: time.Minute}
}

func metric(t *testing.T, m map[string]string, name string) float64 {
	t.Helper()
	v, ok := m[name]
	if !ok {
		return 0
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		t.Fatalf("%s = %q", name, v)
	}
	return f
}

// TestUnauthenticatedFlood: a flood of junk and of badly signed requests
// from six addresses, far above the limits before authentication, while a
// registered merchant applies from its own address and decrypts through the
// socket. Everything is asserted on the daemon's own counts, not on time:
// the token signed exactly the merchant's answers and nothing for the
// flood; the audit trail grew by the merchant's lines only, and the
// refusals are one summary line at shutdown whose counts add up to the
// flood; every apply and decrypt of the merchant succeeded.
func TestUnauthenticatedFlood(t *testing.T) {
	const (
		applies   = 10
		floodFrom = 6
		minFlood  = 600 // requests the flood sends at least
	)
	// The buckets refill once in 1000 s: what gets through them is a
	// count, not a race with the clock.
	path := signedSetup(t, `
[limits]
rate = 100000.0
burst = 100000
address_rate = 0.001
address_burst = 40
unverified_rate = 0.001
unverified_burst = 20
[audit]
summary_interval = "1h"
`)
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Pool.Size, cfg.Pool.Generators = applies+2, 2
	d, stop := runDaemon(t, cfg, daemon.Options{Log: slog.New(slog.DiscardHandler)})
	apiURL := "http://" + d.APIAddr() + "/ams/api/v1/customer/applyPublicKey"
	adminURL := "http://" + d.AdminAddr()
	c := &child{t: t, api: apiURL, socket: cfg.Decrypt.Socket}
	waitFor(t, "the pool to fill", func() bool { return d.Issuer().Stats().PoolReady >= cfg.Pool.Size })
	// The start-up checkpoint is the token's to sign too: counted before.
	waitFor(t, "the start-up checkpoint", func() bool { return len(find(readAudit(t, cfg.Audit.Path), audit.AuditCheckpoint, "")) > 0 })

	// The merchant's first apply, before the flood, vouches for its
	// address.
	merchant := clientFrom("127.0.0.2")
	if a := sdkApply(t, merchant, apiURL, `{}`); a.Result.ResultCode != "SUCCESS" {
		t.Fatalf("first apply: %+v", a.Result)
	}
	before := scrape(t, adminURL)
	sigs0 := metric(t, before, "keyissuer_token_signatures_total")
	if sigs0 == 0 {
		t.Fatal("keyissuer_token_signatures_total is 0 after a signed answer")
	}
	lines0 := len(readAudit(t, cfg.Audit.Path))

	// The flood: junk and bad signatures, as fast as it goes, until the
	// merchant is done and at least minFlood were sent.
	junk := []func() *http.Request{
		func() *http.Request { r, _ := http.NewRequest("GET", apiURL, nil); return r },
		func() *http.Request {
			r, _ := http.NewRequest("POST", strings.Replace(apiURL, "applyPublicKey", "nope", 1), strings.NewReader("{}"))
			r.Header.Set("Content-Type", "application/json")
			return r
		},
		func() *http.Request {
			r, _ := http.NewRequest("POST", apiURL, strings.NewReader(`{"customerId":`))
			r.Header.Set("Content-Type", "application/json")
			return r
		},
		func() *http.Request { // the merchant's Client-Id, a forged signature
			r, _ := http.NewRequest("POST", apiURL, strings.NewReader(`{}`))
			r.Header.Set("Content-Type", "application/json")
			r.Header.Set("Client-Id", merchantID)
			r.Header.Set("Request-Time", strconv.FormatInt(time.Now().UnixMilli(), 10))
			r.Header.Set("Signature", "algorithm=RSA256,keyVersion=1,signature="+strings.Repeat("QUFB", 86)+"QQ%3D%3D")
			return r
		},
		func() *http.Request { // an unknown client
			r, _ := http.NewRequest("POST", apiURL, strings.NewReader(`{}`))
			r.Header.Set("Content-Type", "application/json")
			r.Header.Set("Client-Id", "SANDBOX_STRANGER")
			r.Header.Set("Request-Time", strconv.FormatInt(time.Now().UnixMilli(), 10))
			r.Header.Set("Signature", "algorithm=RSA256,keyVersion=1,signature=QUFB")
			return r
		},
	}
	var (
		sent, signed atomic.Int64
		merchantDone atomic.Bool
		mu           sync.Mutex
		codes        = map[string]int{}
		wg           sync.WaitGroup
	)
	for w := range floodFrom {
		wg.Go(func() {
			cl := clientFrom(fmt.Sprintf("127.0.0.%d", 3+w))
			defer cl.CloseIdleConnections()
			for i := 0; !merchantDone.Load() || sent.Load() < minFlood; i++ {
				resp, err := cl.Do(junk[(i+w)%len(junk)]())
				if err != nil {
					t.Errorf("flood: %v", err)
					return
				}
				var a applyAnswer
				decodeJSON(resp, &a)
				sent.Add(1)
				if resp.Header.Get("Signature") != "" {
					signed.Add(1)
				}
				mu.Lock()
				codes[a.Result.ResultCode]++
				mu.Unlock()
			}
		})
	}

	// The merchant, through the flood: every apply and decrypt succeeds.
	for i := range applies {
		a, err := trySDKApply(merchant, apiURL, fmt.Sprintf(`{"customerId":"218800000000%04d"}`, i))
		if err != nil || a.Result.ResultCode != "SUCCESS" {
			t.Fatalf("apply %d during the flood: %+v %v", i, a.Result, err)
		}
		if status, code, pw, err := c.decrypt(a.PublicKeyInfo.UniqueID, encryptFor(t, *a.PublicKeyInfo, "pw")); err != nil || status != 200 || pw != "pw" {
			t.Fatalf("decrypt %d during the flood: %d %s %v", i, status, code, err)
		}
	}
	merchantDone.Store(true)
	wg.Wait()
	t.Logf("flood: %d requests from %d addresses: %v", sent.Load(), floodFrom, codes)

	after := scrape(t, adminURL)
	if n := signed.Load(); n != 0 {
		t.Errorf("%d answers to the flood are signed", n)
	}
	if got := metric(t, after, "keyissuer_token_signatures_total") - sigs0; got != applies {
		t.Errorf("the token signed %v times during the flood, want %d: the merchant's answers only", got, applies)
	}
	var refusals float64
	for k, v := range after {
		if strings.HasPrefix(k, "keyissuer_apply_refusals_total{") {
			f, _ := strconv.ParseFloat(v, 64)
			refusals += f
		}
	}
	if refusals != float64(sent.Load()) {
		t.Errorf("%v refusals counted, want one per flood request: %d", refusals, sent.Load())
	}
	for _, reason := range []string{"gate_address", "gate_unverified"} {
		if metric(t, after, `keyissuer_apply_refusals_total{reason="`+reason+`"}`) == 0 {
			t.Errorf("no refusal by %s: the flood did not pass the limits", reason)
		}
	}
	lines := readAudit(t, cfg.Audit.Path)[lines0:]
	perKey := map[string]int{}
	for _, l := range lines {
		perKey[l.Event]++
	}
	if len(lines) != 3*applies || perKey[audit.KeyIssued] != applies || perKey[audit.KeyDecrypt] != applies {
		t.Errorf("the flood wrote to the audit trail: %d lines %v, want the merchant's %d (issued, destroyed, decrypt)",
			len(lines), perKey, 3*applies)
	}

	// At shutdown, one summary of the refusals.
	if err := stop(); err != nil {
		t.Errorf("Run: %v", err)
	}
	var summaries []auditLine
	for _, l := range readAudit(t, cfg.Audit.Path) {
		if l.Event == audit.RefusalSummary {
			summaries = append(summaries, l)
		}
		if l.Event == audit.RequestRefused {
			t.Errorf("a refusal line of its own: %+v", l)
		}
	}
	if len(summaries) != 1 {
		t.Fatalf("%d refusal summaries, want 1", len(summaries))
	}
	total := 0
	for _, n := range summaries[0].Counts {
		total += n
	}
	if int64(total) != sent.Load() {
		t.Errorf("the summary counts %d refusals %v, want %d", total, summaries[0].Counts, sent.Load())
	}
	// The Client-Ids the flood claimed are named as unverified, never as
	// a client.
	raw := mustRead(t, cfg.Audit.Path)
	i := strings.Index(raw, `"event":"`+audit.RefusalSummary+`"`)
	line := raw[i : i+strings.IndexByte(raw[i:], '\n')]
	if !strings.Contains(line, `"client_id_unverified":"`) || strings.Contains(line, `"client_id":`) {
		t.Errorf("summary line %s: want the claimed Client-Ids as client_id_unverified only", line)
	}
}

func decodeJSON(resp *http.Response, v any) {
	defer resp.Body.Close()
	json.NewDecoder(resp.Body).Decode(v)
}
