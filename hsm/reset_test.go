package hsm

import (
	"context"
	"sync"
	"testing"
	"time"
)

// Regression: a module reset (recovery from an outage; in token storage,
// every recovery) called C_Finalize and C_Initialize while other goroutines
// were inside calls made without a session: the health check's
// C_GetTokenInfo, which Check, a destroy confirming its objects gone and a
// failed generation make. The reset holds every session, which keeps the
// calls in sessions out, but not those. PKCS#11 leaves C_Finalize undefined
// while other threads make calls, and SoftHSM frees its slots and the
// library's instance under them: the test binary died of a SIGSEGV in
// C_GetTokenInfo within a few resets, or hung in it.
func TestResetWhileHealthChecked(t *testing.T) {
	const resets = 40
	ctx := context.Background()
	tok := openToken(t, StorageToken)
	modulesMu.Lock()
	alone := tok.mod.ours && tok.mod.refs == 1
	modulesMu.Unlock()
	if !alone {
		t.Fatal("another Token of the test binary shares the module, so a reset would not re-initialise it")
	}
	var (
		wg   sync.WaitGroup
		stop = make(chan struct{})
	)
	for range 2 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
					tok.healthy()
				}
			}
		})
	}
	// A call that deadlocked inside the library cannot be interrupted:
	// the watchdog ends the binary with a clear message instead.
	watchdog := time.AfterFunc(time.Minute, func() {
		panic("TestResetWhileHealthChecked: resets and health checks still running after a minute: " +
			"a call deadlocked against C_Finalize")
	})
	defer watchdog.Stop()
	for range resets {
		if err := tok.reset(ctx); err != nil {
			close(stop)
			wg.Wait()
			t.Fatalf("reset: %v", err)
		}
	}
	close(stop)
	wg.Wait()
	if err := tok.healthy(); err != nil {
		t.Fatalf("the token after %d resets: %v", resets, err)
	}
	k, err := tok.Generate(ctx, testID("afterresets"))
	if err != nil {
		t.Fatal(err)
	}
	ct, _ := Encrypt(k.Public, OAEPSHA256, []byte("pw"))
	if got, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); err != nil || string(got) != "pw" {
		t.Errorf("Decrypt after %d resets = %q, %v; want pw", resets, got, err)
	}
	if err := tok.Destroy(ctx, k); err != nil {
		t.Error(err)
	}
}
