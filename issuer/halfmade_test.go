package issuer_test

import (
	"context"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// A SIGKILL inside C_GenerateKeyPair leaves, in token storage on SoftHSM,
// objects with no label and no id (hsmtest.LeaveHalfMade makes each shape
// as the kill leaves it). Reconciliation goes by label; on a token
// dedicated to keyissuer, start-up must destroy them as well, and keep the
// issued key that is still valid.
func TestReconcileDestroysHalfMadeObjects(t *testing.T) {
	ctx := context.Background()
	soft := hsmtest.Shared(t) // SoftHSM: the half-made shapes are its own
	e := newEnv(t, soft, hsm.StorageToken)
	stop := e.run()
	kept := apply(t, e)
	stop()
	e.crash()

	before := hsmtest.Objects(t, soft)
	for _, shape := range []hsmtest.HalfMade{hsmtest.HalfMadeClassless, hsmtest.HalfMadePublic, hsmtest.HalfMadePrivate} {
		hsmtest.LeaveHalfMade(t, soft, shape)
	}
	if n := len(hsmtest.Added(before, hsmtest.Objects(t, soft))); n != 3 {
		t.Fatalf("the kill's stand-in left %d objects, want 3", n)
	}

	// One daemon alone on a token of its own: the grace may be short.
	e.tokenConfig = func(c *hsm.Config) { c.SweepHalfMade, c.HalfMadeGrace = true, time.Millisecond }
	e.open()
	if left := hsmtest.Added(before, hsmtest.Objects(t, soft)); len(left) != 0 {
		t.Errorf("LEAKED OBJECTS: %v survived the restart's reconciliation", left)
	}
	pw, err := e.is.Decrypt(ctx, kept.UniqueID, encrypt(t, kept, "survivor"))
	if err != nil || string(pw) != "survivor" {
		t.Errorf("the issued key after the restart: Decrypt = %q, %v", pw, err)
	}
}
