package config

// The decrypt side: the paddings and plaintext layout a decrypt accepts
// ([Keys]), and who may use the decrypt socket ([Decrypt]).

import (
	"fmt"
	"os/user"
	"slices"
	"strconv"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
)

func (c *Config) setDecryptDefaults() {
	if len(c.Keys.Paddings) == 0 {
		c.Keys.Paddings = []string{string(hsm.OAEPSHA256)}
	}
	if c.Keys.Layout == "" {
		c.Keys.Layout = string(issuer.LayoutPasswordSalt)
	}
}

func (c *Config) validateDecrypt() error {
	for i, p := range c.Keys.Paddings {
		if _, err := hsm.ParsePadding(p); err != nil {
			return fmt.Errorf("keys.paddings: %v", err)
		}
		if slices.Contains(c.Keys.Paddings[:i], p) {
			return fmt.Errorf("keys.paddings: %q is listed twice", p)
		}
	}
	if len(c.Keys.Paddings) > 1 && !c.Decrypt.AllowClientPadding {
		return fmt.Errorf("keys.paddings: %d schemes listed, but only the first can ever be used unless decrypt.allow_client_padding = true", len(c.Keys.Paddings))
	}
	if _, err := issuer.ParseLayout(c.Keys.Layout); err != nil {
		return fmt.Errorf("keys.layout: %v", err)
	}
	if _, err := c.SocketGroup(); err != nil {
		return fmt.Errorf("decrypt.group: %v", err)
	}
	return nil
}

// SocketGroup resolves Decrypt.Group to a gid, or -1 when it is unset.
func (c *Config) SocketGroup() (int, error) {
	g := c.Decrypt.Group
	if g == "" {
		return -1, nil
	}
	if n, err := strconv.ParseUint(g, 10, 32); err == nil {
		return int(n), nil
	}
	grp, err := user.LookupGroup(g)
	if err != nil {
		return 0, fmt.Errorf("no group %q on this machine", g)
	}
	n, err := strconv.ParseUint(grp.Gid, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("group %q has gid %q", g, grp.Gid)
	}
	return int(n), nil
}

// Paddings returns Keys.Paddings as the hsm type, the default first.
func (c *Config) Paddings() []hsm.Padding {
	ps := make([]hsm.Padding, len(c.Keys.Paddings))
	for i, p := range c.Keys.Paddings {
		ps[i] = hsm.Padding(p)
	}
	return ps
}
