package peercred

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

func read(conn net.Conn) (Cred, error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return Cred{}, fmt.Errorf("peercred: a %T is not a socket", conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return Cred{}, fmt.Errorf("peercred: %w", err)
	}
	var (
		c    Cred
		cerr error
	)
	err = raw.Control(func(fd uintptr) {
		u, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil {
			cerr = fmt.Errorf("peercred: SO_PEERCRED: %w", err)
			return
		}
		c = Cred{PID: u.Pid, UID: u.Uid, GID: u.Gid}
		// Linux 4.13 and later; older kernels leave Groups nil and only
		// the effective gid counts.
		c.Groups, _ = peerGroups(int(fd))
	})
	if err != nil {
		return Cred{}, fmt.Errorf("peercred: %w", err)
	}
	return c, cerr
}

// peerGroups reads SO_PEERGROUPS, for which x/sys/unix has no helper: an
// array of gid_t, sized by the kernel when the buffer is too small.
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]uint32, 32)
	for range 2 {
		n := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		runtime.KeepAlive(buf)
		switch {
		case errno == unix.ERANGE && int(n/4) > len(buf):
			buf = make([]uint32, n/4)
			continue
		case errno != 0:
			return nil, errno
		}
		return buf[:n/4], nil
	}
	return nil, errors.New("SO_PEERGROUPS: the group list kept growing")
}
