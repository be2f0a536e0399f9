package config

// Who may call applyPublicKey, and how much: registered clients and their
// keys, request signatures, the response-signing key, the blocklist, rate
// limits and outstanding-key quotas. The [api] keys for these are at the end
// of [API]; [Limits] and [Client] are the [limits] table and the [[clients]]
// array of tables.

import (
	"crypto/rsa"
	"fmt"
	"math"
	"path/filepath"
	"strings"
	"time"

	"github.com/keyissuer/keyissuer/server/apisig"
)

// Limits protects the token and the daemon from floods. Every limit hit is
// REQUEST_TRAFFIC_EXCEED_LIMIT (retryable).
type Limits struct {
	// Rate is how many applyPublicKey requests per second all callers
	// together may make (token bucket; default 200); Burst how many may
	// come at once (default twice Rate).
	Rate  float64 `toml:"rate"`
	Burst int     `toml:"burst"`
	// MaxOutstanding caps the keys issued and not yet used or expired,
	// across all clients, so the token can never be filled (default
	// 10000). Keys ready in the pool come on top: pool.size.
	MaxOutstanding int `toml:"max_outstanding"`
	// MaxOutstandingPerCustomer caps them per customerId (default 10).
	MaxOutstandingPerCustomer int `toml:"max_outstanding_per_customer"`

	// Before authentication (server/publicapi.Gate): every request, even
	// junk, first takes a token from its source address's bucket,
	// AddressRate per second and AddressBurst at once (defaults 200 and
	// twice the rate); and, unless a signed request from that address
	// verified within the last hour, from the bucket all such addresses
	// share, UnverifiedRate and UnverifiedBurst (defaults 100 and twice the
	// rate). Addresses bounds how many addresses are remembered (default
	// 10000; the idle longest, unverified first, are forgotten). A refusal
	// costs no signature, no audit line of its own and no RSA verify.
	AddressRate     float64 `toml:"address_rate"`
	AddressBurst    int     `toml:"address_burst"`
	UnverifiedRate  float64 `toml:"unverified_rate"`
	UnverifiedBurst int     `toml:"unverified_burst"`
	Addresses       int     `toml:"addresses"`
}

// Client is a merchant application registered to call applyPublicKey: a
// [[clients]] table.
type Client struct {
	// ID is the Client-Id it sends: 1 to 64 characters of [A-Za-z0-9_-].
	ID string `toml:"id"`
	// Enabled false refuses the client's requests with INVALID_CLIENT
	// (default true).
	Enabled *bool `toml:"enabled"`
	// PublicKeys are the client's RSA public keys (at least 2048 bits) by
	// keyVersion, a positive integer: PEM ("-----BEGIN PUBLIC KEY-----")
	// or the standard base64 of the DER X.509 SubjectPublicKeyInfo. A
	// request without a keyVersion is checked with the highest.
	PublicKeys map[string]string `toml:"public_keys"`
	// Rate and Burst are the client's own token bucket (defaults 50 per
	// second, and twice Rate).
	Rate  float64 `toml:"rate"`
	Burst int     `toml:"burst"`
	// MaxOutstanding caps the client's outstanding keys (default
	// limits.max_outstanding).
	MaxOutstanding int `toml:"max_outstanding"`
}

// IsEnabled reports whether the client may call.
func (c Client) IsEnabled() bool { return c.Enabled == nil || *c.Enabled }

// Keys parses the client's public keys, by keyVersion.
func (c Client) Keys() (map[int]*rsa.PublicKey, error) {
	keys := make(map[int]*rsa.PublicKey, len(c.PublicKeys))
	for v, s := range c.PublicKeys {
		n, err := apisig.ParseKeyVersion(v)
		if err != nil {
			return nil, fmt.Errorf("keyVersion %q: %v", v, err)
		}
		k, err := apisig.ParsePublicKey(s)
		if err != nil {
			return nil, fmt.Errorf("keyVersion %s: %v", v, err)
		}
		keys[n] = k
	}
	return keys, nil
}

func (c *Config) setAccessDefaults() {
	if c.API.ClockSkew == 0 {
		c.API.ClockSkew = 5 * time.Minute
	}
	if c.API.SigningKeyVersion == 0 {
		c.API.SigningKeyVersion = 1
	}
	if c.API.BlocklistPoll == 0 {
		c.API.BlocklistPoll = 5 * time.Second
	}
	l := &c.Limits
	if l.Rate == 0 {
		l.Rate = 200
	}
	if l.Burst == 0 {
		l.Burst = burstFor(l.Rate)
	}
	if l.MaxOutstanding == 0 {
		l.MaxOutstanding = 10000
	}
	if l.MaxOutstandingPerCustomer == 0 {
		l.MaxOutstandingPerCustomer = 10
	}
	if l.AddressRate == 0 {
		l.AddressRate = 200
	}
	if l.AddressBurst == 0 {
		l.AddressBurst = burstFor(l.AddressRate)
	}
	if l.UnverifiedRate == 0 {
		l.UnverifiedRate = 100
	}
	if l.UnverifiedBurst == 0 {
		l.UnverifiedBurst = burstFor(l.UnverifiedRate)
	}
	if l.Addresses == 0 {
		l.Addresses = 10000
	}
	for i := range c.Clients {
		cl := &c.Clients[i]
		if cl.Rate == 0 {
			cl.Rate = 50
		}
		if cl.Burst == 0 {
			cl.Burst = burstFor(cl.Rate)
		}
		if cl.MaxOutstanding == 0 {
			cl.MaxOutstanding = l.MaxOutstanding
		}
	}
}

func burstFor(rate float64) int {
	if rate <= 0 || rate > 1e6 {
		return 1 // Validate refuses the rate
	}
	return max(1, int(math.Ceil(2*rate)))
}

func (c *Config) resolveAccess(dir string) {
	if p := c.API.BlocklistFile; p != "" && !filepath.IsAbs(p) {
		c.API.BlocklistFile = filepath.Join(dir, p)
	}
}

func (c *Config) validateAccess() error {
	bad := func(field string, format string, args ...any) error {
		return fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...))
	}
	a := c.API
	switch {
	case a.ClockSkew < time.Second || a.ClockSkew > 24*time.Hour:
		return bad("api.clock_skew", "%s is not between 1s and 24h", a.ClockSkew)
	case a.SigningKeyLabel != "" && strings.HasPrefix(a.SigningKeyLabel, c.Token.LabelPrefix):
		return bad("api.signing_key_label", "%q starts with token.label_prefix %q, whose objects are one-time keys that reconciliation destroys", a.SigningKeyLabel, c.Token.LabelPrefix)
	case len(a.SigningKeyLabel) > 128:
		return bad("api.signing_key_label", "longer than 128 characters")
	case a.SigningKeyVersion < 1 || a.SigningKeyVersion > 999999999:
		return bad("api.signing_key_version", "%d is not a positive integer of at most 9 digits", a.SigningKeyVersion)
	case a.BlocklistPoll < 100*time.Millisecond:
		return bad("api.blocklist_poll", "%s is below the minimum 100ms", a.BlocklistPoll)
	}
	if err := validRate("limits", c.Limits.Rate, c.Limits.Burst); err != nil {
		return err
	}
	if err := validRateNamed("limits.address_rate", "limits.address_burst", c.Limits.AddressRate, c.Limits.AddressBurst); err != nil {
		return err
	}
	if err := validRateNamed("limits.unverified_rate", "limits.unverified_burst", c.Limits.UnverifiedRate, c.Limits.UnverifiedBurst); err != nil {
		return err
	}
	if n := c.Limits.Addresses; n < 1 || n > 10_000_000 {
		return bad("limits.addresses", "%d is not between 1 and 10000000", n)
	}
	switch l := c.Limits; {
	case l.MaxOutstanding < 1 || l.MaxOutstanding > 10_000_000:
		return bad("limits.max_outstanding", "%d is not between 1 and 10000000", l.MaxOutstanding)
	case l.MaxOutstandingPerCustomer < 1:
		return bad("limits.max_outstanding_per_customer", "%d is not positive", l.MaxOutstandingPerCustomer)
	}
	seen := map[string]bool{}
	for i, cl := range c.Clients {
		field := fmt.Sprintf("clients[%d]", i)
		if cl.ID != "" {
			field = fmt.Sprintf("clients[%d] (id %q)", i, cl.ID)
		}
		switch {
		case !apisig.ValidClientID(cl.ID):
			return bad(field+".id", "must be 1 to 64 characters of letters, digits, '_' and '-'")
		case seen[cl.ID]:
			return bad(field+".id", "registered twice")
		case len(cl.PublicKeys) == 0:
			return bad(field+".public_keys", "no key: give at least one, by keyVersion (1 = \"-----BEGIN PUBLIC KEY-----...\")")
		case cl.MaxOutstanding < 1:
			return bad(field+".max_outstanding", "%d is not positive", cl.MaxOutstanding)
		}
		seen[cl.ID] = true
		if err := validRate(field, cl.Rate, cl.Burst); err != nil {
			return err
		}
		if _, err := cl.Keys(); err != nil {
			return bad(field+".public_keys", "%v", err)
		}
	}
	return nil
}

func validRate(field string, rate float64, burst int) error {
	return validRateNamed(field+".rate", field+".burst", rate, burst)
}

func validRateNamed(rateField, burstField string, rate float64, burst int) error {
	switch {
	case math.IsNaN(rate) || rate <= 0 || rate > 1e6:
		return fmt.Errorf("%s: %v is not between 0 and 1000000 requests per second", rateField, rate)
	case burst < 1 || burst > 1e7:
		return fmt.Errorf("%s: %d is not between 1 and 10000000", burstField, burst)
	}
	return nil
}
