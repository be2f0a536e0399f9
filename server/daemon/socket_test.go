package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// testGID is a group the socket can be given: a made-up one as root,
// else none (-1), which leaves the file's mode to prove the point.
func testGID() int {
	if os.Geteuid() == 0 {
		return 64100
	}
	return -1
}

func statT(t testing.TB, path string) *syscall.Stat_t {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t)
}

// Regression (issue 14, item 9): the socket's group and mode were set by
// path after the bind, so a socket swapped for a symbolic link in between
// gave the link's target the socket's group and mode. Now they are set
// without following a link, and the swap is refused.
func TestListenUnixDoesNotFollowSwappedSymlink(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("not the socket's\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := statT(t, victim)
	sock := filepath.Join(dir, "decrypt.sock")
	swapped := false
	afterBind = func(path string) {
		if err := os.Remove(path); err != nil {
			t.Error(err)
		}
		if err := os.Symlink(victim, path); err != nil {
			t.Error(err)
		}
		swapped = true
	}
	t.Cleanup(func() { afterBind = nil })

	ln, err := ListenUnix(sock, 0o660, testGID())
	if !swapped {
		t.Fatal("the hook never ran: the swap was not tried")
	}
	if err == nil {
		ln.Close()
		t.Error("ListenUnix accepted a socket swapped for a symbolic link")
	} else if !strings.Contains(err.Error(), "replaced") {
		t.Errorf("error %q, want one saying the socket was replaced", err)
	}
	after := statT(t, victim)
	if after.Mode != before.Mode || after.Gid != before.Gid {
		t.Errorf("the link's target went from mode %#o gid %d to mode %#o gid %d", before.Mode&0o7777, before.Gid, after.Mode&0o7777, after.Gid)
	}
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("what replaced the socket should be left for a person to see: %v, %v", fi, err)
	}
}

// Regression (issue 14, item 9): a socket directory others can write, or
// one reached through a directory someone else owns or can write, let them
// swap the socket; it was used all the same.
func TestListenUnixRefusesUnsafeDirectories(t *testing.T) {
	tests := []struct {
		name    string
		root    bool                                   // needs root (to hand a directory to another user)
		make    func(t *testing.T, base string) string // returns the socket's path
		wantErr string
	}{
		{"writable by others", false, func(t *testing.T, base string) string {
			return filepath.Join(mkdir(t, base, "d", 0o777), "s")
		}, "writable by others"},
		{"writable by another group", true, func(t *testing.T, base string) string {
			d := mkdir(t, base, "d", 0o770)
			noErr(t, os.Lchown(d, -1, 64100))
			return filepath.Join(d, "s")
		}, "writable by others"},
		{"sticky and writable by others", false, func(t *testing.T, base string) string {
			return filepath.Join(mkdir(t, base, "d", 0o1777), "s")
		}, "writable by others"},
		{"below a directory another group can write", true, func(t *testing.T, base string) string {
			open := mkdir(t, base, "open", 0o770)
			noErr(t, os.Lchown(open, -1, 64100))
			return filepath.Join(mkdir(t, open, "d", 0o700), "s")
		}, "writable by others"},
		{"below a directory others can write", false, func(t *testing.T, base string) string {
			return filepath.Join(mkdir(t, mkdir(t, base, "open", 0o777), "d", 0o700), "s")
		}, "writable by others"},
		{"owned by another user", true, func(t *testing.T, base string) string {
			d := mkdir(t, base, "d", 0o755)
			chown(t, d, 65534)
			return filepath.Join(d, "s")
		}, "owned by uid 65534"},
		{"through a link to another user's directory", true, func(t *testing.T, base string) string {
			d := mkdir(t, base, "d", 0o755)
			chown(t, d, 65534)
			if err := os.Symlink(d, filepath.Join(base, "link")); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(base, "link", "s")
		}, "owned by uid 65534"},
		{"below a sticky directory, in another user's directory", true, func(t *testing.T, base string) string {
			d := mkdir(t, mkdir(t, base, "tmp", 0o1777), "d", 0o755)
			chown(t, d, 65534)
			return filepath.Join(d, "s")
		}, "sticky directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.root && os.Geteuid() != 0 {
				t.Skip("needs root")
			}
			base := t.TempDir()
			sock := tt.make(t, base)
			ln, err := ListenUnix(sock, 0o600, -1)
			if err == nil {
				ln.Close()
				t.Fatalf("ListenUnix(%s) succeeded", sock)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q, want one with %q", err, tt.wantErr)
			}
			if _, err := os.Lstat(sock); !os.IsNotExist(err) {
				t.Errorf("a socket was made at %s: %v", sock, err)
			}
		})
	}

	// What is fine: a private directory below a sticky one such as /tmp
	// (t.TempDir) and one writable by the daemon's own group (umask 002),
	// reached through a link of the daemon's own.
	base := t.TempDir()
	d := mkdir(t, mkdir(t, base, "own-group", 0o770), "d", 0o750)
	if err := os.Symlink(d, filepath.Join(base, "link")); err != nil {
		t.Fatal(err)
	}
	ln, err := ListenUnix(filepath.Join(base, "link", "s"), 0o600, -1)
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if fi, err := os.Lstat(filepath.Join(d, "s")); err != nil || fi.Mode() != os.ModeSocket|0o600 {
		t.Errorf("socket: %v, %v; want a 0600 socket in the link's target", fi, err)
	}
}

// mkdir makes parent/name with mode, in the kernel's bits (0o1000 is
// sticky).
func mkdir(t testing.TB, parent, name string, mode uint32) string {
	t.Helper()
	d := filepath.Join(parent, name)
	noErr(t, os.Mkdir(d, 0o700))
	noErr(t, unix.Chmod(d, mode))
	return d
}

func noErr(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func chown(t testing.TB, path string, uid int) {
	t.Helper()
	if err := os.Lchown(path, uid, -1); err != nil {
		t.Fatal(err)
	}
}

// Regression (issue 14, item 9): under the unit's UMask=0077 a directory
// the daemon made for the socket came out 0700, which no group could pass.
// Directories it makes are 0750 with the socket's group, and the socket has
// its mode, whatever the umask.
func TestListenUnixModesUnderUmask0077(t *testing.T) {
	old := unix.Umask(0o077)
	t.Cleanup(func() { unix.Umask(old) })
	gid := testGID()
	base := t.TempDir()
	sock := filepath.Join(base, "run", "sub", "decrypt.sock")
	ln, err := ListenUnix(sock, 0o660, gid)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	want := map[string]os.FileMode{
		filepath.Join(base, "run"):        os.ModeDir | 0o750,
		filepath.Join(base, "run", "sub"): os.ModeDir | 0o750,
		sock:                              os.ModeSocket | 0o660,
	}
	for path, mode := range want {
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode() != mode || (gid != -1 && int(st.Gid) != gid) {
			t.Errorf("%s: mode %v gid %d, want %v gid %d", path, fi.Mode(), st.Gid, mode, gid)
		}
	}
}
