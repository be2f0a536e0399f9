//go:build !linux

package peercred

import (
	"errors"
	"net"
)

// Peer credentials are read on Linux only. Elsewhere no peer is known, and
// the decrypt API refuses every request.
func read(net.Conn) (Cred, error) {
	return Cred{}, errors.New("peercred: peer credentials are read on Linux only")
}
