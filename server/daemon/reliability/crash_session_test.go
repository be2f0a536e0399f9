package reliability

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/issuer/store"
	"github.com/keyissuer/keyissuer/server/audit"
)

// The crash harness's session-storage variant. In session storage a
// decrypt's order is: claim in memory, the token's decrypt, the destroy,
// the record's one move (issued → consumed) queued, the audit line made
// durable, the answer; nothing durable before the token call (see the
// issuer's package doc). keyissuerd is killed with SIGKILL at each point of
// that order in turn, during the first decrypt of a fresh key, and after
// each kill, then after the next start:
//
//   - no record is ever consuming: session storage claims in memory only;
//   - the key's record is issued after the kill (or consumed, if the queued
//     move was committed before a kill after the audit line), and lost or
//     consumed once the next daemon has started: the crash is finished;
//   - the key reached the token's decrypt at most once (the ledger), and a
//     decrypt of it after the restart is refused with 410, never answered;
//   - the audit trail holds the decrypt's line if and only if the kill came
//     after it: the line is durable before the answer, never after.
var sessionCrashPoints = []struct {
	point     string
	reached   int  // decrypts of the key that reached the token by the kill
	audited   bool // the decrypt's audit line is written by the kill
	maySettle bool // the queued move may be committed by the kill
}{
	{"claim", 0, false, false},           // claimed in memory, the token not yet asked
	{"decrypt", 0, false, false},         // entering the token's decrypt
	{"decrypted", 1, false, false},       // decrypted, not destroyed
	{"destroyed", 1, false, false},       // destroyed, the record's move not queued
	{"settle-consumed", 1, false, false}, // as the record's move is queued
	{"audited", 1, true, true},           // the audit line durable, the answer not written
}

func TestCrashSessionStorage(t *testing.T) {
	f := newFixture(t, fixtureConfig{
		storage: "session", poolSize: 2, generators: 1,
		ttl: "10m", reap: "200ms", applyWait: "5s",
	})
	for _, cp := range sessionCrashPoints {
		p, err := f.start(fmt.Sprintf("%s=%s:1:0s", crashEnv, cp.point))
		if err != nil {
			t.Fatalf("%s: %v\n%s", cp.point, err, p.stderr.String())
		}
		waitFor(t, cp.point+": a full pool", func() bool {
			h, _, err := p.health()
			return err == nil && h.PoolReady >= h.PoolSize
		})
		res, err := p.apply("")
		if err != nil || res.code != "SUCCESS" {
			t.Fatalf("%s: apply: %+v, %v", cp.point, res, err)
		}
		k, pw := res.key, f.password()
		ct := seal(t, k, pw)
		if got, err := p.decrypt(k.UniqueID, ct); err == nil {
			t.Fatalf("%s: the decrypt was answered (%d %s), and the daemon was to die before its answer", cp.point, got.status, got.code)
		}
		<-p.exited
		if !p.crashed.Load() {
			t.Fatalf("%s: the daemon died, and not at the planned point: %v\n%s", cp.point, p.err, p.stderr.String())
		}

		// The daemon is dead: its store, its audit trail, the ledger.
		recs, active := f.records([]string{k.UniqueID})
		for _, r := range active {
			if r.State == store.Consuming {
				t.Errorf("%s: record %s is consuming; session storage never claims in the store", cp.point, r.UniqueID)
			}
		}
		switch st := recs[k.UniqueID].State; {
		case st == store.Issued:
		case st == store.Consumed && cp.maySettle:
		default:
			t.Errorf("%s: after the kill the record is %q, want issued", cp.point, st)
		}
		if got := auditedDecrypts(t, f.audit)[k.UniqueID]; got != cp.audited {
			t.Errorf("%s: the audit trail has the decrypt's line: %v, want %v", cp.point, got, cp.audited)
		}
		if n := ledgerBegins(t, f.ledger)[k.UniqueID]; n != cp.reached {
			t.Errorf("%s: the key reached the token's decrypt %d times, want %d", cp.point, n, cp.reached)
		}

		// The next start finishes what the kill left.
		p = f.mustStart()
		if st, err := p.state(k.UniqueID); err != nil || st != string(store.Lost) && st != string(store.Consumed) {
			t.Errorf("%s: after the restart the record is %q (%v), want lost or consumed", cp.point, st, err)
		}
		again, err := p.decrypt(k.UniqueID, ct)
		if err != nil || again.status != http.StatusGone || again.code != "KEY_LOST" && again.code != "KEY_CONSUMED" {
			t.Errorf("%s: a decrypt after the restart: %d %s %v; want 410 KEY_LOST or KEY_CONSUMED", cp.point, again.status, again.code, err)
		}
		p.stop()
		if n := ledgerBegins(t, f.ledger)[k.UniqueID]; n != cp.reached {
			t.Errorf("%s: after the restart the key reached the token's decrypt %d times, want %d", cp.point, n, cp.reached)
		}
		if t.Failed() {
			t.Fatalf("the kill at %s failed its checks", cp.point)
		}
	}
}

// auditedDecrypts reads the audit trail at path: the uniqueIds that have a
// key.decrypt line.
func auditedDecrypts(t testing.TB, path string) map[string]bool {
	t.Helper()
	fh, err := os.Open(path)
	if err != nil {
		t.Fatalf("the audit trail: %v", err)
	}
	defer fh.Close()
	out := map[string]bool{}
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		var ln struct {
			Event    string `json:"event"`
			UniqueID string `json:"unique_id"`
		}
		if json.Unmarshal(sc.Bytes(), &ln) == nil && ln.Event == audit.KeyDecrypt {
			out[ln.UniqueID] = true
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("the audit trail: %v", err)
	}
	return out
}

// ledgerBegins reads the child's ledger at path: for each key, the decrypts
// that reached the token and did not come back unavailable.
func ledgerBegins(t testing.TB, path string) map[string]int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatalf("the ledger: %v", err)
	}
	n := map[string]int{}
	for _, line := range strings.Split(string(b), "\n") {
		switch fields := strings.Fields(line); {
		case len(fields) == 2 && fields[0] == "begin":
			n[fields[1]]++
		case len(fields) == 3 && fields[0] == "end" && fields[2] == "unavailable":
			n[fields[1]]--
		}
	}
	return n
}
