package config_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/server/config"
)

func TestLoadDecryptSide(t *testing.T) {
	tests := []struct {
		name  string
		body  string
		check func(testing.TB, config.Config)
	}{
		{
			name: "defaults",
			body: base,
			check: func(tb testing.TB, c config.Config) {
				if !reflect.DeepEqual(c.Paddings(), []hsm.Padding{hsm.OAEPSHA256}) || c.Keys.Layout != "password-salt" {
					tb.Errorf("paddings %v, layout %q", c.Paddings(), c.Keys.Layout)
				}
				if gid, err := c.SocketGroup(); gid != -1 || err != nil {
					tb.Errorf("SocketGroup() = %d, %v; want -1 (unset)", gid, err)
				}
				if c.Decrypt.AllowedUIDs != nil || c.Decrypt.AllowedGIDs != nil || c.Decrypt.AllowClientPadding {
					tb.Errorf("decrypt = %+v", c.Decrypt)
				}
			},
		},
		{
			name: "several paddings for callers to choose",
			body: base + "[keys]\npaddings = [\"oaep-sha1\", \"pkcs1v15\", \"oaep-sha256\", \"oaep-sha256-mgf1-sha1\"]\n[decrypt]\nallow_client_padding = true\n",
			check: func(tb testing.TB, c config.Config) {
				want := []hsm.Padding{hsm.OAEPSHA1, hsm.PKCS1v15, hsm.OAEPSHA256, hsm.OAEPSHA256MGF1SHA1}
				if !reflect.DeepEqual(c.Paddings(), want) || !c.Decrypt.AllowClientPadding {
					tb.Errorf("paddings %v, allow_client_padding %v", c.Paddings(), c.Decrypt.AllowClientPadding)
				}
			},
		},
		{
			name: "one padding, callers may name it",
			body: base + "[keys]\npaddings = [\"pkcs1v15\"]\n[decrypt]\nallow_client_padding = true\n",
			check: func(tb testing.TB, c config.Config) {
				if !reflect.DeepEqual(c.Paddings(), []hsm.Padding{hsm.PKCS1v15}) {
					tb.Errorf("paddings %v", c.Paddings())
				}
			},
		},
		{
			name: "access lists and a numeric group",
			body: base + "[decrypt]\nmode = \"0660\"\ngroup = \"4242\"\nallowed_uids = [1001, 0, 4294967295]\nallowed_gids = [1002]\n",
			check: func(tb testing.TB, c config.Config) {
				if gid, err := c.SocketGroup(); gid != 4242 || err != nil {
					tb.Errorf("SocketGroup() = %d, %v; want 4242", gid, err)
				}
				if !reflect.DeepEqual(c.Decrypt.AllowedUIDs, []uint32{1001, 0, 4294967295}) || !reflect.DeepEqual(c.Decrypt.AllowedGIDs, []uint32{1002}) {
					tb.Errorf("allowed uids %v gids %v", c.Decrypt.AllowedUIDs, c.Decrypt.AllowedGIDs)
				}
			},
		},
		{
			name: "a group by name",
			body: base + "[decrypt]\ngroup = \"root\"\n",
			check: func(tb testing.TB, c config.Config) {
				if gid, err := c.SocketGroup(); gid != 0 || err != nil {
					tb.Errorf("SocketGroup() = %d, %v; want 0", gid, err)
				}
			},
		},
	}
	for _, layout := range []string{"password-salt", "salt-password", "password|salt", "none"} {
		tests = append(tests, struct {
			name  string
			body  string
			check func(testing.TB, config.Config)
		}{
			name: "layout " + layout,
			body: base + "[keys]\nlayout = \"" + layout + "\"\n",
			check: func(tb testing.TB, c config.Config) {
				if c.Keys.Layout != layout {
					tb.Errorf("layout %q, want %q", c.Keys.Layout, layout)
				}
			},
		})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := config.Load(writeConfig(t, t.TempDir(), tt.body))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			tt.check(t, c)
		})
	}
}

func TestLoadDecryptSideErrors(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		wantErr string
	}{
		{"two paddings without allow_client_padding", base + "[keys]\npaddings = [\"oaep-sha256\", \"oaep-sha1\"]\n", "keys.paddings"},
		{"a padding twice", base + "[keys]\npaddings = [\"oaep-sha1\", \"oaep-sha1\"]\n[decrypt]\nallow_client_padding = true\n", "keys.paddings"},
		{"unknown padding", base + "[keys]\npaddings = [\"oaep-sha512\"]\n", "keys.paddings"},
		{"paddings not a list", base + "[keys]\npaddings = \"oaep-sha256\"\n", "keys.paddings"},
		{"layout", base + "[keys]\nlayout = \"salt|password\"\n", "keys.layout"},
		{"unknown group", base + "[decrypt]\ngroup = \"no-such-group-keyissuer\"\n", "decrypt.group"},
		{"negative uid", base + "[decrypt]\nallowed_uids = [-1]\n", "decrypt.allowed_uids"},
		{"uid beyond 32 bits", base + "[decrypt]\nallowed_uids = [4294967296]\n", "decrypt.allowed_uids"},
		{"gid as a name", base + "[decrypt]\nallowed_gids = [\"wallet\"]\n", "decrypt.allowed_gids"},
		{"allow_client_padding not a bool", base + "[decrypt]\nallow_client_padding = \"yes\"\n", "decrypt.allow_client_padding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := config.Load(writeConfig(t, t.TempDir(), tt.body))
			if err == nil {
				t.Fatalf("Load accepted:\n%s\nas %+v", tt.body, c)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not name %s", err, tt.wantErr)
			}
		})
	}
}
