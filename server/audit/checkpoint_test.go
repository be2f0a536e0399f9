package audit

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

var checkpointKeys = sync.OnceValue(func() [2]*rsa.PrivateKey {
	var ks [2]*rsa.PrivateKey
	for i := range ks {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		ks[i] = k
	}
	return ks
})

func signer(k *rsa.PrivateKey) func([]byte) ([]byte, error) {
	return func(msg []byte) ([]byte, error) {
		d := sha256.Sum256(msg)
		return rsa.SignPKCS1v15(nil, k, crypto.SHA256, d[:])
	}
}

func checkpoint(t testing.TB, l *Log, k *rsa.PrivateKey) Event {
	t.Helper()
	e, ok, err := l.Checkpoint(signer(k), KeyID(&k.PublicKey))
	if err != nil || !ok {
		t.Fatalf("Checkpoint: %v, %v", ok, err)
	}
	return e
}

// cut keeps the first n lines of the file.
func cut(t testing.TB, path string, n int) {
	t.Helper()
	lines := strings.SplitAfter(mustRead(t, path), "\n")
	if err := os.WriteFile(path, []byte(strings.Join(lines[:n], "")), 0o600); err != nil {
		t.Fatal(err)
	}
}

func coverage(t testing.TB, path string, pub *rsa.PublicKey) (Chain, Coverage) {
	t.Helper()
	c, err := verifyFile(t, path)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	cov, err := VerifyCheckpoints(c, pub)
	if err != nil {
		t.Fatalf("VerifyCheckpoints: %v", err)
	}
	return c, cov
}

// TestCheckpointsCoverTheTail: a signed checkpoint says how far the file
// is covered; lines after the last one are reported as not covered; a cut
// and a restart leave a valid chain, which only the logged copy of a later
// checkpoint exposes.
func TestCheckpointsCoverTheTail(t *testing.T) {
	key := checkpointKeys()[0]
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l := openLog(t, path, SyncAlways)
	if _, ok, err := l.Checkpoint(signer(key), KeyID(&key.PublicKey)); ok || err != nil {
		t.Fatalf("checkpoint of an empty trail: %v %v, want none", ok, err)
	}
	record(t, l, sample...)
	first := checkpoint(t, l, key)
	if first.CheckpointSeq != 4 {
		t.Errorf("checkpoint covers seq %d, want 4", first.CheckpointSeq)
	}
	if _, ok, _ := l.Checkpoint(signer(key), KeyID(&key.PublicKey)); ok {
		t.Error("a second checkpoint with nothing new")
	}
	_, cov := coverage(t, path, &key.PublicKey)
	if cov != (Coverage{Checkpoints: 1, Through: 4, Uncovered: 1}) {
		t.Errorf("coverage %+v, want through 4, the checkpoint's own line after it", cov)
	}

	record(t, l, sample[:2]...)
	_, cov = coverage(t, path, &key.PublicKey)
	if cov.Through != 4 || cov.Uncovered != 3 {
		t.Errorf("two more lines: %+v, want through 4 and 3 not covered", cov)
	}
	logged := checkpoint(t, l, key) // what the daemon's log keeps a copy of
	record(t, l, sample[2])
	l.Close()

	// Cut the file after the first checkpoint and restart: the chain goes
	// on, valid, and the file alone reads as covered through seq 4.
	cut(t, path, 5)
	l = openLog(t, path, SyncAlways)
	record(t, l, sample[3])
	l.Close()
	c, cov := coverage(t, path, &key.PublicKey)
	if cov.Through != 4 || c.LastSeq != 6 {
		t.Errorf("after the cut: %+v, last seq %d", cov, c.LastSeq)
	}
	// The logged copy of the second checkpoint names line 7 with a hash
	// the file's line 7 does not have: the cut shows.
	if logged.CheckpointSeq != 7 || c.LastSeq >= logged.CheckpointSeq {
		t.Fatalf("the logged checkpoint covers seq %d, the file ends at %d", logged.CheckpointSeq, c.LastSeq)
	}
	copies := []Logged{
		{Seq: first.CheckpointSeq, Head: first.CheckpointHead, Signature: first.Signature, KeyID: first.KeyID},
		{Seq: logged.CheckpointSeq, Head: logged.CheckpointHead, Signature: logged.Signature, KeyID: logged.KeyID},
	}
	if _, _, err := CompareLogged(strings.NewReader(mustRead(t, path)), copies, &key.PublicKey); err == nil || !strings.Contains(err.Error(), "past the trail's end") {
		t.Errorf("against the logged copies: %v, want the cut found", err)
	}
	// Continued past the cut, the trail has a line 7 again, not the one
	// the log names.
	l = openLog(t, path, SyncAlways)
	record(t, l, sample[0])
	l.Close()
	if _, _, err := CompareLogged(strings.NewReader(mustRead(t, path)), copies, &key.PublicKey); err == nil || !strings.Contains(err.Error(), "does not have the hash") {
		t.Errorf("against the logged copies after a restart: %v, want the cut found", err)
	}
	// The first checkpoint alone matches; a forged copy is refused.
	if n, _, err := CompareLogged(strings.NewReader(mustRead(t, path)), copies[:1], &key.PublicKey); err != nil || n != 1 {
		t.Errorf("the first checkpoint's copy: %d, %v", n, err)
	}
	forged := copies[0]
	forged.Head = strings.Repeat("1", 64)
	if _, _, err := CompareLogged(strings.NewReader(mustRead(t, path)), []Logged{forged}, &key.PublicKey); err == nil || !strings.Contains(err.Error(), "does not verify") {
		t.Errorf("a forged log copy: %v", err)
	}
}

func TestCheckpointsRefuseForgery(t *testing.T) {
	keys := checkpointKeys()
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l := openLog(t, path, SyncAlways)
	record(t, l, sample...)
	checkpoint(t, l, keys[1]) // another key
	l.Close()
	c, err := verifyFile(t, path)
	if err != nil {
		t.Fatal(err)
	}
	var ce *CheckpointError
	if _, err := VerifyCheckpoints(c, &keys[0].PublicKey); !errors.As(err, &ce) || ce.Line != 5 {
		t.Errorf("checkpoint by another key: %v, want a CheckpointError at line 5", err)
	}

	// A signature that does not match, with the right key id.
	s := mustRead(t, path)
	i := strings.Index(s, `"signature":"`) + len(`"signature":"`)
	forged := s[:i] + "AAAA" + s[i+4:]
	forged = strings.Replace(forged, KeyID(&keys[1].PublicKey), KeyID(&keys[0].PublicKey), 1)
	if err := os.WriteFile(path, []byte(forged), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err = verifyFile(t, path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyCheckpoints(c, &keys[0].PublicKey); !errors.As(err, &ce) {
		t.Errorf("forged signature: %v, want a CheckpointError", err)
	}

	// A checkpoint that names a line with another hash breaks the chain
	// check itself.
	cut(t, path, 4)
	l = openLog(t, path, SyncAlways)
	e := checkpoint(t, l, keys[0])
	l.Close()
	s = mustRead(t, path)
	s = strings.Replace(s, e.CheckpointHead, strings.Repeat("0", 64), 1)
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	var ve *VerifyError
	if _, err := verifyFile(t, path); !errors.As(err, &ve) || !strings.Contains(ve.Reason, "checkpoint") {
		t.Errorf("checkpoint naming a wrong hash: %v", err)
	}
}

// A rotation while the checkpoint is being signed: it is signed again, so
// that it covers a line of its own file.
func TestCheckpointAcrossReopen(t *testing.T) {
	key := checkpointKeys()[0]
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l := openLog(t, path, SyncAlways)
	record(t, l, sample...)
	signs := 0
	e, ok, err := l.Checkpoint(func(msg []byte) ([]byte, error) {
		signs++
		if signs == 1 {
			if err := os.Rename(path, path+".1"); err != nil {
				t.Fatal(err)
			}
			if err := l.Reopen(); err != nil {
				t.Fatal(err)
			}
		}
		return signer(key)(msg)
	}, KeyID(&key.PublicKey))
	if err != nil || !ok || signs != 2 || e.CheckpointSeq != 5 {
		t.Fatalf("Checkpoint: %+v %v %v after %d signatures; want seq 5 (audit.reopened), signed twice", e, ok, err, signs)
	}
	l.Close()
	_, cov := coverage(t, path, &key.PublicKey)
	if cov.Through != 5 {
		t.Errorf("the new file: %+v", cov)
	}
}
