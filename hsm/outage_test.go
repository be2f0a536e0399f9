package hsm

import (
	"context"
	"errors"
	"testing"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// During an outage SoftHSM answers CKR_OBJECT_HANDLE_INVALID to
// C_DestroyObject and an empty list to C_FindObjects, which are also how a
// token says an object is already gone. These tests pin that the Token does
// not take the outage's word for it: a destroy during an outage fails with
// ErrUnavailable and succeeds after recovery, and List and DestroyObject
// never report a token that is gone as an empty one.

// Regression: Destroy of a token object during an outage used to return nil
// and mark the key destroyed while both objects stayed in the token, so the
// issuer never retried and the key pair leaked until the next restart.
func TestDestroyDuringOutageIsRetried(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageToken)
	k, err := tok.Generate(ctx, testID("doomed"))
	if err != nil {
		t.Fatal(err)
	}
	ct, _ := Encrypt(k.Public, OAEPSHA256, []byte("pw"))
	restore := hsmtest.MoveTokenDir(t)

	if err := tok.Destroy(ctx, k); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Destroy during the outage: %v, want ErrUnavailable", err)
	}
	if tok.Ready() {
		t.Error("the failed destroy did not mark the token down")
	}
	restore()
	waitReady(t, tok)
	if n := listIDs(t, tok)[testID("doomed")]; n != 2 {
		t.Fatalf("after recovery the key has %d objects, want 2 (the destroy failed)", n)
	}
	// The key was handed to Destroy: it never decrypts again.
	if _, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); !errors.Is(err, ErrKeySpent) {
		t.Errorf("Decrypt between the failed destroy and its retry: %v, want ErrKeySpent", err)
	}
	if err := tok.Destroy(ctx, k); err != nil {
		t.Fatalf("Destroy after recovery: %v", err)
	}
	if n := listIDs(t, tok)[testID("doomed")]; n != 0 {
		t.Errorf("after the retried destroy the key has %d objects, want 0", n)
	}
}

// Regression: List during an outage used to answer an empty list, which
// start-up reconciliation would take for a token without keys.
func TestListAndDestroyObjectDuringOutage(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageToken)
	k, err := tok.Generate(ctx, testID("listed"))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := tok.List(ctx)
	if err != nil || len(objs) != 2 {
		t.Fatalf("List: %v, %v; want the key's 2 objects", objs, err)
	}
	restore := hsmtest.MoveTokenDir(t)
	if got, err := tok.List(ctx); !errors.Is(err, ErrUnavailable) {
		t.Errorf("List during the outage: %v, %v; want ErrUnavailable", got, err)
	}
	// Only the call that recovers the token gets through while it is
	// down: wait out the backoff so that DestroyObject reaches the token.
	tok.mu.Lock()
	tok.down = false
	tok.mu.Unlock()
	if err := tok.DestroyObject(ctx, objs[0]); !errors.Is(err, ErrUnavailable) {
		t.Errorf("DestroyObject during the outage: %v, want ErrUnavailable", err)
	}
	restore()
	waitReady(t, tok)
	if n := listIDs(t, tok)[testID("listed")]; n != 2 {
		t.Errorf("after recovery: %d objects, want 2", n)
	}
	if err := tok.Destroy(ctx, k); err != nil {
		t.Fatal(err)
	}
}
