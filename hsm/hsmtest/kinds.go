package hsmtest

import "testing"

// Kind names a PKCS#11 implementation the integration tests run on.
type Kind string

const (
	// SoftHSM is SoftHSM2: private tokens per test binary ([NewToken]).
	SoftHSM Kind = "softhsm"
	// OpenCryptoki is openCryptoki's soft token: one per machine
	// ([OpenCryptokiToken]).
	OpenCryptoki Kind = "opencryptoki"
)

// Kinds lists every implementation, SoftHSM first.
var Kinds = []Kind{SoftHSM, OpenCryptoki}

// Of returns a token of kind k: the binary's [Shared] SoftHSM token, or the
// machine's openCryptoki soft token (which skips the test where openCryptoki
// is not installed, and fails it under CI=true).
func Of(t testing.TB, k Kind) Token {
	t.Helper()
	switch k {
	case SoftHSM:
		return Shared(t)
	case OpenCryptoki:
		return OpenCryptokiToken(t)
	}
	t.Fatalf("hsmtest: unknown token kind %q", k)
	return Token{}
}

// ForEach runs f once per token kind, as subtests named by the kind
// ("softhsm", "opencryptoki"), so results are reported per token. The
// subtests run one after the other.
func ForEach(t *testing.T, f func(t *testing.T, tok Token)) {
	t.Helper()
	for _, k := range Kinds {
		t.Run(string(k), func(t *testing.T) { f(t, Of(t, k)) })
	}
}
