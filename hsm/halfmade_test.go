package hsm

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

var halfMadeShapes = []hsmtest.HalfMade{hsmtest.HalfMadeClassless, hsmtest.HalfMadePublic, hsmtest.HalfMadePrivate, hsmtest.HalfMadeUnmarked}

// nHalfMade is how many half-made objects leaveHalfMade leaves: one of each shape.
var nHalfMade = len(halfMadeShapes)

// leaveHalfMade leaves one object of every shape a kill inside SoftHSM's
// C_GenerateKeyPair leaves, and checks that the token really holds them:
// three objects more, none with a label or an id.
func leaveHalfMade(t *testing.T) (before []hsmtest.Object) {
	t.Helper()
	soft := softToken(t)
	before = hsmtest.Objects(t, soft)
	for _, shape := range halfMadeShapes {
		hsmtest.LeaveHalfMade(t, soft, shape)
	}
	added := hsmtest.Added(before, hsmtest.Objects(t, soft))
	if len(added) != len(halfMadeShapes) {
		t.Fatalf("the token gained %v, want %d half-made objects", added, len(halfMadeShapes))
	}
	for _, o := range added {
		if o.Label != "" || o.ID != "" {
			t.Fatalf("a half-made object has a label or an id: %v", o)
		}
	}
	t.Cleanup(func() { clearHalfMade(t, before) })
	return before
}

// clearHalfMade destroys what a test left half-made, so that the tests
// after it share a clean token.
func clearHalfMade(t *testing.T, before []hsmtest.Object) {
	if len(hsmtest.Added(before, hsmtest.Objects(t, softToken(t)))) == 0 {
		return
	}
	tok := openToken(t, StorageToken, func(c *Config) { c.SweepHalfMade, c.HalfMadeGrace = true, time.Nanosecond })
	for range 2 {
		if _, err := tok.SweepHalfMade(context.Background()); err != nil {
			t.Errorf("clearing the half-made objects: %v", err)
		}
	}
}

// What a kill inside C_GenerateKeyPair leaves in token storage carries no
// label and no id, so reconciliation by label cannot see it: on a token
// dedicated to keyissuer the sweep destroys it at its second look, and
// never a finished key.
func TestSweepHalfMadeDestroysWhatAKillLeft(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageToken, func(c *Config) { c.SweepHalfMade, c.HalfMadeGrace = true, time.Nanosecond })
	k, err := tok.Generate(ctx, testID("finished"))
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Destroy(ctx, k)
	before := leaveHalfMade(t)

	first, err := tok.SweepHalfMade(ctx)
	if err != nil {
		t.Fatalf("first look: %v", err)
	}
	if first.Found != nHalfMade || first.Destroyed != 0 || first.Waiting != nHalfMade || first.NextDue <= 0 {
		t.Errorf("first look = %+v, want %d found and waiting for a second look, none destroyed", first, nHalfMade)
	}
	second, err := tok.SweepHalfMade(ctx)
	if err != nil {
		t.Fatalf("second look: %v", err)
	}
	if second.Found != nHalfMade || second.Destroyed != nHalfMade || second.Waiting != 0 {
		t.Errorf("second look = %+v, want the %d destroyed", second, nHalfMade)
	}
	if left := hsmtest.Added(before, hsmtest.Objects(t, softToken(t))); len(left) != 0 {
		t.Errorf("LEAKED OBJECTS: %v remain after the sweep", left)
	}
	ct, err := Encrypt(k.Public, OAEPSHA256, []byte("still here"))
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); err != nil || string(pt) != "still here" {
		t.Errorf("the finished key after the sweep: Decrypt = %q, %v", pt, err)
	}
}

// Without Config.SweepHalfMade (the token may be shared with other
// applications) half-made objects are counted, never destroyed; with it,
// not before the grace has passed.
func TestSweepHalfMadeKeepsWhatItMayNotTake(t *testing.T) {
	ctx := context.Background()
	before := leaveHalfMade(t)
	for _, tc := range []struct {
		name string
		cfg  func(*Config)
	}{
		{"not dedicated", func(c *Config) { c.HalfMadeGrace = time.Nanosecond }},
		{"within the grace", func(c *Config) { c.SweepHalfMade = true }}, // a minute
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := openToken(t, StorageToken, tc.cfg)
			for look := range 3 {
				res, err := tok.SweepHalfMade(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if res.Found != nHalfMade || res.Destroyed != 0 || res.Waiting != nHalfMade {
					t.Errorf("look %d = %+v, want %d found, %d waiting, none destroyed", look, res, nHalfMade, nHalfMade)
				}
			}
			if err := tok.Check(ctx); err != nil {
				t.Fatalf("Check: %v", err)
			}
			if left := len(hsmtest.Added(before, hsmtest.Objects(t, softToken(t)))); left != nHalfMade {
				t.Errorf("%d half-made objects left, want the %d", left, nHalfMade)
			}
		})
	}
}

// A generation of this process in flight during the first look may be
// making what it found: nothing goes until it has finished, whatever the
// grace.
func TestSweepHalfMadeWaitsForOwnGenerations(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageToken, func(c *Config) { c.SweepHalfMade, c.HalfMadeGrace = true, time.Nanosecond })
	leaveHalfMade(t)
	end := tok.half.beginGeneration() // as if C_GenerateKeyPair were running
	for look := range 2 {
		res, err := tok.SweepHalfMade(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if res.Destroyed != 0 || res.Waiting != nHalfMade {
			t.Errorf("look %d during a generation = %+v, want %d waiting, none destroyed", look, res, nHalfMade)
		}
	}
	end()
	res, err := tok.SweepHalfMade(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Destroyed != nHalfMade {
		t.Errorf("look after the generation = %+v, want the %d destroyed", res, nHalfMade)
	}
}

// The sweep finds what it looks for with searches, and reads no object's
// attributes: on SoftHSM 2.6.1 a read of a key that another process is
// making can wipe that key's label and id (RELIABILITY.md, bug 6), so a
// sweep that read every object damaged its neighbours' keys in a cluster.
// The one read left is the class of an object that has been classless for
// a grace, just before it goes.
func TestSweepHalfMadeReadsNoAttributes(t *testing.T) {
	ctx := context.Background()
	var reads atomic.Int32
	count := func(c *Config) {
		c.AfterCall = func(op Op, _ string, err error) error {
			if op == OpGetAttributeValue {
				reads.Add(1)
			}
			return err
		}
	}
	tok := openToken(t, StorageToken, count, func(c *Config) { c.SweepHalfMade = true }) // a minute's grace
	k, err := tok.Generate(ctx, testID("finished"))
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Destroy(ctx, k)
	leaveHalfMade(t)
	reads.Store(0)
	for look := range 2 {
		res, err := tok.SweepHalfMade(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if res.Found != nHalfMade {
			t.Errorf("look %d = %+v, want %d found", look, res, nHalfMade)
		}
	}
	if n := reads.Load(); n != 0 {
		t.Errorf("two looks read attributes %d times, want none", n)
	}

	due := openToken(t, StorageToken, count, func(c *Config) { c.SweepHalfMade, c.HalfMadeGrace = true, time.Nanosecond })
	reads.Store(0)
	for range 2 {
		if _, err := due.SweepHalfMade(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if n := reads.Load(); n != 1 {
		t.Errorf("two looks that destroyed the half-made objects read attributes %d times, want 1 (the classless object's class)", n)
	}
}
