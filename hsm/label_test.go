package hsm

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
)

// testID makes a well-formed key id out of a readable name: its letters and
// digits, padded with zeros to KeyIDLen.
func testID(name string) string {
	var b strings.Builder
	for i := range len(name) {
		if isAlnum(name[i]) && b.Len() < KeyIDLen {
			b.WriteByte(name[i])
		}
	}
	return b.String() + strings.Repeat("0", KeyIDLen-b.Len())
}

func TestParseLabel(t *testing.T) {
	id := "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
	tests := []struct {
		name, prefix, label string
		want                string
		wantOK              bool
	}{
		{"exact", "keyissuer:", "keyissuer:" + id, id, true},
		{"nested prefix's object", "keyissuer:", "keyissuer:host-b:" + id, "", false},
		{"nested prefix sees its own", "keyissuer:host-b:", "keyissuer:host-b:" + id, id, true},
		{"outer object under the nested prefix", "keyissuer:host-b:", "keyissuer:" + id, "", false},
		{"id one short", "keyissuer:", "keyissuer:" + id[1:], "", false},
		{"id one long", "keyissuer:", "keyissuer:" + id + "x", "", false},
		{"id with a dash", "keyissuer:", "keyissuer:" + id[1:] + "-", "", false},
		{"id with a colon", "keyissuer:", "keyissuer:" + id[1:] + ":", "", false},
		{"non-ASCII", "keyissuer:", "keyissuer:" + id[2:] + "é", "", false},
		{"probe key", "keyissuer:", "keyissuer:probe", "", false},
		{"signing key", "keyissuer:", "keyissuer-signing", "", false},
		{"other prefix", "keyissuer:", "other:" + id, "", false},
		{"prefix alone", "keyissuer:", "keyissuer:", "", false},
		{"empty", "keyissuer:", "", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := ParseLabel(tt.prefix, tt.label)
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("ParseLabel(%q, %q) = %q, %v; want %q, %v", tt.prefix, tt.label, got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

func TestCheckLabelPrefix(t *testing.T) {
	tests := []struct {
		prefix  string
		wantErr string
	}{
		{"keyissuer:", ""},
		{"keyissuer:host-b:", ""},
		{"ki.prod_2-a:", ""},
		{"", "empty"},
		{"keyissuer", "does not end with"},
		{"keyissuer-", "does not end with"},
		{"key issuer:", "holds ' '"},
		{"keyissuer/a:", "holds '/'"},
		{"kéy:", "holds"},
	}
	for _, tt := range tests {
		t.Run(tt.prefix, func(t *testing.T) {
			err := CheckLabelPrefix(tt.prefix)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("CheckLabelPrefix(%q) = %v, want nil", tt.prefix, err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("CheckLabelPrefix(%q) = %v, want an error with %q", tt.prefix, err, tt.wantErr)
			}
		})
	}
}

func TestGenerateRefusesMalformedIDs(t *testing.T) {
	tok := openToken(t, StorageSession)
	for _, id := range []string{"", "short", testID("x")[1:] + ":", testID("x") + "0"} {
		if k, err := tok.Generate(context.Background(), id); err == nil {
			tok.Destroy(context.Background(), k)
			t.Errorf("Generate(%q) succeeded: List would never find the key", id)
		}
	}
}

// Regression: List cut the prefix off any label that started with it, so
// a daemon configured "keyissuer:" listed (and its reconciliation destroyed)
// the keys of a neighbour configured "keyissuer:host-b:". It lists only
// labels that are exactly its prefix and a key id, under a CKA_ID that
// agrees.
func TestListMatchesExactly(t *testing.T) {
	ctx := context.Background()
	outerPrefix := "t-" + t.Name() + ":"
	innerPrefix := outerPrefix + "host-b:"
	outer := openToken(t, StorageToken, func(c *Config) { c.LabelPrefix = outerPrefix })
	inner := openToken(t, StorageToken, func(c *Config) { c.LabelPrefix = innerPrefix })

	ko, err := outer.Generate(ctx, testID("outer"))
	if err != nil {
		t.Fatal(err)
	}
	defer outer.Destroy(ctx, ko)
	ki, err := inner.Generate(ctx, testID("inner"))
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Destroy(ctx, ki)
	// Objects under the outer prefix that are not its keys: a label with a
	// malformed id, and a well-formed label whose CKA_ID disagrees.
	createPublicObject(t, outer, outerPrefix+"not-a-key-id", outerPrefix+"not-a-key-id")
	createPublicObject(t, outer, outerPrefix+testID("mislabelled"), "something-else")

	if got := listIDs(t, outer); len(got) != 1 || got[ko.ID] != 2 {
		t.Errorf("%q lists %v, want only its key %s (2 objects)", outerPrefix, got, ko.ID)
	}
	if got := listIDs(t, inner); len(got) != 1 || got[ki.ID] != 2 {
		t.Errorf("%q lists %v, want only its key %s (2 objects)", innerPrefix, got, ki.ID)
	}
}

// createPublicObject creates a token RSA public key object labelled label
// with CKA_ID id, destroyed when the test ends.
func createPublicObject(t testing.TB, tok *Token, label, id string) {
	t.Helper()
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(id)),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, priv.N.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
	}
	var h pkcs11.ObjectHandle
	err = tok.do(context.Background(), func(s *session) error {
		var err error
		h, err = tok.mod.ctx.CreateObject(s.h, tmpl)
		return err
	})
	if err != nil {
		t.Fatalf("CreateObject %q: %v", label, err)
	}
	t.Cleanup(func() {
		tok.do(context.Background(), func(s *session) error { return tok.mod.ctx.DestroyObject(s.h, h) })
	})
}
