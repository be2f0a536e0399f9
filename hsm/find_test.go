package hsm

import (
	"context"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"testing"
)

// TestFindKeyMadeByAnotherProcess has pkcs11-tool, another process, make
// a key pair on the token while this process holds it open with
// long-lived sessions, as a neighbour in a cluster does; Find must see it
// at once and decrypt with it.
func TestFindKeyMadeByAnotherProcess(t *testing.T) {
	tool, err := exec.LookPath("pkcs11-tool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("pkcs11-tool not found: apt-get install opensc")
		}
		t.Skip("pkcs11-tool not found: apt-get install opensc")
	}
	ctx := context.Background()
	tok := openToken(t, StorageToken)
	// Warm the sessions up: each has searched the token before the key exists.
	if _, err := tok.Find(ctx, "neighbour"); !errors.Is(err, ErrKeyLost) {
		t.Fatalf("Find() before the key exists = %v, want ErrKeyLost", err)
	}
	st := softToken(t)
	label := tok.cfg.LabelPrefix + "neighbour"
	out, err := exec.Command(tool, "--module", st.Module, "--token-label", st.Label, "--login", "--pin", st.PIN,
		"--keypairgen", "--key-type", "rsa:2048", "--id", hex.EncodeToString([]byte(label)), "--label", label,
		"--usage-decrypt").CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --keypairgen: %v\n%s", err, out)
	}
	k, err := tok.Find(ctx, "neighbour")
	if err != nil {
		t.Fatalf("Find() of a key another process made = %v", err)
	}
	ct, _ := Encrypt(k.Public, OAEPSHA256, []byte("from a neighbour"))
	if got, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); err != nil || string(got) != "from a neighbour" {
		t.Fatalf("Decrypt() with the found key = %q, %v", got, err)
	}
	if err := tok.Destroy(ctx, k); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.Find(ctx, "neighbour"); !errors.Is(err, ErrKeyLost) {
		t.Errorf("Find() after Destroy = %v, want ErrKeyLost", err)
	}
}

// TestRescanKeepsKeys: a rescan resets the module; keys made before it
// still decrypt, their handles found again by CKA_ID.
func TestRescanKeepsKeys(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageToken)
	k, err := tok.Generate(ctx, testID("kept"))
	if err != nil {
		t.Fatal(err)
	}
	before := tok.epoch.Load()
	if err := tok.Rescan(ctx); err != nil {
		t.Fatalf("Rescan() = %v", err)
	}
	if tok.epoch.Load() == before {
		t.Fatal("Rescan() did not reset the module")
	}
	ct, _ := Encrypt(k.Public, OAEPSHA256, []byte("after a rescan"))
	if got, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); err != nil || string(got) != "after a rescan" {
		t.Fatalf("Decrypt() after Rescan = %q, %v", got, err)
	}
	if err := tok.Destroy(ctx, k); err != nil {
		t.Fatal(err)
	}
}
