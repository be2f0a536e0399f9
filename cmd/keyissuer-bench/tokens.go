package main

import (
	"context"
	"fmt"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// rowTokens is row 7: key generation and decrypt + destroy through
// keyissuer's hsm package on SoftHSM and on openCryptoki's soft token, one
// run each, side by side, so that an operator sees the spread between two
// PKCS#11 implementations. No baseline and no target: it reports.
func (b *bench) rowTokens(ctx context.Context) {
	n := b.sz.Decrypts
	b.progress("row 7: key generation and decrypt on SoftHSM and openCryptoki (%d keys each)", n)
	ock, err := hsmtest.SetUpOpenCryptoki()
	if err != nil {
		b.fail("7", fmt.Errorf("openCryptoki: %w", err))
		return
	}
	rw := row{ID: "7", What: fmt.Sprintf("key generation (2 sessions) and decrypt + destroy (1) in the token, %d keys, by token", n),
		Verdict: "REPORT", Detail: map[string]any{}}
	for _, tk := range []struct{ name, module, label, pin, prefix string }{
		{"SoftHSM", b.hsm.Module, b.hsm.Label, b.hsm.PIN, ""},
		{"openCryptoki", ock.Module, ock.Label, ock.PIN, ock.Prefix},
	} {
		gen, dec, method, err := tokenRun(ctx, tk.module, tk.label, tk.pin, tk.prefix+"bench:", n)
		if err != nil {
			b.fail("7", fmt.Errorf("%s: %w", tk.name, err))
			return
		}
		rw.Cells = append(rw.Cells, fmt.Sprintf("%s: keygen %.1f/s, decrypt %.0f/s (%s)", tk.name, gen.PerSecond(), dec.PerSecond(), method))
		rw.Notes = append(rw.Notes, fmt.Sprintf("%s: keygen latency %s; decrypt + destroy latency %s",
			tk.name, latencyText(gen.Latencies), latencyText(dec.Latencies)))
		rw.Detail[tk.name] = map[string]any{"keygenPerSecond": gen.PerSecond(), "decryptPerSecond": dec.PerSecond(),
			"keygen": latencies(gen.Latencies), "decrypt": latencies(dec.Latencies)}
		b.progress("  %s: keygen %.1f/s, decrypt %.0f/s", tk.name, gen.PerSecond(), dec.PerSecond())
	}
	b.add(rw)
}

// tokenRun opens a token as keyissuerd does (session storage, oaep-sha256)
// and generates n keys on two sessions, then decrypts with each once and
// destroys it.
func tokenRun(ctx context.Context, module, label, pin, prefix string, n int) (gen, dec loadRun, method hsm.Method, err error) {
	tok, err := hsm.Open(ctx, hsm.Config{Module: module, TokenLabel: label, PIN: pin, LabelPrefix: prefix,
		KeyBits: keyBits, Sessions: 4, Paddings: []hsm.Padding{hsm.OAEPSHA256}})
	if err != nil {
		return gen, dec, "", err
	}
	defer tok.Close()
	method = tok.Info().Methods[hsm.OAEPSHA256]
	keys := make([]*hsm.Key, n)
	gen = countedRun(ctx, 2, n, func(ctx context.Context, _, i int) error {
		k, err := tok.Generate(ctx, fmt.Sprintf("k%019d%012d", time.Now().UnixNano(), i)) // a well-formed id: 32 digits
		keys[i] = k
		return err
	})
	defer func() {
		for _, k := range keys {
			if k != nil {
				tok.Destroy(context.WithoutCancel(ctx), k)
			}
		}
	}()
	if gen.Errors > 0 {
		return gen, dec, method, fmt.Errorf("key generation: %d errors: %w", gen.Errors, gen.FirstErr)
	}
	msg := []byte("correct horse battery staple")
	cts := make([][]byte, n)
	for i, k := range keys {
		if cts[i], err = hsm.Encrypt(k.Public, hsm.OAEPSHA256, msg); err != nil {
			return gen, dec, method, err
		}
	}
	dec = countedRun(ctx, 1, n, func(ctx context.Context, _, i int) error {
		pt, err := tok.Decrypt(ctx, keys[i], hsm.OAEPSHA256, cts[i])
		if err == nil && string(pt) != string(msg) {
			err = fmt.Errorf("key %d decrypted to something else", i)
		}
		if err != nil {
			return err
		}
		return tok.Destroy(ctx, keys[i])
	})
	if dec.Errors > 0 {
		return gen, dec, method, fmt.Errorf("decrypt: %d errors: %w", dec.Errors, dec.FirstErr)
	}
	return gen, dec, method, nil
}
