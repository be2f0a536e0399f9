package main

import (
	"os"
	"strings"
	"testing"
)

// The unit keeps what it promises: no core dumps, no swap for the whole
// service (MemorySwapMax=0 covers every copy of a plaintext, which mlock in
// the daemon could not), and no LimitMEMLOCK, which would promise locking
// that the daemon does not do.
func TestUnitKeepsPlaintextsOutOfSwap(t *testing.T) {
	unit, err := os.ReadFile("deploy/keyissuerd.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"\nLimitCORE=0\n", "\nMemorySwapMax=0\n"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("the unit lacks %q", strings.TrimSpace(want))
		}
	}
	if strings.Contains(string(unit), "LimitMEMLOCK") {
		t.Error("the unit sets LimitMEMLOCK, but the daemon locks no memory")
	}
}
