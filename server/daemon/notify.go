package daemon

import (
	"net"
	"os"
)

// notify sends state to systemd's notification socket (sd_notify) when
// NOTIFY_SOCKET is set, as it is for a unit of Type=notify. Errors are
// ignored: without systemd there is no one to tell.
func notify(state string) {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return
	}
	if addr[0] == '@' { // abstract namespace
		addr = "\x00" + addr[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return
	}
	defer c.Close()
	c.Write([]byte(state))
}
