package peercred_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"

	"github.com/keyissuer/keyissuer/server/peercred"
)

func TestReadOverUnixSocket(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skipf("peer credentials are read on Linux only, and this is %s (CI runs on Linux, where this test runs)", runtime.GOOS)
	}
	path := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()

	c, err := peercred.Read(server)
	if err != nil {
		t.Fatal(err)
	}
	if c.UID != uint32(os.Geteuid()) || c.GID != uint32(os.Getegid()) || c.PID != int32(os.Getpid()) {
		t.Errorf("Read = %+v, want uid %d gid %d pid %d", c, os.Geteuid(), os.Getegid(), os.Getpid())
	}
	groups, _ := os.Getgroups()
	for _, g := range groups {
		if !slices.Contains(c.Groups, uint32(g)) {
			t.Errorf("Groups %v lack supplementary group %d", c.Groups, g)
		}
	}

	ctx := peercred.ConnContext(context.Background(), server)
	if got, err := peercred.FromContext(ctx); err != nil || got.UID != c.UID || got.PID != c.PID {
		t.Errorf("FromContext(ConnContext) = %+v, %v", got, err)
	}
}

func TestConnContextNotASocket(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := peercred.FromContext(peercred.ConnContext(context.Background(), a)); err == nil {
		t.Error("FromContext after ConnContext on a pipe: no error")
	}
	if _, err := peercred.FromContext(context.Background()); !errors.Is(err, peercred.ErrNoCred) {
		t.Errorf("FromContext(empty) = %v, want ErrNoCred", err)
	}
	want := peercred.Cred{PID: 7, UID: 1001, GID: 1002}
	if got, err := peercred.FromContext(peercred.NewContext(context.Background(), want)); err != nil || got.UID != want.UID {
		t.Errorf("FromContext(NewContext) = %+v, %v", got, err)
	}
}

func TestPolicyAllows(t *testing.T) {
	self := uint32(os.Geteuid())
	const stranger = 64001
	tests := []struct {
		name   string
		policy peercred.Policy
		cred   peercred.Cred
		want   bool
	}{
		{"zero policy: self", peercred.Policy{}, peercred.Cred{UID: self, GID: stranger}, true},
		{"zero policy: root", peercred.Policy{}, peercred.Cred{UID: 0, GID: 0}, true},
		{"zero policy: anyone else", peercred.Policy{}, peercred.Cred{UID: stranger, GID: stranger}, false},
		{"listed uid", peercred.Policy{UIDs: []uint32{1001}}, peercred.Cred{UID: 1001, GID: stranger}, true},
		{"unlisted uid", peercred.Policy{UIDs: []uint32{1001}}, peercred.Cred{UID: 1002, GID: stranger}, false},
		{"a uid is not a gid", peercred.Policy{UIDs: []uint32{1001}}, peercred.Cred{UID: stranger, GID: 1001}, false},
		{"listed effective gid", peercred.Policy{GIDs: []uint32{2001}}, peercred.Cred{UID: stranger, GID: 2001}, true},
		{"listed supplementary gid", peercred.Policy{GIDs: []uint32{2001}}, peercred.Cred{UID: stranger, GID: stranger, Groups: []uint32{5, 2001}}, true},
		{"unlisted gids", peercred.Policy{GIDs: []uint32{2001}}, peercred.Cred{UID: stranger, GID: 2002, Groups: []uint32{2003}}, false},
		{"a gid is not a uid", peercred.Policy{GIDs: []uint32{2001}}, peercred.Cred{UID: 2001, GID: stranger}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if self == stranger {
				// Never in CI, which runs as root; a gap there.
				if os.Getenv("CI") == "true" {
					t.Fatalf("the test runs as uid %d, the stranger's", stranger)
				}
				t.Skipf("the test runs as uid %d, the stranger's (never in CI, which runs as root)", stranger)
			}
			if got := tt.policy.Allows(tt.cred); got != tt.want {
				t.Errorf("%+v.Allows(%+v) = %v, want %v", tt.policy, tt.cred, got, tt.want)
			}
		})
	}
}
