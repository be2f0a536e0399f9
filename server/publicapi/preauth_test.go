package publicapi_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/keyissuer/keyissuer/server/publicapi"
)

type countingSigner struct {
	publicapi.Signer
	n atomic.Int64
}

func (s *countingSigner) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	s.n.Add(1)
	return s.Signer.Sign(ctx, msg)
}

// A frozen clock: no bucket refills while a test runs, however slow the
// machine.
func frozen() func() time.Time {
	t := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	return func() time.Time { return t }
}

func TestGate(t *testing.T) {
	g := publicapi.NewGate(publicapi.GateConfig{
		AddressRate: rate.Every(time.Hour), AddressBurst: 3,
		UnverifiedRate: rate.Every(time.Hour), UnverifiedBurst: 4,
		Addresses: 3, Now: frozen(),
	})
	// The address's own bucket: three, then no more.
	for i := range 3 {
		if why := g.Allow("192.0.2.1:1000"); why != "" {
			t.Fatalf("request %d refused: %s", i, why)
		}
	}
	if why := g.Allow("192.0.2.1:1001"); why != publicapi.GateAddress {
		t.Fatalf("fourth request from one address: %q, want %q", why, publicapi.GateAddress)
	}
	// The unverified bucket had one left, shared by every address.
	if why := g.Allow("192.0.2.2:1"); why != "" {
		t.Fatalf("another address: %q", why)
	}
	if why := g.Allow("192.0.2.3:1"); why != publicapi.GateUnverified {
		t.Fatalf("shared bucket empty: %q, want %q", why, publicapi.GateUnverified)
	}
	// A verified address skips the shared bucket, and is not pushed out by
	// a crowd of new addresses.
	g.Verified("192.0.2.2:2")
	for i := range 100 {
		g.Allow(fmt.Sprintf("198.51.100.%d:1", i))
	}
	if n := g.Len(); n > 3 {
		t.Errorf("%d addresses remembered, bound 3", n)
	}
	if why := g.Allow("192.0.2.2:3"); why != "" {
		t.Errorf("verified address after a crowd: %q, want allowed (its bucket has 2 left)", why)
	}
	if why := g.Allow("192.0.2.2:3"); why != "" {
		t.Errorf("verified address: %q", why)
	}
	if why := g.Allow("192.0.2.2:3"); why != publicapi.GateAddress {
		t.Errorf("verified address past its own bucket: %q, want %q", why, publicapi.GateAddress)
	}
}

// TestUnauthenticatedAnswersCostNoSignature floods the handler with
// requests that do not authenticate, from many addresses, past the gate:
// not one of their answers is signed, each refusal is reported once with its
// reason and as unverified, and a registered client's signed applies from
// its own address all succeed, signed.
func TestUnauthenticatedAnswersCostNoSignature(t *testing.T) {
	fake := &fakeIssuer{issued: newIssued()}
	cfg := baseConfig(fake)
	signer := &countingSigner{Signer: cfg.Signer}
	cfg.Signer = signer
	cfg.Now = time.Now
	cfg.Gate = publicapi.NewGate(publicapi.GateConfig{
		AddressRate: rate.Every(time.Hour), AddressBurst: 12,
		UnverifiedRate: rate.Every(time.Hour), UnverifiedBurst: 40,
		Addresses: 64, Now: frozen(),
	})
	var (
		mu       sync.Mutex
		reported = map[string]int{}
	)
	cfg.OnRefused = func(r *http.Request, f publicapi.Refusal) {
		mu.Lock()
		defer mu.Unlock()
		if f.Verified {
			t.Errorf("refusal %+v reported as verified", f)
		}
		reported[f.Reason]++
	}
	h := publicapi.New(cfg)
	serve := func(r *http.Request, remote string) *httptest.ResponseRecorder {
		r.RemoteAddr = remote
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		return rec
	}

	// The merchant applies once from its address: verified from then on.
	if rec := serve(request{body: defaultBody}.build(t, "http://x"), "203.0.113.9:4000"); rec.Header().Get("Signature") == "" {
		t.Fatalf("first signed apply: unsigned answer %s", rec.Body)
	}

	junk := []request{
		{path: "/nope"},
		{method: http.MethodGet},
		{contentType: "text/plain"},
		{clientID: "SANDBOX_UNKNOWN"},
		{key: "stranger"},               // the merchant's Client-Id, a bad signature
		{unsigned: true, clientID: "-"}, // nothing at all
		{requestTime: "yesterday"},      // malformed Request-Time
		{body: `{"customerId":"2188000123456789"`, key: "stranger"},
	}
	codes := map[string]int{}
	sent := 0
	for i := range 600 {
		rq := junk[i%len(junk)]
		rec := serve(rq.build(t, "http://x"), fmt.Sprintf("198.51.100.%d:%d", i%32, 1000+i))
		sent++
		if sig := rec.Header().Get("Signature"); sig != "" {
			t.Fatalf("answer %d to a request that did not authenticate is signed: %s", i, rec.Body)
		}
		var resp publicapi.Response
		if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
			t.Fatal(err)
		}
		codes[resp.Result.ResultCode]++
		if i%60 == 0 {
			// The merchant, through the flood.
			rec := serve(request{body: defaultBody}.build(t, "http://x"), "203.0.113.9:4001")
			if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil || resp.Result.ResultCode != publicapi.CodeSuccess || rec.Header().Get("Signature") == "" {
				t.Fatalf("the merchant's apply during the flood: %s (signature %q)", rec.Body, rec.Header().Get("Signature"))
			}
		}
	}
	t.Logf("answers to the flood: %v; reported: %v", codes, reported)
	if got := signer.n.Load(); got != 1+10 {
		t.Errorf("%d signatures, want 11: one per merchant apply and none for the flood", got)
	}
	total := 0
	for _, n := range reported {
		total += n
	}
	if total != sent {
		t.Errorf("%d refusals reported, want %d", total, sent)
	}
	if reported[publicapi.ReasonGateAddress] == 0 || reported[publicapi.ReasonGateUnverified] == 0 {
		t.Errorf("the flood did not reach both gate limits: %v", reported)
	}
	if fake.calls != 11 {
		t.Errorf("issuer called %d times, want 11", fake.calls)
	}
}
