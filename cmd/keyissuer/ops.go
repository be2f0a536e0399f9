package main

// Operations commands: status (through the admin listener) and audit
// verify.

import (
	"bytes"
	"context"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/keyissuer/keyissuer/server/admin"
	"github.com/keyissuer/keyissuer/server/audit"
)

const defaultAdmin = "http://127.0.0.1:9464"

// status prints the daemon's status from its admin listener.
func status(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("keyissuer status", flag.ContinueOnError)
	adminURL := fs.String("admin", defaultAdmin, "keyissuerd's admin listener (admin.listen)")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(*adminURL, "/")+admin.StatusPath, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("status: %w (is keyissuerd running, with admin.listen at %s?)", err, *adminURL)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status: HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	var s admin.Status
	if err := json.Unmarshal(body, &s); err != nil {
		return fmt.Errorf("status: unexpected answer: %w", err)
	}
	if *asJSON {
		return printJSON(stdout, s)
	}
	printStatus(stdout, s, time.Now())
	return nil
}

func printStatus(w io.Writer, s admin.Status, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "%s\t"+format+"\n", append([]any{k}, args...)...) }
	ago := func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return fmt.Sprintf("%s (%s ago)", t.Local().Format(time.DateTime), now.Sub(t).Round(time.Second))
	}
	up := "up"
	if !s.Token.Ready {
		up = "DOWN"
	}
	var paddings []string
	for p, m := range s.Token.Paddings {
		paddings = append(paddings, p+" ("+m+")")
	}
	sort.Strings(paddings)
	row("version", "%s, started %s", s.Version, ago(s.StartedAt))
	row("token", "%s, label %q, serial %s, %s %s", up, s.Token.Label, s.Token.Serial, s.Token.Manufacturer, s.Token.Model)
	row("", "faults %d, recoveries %d", s.Token.Faults, s.Token.Recoveries)
	row("storage", "%s, RSA-%d, paddings %s", s.Token.Storage, s.Token.KeyBits, strings.Join(paddings, ", "))
	signing := "answers unsigned"
	if s.Token.Signing != "" {
		signing = s.Token.Signing
	}
	row("signing", "%s", signing)
	row("pool", "%d/%d ready, %d generated (%.3fs each in the token), %d failed", s.Pool.Ready, s.Pool.Target,
		s.Pool.Generated, s.Pool.AvgGenerateSec, s.Pool.GenerateErrors)
	row("keys", "%d outstanding, %d destroys pending", s.Keys.Outstanding, s.Keys.PendingDestroys)
	oldest := "none"
	if !s.Keys.OldestActiveIssuedAt.IsZero() {
		oldest = "issued " + ago(s.Keys.OldestActiveIssuedAt)
	}
	row("oldest active key", "%s", oldest)
	row("records "+s.Records.Scope, "%d issued, %d decrypts, %d expired, %d lost", s.Records.Issued, s.Records.Decrypts, s.Records.Expired, s.Records.Lost)
	row("reaper", "last run %s, every %s", ago(s.Reaper.LastRun), s.Reaper.Interval)
	row("audit", "%s, line %d, head %s", s.Audit.Path, s.Audit.Seq, s.Audit.Head)
	reload := "never"
	if !s.Config.LastReload.IsZero() {
		reload = ago(s.Config.LastReload)
		if s.Config.LastReloadErr != "" {
			reload += ", REFUSED: " + s.Config.LastReloadErr
		}
	}
	row("config", "%s, log level %s, last reload %s", s.Config.Path, s.Config.LogLevel, reload)
	if len(s.Config.RestartPending) > 0 {
		row("", "changed, needs a restart: %s", strings.Join(s.Config.RestartPending, ", "))
	}
	row("listeners", "api %s, decrypt %s, admin %s", s.Listeners.API, s.Listeners.Decrypt, s.Listeners.Admin)
	tw.Flush()
}

// auditCmd runs `keyissuer audit verify [-key FILE] FILE...`.
func auditCmd(args []string, stdout io.Writer) error {
	const usage = "usage: keyissuer audit verify [-key FILE] [-log FILE] FILE... (oldest first, after rotation)"
	if len(args) == 0 || args[0] != "verify" {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet("keyissuer audit verify", flag.ContinueOnError)
	keyFile := fs.String("key", "", "the response-signing public key (PEM or base64 `file`, from `keyissuer signing-key`): check the signed checkpoints")
	logFile := fs.String("log", "", "keyissuerd's JSON log (`file`, e.g. journalctl -o cat): check the trail against the checkpoints copied there")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	files := fs.Args()
	if len(files) == 0 {
		return errors.New("audit verify: name the trail's file(s), oldest first; " + usage)
	}
	var pub *rsa.PublicKey
	if *keyFile != "" {
		var err error
		if pub, err = readPublicKey("audit verify: -key", *keyFile); err != nil {
			return err
		}
	}
	var prev *audit.Chain
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		c, err := audit.Verify(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("%s: BROKEN: %w", name, err)
		}
		if prev != nil && (c.Start != prev.Head || c.FirstSeq != prev.LastSeq+1) {
			return fmt.Errorf("%s: BROKEN: does not continue the file before it (starts at line %d from %s; that one ended at line %d with %s)",
				name, c.FirstSeq, c.Start, prev.LastSeq, prev.Head)
		}
		from := "the start of the trail"
		if c.Start != audit.Genesis {
			from = "head " + c.Start + " of an earlier file"
		}
		fmt.Fprintf(stdout, "%s: ok, %d lines, seq %d-%d, chained from %s; head %s\n", name, c.Lines, c.FirstSeq, c.LastSeq, from, c.Head)
		if err := printCoverage(stdout, name, c, pub); err != nil {
			return err
		}
		prev = &c
	}
	if *logFile != "" {
		return compareLog(stdout, *logFile, files, pub)
	}
	return nil
}

// compareLog checks the trail's files against the checkpoints in the
// daemon's log: what the file alone cannot show, a cut before its last
// checkpoint.
func compareLog(w io.Writer, logFile string, files []string, pub *rsa.PublicKey) error {
	b, err := os.ReadFile(logFile)
	if err != nil {
		return fmt.Errorf("audit verify: -log: %w", err)
	}
	var logged []audit.Logged
	for _, line := range bytes.Split(b, []byte("\n")) {
		var m struct {
			Msg       string `json:"msg"`
			Seq       uint64 `json:"seq"`
			Head      string `json:"head"`
			Signature string `json:"signature"`
			KeyID     string `json:"key_id"`
		}
		if json.Unmarshal(line, &m) == nil && m.Msg == "audit checkpoint" {
			logged = append(logged, audit.Logged{Seq: m.Seq, Head: m.Head, Signature: m.Signature, KeyID: m.KeyID})
		}
	}
	var rs []io.Reader
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		rs = append(rs, f)
	}
	checked, skipped, err := audit.CompareLogged(io.MultiReader(rs...), logged, pub)
	if err != nil {
		return fmt.Errorf("BROKEN against %s: %w", logFile, err)
	}
	fmt.Fprintf(w, "%s: %d logged checkpoints match the trail (%d of older files skipped)\n", logFile, checked, skipped)
	if len(logged) == 0 {
		fmt.Fprintf(w, "%s: WARNING: no \"audit checkpoint\" line in it\n", logFile)
	}
	return nil
}

// printCoverage reports how far the signed checkpoints cover a file.
func printCoverage(w io.Writer, name string, c audit.Chain, pub *rsa.PublicKey) error {
	const caveat = "a cut there leaves no trace in the file; compare with the \"audit checkpoint\" lines in keyissuerd's log, which also show a cut before the last checkpoint"
	switch {
	case len(c.Checkpoints) == 0:
		fmt.Fprintf(w, "%s: NOT COVERED: no signed checkpoint; all %d lines could be cut off the end unseen\n", name, c.Lines)
		return nil
	case pub == nil:
		fmt.Fprintf(w, "%s: %d checkpoints, signatures NOT checked: give -key (the response-signing public key, `keyissuer signing-key`)\n", name, len(c.Checkpoints))
		return nil
	}
	cov, err := audit.VerifyCheckpoints(c, pub)
	if err != nil {
		return fmt.Errorf("%s: BROKEN: %w", name, err)
	}
	fmt.Fprintf(w, "%s: covered through seq %d by %d signed checkpoints", name, cov.Through, cov.Checkpoints)
	if cov.Uncovered > 0 {
		fmt.Fprintf(w, "; NOT COVERED: the %d lines after it (seq %d-%d, the last checkpoint's own line included): %s",
			cov.Uncovered, cov.Through+1, c.LastSeq, caveat)
	}
	fmt.Fprintln(w)
	return nil
}
