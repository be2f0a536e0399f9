package daemon

import (
	"context"
	"fmt"
	"testing"

	"github.com/keyissuer/keyissuer/issuer"
)

// Each decrypt outcome has its own name in the audit trail; a caller that
// gave up after its key was claimed is not a failed decrypt.
func TestDecryptOutcome(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{nil, "ok"},
		{issuer.ErrDecrypt, "decrypt_failed"},
		{issuer.ErrAbandoned, "decrypt_abandoned"},
		{fmt.Errorf("wrapped: %w", issuer.ErrAbandoned), "decrypt_abandoned"},
		{issuer.ErrUnavailable, "unavailable"},
		{context.Canceled, "canceled"}, // before the claim: the key is untouched
		{issuer.ErrConsumed, "consumed"},
	}
	for _, tt := range tests {
		if got := outcome(tt.err); got != tt.want {
			t.Errorf("outcome(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}
