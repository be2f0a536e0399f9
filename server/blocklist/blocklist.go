// Package blocklist keeps the set of blocked customerIds that keyissuerd
// reads from a file and reloads when the file changes, without a restart.
//
// Changes are found by polling the file's modification time, size and
// inode: simpler and more robust than inotify (which loses a file that an
// editor or `mv` replaces) or SIGHUP (which an operator forgets). A file
// that cannot be read or parsed keeps the previous list in force.
package blocklist

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// maxFile bounds the file: some 30 million ids.
const maxFile = 1 << 30

// List is a reloadable set of customerIds. Contains is safe for concurrent
// use with Watch.
type List struct {
	path string
	log  *slog.Logger
	ids  atomic.Pointer[map[string]struct{}]
	seen fileID
}

type fileID struct {
	mtime time.Time
	size  int64
	ino   uint64
}

// Load reads the file at path: one customerId per line; blank lines and
// everything after a '#' are ignored, and so is whitespace around an id.
func Load(path string, log *slog.Logger) (*List, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &List{path: path, log: log}
	if _, err := l.reload(); err != nil {
		return nil, err
	}
	return l, nil
}

// Contains reports whether id is blocked.
func (l *List) Contains(id string) bool {
	_, ok := (*l.ids.Load())[id]
	return ok
}

// Len is the number of blocked ids.
func (l *List) Len() int { return len(*l.ids.Load()) }

// Watch checks the file every interval and reloads it when it changed,
// until ctx is done.
func (l *List) Watch(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		changed, err := l.reload()
		switch {
		case err != nil && !failing:
			l.log.Error("blocklist not reloaded; the previous list stays in force", "path", l.path, "err", err)
			failing = true
		case err == nil && changed:
			l.log.Info("blocklist reloaded", "path", l.path, "ids", l.Len())
			failing = false
		case err == nil:
			failing = false
		}
	}
}

// reload reads the file if it changed since the last read. Only Load and
// Watch's goroutine call it.
func (l *List) reload() (changed bool, err error) {
	f, err := os.Open(l.path)
	if err != nil {
		return false, fmt.Errorf("failed to read blocklist: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return false, fmt.Errorf("failed to read blocklist: %w", err)
	}
	id := fileID{mtime: fi.ModTime(), size: fi.Size()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.ino = st.Ino
	}
	if l.ids.Load() != nil && id == l.seen {
		return false, nil
	}
	if !fi.Mode().IsRegular() {
		return false, fmt.Errorf("blocklist %s is not a regular file", l.path)
	}
	if fi.Size() > maxFile {
		return false, fmt.Errorf("blocklist %s is larger than %d bytes", l.path, maxFile)
	}
	ids, err := parse(f)
	if err != nil {
		return false, fmt.Errorf("blocklist %s: %w", l.path, err)
	}
	l.ids.Store(&ids)
	l.seen = id
	return true, nil
}

func parse(f *os.File) (map[string]struct{}, error) {
	ids := map[string]struct{}{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 4096), 4096)
	for n := 1; sc.Scan(); n++ {
		line := sc.Bytes()
		if i := bytes.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		id := strings.TrimSpace(string(line))
		if id == "" {
			continue
		}
		if strings.ContainsAny(id, " \t") {
			return nil, fmt.Errorf("line %d: more than one id", n)
		}
		ids[id] = struct{}{}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return ids, nil
}
