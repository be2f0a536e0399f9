package daemon

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ListenUnix listens on a Unix socket at path with the given mode and, if
// gid is not -1, group. It refuses to start when a live server answers
// there, removes only a stale socket file, and never removes anything that
// is not a socket.
//
// Nobody but root and the daemon's user may be able to swap what the path
// leads to: every directory on the way must be owned by one of them and not
// writable by others, that is by anyone or by a group other than root's
// and the daemon's (a sticky directory such as /tmp may be, if the next
// step is owned by root or the daemon's user, but not the socket's own). Symbolic links
// in the configured path are resolved once, then the path is walked without
// following any. Missing directories are created with mode 0750 and the
// socket's group, whatever the umask, so that the group can reach the
// socket. The socket is born with its mode (the umask is set to match), and
// its group is set through the directory's descriptor without following a
// symbolic link.
func ListenUnix(path string, mode os.FileMode, gid int) (net.Listener, error) {
	dir, name := filepath.Split(filepath.Clean(path))
	if name == "" || name == "." || name == ".." {
		return nil, fmt.Errorf("decrypt.socket %s names no file", path)
	}
	dirfd, dir, err := openSocketDir(dir, gid)
	if err != nil {
		return nil, fmt.Errorf("decrypt.socket %s: %w", path, err)
	}
	defer unix.Close(dirfd)
	path = filepath.Join(dir, name)

	var st unix.Stat_t
	switch err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); {
	case errors.Is(err, unix.ENOENT):
	case err != nil:
		return nil, fmt.Errorf("failed to inspect decrypt.socket %s: %w", path, err)
	case st.Mode&unix.S_IFMT != unix.S_IFSOCK:
		return nil, fmt.Errorf("decrypt.socket %s exists and is not a socket; refusing to remove it", path)
	default:
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("decrypt.socket %s: another server is answering there", path)
		}
		if err := unix.Unlinkat(dirfd, name, 0); err != nil {
			return nil, fmt.Errorf("failed to remove stale socket %s: %w", path, err)
		}
	}

	// The socket is born with the umask's permissions: make them the
	// mode, so that it is never more open than asked.
	old := unix.Umask(0o777 &^ int(mode.Perm()))
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("failed to listen on decrypt.socket %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false) // close() removes it, after the token is closed
	if afterBind != nil {
		afterBind(path)
	}
	fail := func(err error) (net.Listener, error) {
		ln.Close()
		// Only a socket is removed: what replaced it stays for a person
		// to look at.
		if unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK {
			unix.Unlinkat(dirfd, name, 0)
		}
		return nil, err
	}
	if gid != -1 {
		if err := unix.Fchownat(dirfd, name, -1, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fail(fmt.Errorf("failed to give %s group %d (keyissuerd must be root or a member): %w", path, gid, err))
		}
	}
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fail(fmt.Errorf("failed to inspect decrypt.socket %s: %w", path, err))
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fail(fmt.Errorf("decrypt.socket %s was replaced by something else while it was set up", path))
	}
	if os.FileMode(st.Mode&0o777) != mode.Perm() {
		// A default ACL on the directory overrides the umask. The
		// directory is the daemon's (checked above): nobody else can
		// have put a symbolic link there since the check.
		if err := unix.Fchmodat(dirfd, name, uint32(mode.Perm()), 0); err != nil {
			return fail(fmt.Errorf("failed to set mode of %s: %w", path, err))
		}
	}
	return ln, nil
}

// afterBind, if set, runs between the socket's bind and the setting of its
// group: tests swap the socket for a symbolic link there.
var afterBind func(path string)

// openSocketDir opens dir, the socket's directory, creating what is missing
// of it, and checks that only root and the daemon's user can change what
// it leads to (see [ListenUnix]). It returns the directory's descriptor and
// its path with symbolic links resolved.
func openSocketDir(dir string, gid int) (int, string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return -1, "", err
	}
	// Resolve the part that exists; the walk below then follows no link.
	existing, rest := dir, ""
	for {
		resolved, err := filepath.EvalSymlinks(existing)
		if err == nil {
			dir = filepath.Join(resolved, rest)
			break
		}
		if !errors.Is(err, os.ErrNotExist) || existing == "/" {
			return -1, "", fmt.Errorf("failed to resolve socket directory %s: %w", dir, err)
		}
		existing, rest = filepath.Dir(existing), filepath.Join(filepath.Base(existing), rest)
	}

	euid, egid := uint32(os.Geteuid()), uint32(os.Getegid())
	trusted := func(st *unix.Stat_t) bool { return st.Uid == 0 || st.Uid == euid }
	// Others: anyone, or a group other than root's and the daemon's own
	// (a user private group, as with umask 002, is no stranger).
	openToOthers := func(st *unix.Stat_t) bool {
		return st.Mode&0o002 != 0 || st.Mode&0o020 != 0 && st.Gid != 0 && st.Gid != egid
	}
	fd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, "", err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, "", err
	}
	at := "/"
	for _, c := range strings.Split(strings.TrimPrefix(dir, "/"), "/") {
		if c == "" {
			continue
		}
		parent := st
		// The parent decides who can swap this entry: nobody else may
		// write it, unless it is sticky and the entry is trusted.
		if openToOthers(&parent) && parent.Mode&unix.S_ISVTX == 0 {
			unix.Close(fd)
			return -1, "", fmt.Errorf("directory %s is writable by others, who could swap %s: refusing it", at, filepath.Join(at, c))
		}
		next, err := unix.Openat(fd, c, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			next, err = makeSocketDir(fd, c, gid)
		}
		if err != nil {
			unix.Close(fd)
			return -1, "", fmt.Errorf("failed to open socket directory %s: %w", filepath.Join(at, c), err)
		}
		unix.Close(fd)
		fd, at = next, filepath.Join(at, c)
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return -1, "", err
		}
		if openToOthers(&parent) && !trusted(&st) {
			unix.Close(fd)
			return -1, "", fmt.Errorf("sticky directory %s is writable by others and %s is not keyissuerd's: refusing it", filepath.Dir(at), at)
		}
		if !trusted(&st) {
			unix.Close(fd)
			return -1, "", fmt.Errorf("directory %s is owned by uid %d, neither root nor keyissuerd's user: refusing it", at, st.Uid)
		}
	}
	if openToOthers(&st) {
		unix.Close(fd)
		return -1, "", fmt.Errorf("socket directory %s is writable by others (mode %#o, group %d): refusing it", at, st.Mode&0o7777, st.Gid)
	}
	return fd, at, nil
}

// makeSocketDir creates the directory name in parent with mode 0750 and, if
// gid is not -1, group gid, and opens it.
func makeSocketDir(parent int, name string, gid int) (int, error) {
	if err := unix.Mkdirat(parent, name, 0o700); errors.Is(err, unix.EEXIST) {
		// Made meanwhile, by someone else: checked, never changed.
		return unix.Openat(parent, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	} else if err != nil {
		return -1, err
	}
	fd, err := unix.Openat(parent, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if gid != -1 {
		if err := unix.Fchown(fd, -1, gid); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("failed to give it group %d: %w", gid, err)
		}
	}
	if err := unix.Fchmod(fd, 0o750); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}
