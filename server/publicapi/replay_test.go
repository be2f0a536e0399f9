package publicapi_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/keyissuer/keyissuer/server/publicapi"
)

type brokenGuard struct{}

func (brokenGuard) FirstUse(context.Context, []byte, time.Time) (bool, error) {
	return false, errors.New("store down")
}

// TestReplay: a signed request is accepted once; the same request again,
// within the clock-skew window, is REPEAT_REQUEST, unsigned, and neither
// reaches the issuer nor spends the client's rate; a guard that fails
// answers UNKNOWN_EXCEPTION and accepts nothing.
func TestReplay(t *testing.T) {
	fake := &fakeIssuer{issued: newIssued()}
	cfg := baseConfig(fake)
	signer := &countingSigner{Signer: cfg.Signer}
	cfg.Signer = signer
	// A bucket of two that never refills.
	cfg.Clients[0].Rate, cfg.Clients[0].Burst = rate.Every(100*365*24*time.Hour), 2
	cfg.Replay = publicapi.NewMemoryReplayGuard(100, nil)
	var refusals []publicapi.Refusal
	cfg.OnRefused = func(_ *http.Request, f publicapi.Refusal) { refusals = append(refusals, f) }
	srv := httptest.NewServer(publicapi.New(cfg))
	defer srv.Close()

	at := strconv.FormatInt(time.Now().UnixMilli(), 10)
	first := send(t, srv.Client(), request{body: defaultBody, requestTime: at}.build(t, srv.URL))
	if first.resp.Result.ResultCode != publicapi.CodeSuccess {
		t.Fatalf("first: %+v", first.resp.Result)
	}
	for range 3 {
		again := send(t, srv.Client(), request{body: defaultBody, requestTime: at}.build(t, srv.URL))
		if r := again.resp.Result; r.ResultCode != publicapi.CodeRepeatRequest || r.ResultStatus != "U" {
			t.Errorf("replay: %+v, want REPEAT_REQUEST/U", r)
		}
		if again.header.Get("Signature") != "" {
			t.Error("the answer to a replay is signed")
		}
	}
	// Another Request-Time is another request; the replays gave back the
	// tokens they took, so the client's second token is still there.
	later := strconv.FormatInt(time.Now().UnixMilli()+1, 10)
	if a := send(t, srv.Client(), request{body: defaultBody, requestTime: later}.build(t, srv.URL)); a.resp.Result.ResultCode != publicapi.CodeSuccess {
		t.Errorf("a fresh request after the replays: %+v (did the replays use up the client's rate?)", a.resp.Result)
	}
	if fake.calls != 2 || signer.n.Load() != 2 {
		t.Errorf("issuer called %d times, %d signatures; want 2 and 2", fake.calls, signer.n.Load())
	}
	if len(refusals) != 3 || refusals[0].Reason != publicapi.ReasonReplay || refusals[0].Verified {
		t.Errorf("refusals reported: %+v, want 3 unverified replays", refusals)
	}

	// A guard that fails refuses, retryably, and accepts nothing.
	fake2 := &fakeIssuer{issued: newIssued()}
	cfg2 := baseConfig(fake2)
	cfg2.Replay = brokenGuard{}
	srv2 := httptest.NewServer(publicapi.New(cfg2))
	defer srv2.Close()
	a := send(t, srv2.Client(), request{body: defaultBody}.build(t, srv2.URL))
	if r := a.resp.Result; r.ResultCode != publicapi.CodeUnknown || r.ResultStatus != "U" || fake2.calls != 0 {
		t.Errorf("with a failing guard: %+v, issuer called %d times; want UNKNOWN_EXCEPTION/U and none", r, fake2.calls)
	}
}

func TestMemoryReplayGuard(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	g := publicapi.NewMemoryReplayGuard(2, func() time.Time { return now })
	ctx := context.Background()
	use := func(d string, ttl time.Duration) (bool, error) { return g.FirstUse(ctx, []byte(d), now.Add(ttl)) }
	for _, tt := range []struct {
		name    string
		digest  string
		ttl     time.Duration
		advance time.Duration
		want    bool
		wantErr error
	}{
		{name: "first", digest: "a", ttl: time.Minute, want: true},
		{name: "again", digest: "a", ttl: time.Minute, want: false},
		{name: "another", digest: "b", ttl: 2 * time.Minute, want: true},
		{name: "full: refuse, not forget", digest: "c", ttl: time.Minute, wantErr: publicapi.ErrReplayGuardFull},
		{name: "still remembered when full", digest: "a", ttl: time.Minute, want: false},
		{name: "expired already", digest: "d", ttl: -time.Second, want: true},
		{name: "a expired: room again", digest: "c", ttl: time.Minute, advance: time.Minute, want: true},
		{name: "a forgotten after its expiry", digest: "a", ttl: time.Minute, wantErr: publicapi.ErrReplayGuardFull},
		{name: "b still there", digest: "b", ttl: time.Minute, want: false},
		{name: "b expired", digest: "a", ttl: time.Minute, advance: time.Minute, want: true},
	} {
		now = now.Add(tt.advance)
		got, err := use(tt.digest, tt.ttl)
		if got != tt.want || !errors.Is(err, tt.wantErr) {
			t.Errorf("%s: FirstUse = %v, %v; want %v, %v", tt.name, got, err, tt.want, tt.wantErr)
		}
	}
	if n := g.Len(); n > 2 {
		t.Errorf("%d digests held, bound 2", n)
	}
	if got, want := publicapi.ReplayCapacity(200, 400, 5*time.Minute), 200*600+400+1; got != want {
		t.Errorf("ReplayCapacity = %d, want %d", got, want)
	}
}
