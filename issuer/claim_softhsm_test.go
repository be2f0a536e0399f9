package issuer_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
)

// The order of a decrypt on a real token (see the issuer's package doc).

// While a decrypt holds its claim, before the token call: concurrent
// decrypts answer ErrConsumed, and the reaper past the key's expiry leaves
// the key and its record alone. Then the owner decrypts, once.
func TestClaimHeldOnSoftHSM(t *testing.T) {
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			ctx := context.Background()
			claimed, resume := make(chan struct{}), make(chan struct{})
			var once sync.Once
			e := newEnvWith(t, hsmtest.Shared(t), storage, func(c *issuer.Config) {
				c.AfterClaim = func(string) {
					once.Do(func() {
						close(claimed)
						<-resume
					})
				}
			})
			stop := e.run()
			defer stop()
			iss := apply(t, e)
			ct := encrypt(t, iss, "once")
			owner := make(chan error, 1)
			go func() {
				pw, err := e.is.Decrypt(ctx, iss.UniqueID, ct)
				if err == nil && string(pw) != "once" {
					err = errors.New("wrong password")
				}
				owner <- err
			}()
			<-claimed
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(func() {
					if _, err := e.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, issuer.ErrConsumed) {
						t.Errorf("a decrypt racing the claim: %v, want ErrConsumed", err)
					}
				})
			}
			wg.Wait()
			e.advance(2 * time.Minute) // past the TTL
			e.is.Reap(ctx)
			if s := e.state(iss.UniqueID); s == store.Expired {
				t.Error("the reaper expired a claimed key")
			}
			if n := e.objects(iss.UniqueID); n != 2 {
				t.Errorf("the claimed key has %d objects before its decrypt, want 2", n)
			}
			close(resume)
			if err := <-owner; err != nil {
				t.Fatalf("the owner's Decrypt: %v", err)
			}
			if s := e.state(iss.UniqueID); s != store.Consumed {
				t.Errorf("state %s, want consumed", s)
			}
			if n := e.objects(iss.UniqueID); n != 0 {
				t.Errorf("%d objects left", n)
			}
		})
	}
}

// dropSettles loses every settled move, as a crash before its commit does.
type dropSettles struct{ issuer.Store }

func (dropSettles) Settle(string, store.State, store.State, time.Time) {}

// Session storage, a crash after the answer and before the store committed
// the record's last move: the record says issued, but the key died with
// the process, and the next start marks it lost. It never decrypts again.
func TestSessionCrashLosesTheLastMove(t *testing.T) {
	ctx := context.Background()
	e := newEnvWith(t, hsmtest.Shared(t), hsm.StorageSession, func(c *issuer.Config) { c.Store = dropSettles{c.Store} })
	stop := e.run()
	iss := apply(t, e)
	ct := encrypt(t, iss, "once")
	if pw, err := e.is.Decrypt(ctx, iss.UniqueID, ct); err != nil || string(pw) != "once" {
		t.Fatalf("Decrypt: %q, %v", pw, err)
	}
	if s := e.state(iss.UniqueID); s != store.Issued {
		t.Fatalf("the store says %s; the test wants the last move lost", s)
	}
	// Within the process the key is gone for good.
	if _, err := e.is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, issuer.ErrConsumed) {
		t.Errorf("Decrypt again in the same process: %v, want ErrConsumed", err)
	}
	stop()
	e.crash()
	restartWantsLost(t, e, iss.UniqueID, ct)
	if n := e.objects(""); n != 0 {
		t.Errorf("%d objects in the token after the restart", n)
	}
}

// Session storage, a crash between the claim (in memory) and the token's
// decrypt: nothing durable says the key was claimed, and nothing needs to:
// the key dies with the process, and the next start marks it lost.
func TestSessionCrashAfterTheClaim(t *testing.T) {
	ctx := context.Background()
	var (
		e    *env
		stop func()
	)
	e = newEnvWith(t, hsmtest.Shared(t), hsm.StorageSession, func(c *issuer.Config) {
		c.AfterClaim = func(string) {
			stop() // the claimed key is not the pool's, nor issued: the stop leaves it
			e.crash()
		}
	})
	stop = e.run()
	iss := apply(t, e)
	ct := encrypt(t, iss, "never")
	if pw, err := e.is.Decrypt(ctx, iss.UniqueID, ct); err == nil {
		t.Fatalf("Decrypt on a crashed token answered %q", pw)
	}
	restartWantsLost(t, e, iss.UniqueID, ct)
}

// restartWantsLost starts e again, as after a crash, without the test's
// config changes: the record of id is lost and ct does not decrypt.
func restartWantsLost(t *testing.T, e *env, id string, ct []byte) {
	t.Helper()
	e.mod = nil
	e.open()
	if s := e.state(id); s != store.Lost {
		t.Errorf("after the restart: state %s, want lost", s)
	}
	if _, err := e.is.Decrypt(context.Background(), id, ct); !errors.Is(err, issuer.ErrLost) {
		t.Errorf("Decrypt after the restart: %v, want ErrLost", err)
	}
}
