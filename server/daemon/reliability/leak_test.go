package reliability

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
	"github.com/keyissuer/keyissuer/server/daemon/internal/daemontest"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// TestShutdownLeaksNoGoroutine runs the daemon in this process through an
// apply, a decrypt and an orderly stop, in both storages: once Run has
// returned, every goroutine it started is gone (listeners, the issuer's
// generators and reaper, the audit trail's and the store's committers).
func TestShutdownLeaksNoGoroutine(t *testing.T) {
	for _, storage := range []string{"session", "token"} {
		t.Run(storage, func(t *testing.T) {
			f := newFixture(t, fixtureConfig{
				storage: storage, poolSize: 2, generators: 1,
				ttl: "1m", reap: "100ms", applyWait: "30s",
			})
			cfg, err := config.Load(f.cfgPath)
			if err != nil {
				t.Fatal(err)
			}
			f.tokenObjects() // SoftHSM's own threads, once, before the snapshot
			before := goleak.IgnoreCurrent()

			ctx, cancel := context.WithCancel(context.Background())
			// Its log, at debug level, goes to the secret scans.
			logs := &daemontest.SyncBuffer{}
			f.mu.Lock()
			f.logs = append(f.logs, logs)
			f.mu.Unlock()
			d, err := daemon.New(ctx, cfg, daemon.Options{
				Log: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
			})
			if err != nil {
				cancel()
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- d.Run(ctx) }()

			p := &proc{
				t:         t,
				api:       "http://" + d.APIAddr() + publicapi.ApplyPath,
				apiClient: &http.Client{Timeout: hangLimit},
				sockClient: &http.Client{Timeout: hangLimit, Transport: &http.Transport{
					DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
						var d net.Dialer
						return d.DialContext(ctx, "unix", cfg.Decrypt.Socket)
					},
				}},
			}
			waitFor(t, "the daemon to serve", func() bool {
				_, st, err := p.health()
				return err == nil && st == http.StatusOK
			})
			r, err := p.apply("")
			if err != nil || r.code != "SUCCESS" {
				t.Fatalf("apply: %+v, %v", r, err)
			}
			pw := f.password()
			if res, err := p.decrypt(r.key.UniqueID, seal(t, r.key, pw)); err != nil || res.password != pw {
				t.Fatalf("decrypt: %+v, %v", res, err)
			}
			p.apiClient.CloseIdleConnections()
			p.sockClient.CloseIdleConnections()

			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(hangLimit):
				t.Fatal("Run did not return after its context ended")
			}
			goleak.VerifyNone(t, before)
		})
	}
}
