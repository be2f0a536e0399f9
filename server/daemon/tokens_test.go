package daemon_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// TestWalkThroughOnEachToken is the README walk-through against keyissuerd
// on each token (SoftHSM, openCryptoki's soft token), with
// config.example.toml's settings where they matter: signed requests only,
// the response-signing key in the token. keyissuerd starts, signs its
// answers (openCryptoki by the DigestInfo fallback, as status says), issues
// a key that decrypts once and refuses a second decrypt.
func TestWalkThroughOnEachToken(t *testing.T) { hsmtest.ForEach(t, testWalkThrough) }

func testWalkThrough(t *testing.T, tk hsmtest.Token) {
	ctx := context.Background()
	label := tk.Prefix + "e2e-walk-signing"
	tok, err := hsm.Open(ctx, hsm.Config{
		Module: tk.Module, TokenLabel: tk.Label, PIN: tk.PIN, LabelPrefix: tk.Prefix + "e2e-walk:", Sessions: 2,
	})
	if err != nil {
		t.Fatalf("hsm.Open: %v", err)
	}
	s, _, err := tok.CreateSigningKey(ctx, label, 2048)
	tok.Close()
	if err != nil {
		t.Fatalf("CreateSigningKey: %v", err)
	}
	t.Cleanup(func() { hsmtest.DestroyObjects(t, tk, label) })

	c := start(t, signedSetupOn(t, tk, label, ""))
	a, err := trySDKApplyTo(http.DefaultClient, c.api, `{"customerId":"2188000123456789"}`, s.Public())
	if err != nil {
		t.Fatal(err)
	}
	if a.Result.ResultCode != "SUCCESS" || a.PublicKeyInfo == nil {
		t.Fatalf("signed apply: %+v", a.Result)
	}
	const password = "correct horse"
	ct := encryptFor(t, *a.PublicKeyInfo, password)
	if status, code, pw, err := c.decrypt(a.PublicKeyInfo.UniqueID, ct); err != nil || status != 200 || pw != password {
		t.Fatalf("decrypt: %d %s %q %v", status, code, pw, err)
	}
	if status, code, _, err := c.decrypt(a.PublicKeyInfo.UniqueID, ct); err != nil || status != 410 || code != "KEY_CONSUMED" {
		t.Errorf("second decrypt: %d %s %v; want 410 KEY_CONSUMED", status, code, err)
	}

	st := getStatus(t, c.admin)
	if st.Token.Signing != string(s.Method()) {
		t.Errorf("status says signing %q, want %q", st.Token.Signing, s.Method())
	}
	t.Logf("%s: token %s %s, signing %s, paddings %v", tk.Kind, st.Token.Manufacturer, st.Token.Model, st.Token.Signing, st.Token.Paddings)
	c.stop()
	if logs := c.stderr.String(); !strings.Contains(logs, `"signing":"`+string(s.Method())+`"`) {
		t.Errorf("the token open line does not say how the token signs:\n%s", logs)
	}
	if strings.Contains(c.stderr.String(), tk.PIN) {
		t.Error("the PIN appears in the daemon's log")
	}
}
