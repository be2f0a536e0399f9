package daemon

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/keyissuer/keyissuer/server/admin"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// Console is a terminal shared by the log and a status line kept at its
// bottom: a log write erases the status line, writes, and draws it again.
// Give it to the logger as its writer and to [Options.Console].
type Console struct {
	mu     sync.Mutex
	w      io.Writer
	status string
}

// NewConsole returns a Console writing to w, a terminal.
func NewConsole(w io.Writer) *Console { return &Console{w: w} }

// Write writes p above the status line.
func (c *Console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.status != "" {
		io.WriteString(c.w, "\r\033[K")
	}
	n, err := c.w.Write(p)
	if c.status != "" {
		io.WriteString(c.w, c.status)
	}
	return n, err
}

// Status replaces the status line; "" removes it.
func (c *Console) Status(s string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	io.WriteString(c.w, "\r\033[K"+s)
	c.status = s
}

// warmUp shows the pool filling at start-up: on the console as a status
// line, otherwise as a log line every few seconds (and in systemd's
// status). The daemon serves meanwhile: an apply takes the first key
// ready.
func (d *Daemon) warmUp(ctx context.Context) {
	if c := d.opts.Console; c != nil {
		fmt.Fprint(c, tryThis(d))
	}
	every := 5 * time.Second
	if d.opts.Console != nil {
		every = 250 * time.Millisecond
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	start := time.Now()
	gen0 := d.issuer.Stats().Generated
	for {
		s := d.issuer.Stats()
		elapsed := time.Since(start)
		rate := float64(s.Generated-gen0) / elapsed.Seconds()
		if s.PoolReady >= s.PoolSize {
			msg := fmt.Sprintf("pool ready: %d keys in %s (%.1f keys/s)", s.PoolSize, elapsed.Round(100*time.Millisecond), rate)
			if c := d.opts.Console; c != nil {
				c.Status("")
			}
			d.log.Info(msg, "pool_ready", s.PoolReady, "pool_size", s.PoolSize, "keys_per_second", fmt.Sprintf("%.1f", rate))
			notify("STATUS=" + msg)
			return
		}
		left := "?"
		if rate > 0 {
			left = (time.Duration(float64(s.PoolSize-s.PoolReady)/rate) * time.Second).Round(time.Second).String()
		}
		msg := fmt.Sprintf("warming up the pool: %d/%d keys ready, %.1f keys/s, %s left; applies are served meanwhile",
			s.PoolReady, s.PoolSize, rate, left)
		if c := d.opts.Console; c != nil {
			c.Status(msg)
		} else if elapsed > 0 {
			d.log.Info("warming up the pool", "pool_ready", s.PoolReady, "pool_size", s.PoolSize,
				"keys_per_second", fmt.Sprintf("%.1f", rate), "time_left", left)
		}
		notify("STATUS=" + msg)
		select {
		case <-ctx.Done():
			if c := d.opts.Console; c != nil {
				c.Status("")
			}
			return
		case <-tick.C:
		}
	}
}

// tryThis is what to run against a daemon started at the terminal.
func tryThis(d *Daemon) string {
	var b strings.Builder
	api := d.apiScheme() + "://" + d.APIAddr() + publicapi.ApplyPath
	adm := "http://" + d.AdminAddr()
	fmt.Fprintf(&b, "\nkeyissuerd is serving. From another terminal, in the repository:\n")
	if d.tls != nil {
		// The CA that make dev-tls writes; another CA's file otherwise.
		fmt.Fprintf(&b, "  curl -s --cacert .dev-tls/ca.pem %s -H 'Content-Type: application/json' -d '{\"customerId\": \"2188000123456789\"}'\n", api)
	} else {
		fmt.Fprintf(&b, "  curl -s %s -H 'Content-Type: application/json' -d '{\"customerId\": \"2188000123456789\"}'\n", api)
		fmt.Fprintf(&b, "  bin/keyissuer apply -url %s -customer-id 2188000123456789\n", api)
	}
	fmt.Fprintf(&b, "  curl -s --unix-socket %s http://localhost/v1/health\n", d.cfg.Decrypt.Socket)
	fmt.Fprintf(&b, "  bin/keyissuer status -admin %s          (also %s%s, %s%s)\n", adm, adm, admin.MetricsPath, adm, admin.ReadyzPath)
	fmt.Fprintf(&b, "  bin/keyissuer audit verify %s\n", d.cfg.Audit.Path)
	fmt.Fprintf(&b, "The README's walk-through has the whole flow. Ctrl-C stops the daemon cleanly.\n\n")
	return b.String()
}
