package issuer_test

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
)

// Item 7 of the security review: with a padding the token does natively,
// bad padding is a token error (CKR_GENERAL_ERROR on SoftHSM), which used
// to cost health checks that a wrong salt (a decrypt that succeeds, then
// fails the salt check) did not: one bit of timing per key. Both failures
// must take the same course through the token: the same PKCS#11 calls, in
// the same order.
func TestFailedDecryptsMakeTheSameTokenCalls(t *testing.T) {
	for _, storage := range storages {
		t.Run(string(storage), func(t *testing.T) {
			ctx := context.Background()
			softTok := hsmtest.Shared(t)
			var (
				mu    sync.Mutex
				calls []hsm.Op
			)
			tok, err := hsm.Open(ctx, hsm.Config{
				Module: softTok.Module, TokenLabel: softTok.Label, PIN: softTok.PIN,
				Storage: storage, LabelPrefix: "cost-" + filepath.Base(t.TempDir()) + ":",
				Sessions: 2, Paddings: []hsm.Padding{hsm.OAEPSHA1},
				AfterCall: func(op hsm.Op, _ string, err error) error {
					mu.Lock()
					calls = append(calls, op)
					mu.Unlock()
					return err
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer tok.Close()
			if m := tok.Info().Methods[hsm.OAEPSHA1]; m != hsm.Native {
				t.Fatalf("SoftHSM does OAEP-SHA-1 %s; this test needs it native", m)
			}
			st, err := bolt.Open(filepath.Join(t.TempDir(), "records.db"), bolt.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			is, err := issuer.New(issuer.Config{
				Token: tok, Store: st, Storage: storage, Log: slog.New(slog.DiscardHandler),
				Paddings: []hsm.Padding{hsm.OAEPSHA1}, PoolSize: 2, Generators: 1,
				ApplyWait: time.Minute, ReapInterval: time.Hour,
			})
			if err != nil {
				t.Fatal(err)
			}
			runCtx, stop := context.WithCancel(ctx)
			done := make(chan struct{})
			go func() { is.Run(runCtx); close(done) }()
			defer func() { stop(); <-done }()

			course := map[string][]hsm.Op{}
			for _, name := range []string{"wrong salt", "bad padding"} {
				iss, err := is.Apply(ctx, "2188000000000001", "")
				if err != nil {
					t.Fatal(err)
				}
				pub, err := x509.ParsePKIXPublicKey(iss.PublicKey)
				if err != nil {
					t.Fatal(err)
				}
				ct, err := hsm.Encrypt(pub.(*rsa.PublicKey), hsm.OAEPSHA1, []byte("pw"+"WRONGSALT000"))
				if err != nil {
					t.Fatal(err)
				}
				if name == "bad padding" {
					ct = bytes.Repeat([]byte{0x5a}, len(ct))
					ct[0] = 0x01
				}
				// The pool refills after the apply: wait, so that only the
				// decrypt's calls are counted.
				waitUntil(t, "the pool to refill", func() bool { return is.Stats().PoolReady == 2 })
				mu.Lock()
				calls = nil
				mu.Unlock()
				if _, err := is.Decrypt(ctx, iss.UniqueID, ct); !errors.Is(err, issuer.ErrDecrypt) {
					t.Fatalf("%s: Decrypt = %v, want ErrDecrypt", name, err)
				}
				mu.Lock()
				course[name] = calls
				mu.Unlock()
				t.Logf("%s: %v", name, course[name])
			}
			if a, b := course["wrong salt"], course["bad padding"]; len(a) == 0 || !slices.Equal(a, b) {
				t.Errorf("token calls differ: wrong salt %v, bad padding %v", a, b)
			}
		})
	}
}
