package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// destroyLabelled destroys every object under label when the test ends:
// signing keys are token objects and outlive the Token.
func destroyLabelled(t testing.TB, tok *Token, label string) {
	t.Helper()
	t.Cleanup(func() {
		err := tok.do(context.Background(), func(s *session) error {
			hs, err := tok.findAll(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
			if err != nil {
				return err
			}
			for _, h := range hs {
				if err := tok.mod.ctx.DestroyObject(s.h, h); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Errorf("failed to clean up %q: %v", label, err)
		}
	})
}

// TestSigningKey runs with the method the token chose and with the
// DigestInfo fallback forced, so that the fallback (chosen where
// CKM_SHA256_RSA_PKCS is missing, as on openCryptoki's soft token) is
// tested on SoftHSM too.
func TestSigningKey(t *testing.T) {
	hsmtest.ForEach(t, func(t *testing.T, tk hsmtest.Token) {
		chosen := openTokenOn(t, tk, StorageSession).Info().Signing
		if chosen == "" {
			t.Fatal("the token chose no signing method")
		}
		for _, m := range slices.Compact([]SignMethod{chosen, SignDigestInfo}) {
			t.Run(string(m), func(t *testing.T) { testSigningKey(t, tk, m) })
		}
	})
}

func testSigningKey(t *testing.T, tk hsmtest.Token, method SignMethod) {
	ctx := context.Background()
	tok := openTokenOn(t, tk, StorageSession)
	tok.info.Signing = method
	label := tk.Prefix + "sign-" + tok.cfg.LabelPrefix[len(tk.Prefix):len(tok.cfg.LabelPrefix)-1]
	destroyLabelled(t, tok, label)

	if _, err := tok.Signer(ctx, label); !errors.Is(err, ErrNoSigningKey) {
		t.Fatalf("Signer() before creation = %v, want ErrNoSigningKey", err)
	}
	s, created, err := tok.CreateSigningKey(ctx, label, 2048)
	if err != nil || !created {
		t.Fatalf("CreateSigningKey() = %v, created %v", err, created)
	}
	if s.Method() != method {
		t.Errorf("Method() = %s, want %s", s.Method(), method)
	}
	again, created, err := tok.CreateSigningKey(ctx, label, 2048)
	if err != nil || created || !again.Public().Equal(s.Public()) {
		t.Fatalf("second CreateSigningKey() = %v, created %v; want the same key, not created", err, created)
	}

	// Signatures verify as a wallet SDK checks them: SHA256withRSA.
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			msg := fmt.Appendf(nil, "POST /ams/api/v1/customer/applyPublicKey\nclient.%d.{}", i)
			sig, err := again.Sign(ctx, msg)
			if err != nil {
				t.Errorf("Sign() = %v", err)
				return
			}
			digest := sha256.Sum256(msg)
			if err := rsa.VerifyPKCS1v15(s.Public(), crypto.SHA256, digest[:], sig); err != nil {
				t.Errorf("signature does not verify: %v", err)
			}
		})
	}
	wg.Wait()

	// The private half is a sensitive, never extractable, sign-only token
	// object; the public half only verifies.
	err = tok.do(ctx, func(ss *session) error {
		for _, tc := range []struct {
			class uint
			want  map[uint]bool
		}{
			{pkcs11.CKO_PRIVATE_KEY, map[uint]bool{
				pkcs11.CKA_TOKEN: true, pkcs11.CKA_PRIVATE: true, pkcs11.CKA_SENSITIVE: true,
				pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_NEVER_EXTRACTABLE: true, pkcs11.CKA_SIGN: true,
				pkcs11.CKA_DECRYPT: false, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_DERIVE: false,
			}},
			{pkcs11.CKO_PUBLIC_KEY, map[uint]bool{
				pkcs11.CKA_TOKEN: true, pkcs11.CKA_VERIFY: true, pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_WRAP: false,
			}},
		} {
			hs, err := tok.findAll(ss, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, tc.class),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
			})
			if err != nil {
				return err
			}
			if len(hs) != 1 {
				t.Fatalf("%d objects of class %d under %q, want 1", len(hs), tc.class, label)
			}
			for typ, want := range tc.want {
				attrs, err := tok.mod.ctx.GetAttributeValue(ss.h, hs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
				if err != nil {
					return fmt.Errorf("attribute %#x: %w", typ, err)
				}
				if got := attrs[0].Value; !bytes.Equal(got, []byte{boolByte(want)}) {
					t.Errorf("class %d attribute %#x = %v, want %v", tc.class, typ, got, want)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// A later Token finds the same key.
	tok2 := openTokenOn(t, tk, StorageSession)
	s2, err := tok2.Signer(ctx, label)
	if err != nil || !s2.Public().Equal(s.Public()) {
		t.Errorf("Signer() from another Token = %v; want the same key", err)
	}
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}

func TestSigningKeyLabels(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageSession)
	for _, label := range []string{"", tok.cfg.LabelPrefix + "signing"} {
		if _, err := tok.Signer(ctx, label); err == nil || errors.Is(err, ErrNoSigningKey) {
			t.Errorf("Signer(%q) = %v, want a label error", label, err)
		}
		if _, _, err := tok.CreateSigningKey(ctx, label, 2048); err == nil {
			t.Errorf("CreateSigningKey(%q) succeeded", label)
		}
	}
	if _, _, err := tok.CreateSigningKey(ctx, "sign-bits", 1024); err == nil {
		t.Error("CreateSigningKey() made a 1024-bit key")
	}

	// A one-time decrypt key cannot be used: its private half may not sign.
	k, err := tok.Generate(ctx, testID("not-a-signer"))
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Destroy(ctx, k)
	ts := &Signer{t: tok, label: "x", pub: k.Public, priv: k.priv}
	if _, err := ts.Sign(ctx, []byte("msg")); err == nil {
		t.Error("Sign() with a decrypt-only key succeeded")
	}
}

func TestChooseSignMethod(t *testing.T) {
	sign := mechInfo{min: 512, max: 4096, flags: pkcs11.CKF_SIGN | pkcs11.CKF_VERIFY}
	verifyOnly := mechInfo{min: 512, max: 4096, flags: pkcs11.CKF_VERIFY}
	tests := []struct {
		name  string
		infos map[uint]mechInfo
		want  SignMethod
	}{
		{"both", map[uint]mechInfo{pkcs11.CKM_SHA256_RSA_PKCS: sign, pkcs11.CKM_RSA_PKCS: sign}, SignSHA256RSA},
		// openCryptoki 3.8's soft token.
		{"no CKM_SHA256_RSA_PKCS", map[uint]mechInfo{pkcs11.CKM_RSA_PKCS: sign, pkcs11.CKM_SHA256_RSA_PKCS_PSS: sign}, SignDigestInfo},
		{"CKM_SHA256_RSA_PKCS verifies only", map[uint]mechInfo{pkcs11.CKM_SHA256_RSA_PKCS: verifyOnly, pkcs11.CKM_RSA_PKCS: sign}, SignDigestInfo},
		{"neither signs", map[uint]mechInfo{pkcs11.CKM_SHA256_RSA_PKCS: verifyOnly, pkcs11.CKM_RSA_PKCS: verifyOnly}, ""},
		{"none", map[uint]mechInfo{}, ""},
	}
	for _, tc := range tests {
		if got := chooseSignMethod(tc.infos); got != tc.want {
			t.Errorf("%s: chooseSignMethod() = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestSigningUnsupported: a token that cannot sign opens (it can still
// issue and decrypt), but makes no signing key it could not use.
func TestSigningUnsupported(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageSession)
	tok.info.Signing = ""
	label := "sign-" + tok.cfg.LabelPrefix[:len(tok.cfg.LabelPrefix)-1]
	destroyLabelled(t, tok, label)
	if _, _, err := tok.CreateSigningKey(ctx, label, 2048); err == nil || !strings.Contains(err.Error(), "CKM_RSA_PKCS") {
		t.Errorf("CreateSigningKey() = %v, want an error naming the mechanisms", err)
	}
	if _, err := tok.Signer(ctx, label); err == nil || errors.Is(err, ErrNoSigningKey) {
		t.Errorf("Signer() = %v, want an error naming the mechanisms", err)
	}
	if n := len(listLabelled(t, tok, label)); n != 0 {
		t.Errorf("%d objects under %q, want none", n, label)
	}
}

// listLabelled returns the handles of the objects under label.
func listLabelled(t testing.TB, tok *Token, label string) []pkcs11.ObjectHandle {
	t.Helper()
	var hs []pkcs11.ObjectHandle
	err := tok.do(context.Background(), func(s *session) error {
		var err error
		hs, err = tok.findAll(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, label)})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return hs
}

// TestKeySizeOutsideMechanism: a key the token's mechanism does not take
// (openCryptoki crashes on one) is refused before it reaches the token,
// and the refusal does not spend the key.
func TestKeySizeOutsideMechanism(t *testing.T) {
	ctx := context.Background()
	tok := openToken(t, StorageSession)
	k, err := tok.Generate(ctx, testID("size"))
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Destroy(ctx, k)
	m := tok.info.Methods[OAEPSHA256]
	mech := OAEPSHA256.mechanism(m)[0].Mechanism
	saved := tok.mechs
	tok.mechs = maps.Clone(saved)
	tok.mechs[mech] = mechInfo{min: 512, max: 1024, flags: saved[mech].flags}
	ct, _ := Encrypt(k.Public, OAEPSHA256, []byte("pw"))
	if _, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); !errors.Is(err, ErrKeySize) {
		t.Fatalf("Decrypt with a 2048-bit key and a mechanism of 512-1024 bits = %v, want ErrKeySize", err)
	}
	tok.mechs = saved
	if got, err := tok.Decrypt(ctx, k, OAEPSHA256, ct); err != nil || string(got) != "pw" {
		t.Errorf("Decrypt after = %q, %v; want the key unspent", got, err)
	}
	for _, tc := range []struct {
		mi   mechInfo
		bits int
		want bool
	}{
		{mechInfo{min: 512, max: 4096}, 2048, true},
		{mechInfo{min: 512, max: 4096}, 8192, false},
		{mechInfo{min: 3072, max: 4096}, 2048, false},
		{mechInfo{}, 8192, true}, // no range reported
	} {
		if got := sizeFits(tc.mi, tc.bits); got != tc.want {
			t.Errorf("sizeFits(%d-%d, %d) = %v, want %v", tc.mi.min, tc.mi.max, tc.bits, got, tc.want)
		}
	}
}
