package audit

import (
	"path/filepath"
	"testing"
)

// TestAppendThenRecord checks that a line appended without its own fsync
// is chained like any other and is on disk once the Record after it
// returns.
func TestAppendThenRecord(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	l := openLog(t, path, SyncAlways)
	if err := l.Append(sample[2]); err != nil { // key.destroyed
		t.Fatal(err)
	}
	if got := l.written.Load(); got != 1 {
		t.Fatalf("written = %d after Append, want 1", got)
	}
	record(t, l, sample[1]) // key.decrypt
	if got := l.synced.Load(); got < 2 {
		t.Errorf("synced = %d after the Record, want both lines on disk", got)
	}
	chain, err := verifyFile(t, path)
	if err != nil {
		t.Fatal(err)
	}
	if chain.Lines != 2 {
		t.Errorf("%d lines, want 2", chain.Lines)
	}
	l.Close()
	if err := l.Append(sample[0]); err != ErrClosed {
		t.Errorf("Append() on a closed log = %v, want ErrClosed", err)
	}
}
