package daemon_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
)

// sessionWaiter is a token whose Decrypt waits, as the real one does when
// every session is busy, until the caller gives up; then, as the real one,
// it returns the context's error without reaching C_Decrypt.
type sessionWaiter struct {
	issuer.Token
	waiting chan struct{}
}

func (w *sessionWaiter) Decrypt(ctx context.Context, k *hsm.Key, p hsm.Padding, ct []byte) ([]byte, error) {
	close(w.waiting)
	<-ctx.Done()
	return nil, fmt.Errorf("failed to decrypt with key %s: %w", k.ID, ctx.Err())
}

// A merchant's decrypt whose caller hangs up while the decrypt waits for a
// token session: the key is consumed (its claim stands, it is destroyed),
// and the audit trail, the metrics and the key's record say what happened:
// decrypt_abandoned, DECRYPT_ABANDONED, consumed; not decrypt_failed.
func TestDecryptAbandonedByItsCaller(t *testing.T) {
	cfgPath, _ := setup(t, "session")
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	cfg.API.AllowUnsigned = true
	w := &sessionWaiter{waiting: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d, err := daemon.New(ctx, cfg, daemon.Options{
		Log:       slog.New(slog.DiscardHandler),
		WrapToken: func(t issuer.Token) issuer.Token { w.Token = t; return w },
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	c := &child{t: t, api: "http://" + d.APIAddr() + "/ams/api/v1/customer/applyPublicKey", socket: cfg.Decrypt.Socket}
	k := c.apply("2188000000000001")

	rctx, hangUp := context.WithCancel(context.Background())
	body := fmt.Sprintf(`{"uniqueId":%q,"ciphertext":%q}`, k.UniqueID,
		base64.StdEncoding.EncodeToString(encryptFor(t, k, "pw")))
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, "http://keyissuer/v1/decrypt", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		resp, err := c.socketClient().Do(req)
		if err == nil {
			resp.Body.Close()
		}
		errc <- err
	}()
	select {
	case <-w.waiting:
	case <-time.After(time.Minute):
		t.Fatal("the decrypt never reached the token")
	}
	hangUp()
	if err := <-errc; err == nil {
		t.Fatal("the request was answered although its caller hung up")
	}

	var rec struct{ State string }
	waitFor(t, "the key to be consumed", func() bool {
		c.getJSON("/v1/keys/"+k.UniqueID, &rec)
		return rec.State == "consumed"
	})
	// The answer nobody reads is still counted under its code.
	waitFor(t, "the abandoned decrypt to be counted", func() bool {
		return scrape(t, "http://"+d.AdminAddr())[`keyissuer_decrypt_requests_total{code="DECRYPT_ABANDONED"}`] == "1"
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	lines := readAudit(t, cfg.Audit.Path)
	if l := find(lines, audit.KeyDecrypt, k.UniqueID); len(l) != 1 || l[0].Outcome != "decrypt_abandoned" {
		t.Errorf("key.decrypt lines %+v, want one decrypt_abandoned", l)
	}
	if l := find(lines, audit.KeyDestroyed, k.UniqueID); len(l) != 1 || l[0].Reason != "consumed" {
		t.Errorf("key.destroyed lines %+v, want one, consumed", l)
	}
}
