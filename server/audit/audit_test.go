package audit

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func openLog(t testing.TB, path string, sync Sync) *Log {
	t.Helper()
	l, err := Open(path, Options{Sync: sync})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func record(t testing.TB, l *Log, events ...Event) {
	t.Helper()
	for _, e := range events {
		if err := l.Record(e); err != nil {
			t.Fatal(err)
		}
	}
}

func verifyFile(t testing.TB, path string) (Chain, error) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return Verify(bytes.NewReader(b))
}

var sample = []Event{
	{Type: KeyIssued, UniqueID: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", CustomerID: "2188000000000001", Remote: "127.0.0.1:5000"},
	{Type: KeyDecrypt, UniqueID: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Peer: &Peer{UID: 1000, GID: 1000, PID: 42}, Outcome: "ok"},
	{Type: KeyDestroyed, UniqueID: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Reason: "consumed"},
	{Type: Reconciled, Counts: map[string]int{"adopted": 1, "lost": 2}},
}

func TestRecordAndVerify(t *testing.T) {
	for _, s := range []Sync{SyncAlways, SyncInterval, SyncNever} {
		t.Run(string(s), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "audit", "audit.jsonl")
			l := openLog(t, path, s)
			record(t, l, sample...)
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(path)
			if err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("audit file mode %v, %v; want 0600", fi.Mode(), err)
			}
			c, err := verifyFile(t, path)
			if err != nil {
				t.Fatal(err)
			}
			seq, head := l.Head()
			if c.Lines != 4 || c.FirstSeq != 1 || c.LastSeq != 4 || c.Start != Genesis || c.Head != head || seq != 4 {
				t.Errorf("chain %+v, head %d %s", c, seq, head)
			}
			if err := l.Record(sample[0]); !errors.Is(err, ErrClosed) {
				t.Errorf("Record after Close: %v, want ErrClosed", err)
			}
		})
	}
}

func TestLineFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.jsonl")
	l := openLog(t, path, SyncNever)
	record(t, l, sample[1])
	l.Close()
	got := strings.TrimSpace(mustRead(t, path))
	for _, want := range []string{`{"seq":1,"time":"`, `"event":"key.decrypt"`, `"peer":{"uid":1000,"gid":1000,"pid":42}`, `"outcome":"ok"`, `"prev":"` + Genesis + `"}`} {
		if !strings.Contains(got, want) {
			t.Errorf("line %s lacks %s", got, want)
		}
	}
	if strings.Contains(got, "customer_id") {
		t.Errorf("empty fields are written: %s", got)
	}
}

func mustRead(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Tampering of every kind breaks the chain at the line it touched.
func TestVerifyCatchesTampering(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.jsonl")
	l := openLog(t, path, SyncNever)
	record(t, l, sample...)
	l.Close()
	lines := strings.SplitAfter(strings.TrimSuffix(mustRead(t, path), "\n"), "\n")
	tests := []struct {
		name     string
		edit     func([]string) []string
		wantLine int
	}{
		{"edited field", func(ls []string) []string {
			ls[1] = strings.Replace(ls[1], `"outcome":"ok"`, `"outcome":"no"`, 1)
			return ls
		}, 3},
		{"edited last line's prev", func(ls []string) []string {
			ls[3] = strings.Replace(ls[3], `"prev":"`, `"prev":"0`, 1)[:len(ls[3])] + "\n"
			return ls
		}, 4},
		{"removed line", func(ls []string) []string { return append(ls[:1:1], ls[2:]...) }, 2},
		{"swapped lines", func(ls []string) []string { ls[1], ls[2] = ls[2], ls[1]; return ls }, 2},
		{"unknown field", func(ls []string) []string {
			ls[0] = strings.Replace(ls[0], `"event"`, `"password":"x","event"`, 1)
			return ls
		}, 1},
		{"not json", func(ls []string) []string { ls[2] = "hello\n"; return ls }, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := strings.Join(tt.edit(append([]string(nil), lines...)), "")
			_, err := Verify(strings.NewReader(in))
			var ve *VerifyError
			if !errors.As(err, &ve) || ve.Line != tt.wantLine {
				t.Errorf("Verify: %v, want a VerifyError at line %d", err, tt.wantLine)
			}
		})
	}
}

// A restarted daemon continues the chain of the file it finds; after a
// rotation the chain goes on in the new file.
func TestChainAcrossRestartAndRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a.jsonl")
	l := openLog(t, path, SyncAlways)
	record(t, l, sample[:2]...)
	l.Close()

	l = openLog(t, path, SyncAlways)
	record(t, l, sample[2])
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := l.Reopen(); err != nil {
		t.Fatal(err)
	}
	record(t, l, sample[3])
	l.Close()

	old, err := verifyFile(t, path+".1")
	if err != nil || old.Lines != 3 || old.Start != Genesis {
		t.Fatalf("rotated file: %+v %v", old, err)
	}
	cur, err := verifyFile(t, path)
	if err != nil || cur.Lines != 2 || cur.FirstSeq != 4 || cur.Start != old.Head {
		t.Fatalf("new file: %+v %v; want it to start at seq 4 from head %s", cur, err, old.Head)
	}
	if !strings.Contains(mustRead(t, path), `"event":"audit.reopened"`) {
		t.Error("no audit.reopened line after Reopen")
	}
	both := io.MultiReader(strings.NewReader(mustRead(t, path+".1")), strings.NewReader(mustRead(t, path)))
	if c, err := Verify(both); err != nil || c.Lines != 5 {
		t.Errorf("both files: %+v %v", c, err)
	}
}

// A line torn by a crash is closed and left for Verify to report; writing
// goes on from the last whole line.
func TestTornLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.jsonl")
	l := openLog(t, path, SyncNever)
	record(t, l, sample[0])
	l.Close()
	f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString(`{"seq":2,"time":"20`)
	f.Close()
	l = openLog(t, path, SyncNever)
	record(t, l, sample[1])
	l.Close()
	lines := strings.Split(strings.TrimSpace(mustRead(t, path)), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines, want 3:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	var ve *VerifyError
	if _, err := verifyFile(t, path); !errors.As(err, &ve) || ve.Line != 2 {
		t.Errorf("Verify: %v, want the torn line 2 reported", err)
	}
	// Without the torn line the chain is whole.
	if _, err := Verify(strings.NewReader(lines[0] + "\n" + lines[2] + "\n")); err != nil {
		t.Errorf("chain past the torn line: %v", err)
	}
}

func TestOpenRefusesForeignFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.jsonl")
	os.WriteFile(path, []byte("not an audit trail\n"), 0o600)
	if _, err := Open(path, Options{}); err == nil {
		t.Error("Open continued a file that is not an audit trail")
	}
}

func TestConcurrentRecords(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.jsonl")
	l := openLog(t, path, SyncAlways)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 50 {
				if err := l.Record(sample[0]); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Go(func() {
		for range 3 {
			if err := l.Reopen(); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Wait()
	l.Close()
	if c, err := verifyFile(t, path); err != nil || c.Lines != 403 {
		t.Errorf("chain %+v %v; want 403 lines", c, err)
	}
}

func FuzzVerify(f *testing.F) {
	dir := f.TempDir()
	path := filepath.Join(dir, "a.jsonl")
	l := openLog(f, path, SyncNever)
	record(f, l, sample...)
	l.Close()
	b, _ := os.ReadFile(path)
	f.Add(b)
	f.Add([]byte("{}\n"))
	key := checkpointKeys()[0]
	l = openLog(f, path, SyncNever)
	if _, _, err := l.Checkpoint(signer(key), KeyID(&key.PublicKey)); err != nil {
		f.Fatal(err)
	}
	record(f, l, sample[0])
	l.Close()
	b, _ = os.ReadFile(path)
	f.Add(b)
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := Verify(bytes.NewReader(in))
		if err == nil && (c.Lines == 0 || c.LastSeq < c.FirstSeq) {
			t.Errorf("accepted %q as %+v", in, c)
		}
		if err == nil {
			cov, err := VerifyCheckpoints(c, &key.PublicKey)
			if err == nil && (cov.Through > c.LastSeq || cov.Checkpoints > len(c.Checkpoints)) {
				t.Errorf("coverage %+v of %+v", cov, c)
			}
		}
	})
}
