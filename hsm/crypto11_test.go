package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"testing"

	"github.com/ThalesGroup/crypto11"
)

// A second, independent PKCS#11 client (crypto11) reads back what keyissuer
// left in the token: the pair it finds under the key's label must be
// sensitive, never extractable and decrypt-only, with the public key that
// keyissuer hands out. Token storage, since only token objects outlive the
// Token that made them.
func TestCrypto11ReadsBackTokenKey(t *testing.T) {
	ctx := context.Background()
	st := softToken(t)
	tok := openToken(t, StorageToken)
	k, err := tok.Generate(ctx, testID("crypto11"))
	if err != nil {
		t.Fatal(err)
	}
	label := tok.label(k.ID)
	tok.Close() // the module is finalised: crypto11 initialises it anew

	c11, err := crypto11.Configure(&crypto11.Config{Path: st.Module, TokenLabel: st.Label, Pin: st.PIN})
	if err != nil {
		t.Fatalf("crypto11.Configure: %v", err)
	}
	pair, err := c11.FindKeyPair(label, label)
	if err != nil {
		c11.Close()
		t.Fatalf("FindKeyPair: %v", err)
	}
	pub, ok := pair.Public().(*rsa.PublicKey)
	if !ok || !pub.Equal(k.Public) {
		t.Errorf("crypto11 sees public key %v, want the issued one", pair.Public())
	}
	attrs, err := c11.GetAttributes(pair, []crypto11.AttributeType{
		crypto11.CkaSensitive, crypto11.CkaAlwaysSensitive, crypto11.CkaExtractable,
		crypto11.CkaNeverExtractable, crypto11.CkaSign, crypto11.CkaUnwrap, crypto11.CkaDecrypt,
	})
	if err != nil {
		t.Fatalf("GetAttributes: %v", err)
	}
	want := map[crypto11.AttributeType]byte{
		crypto11.CkaSensitive: 1, crypto11.CkaAlwaysSensitive: 1, crypto11.CkaExtractable: 0,
		crypto11.CkaNeverExtractable: 1, crypto11.CkaSign: 0, crypto11.CkaUnwrap: 0, crypto11.CkaDecrypt: 1,
	}
	for typ, w := range want {
		if a := attrs[typ]; a == nil || !bytes.Equal(a.Value, []byte{w}) {
			t.Errorf("attribute %#x = %v, want %d", typ, a, w)
		}
	}
	// Signing is refused by the token: CKA_SIGN is false.
	digest := make([]byte, 32)
	if _, err := pair.Sign(nil, digest, crypto.SHA256); err == nil {
		t.Error("the token signed with a decrypt-only key")
	}
	if err := c11.Close(); err != nil {
		t.Fatal(err)
	}

	// Clean up through keyissuer, as reconciliation would.
	tok2 := openToken(t, StorageToken)
	objs, err := tok2.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if err := tok2.DestroyObject(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
}
