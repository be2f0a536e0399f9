// Package peercred finds out who is at the other end of a Unix socket
// connection, from the kernel (SO_PEERCRED and SO_PEERGROUPS on Linux), and
// carries the answer in each request's context so that the decrypt API can
// refuse callers that are not allowed.
//
// The credentials are those the peer had when it connected; a process that
// changes its ids later keeps the ones it connected with, and one that
// passes the connection on passes its own identity with it.
package peercred

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"slices"
)

// Cred is the identity of a connection's peer.
type Cred struct {
	PID    int32
	UID    uint32   // effective uid
	GID    uint32   // effective gid
	Groups []uint32 // supplementary groups; nil if the kernel cannot say
}

// LogValue logs the ids, which are not secret.
func (c Cred) LogValue() slog.Value {
	return slog.GroupValue(
		slog.Int64("uid", int64(c.UID)),
		slog.Int64("gid", int64(c.GID)),
		slog.Int64("pid", int64(c.PID)),
	)
}

// Read asks the kernel for the credentials of conn's peer. conn must be a
// Unix socket connection.
func Read(conn net.Conn) (Cred, error) { return read(conn) }

type ctxKey struct{}

type result struct {
	cred Cred
	err  error
}

// ConnContext has the signature of [net/http.Server.ConnContext]: it reads
// the peer's credentials once per connection and puts them, or the reason
// they could not be read, in the context of every request on it.
func ConnContext(ctx context.Context, conn net.Conn) context.Context {
	c, err := Read(conn)
	return context.WithValue(ctx, ctxKey{}, result{c, err})
}

// NewContext returns ctx carrying c, as ConnContext does; for tests and
// other transports.
func NewContext(ctx context.Context, c Cred) context.Context {
	return context.WithValue(ctx, ctxKey{}, result{cred: c})
}

// ErrNoCred means the context carries no credentials: the request did not
// come through a server using ConnContext.
var ErrNoCred = errors.New("peercred: no peer credentials in the context")

// FromContext returns the credentials ConnContext or NewContext put in ctx.
func FromContext(ctx context.Context) (Cred, error) {
	r, ok := ctx.Value(ctxKey{}).(result)
	if !ok {
		return Cred{}, ErrNoCred
	}
	return r.cred, r.err
}

// self is the daemon's own effective uid.
var self = uint32(os.Geteuid())

// Policy says which peers may connect. The daemon's own user and root are
// always allowed: both can read the daemon's memory and its PIN anyway, so
// refusing them would protect nothing. So the zero Policy allows only them.
type Policy struct {
	UIDs []uint32 // users allowed
	GIDs []uint32 // groups allowed: the peer's effective or any supplementary group
}

// Allows reports whether c may use the socket.
func (p Policy) Allows(c Cred) bool {
	if c.UID == self || c.UID == 0 || slices.Contains(p.UIDs, c.UID) {
		return true
	}
	if slices.Contains(p.GIDs, c.GID) {
		return true
	}
	for _, g := range c.Groups {
		if slices.Contains(p.GIDs, g) {
			return true
		}
	}
	return false
}
