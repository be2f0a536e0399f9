package issuer

import (
	"context"
	"crypto/rand"
	"errors"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store"
)

func TestLayoutPassword(t *testing.T) {
	const salt = "SALTSALTSALT"
	tests := []struct {
		name   string
		layout Layout
		pt     string
		want   string
		wantOK bool
	}{
		{"password-salt", LayoutPasswordSalt, "hunter2" + salt, "hunter2", true},
		{"password-salt, salt first", LayoutPasswordSalt, salt + "hunter2", "", false},
		{"password-salt, empty password", LayoutPasswordSalt, salt, "", true},

		{"salt-password", LayoutSaltPassword, salt + "hunter2", "hunter2", true},
		{"salt-password, salt last", LayoutSaltPassword, "hunter2" + salt, "", false},
		{"salt-password, empty password", LayoutSaltPassword, salt, "", true},
		{"salt-password, wrong salt", LayoutSaltPassword, "SALTSALTSALX" + "hunter2", "", false},
		{"salt-password, shorter than the salt", LayoutSaltPassword, "SALT", "", false},

		{"pipe", LayoutPipe, "hunter2|" + salt, "hunter2", true},
		{"pipe, a pipe in the password", LayoutPipe, "a|b||" + salt, "a|b|", true},
		{"pipe, empty password", LayoutPipe, "|" + salt, "", true},
		{"pipe, no pipe", LayoutPipe, "hunter2" + salt, "", false},
		{"pipe, other separator", LayoutPipe, "hunter2:" + salt, "", false},
		{"pipe, salt alone", LayoutPipe, salt, "", false},
		{"pipe, wrong salt", LayoutPipe, "hunter2|SALTSALTSALX", "", false},
		{"pipe, salt first", LayoutPipe, salt + "|hunter2", "", false},

		{"none", LayoutNone, "hunter2", "hunter2", true},
		{"none keeps a salt as password", LayoutNone, "hunter2" + salt, "hunter2" + salt, true},
		{"none, empty", LayoutNone, "", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := tt.layout.password([]byte(tt.pt), salt)
			if ok != tt.wantOK {
				t.Fatalf("%s.password(%q) ok = %v, want %v", tt.layout, tt.pt, ok, tt.wantOK)
			}
			if ok && string(got) != tt.want {
				t.Errorf("%s.password(%q) = %q, want %q", tt.layout, tt.pt, got, tt.want)
			}
		})
	}
	// What Plaintext builds, password takes apart.
	for _, l := range Layouts() {
		if got, ok := l.password(l.Plaintext([]byte("pw|x"), salt), salt); !ok || string(got) != "pw|x" {
			t.Errorf("%s: password(Plaintext(pw|x)) = %q, %v", l, got, ok)
		}
	}
}

func TestParseLayout(t *testing.T) {
	for _, l := range Layouts() {
		if got, err := ParseLayout(string(l)); err != nil || got != l {
			t.Errorf("ParseLayout(%q) = %q, %v", l, got, err)
		}
	}
	for _, bad := range []string{"", "password+salt", "Password-Salt", "salt|password"} {
		if _, err := ParseLayout(bad); err == nil {
			t.Errorf("ParseLayout(%q) accepted", bad)
		}
	}
}

// TestDecryptLayoutsAndPaddings runs a decrypt for each layout and the
// padding cases: the right one, the wrong one, one not accepted.
func TestDecryptLayoutsAndPaddings(t *testing.T) {
	const password = "pässwörd|42"
	accepted := []hsm.Padding{hsm.OAEPSHA256, hsm.PKCS1v15, hsm.OAEPSHA1}
	for _, layout := range Layouts() {
		t.Run(string(layout), func(t *testing.T) {
			ctx := context.Background()
			h := newHarness(t, func(c *Config) {
				c.Layout = layout
				c.Paddings = accepted
			})
			h.start(t)
			seal := func(iss Issued, p hsm.Padding, pt []byte) []byte {
				t.Helper()
				ct, err := hsm.Encrypt(parsePublic(t, iss.PublicKey), p, pt)
				if err != nil {
					t.Fatal(err)
				}
				return ct
			}
			tests := []struct {
				name      string
				ask       hsm.Padding // the padding the decrypt names
				ct        func(iss Issued) []byte
				wantErr   error
				wantState store.State
			}{
				{
					name: "default padding",
					ct: func(iss Issued) []byte {
						return seal(iss, hsm.OAEPSHA256, layout.Plaintext([]byte(password), iss.Salt))
					},
				},
				{
					name: "named padding",
					ask:  hsm.PKCS1v15,
					ct:   func(iss Issued) []byte { return seal(iss, hsm.PKCS1v15, layout.Plaintext([]byte(password), iss.Salt)) },
				},
				{
					name: "another accepted padding than the ciphertext's",
					ask:  hsm.OAEPSHA1,
					ct: func(iss Issued) []byte {
						return seal(iss, hsm.OAEPSHA256, layout.Plaintext([]byte(password), iss.Salt))
					},
					wantErr:   ErrDecrypt,
					wantState: store.Consumed,
				},
				{
					name: "padding not accepted",
					ask:  hsm.OAEPSHA256MGF1SHA1,
					ct: func(iss Issued) []byte {
						return seal(iss, hsm.OAEPSHA256MGF1SHA1, layout.Plaintext([]byte(password), iss.Salt))
					},
					wantErr:   ErrPadding,
					wantState: store.Issued,
				},
				{
					name: "unknown padding",
					ask:  "oaep-md5",
					ct: func(iss Issued) []byte {
						return seal(iss, hsm.OAEPSHA256, layout.Plaintext([]byte(password), iss.Salt))
					},
					wantErr:   ErrPadding,
					wantState: store.Issued,
				},
				{
					name: "wrong salt",
					ct: func(iss Issued) []byte {
						return seal(iss, hsm.OAEPSHA256, layout.Plaintext([]byte(password), "AAAAAAAAAAAA"))
					},
					wantErr:   ErrDecrypt,
					wantState: store.Consumed,
				},
				{
					name: "garbage",
					ct: func(iss Issued) []byte {
						ct := make([]byte, 256)
						rand.Read(ct[1:])
						return ct
					},
					wantErr:   ErrDecrypt,
					wantState: store.Consumed,
				},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					iss := h.apply(t)
					got, err := h.is.DecryptWithPadding(ctx, iss.UniqueID, tt.ct(iss), tt.ask)
					if layout == LayoutNone && tt.name == "wrong salt" {
						// Nothing to check: the password comes back.
						tt.wantErr, tt.wantState = nil, ""
					}
					if tt.wantErr == nil {
						if err != nil || string(got) != password {
							t.Fatalf("DecryptWithPadding = %q, %v; want the password", got, err)
						}
						h.wantState(t, iss.UniqueID, store.Consumed)
						return
					}
					// The sentinel itself: bad padding and a bad salt
					// must not differ even in wrapping.
					if err != tt.wantErr {
						t.Fatalf("DecryptWithPadding = %q, %v; want exactly %v", got, err, tt.wantErr)
					}
					h.wantState(t, iss.UniqueID, tt.wantState)
					if destroyed := h.tok.wasDestroyed(iss.UniqueID); destroyed != (tt.wantState == store.Consumed) {
						t.Errorf("key destroyed = %v in state %s", destroyed, tt.wantState)
					}
				})
			}
		})
	}
}

func TestNewRejectsBadLayoutAndPadding(t *testing.T) {
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"layout", func(c *Config) { c.Layout = "salt+password" }, "layout"},
		{"padding", func(c *Config) { c.Paddings = []hsm.Padding{"oaep-md5"} }, "padding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{Token: newFakeToken(hsm.StorageSession), Store: &watchStore{}}
			tt.mod(&cfg)
			_, err := New(cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New() = %v, want an error about the %s", err, tt.want)
			}
			if errors.Is(err, ErrPadding) {
				t.Error("a configuration error must not look like a request's")
			}
		})
	}
}
