package hsm

import (
	"context"
	"errors"
	"testing"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// The fault counters follow a real outage: down once, recovered once.
func TestFaultsCountAnOutage(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageSession)
	if f := tok.Faults(); f != (Faults{}) {
		t.Fatalf("Faults of a fresh token = %+v, want zero", f)
	}
	restore := hsmtest.MoveTokenDir(t)
	if err := tok.Check(ctx); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Check during the outage: %v, want ErrUnavailable", err)
	}
	tok.Check(ctx) // still down: not counted twice
	if f := tok.Faults(); f.Down != 1 || f.Recovered != 0 {
		t.Errorf("Faults during the outage = %+v, want Down 1, Recovered 0", f)
	}
	restore()
	waitReady(t, tok)
	if f := tok.Faults(); f.Down != 1 || f.Recovered != 1 || f.SessionsRetired == 0 {
		t.Errorf("Faults after recovery = %+v, want Down 1, Recovered 1, some sessions retired", f)
	}
}
