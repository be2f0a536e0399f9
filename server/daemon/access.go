package daemon

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"

	"golang.org/x/time/rate"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/issuer/store/postgres"
	"github.com/keyissuer/keyissuer/server/blocklist"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// access is what guards applyPublicKey: the registered clients, the
// response-signing key in the token, the blocklist and the limits.
type access struct {
	signer    *hsm.Signer     // nil: answers unsigned
	blocklist *blocklist.List // nil: none
	clients   []publicapi.Client
	gate      *publicapi.Gate // the limits before authentication; kept across reloads
	// replay remembers the signatures accepted, across reloads: on one
	// host in memory (memReplay), in a cluster in PostgreSQL, so that a
	// request accepted by one instance is refused by every other.
	replay    publicapi.ReplayGuard
	memReplay *publicapi.MemoryReplayGuard // nil in a cluster
}

// openAccess finds the response-signing key, loads the blocklist and parses
// the clients' keys. It warns about every setting that weakens the API.
func (d *Daemon) openAccess(ctx context.Context) error {
	cfg := d.cfg.API
	if label := cfg.SigningKeyLabel; label != "" {
		s, err := d.token.Signer(ctx, label)
		if errors.Is(err, hsm.ErrNoSigningKey) {
			return fmt.Errorf("api.signing_key_label: the token has no key pair labelled %q; create it with "+
				"`keyissuer signing-key -create -config FILE` (for the development token: ./softhsm-setup.sh)", label)
		}
		if err != nil {
			return fmt.Errorf("api.signing_key_label: %w", err)
		}
		d.access.signer = s
		d.ops.metrics.Signatures(s.Signs)
		der, _ := x509.MarshalPKIXPublicKey(s.Public())
		sum := sha256.Sum256(der)
		d.log.Info("response-signing key", "label", label, "key_version", cfg.SigningKeyVersion,
			"bits", s.Public().N.BitLen(), "method", s.Method(), "spki_sha256", hex.EncodeToString(sum[:]))
	} else {
		d.log.Warn("api.signing_key_label is empty: answers are not signed, and the wallet SDKs will reject them")
	}
	if cfg.BlocklistFile != "" {
		l, err := blocklist.Load(cfg.BlocklistFile, d.log)
		if err != nil {
			return fmt.Errorf("api.blocklist_file: %w", err)
		}
		d.access.blocklist = l
		d.log.Info("blocklist loaded", "path", cfg.BlocklistFile, "ids", l.Len(), "poll", cfg.BlocklistPoll)
	}
	clients, err := clientsOf(d.cfg.Clients)
	if err != nil {
		return err
	}
	d.access.clients = clients
	l := d.cfg.Limits
	d.access.gate = publicapi.NewGate(publicapi.GateConfig{
		AddressRate: rate.Limit(l.AddressRate), AddressBurst: l.AddressBurst,
		UnverifiedRate: rate.Limit(l.UnverifiedRate), UnverifiedBurst: l.UnverifiedBurst,
		Addresses: l.Addresses,
	})
	if pg, ok := d.store.(*postgres.Store); ok {
		d.access.replay = pg
	} else {
		d.access.memReplay = publicapi.NewMemoryReplayGuard(d.replayCapacity(d.cfg), nil)
		d.access.replay = d.access.memReplay
	}
	if cfg.AllowUnsigned {
		d.log.Warn("api.allow_unsigned is true: applyPublicKey accepts requests without a signature, " +
			"so anyone who reaches api.listen can take keys; for local development only")
	}
	if len(d.cfg.Clients) == 0 && !cfg.AllowUnsigned {
		d.log.Warn("no [[clients]] registered and api.allow_unsigned is false: every applyPublicKey request will be refused")
	}
	return nil
}

// clientsOf parses the configured clients' keys; a reload calls it too.
func clientsOf(cfg []config.Client) ([]publicapi.Client, error) {
	var out []publicapi.Client
	for _, c := range cfg {
		keys, err := c.Keys()
		if err != nil {
			return nil, fmt.Errorf("clients (id %q): %w", c.ID, err) // Validate checked them
		}
		out = append(out, publicapi.Client{
			ID:             c.ID,
			Disabled:       !c.IsEnabled(),
			Keys:           keys,
			Rate:           rate.Limit(c.Rate),
			Burst:          c.Burst,
			MaxOutstanding: c.MaxOutstanding,
		})
	}
	return out, nil
}

// publicHandler is applyPublicKey, wired to the issuer and the access rules.
func (d *Daemon) publicHandler() http.Handler {
	var bl publicapi.Blocklist
	if d.access.blocklist != nil {
		bl = d.access.blocklist
	}
	var signer publicapi.Signer
	if d.access.signer != nil {
		signer = d.access.signer
	}
	l := d.cfg.Limits
	return publicapi.New(publicapi.Config{
		Issuer:           d.issuer,
		Log:              d.log,
		MaxBody:          d.cfg.API.MaxBodyBytes,
		Clients:          d.access.clients,
		AllowUnsigned:    d.cfg.API.AllowUnsigned,
		ClockSkew:        d.cfg.API.ClockSkew,
		Signer:           signer,
		SignerKeyVersion: d.cfg.API.SigningKeyVersion,
		Blocklist:        bl,
		Rate:             rate.Limit(l.Rate),
		Burst:            l.Burst,
		Limits:           issuer.Limits{Total: l.MaxOutstanding, Customer: l.MaxOutstandingPerCustomer},
		Gate:             d.access.gate,
		Replay:           d.access.replay,
		OnRefused:        d.onRefused,
		Instances:        d.liveInstances(),
	})
}

// maxReplayEntries caps the replay cache: about 100 bytes an entry.
const maxReplayEntries = 2_000_000

// replayCapacity sizes the replay cache from the global rate limit and the
// clock skew, up to maxReplayEntries. Sized so, it is never full; capped,
// a full cache refuses signed applies (UNKNOWN_EXCEPTION, retry) until
// entries expire, rather than forget one and allow its replay.
func (d *Daemon) replayCapacity(cfg config.Config) int {
	n := publicapi.ReplayCapacity(cfg.Limits.Rate, cfg.Limits.Burst, cfg.API.ClockSkew)
	if n > maxReplayEntries {
		d.log.Warn("the replay cache is capped below what limits.rate and api.clock_skew allow: past the cap, signed applies are refused until entries expire",
			"needed", n, "cap", maxReplayEntries)
		return maxReplayEntries
	}
	return n
}

// watchBlocklist reloads the blocklist when its file changes, until ctx is
// done.
func (d *Daemon) watchBlocklist(ctx context.Context) {
	if d.access.blocklist != nil {
		d.access.blocklist.Watch(ctx, d.cfg.API.BlocklistPoll)
	}
}
