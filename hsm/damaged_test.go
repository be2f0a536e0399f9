package hsm

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"
)

// Regression: keyissuerd died of a SIGSEGV inside SoftHSM's C_Decrypt
// (TestApplyFlood, now and then). Another process listing the token (the
// suite's object count, pkcs11-tool) read a key pair's private object while
// the daemon was still writing it, and SoftHSM 2.6.1's C_GetAttributeValue
// in that process wrote default values for the attributes it did not find
// (an empty modulus, empty key material) back over the daemon's object. The
// daemon's C_DecryptInit accepted the damaged key, and C_Decrypt
// dereferenced its null modulus (RSA_size, BN_num_bits at address 0x8).
//
// The test makes the object that damage leaves, a private RSA key object
// whose modulus and key material are empty, directly (the race with another
// process is rare and slow to hit), and decrypts with it: without the check
// before C_DecryptInit the test binary dies of that SIGSEGV; with it the key
// is lost, and C_Decrypt is never called.
func TestDecryptWithDamagedKeyIsLostNotACrash(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageToken)
	id := testID("damaged")
	k := damagedKey(t, tok, id)
	ct, err := Encrypt(k.Public, OAEPSHA256, []byte("pw"))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); !errors.Is(err, ErrKeyLost) {
		t.Errorf("Decrypt with a key whose private half lost its modulus = %q, %v; want ErrKeyLost", got, err)
	}
	if err := tok.Destroy(ctx, k); err != nil {
		t.Errorf("Destroy of the damaged key: %v", err)
	}
	if n := listIDs(t, tok)[id]; n != 0 {
		t.Errorf("after Destroy the token holds %d objects of the damaged key, want 0", n)
	}
}

// damagedKey creates, as a token object under id's label, the private half
// of a key pair as another SoftHSM process leaves it when it writes back an
// object it read half-written: a decrypt-only private RSA key whose
// modulus and key material are empty. The Key's public half is a real one,
// as the daemon knew it when it issued the key.
func damagedKey(t *testing.T, tok *Token, id string) *Key {
	t.Helper()
	real, err := rsa.GenerateKey(rand.Reader, tok.cfg.KeyBits)
	if err != nil {
		t.Fatal(err)
	}
	_, tmpl := KeyTemplates(true, tok.label(id), 0)
	for _, typ := range []uint{
		pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT, pkcs11.CKA_PRIVATE_EXPONENT,
		pkcs11.CKA_PRIME_1, pkcs11.CKA_PRIME_2,
	} {
		tmpl = append(tmpl, pkcs11.NewAttribute(typ, []byte{}))
	}
	k := &Key{ID: id, Public: &real.PublicKey, tokenStore: true, epoch: tok.epoch.Load()}
	err = tok.do(context.Background(), func(s *session) error {
		k.priv, err = tok.mod.ctx.CreateObject(s.h, tmpl)
		return err
	})
	if err != nil {
		t.Fatalf("creating the damaged private key object: %v", err)
	}
	return k
}
