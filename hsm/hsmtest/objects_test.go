package hsmtest

import (
	"testing"

	"github.com/miekg/pkcs11"
)

// Objects sees what a session of another handle made in the token: a key
// pair and a data object, any label, and Added tells them from the rest.
func TestObjects(t *testing.T) {
	tok := NewToken(t)
	before := Objects(t, tok)
	if len(before) != 0 {
		t.Fatalf("a fresh token holds %v", before)
	}

	p := initModule(t, tok.Module)
	s, err := p.OpenSession(slotsByLabel(t, p)[tok.Label], pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Login(s, pkcs11.CKU_USER, tok.PIN); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 1024),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "pair"),
			pkcs11.NewAttribute(pkcs11.CKA_ID, "pair-id"),
		},
		[]*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "pair"),
			pkcs11.NewAttribute(pkcs11.CKA_ID, "pair-id"),
		}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.CreateObject(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "stray"),
	}); err != nil {
		t.Fatal(err)
	}
	// A session object of this process: visible to every session of it.
	if _, err := p.CreateObject(s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "session"),
	}); err != nil {
		t.Fatal(err)
	}

	// The module is initialised by this test now: Objects shares it.
	got := Added(before, Objects(t, tok))
	want := []Object{
		{Class: pkcs11.CKO_DATA, Label: "session"},
		{Class: pkcs11.CKO_DATA, Label: "stray"},
		{Class: pkcs11.CKO_PRIVATE_KEY, Label: "pair", ID: "pair-id"},
		{Class: pkcs11.CKO_PUBLIC_KEY, Label: "pair", ID: "pair-id"},
	}
	if len(got) != len(want) {
		t.Fatalf("added %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("added[%d] = %v, want %v", i, got[i], want[i])
		}
	}
	if a := Added(got, got); len(a) != 0 {
		t.Errorf("Added(x, x) = %v", a)
	}
}
