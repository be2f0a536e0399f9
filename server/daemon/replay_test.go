package daemon_test

import (
	"log/slog"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
)

// TestSignedApplyReplay: the daemon accepts a signed apply once; the same
// request sent again within api.clock_skew is REPEAT_REQUEST, unsigned,
// and gets no key, also after a reload of the access rules (the replay
// cache outlives the handler).
func TestSignedApplyReplay(t *testing.T) {
	path := signedSetup(t, "")
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := runDaemon(t, cfg, daemon.Options{Log: slog.New(slog.DiscardHandler)})
	apiURL := "http://" + d.APIAddr() + "/ams/api/v1/customer/applyPublicKey"
	at := strconv.FormatInt(time.Now().UnixMilli(), 10)
	a, err := trySDKApplyAt(http.DefaultClient, apiURL, `{}`, at, true, signingPub)
	if err != nil || a.Result.ResultCode != "SUCCESS" {
		t.Fatalf("first: %+v %v", a.Result, err)
	}
	issued := d.Issuer().Stats().Issued
	replay := func(when string) {
		a, err := trySDKApplyAt(http.DefaultClient, apiURL, `{}`, at, false, signingPub)
		if err != nil || a.Result.ResultCode != "REPEAT_REQUEST" || a.Result.ResultStatus != "U" || a.PublicKeyInfo != nil {
			t.Errorf("replay %s: %+v %v, want REPEAT_REQUEST/U", when, a.Result, err)
		}
	}
	replay("at once")
	cfg2 := cfg
	cfg2.API.ClockSkew = 10 * time.Minute
	if err := d.Reload(cfg2); err != nil {
		t.Fatal(err)
	}
	replay("after a reload")
	if n := d.Issuer().Stats().Issued; n != issued {
		t.Errorf("%d keys issued to replays", n-issued)
	}
}
