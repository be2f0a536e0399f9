package daemon_test

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/server/audit"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
	"github.com/keyissuer/keyissuer/server/daemon/internal/daemontest"
)

// loggedCheckpoints are the "audit checkpoint" lines of a JSON log.
func loggedCheckpoints(t *testing.T, log string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(log, "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "audit checkpoint" {
			out = append(out, m)
		}
	}
	return out
}

// TestAuditCheckpoints: the daemon signs the audit trail's head with the
// response-signing key at start-up, periodically when lines were added,
// and at shutdown, after its last line; each checkpoint is in the log too.
// The file then verifies as covered up to the shutdown checkpoint's own
// line, with the signing key.
func TestAuditCheckpoints(t *testing.T) {
	path := signedSetup(t, "\n[audit]\ncheckpoint_interval = \"1s\"\n")
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	logs := &daemontest.SyncBuffer{}
	d, stop := runDaemon(t, cfg, daemon.Options{Log: slog.New(slog.NewJSONHandler(logs, nil))})
	waitFor(t, "the start-up checkpoint", func() bool { return len(loggedCheckpoints(t, logs.String())) == 1 })
	apiURL := "http://" + d.APIAddr() + "/ams/api/v1/customer/applyPublicKey"
	if a := sdkApply(t, http.DefaultClient, apiURL, `{}`); a.Result.ResultCode != "SUCCESS" {
		t.Fatalf("apply: %+v", a.Result)
	}
	waitFor(t, "a periodic checkpoint after the apply", func() bool { return len(loggedCheckpoints(t, logs.String())) >= 2 })
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	f, err := os.Open(cfg.Audit.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c, err := audit.Verify(f)
	if err != nil {
		t.Fatal(err)
	}
	cov, err := audit.VerifyCheckpoints(c, signingKey(t))
	if err != nil {
		t.Fatal(err)
	}
	lines := readAudit(t, cfg.Audit.Path)
	if last := lines[len(lines)-1]; last.Event != audit.AuditCheckpoint || lines[len(lines)-2].Event != audit.DaemonStopped {
		t.Errorf("the trail ends with %s, %s; want daemon.stopped, audit.checkpoint", lines[len(lines)-2].Event, last.Event)
	}
	if cov.Through != c.LastSeq-1 || cov.Uncovered != 1 {
		t.Errorf("coverage %+v of seq %d-%d; want all but the last checkpoint's own line", cov, c.FirstSeq, c.LastSeq)
	}
	// The log holds a copy of every checkpoint in the file.
	logged := loggedCheckpoints(t, logs.String())
	if len(logged) != len(c.Checkpoints) {
		t.Fatalf("%d checkpoints logged, %d in the file", len(logged), len(c.Checkpoints))
	}
	for i, cp := range c.Checkpoints {
		if uint64(logged[i]["seq"].(float64)) != cp.Seq || logged[i]["head"] != cp.Head {
			t.Errorf("checkpoint %d: logged %v, in the file seq %d head %s", i, logged[i], cp.Seq, cp.Head)
		}
	}
	if why := logged[len(logged)-1]["why"]; why != "shutdown" || logged[0]["why"] != "start" {
		t.Errorf("first and last checkpoints: %v, %v", logged[0]["why"], why)
	}
}
