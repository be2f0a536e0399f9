package issuer_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/issuer/store/bolt"
)

// BenchmarkDecrypt times Issuer.Decrypt at concurrency 1 on SoftHSM, with
// the store and an audit-like file (one line appended and fsync'd at each
// decrypt event, as the daemon's audit.fsync = "always") in the test's
// temp dir: the durable writes a decrypt waits for, without the socket.
// Keys are issued, and the pool refilled, before the timer starts. Besides
// the time per decrypt it reports the time a decrypt waited for the store
// (store-ms/op: durable transitions) and for the audit line's fsync
// (audit-ms/op): on a loaded machine the first figure is noisy, these two
// say which writes a decrypt waits for.
//
//	go test -run '^$' -bench BenchmarkDecrypt -benchtime 200x ./issuer
func BenchmarkDecrypt(b *testing.B) {
	for _, storage := range []hsm.Storage{hsm.StorageSession, hsm.StorageToken} {
		b.Run(string(storage), func(b *testing.B) { benchDecrypt(b, storage) })
	}
}

func benchDecrypt(b *testing.B, storage hsm.Storage) {
	ctx := context.Background()
	soft := hsmtest.Shared(b)
	dir := b.TempDir()
	tok, err := hsm.Open(ctx, hsm.Config{
		Module: soft.Module, TokenLabel: soft.Label, PIN: soft.PIN,
		Storage: storage, LabelPrefix: "bd-" + filepath.Base(dir) + ":", Sessions: 4,
		Paddings: []hsm.Padding{hsm.OAEPSHA256},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer tok.Close()
	st, err := bolt.Open(filepath.Join(dir, "records.db"), bolt.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	trail, err := os.OpenFile(filepath.Join(dir, "audit.jsonl"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer trail.Close()
	var storeWait, auditWait time.Duration
	is, err := issuer.New(issuer.Config{
		Token: tok, Store: timedStore{st, &storeWait}, Storage: storage,
		Paddings: []hsm.Padding{hsm.OAEPSHA256},
		Log:      slog.New(slog.DiscardHandler),
		TTL:      time.Hour, PoolSize: 8, Generators: 2, ApplyWait: time.Minute,
		ReapInterval: time.Hour,
		OnEvent: func(_ context.Context, e issuer.Event) {
			if e.Kind == issuer.EventDecrypt {
				start := time.Now()
				trail.WriteString(`{"event":"key.decrypt","unique_id":"` + e.UniqueID + `"}` + "\n")
				trail.Sync()
				auditWait += time.Since(start)
			}
		},
	})
	if err != nil {
		b.Fatal(err)
	}
	if err := is.Reconcile(ctx); err != nil {
		b.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { is.Run(runCtx); close(done) }()
	defer func() { cancel(); <-done }()

	keys := make([]issuer.Issued, b.N)
	cts := make([][]byte, b.N)
	for i := range keys {
		if keys[i], err = is.Apply(ctx, "2188000000000001", "client-1"); err != nil {
			b.Fatal(err)
		}
		cts[i] = encrypt(b, keys[i], "pw")
	}
	// A full pool: no key generation competes with the timed decrypts.
	for deadline := time.Now().Add(time.Minute); is.Stats().PoolReady < is.Stats().PoolSize; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatal("the pool did not fill within a minute")
		}
	}
	storeWait, auditWait = 0, 0
	b.ResetTimer()
	for i := range b.N {
		if _, err := is.Decrypt(ctx, keys[i].UniqueID, cts[i]); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(storeWait.Microseconds())/1e3/float64(b.N), "store-ms/op")
	b.ReportMetric(float64(auditWait.Microseconds())/1e3/float64(b.N), "audit-ms/op")
}

// timedStore adds up the time spent in durable transitions. The benchmark
// decrypts one at a time, so the sum needs no lock.
type timedStore struct {
	issuer.Store
	wait *time.Duration
}

func (s timedStore) Transition(ctx context.Context, id string, from, to store.State, at time.Time) (store.Record, error) {
	start := time.Now()
	defer func() { *s.wait += time.Since(start) }()
	return s.Store.Transition(ctx, id, from, to, at)
}
