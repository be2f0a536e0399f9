package blocklist

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func write(tb testing.TB, path, body string, mtime time.Time) {
	tb.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Chtimes(tmp, mtime, mtime); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		tb.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocked.txt")
	write(t, path, "# blocked customers\n2188000123456789\n\n  2188000000000001  # fraud, ticket 42\r\n2188#000\n", time.Unix(1e9, 0))
	l, err := Load(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]bool{
		"2188000123456789": true, "2188000000000001": true, "2188": true,
		"2188000": false, "": false, "# blocked customers": false,
	} {
		if got := l.Contains(id); got != want {
			t.Errorf("Contains(%q) = %v, want %v", id, got, want)
		}
	}
	if l.Len() != 3 {
		t.Errorf("Len() = %d, want 3", l.Len())
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"two ids":   "2188 2189\n",
		"long line": strings.Repeat("1", 5000) + "\n",
	} {
		path := filepath.Join(dir, name)
		write(t, path, body, time.Now())
		if _, err := Load(path, nil); err == nil {
			t.Errorf("%s: Load succeeded", name)
		}
	}
	if _, err := Load(filepath.Join(dir, "missing"), nil); err == nil {
		t.Error("Load of a missing file succeeded")
	}
	if _, err := Load(dir, nil); err == nil {
		t.Error("Load of a directory succeeded")
	}
}

func TestReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocked.txt")
	write(t, path, "2101\n", time.Unix(1e9, 0))
	l, err := Load(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if changed, err := l.reload(); changed || err != nil {
		t.Errorf("reload() of an unchanged file = %v, %v; want no change", changed, err)
	}

	// Replaced, as an editor or `mv` would.
	write(t, path, "2102\n2103\n", time.Unix(1e9+1, 0))
	if changed, err := l.reload(); !changed || err != nil {
		t.Fatalf("reload() = %v, %v; want a change", changed, err)
	}
	if l.Contains("2101") || !l.Contains("2102") || !l.Contains("2103") {
		t.Error("the new list is not in force")
	}

	// A broken file keeps the last good list.
	write(t, path, "2104 2105\n", time.Unix(1e9+2, 0))
	if _, err := l.reload(); err == nil {
		t.Fatal("reload() of a bad file succeeded")
	}
	if !l.Contains("2102") {
		t.Error("a bad file dropped the list in force")
	}
	os.Remove(path)
	if _, err := l.reload(); err == nil {
		t.Fatal("reload() of a removed file succeeded")
	}
	if !l.Contains("2102") {
		t.Error("a removed file dropped the list in force")
	}
}

// TestWatch checks that Watch picks a change up and returns when its
// context ends. It waits for the change for a minute, then fails.
func TestWatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocked.txt")
	write(t, path, "2101\n", time.Unix(1e9, 0))
	l, err := Load(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { l.Watch(ctx, 10*time.Millisecond) })
	write(t, path, "2109\n", time.Unix(1e9+1, 0))
	for deadline := time.Now().Add(time.Minute); !l.Contains("2109"); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("Watch did not pick up the change within a minute (polling every 10ms)")
		}
	}
	cancel()
	wg.Wait()
}
