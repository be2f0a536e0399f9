// Package reliability is keyissuer's reliability and security suite. It has
// no code of its own: its tests run keyissuerd as a child process (the test
// binary, re-executed) on a SoftHSM token and hold it to the promises of
// RELIABILITY.md at the repository root while they kill it with SIGKILL at
// chosen instants, take its token away, flood it and feed it hostile input.
//
// The child installs test-only fault points through
// [github.com/keyissuer/keyissuer/server/daemon.Options]: wrappers of the
// token and the store that SIGKILL the process inside a key generation, a
// decrypt, a destroy or a store commit, pause it at a chosen instant, and
// note every decrypt that reaches the token in a ledger file that outlives
// the process.
//
// Knobs, read from the environment by the tests:
//
//	SOAK_CYCLES=n  run the crash harness for n cycles instead of the CI's 30
//	               (make soak); the first aim at each crash point in turn
//	CRASH_SEED=n   replay the crash harness's choices of a logged seed
package reliability
