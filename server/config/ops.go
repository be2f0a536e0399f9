package config

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"time"
)

// Operations: the admin listener and the audit trail.

// Admin sets the admin HTTP listener: /metrics (Prometheus), /healthz,
// /readyz and /v1/status. It has no authentication: keep it on loopback or
// on a management network.
type Admin struct {
	// Listen is host:port (default 127.0.0.1:9464).
	Listen string `toml:"listen"`
}

// Audit sets the audit trail: one JSON line per security event,
// hash-chained (see server/audit).
type Audit struct {
	// Path is the append-only file (default data/audit.jsonl). It is
	// reopened on SIGHUP, after log rotation renamed it.
	Path string `toml:"path"`
	// Fsync is when lines reach the disk: "always" (default; a request's
	// line is on disk before it is answered, concurrent lines share an
	// fsync), "interval" (every fsync_interval) or "never" (left to the
	// kernel).
	Fsync string `toml:"fsync"`
	// FsyncInterval is the period of fsync = "interval" (default 1s).
	FsyncInterval time.Duration `toml:"fsync_interval"`
	// SummaryInterval is how often refused applyPublicKey requests are
	// summarised in one audit line and one log line, counts by reason
	// (default 1m; at least 1s). Refusals of verified clients by the
	// blocklist or a quota get a line each, as they happen.
	SummaryInterval time.Duration `toml:"summary_interval"`
	// CheckpointInterval is how often the head of the trail is signed with
	// the response-signing key (api.signing_key_label) into an
	// audit.checkpoint line, copied to the log; also at start-up and at
	// shutdown (default 5m; 1s to 24h). Without a signing key, none.
	CheckpointInterval time.Duration `toml:"checkpoint_interval"`
}

func (c *Config) setOpsDefaults() {
	if c.Admin.Listen == "" {
		c.Admin.Listen = "127.0.0.1:9464"
	}
	if c.Audit.Path == "" {
		c.Audit.Path = "data/audit.jsonl"
	}
	if c.Audit.Fsync == "" {
		c.Audit.Fsync = "always"
	}
	if c.Audit.FsyncInterval == 0 {
		c.Audit.FsyncInterval = time.Second
	}
	if c.Audit.SummaryInterval == 0 {
		c.Audit.SummaryInterval = time.Minute
	}
	if c.Audit.CheckpointInterval == 0 {
		c.Audit.CheckpointInterval = 5 * time.Minute
	}
}

func (c *Config) resolveOps(dir string) {
	if p := c.Audit.Path; p != "" && !filepath.IsAbs(p) {
		c.Audit.Path = filepath.Join(dir, p)
	}
}

func (c *Config) validateOps() error {
	bad := func(field string, format string, args ...any) error {
		return fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...))
	}
	if _, port, err := net.SplitHostPort(c.Admin.Listen); err != nil {
		return bad("admin.listen", "%q is not host:port", c.Admin.Listen)
	} else if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && port != "0") {
		return bad("admin.listen", "%q: the port must be a number from 0 to 65535", c.Admin.Listen)
	}
	if c.Admin.Listen == c.API.Listen && c.API.Listen != "" && !hasPort0(c.API.Listen) {
		return bad("admin.listen", "%q is api.listen too; the admin listener needs its own address", c.Admin.Listen)
	}
	switch c.Audit.Fsync {
	case "always", "interval", "never":
	default:
		return bad("audit.fsync", "%q is not always, interval or never", c.Audit.Fsync)
	}
	if c.Audit.FsyncInterval < 10*time.Millisecond {
		return bad("audit.fsync_interval", "%s is below the minimum 10ms", c.Audit.FsyncInterval)
	}
	if c.Audit.SummaryInterval < time.Second {
		return bad("audit.summary_interval", "%s is below the minimum 1s", c.Audit.SummaryInterval)
	}
	if ci := c.Audit.CheckpointInterval; ci < time.Second || ci > 24*time.Hour {
		return bad("audit.checkpoint_interval", "%s is not between 1s and 24h", ci)
	}
	return nil
}

func hasPort0(hostport string) bool {
	_, port, err := net.SplitHostPort(hostport)
	return err == nil && port == "0"
}
