package daemon_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
)

// The decrypt side end to end: who may call the socket, and what every
// failed decrypt looks like from outside.

// decryptConfig writes a config as setup does (session storage), with keys
// and decrypt added to its [keys] and [decrypt] tables.
func decryptConfig(t *testing.T, keys, decrypt string) string {
	t.Helper()
	return decryptConfigOn(t, hsmtest.Shared(t), keys, decrypt)
}

// decryptConfigOn is decryptConfig on tok.
func decryptConfigOn(t *testing.T, tok hsmtest.Token, keys, decrypt string) string {
	t.Helper()
	cfgPath, _ := setupOn(t, tok, "session")
	cfg := mustRead(t, cfgPath)
	for _, table := range []struct{ header, add string }{{"[keys]\n", keys}, {"[decrypt]\n", decrypt}} {
		if !strings.Contains(cfg, "\n"+table.header) {
			t.Fatalf("setup's config has no %s table:\n%s", table.header, cfg)
		}
		cfg = strings.Replace(cfg, "\n"+table.header, "\n"+table.header+table.add+"\n", 1)
	}
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfgPath
}

func publicKeyOf(t *testing.T, k publicKeyInfo) *rsa.PublicKey {
	t.Helper()
	der, err := base64.StdEncoding.DecodeString(k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		t.Fatal(err)
	}
	return pub.(*rsa.PublicKey)
}

// rawDecrypt posts body to /v1/decrypt and returns the answer as it came.
func (c *child) rawDecrypt(body any) (int, http.Header, []byte) {
	c.t.Helper()
	b, _ := json.Marshal(body)
	resp, err := c.socketClient().Post("http://keyissuer/v1/decrypt", "application/json", bytes.NewReader(b))
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, raw
}

// TestDecryptFailuresLookAlike makes a decrypt fail in every way a
// ciphertext can, through both of the token's paths (raw RSA + rsapad for
// OAEP-SHA-256, SoftHSM's own OAEP for SHA-1): the caller must get the very
// same answer each time, and the key must be gone each time.
func TestDecryptFailuresLookAlike(t *testing.T) {
	c := start(t, decryptConfig(t, `paddings = ["oaep-sha256", "oaep-sha1"]`, `allow_client_padding = true`))
	const password = "correct horse"
	seal := func(k publicKeyInfo, p hsm.Padding, pt string) []byte {
		ct, err := hsm.Encrypt(publicKeyOf(t, k), p, []byte(pt))
		if err != nil {
			t.Fatal(err)
		}
		return ct
	}
	tests := []struct {
		name    string
		padding string // as the request names it; "" for the default
		ct      func(k publicKeyInfo) []byte
	}{
		{"OAEP-SHA-1 ciphertext taken as OAEP-SHA-256 (raw, rsapad)", "", func(k publicKeyInfo) []byte {
			return seal(k, hsm.OAEPSHA1, password+k.Salt)
		}},
		{"OAEP-SHA-256 ciphertext taken as OAEP-SHA-1 (the token's OAEP)", "oaep-sha1", func(k publicKeyInfo) []byte {
			return seal(k, hsm.OAEPSHA256, password+k.Salt)
		}},
		{"wrong salt", "", func(k publicKeyInfo) []byte { return seal(k, hsm.OAEPSHA256, password+"AAAAAAAAAAAA") }},
		{"no salt, token's OAEP", "oaep-sha1", func(k publicKeyInfo) []byte { return seal(k, hsm.OAEPSHA1, password) }},
		{"salt first", "", func(k publicKeyInfo) []byte { return seal(k, hsm.OAEPSHA256, k.Salt+password) }},
		{"random, below the modulus", "", func(k publicKeyInfo) []byte {
			ct := make([]byte, 256)
			rand.Read(ct[1:])
			return ct
		}},
	}
	type answer struct {
		status                     int
		contentType, cacheControl  string
		contentLength, body, label string
	}
	var first *answer
	for _, tt := range tests {
		k := c.apply("")
		body := map[string]string{"uniqueId": k.UniqueID, "ciphertext": base64.StdEncoding.EncodeToString(tt.ct(k))}
		if tt.padding != "" {
			body["padding"] = tt.padding
		}
		status, h, raw := c.rawDecrypt(body)
		a := answer{status, h.Get("Content-Type"), h.Get("Cache-Control"), h.Get("Content-Length"), string(raw), tt.name}
		if first == nil {
			first = &a
			if status != http.StatusUnprocessableEntity || !strings.Contains(a.body, `"DECRYPT_FAILED"`) {
				t.Fatalf("%s: HTTP %d %s, want 422 DECRYPT_FAILED", tt.name, status, raw)
			}
		} else if a.status != first.status || a.contentType != first.contentType || a.cacheControl != first.cacheControl ||
			a.contentLength != first.contentLength || a.body != first.body {
			t.Errorf("%s: answer %+v differs from that to %s: %+v", tt.name, a, first.label, *first)
		}
		// The key is gone: the right ciphertext comes too late.
		good := map[string]string{"uniqueId": k.UniqueID, "ciphertext": base64.StdEncoding.EncodeToString(seal(k, hsm.OAEPSHA256, password+k.Salt))}
		if status, _, raw := c.rawDecrypt(good); status != http.StatusGone || !bytes.Contains(raw, []byte(`"KEY_CONSUMED"`)) {
			t.Errorf("%s: then the right ciphertext: HTTP %d %s, want 410 KEY_CONSUMED", tt.name, status, raw)
		}
	}
	var health map[string]any
	if st := c.getJSON("/v1/health", &health); st != 200 || health["outstandingKeys"] != float64(0) {
		t.Errorf("health: %d %v; want no outstanding key", st, health)
	}
	logs := c.stderr.String()
	if strings.Contains(logs, password) {
		t.Error("the password appears in the daemon's log")
	}
	// Start-up says how the token does each padding: SoftHSM 2.6 does
	// OAEP natively with SHA-1 only.
	for _, line := range strings.Split(logs, "\n") {
		var rec struct {
			Msg      string            `json:"msg"`
			Default  string            `json:"padding_default"`
			Paddings map[string]string `json:"paddings"`
		}
		if json.Unmarshal([]byte(line), &rec) != nil || rec.Msg != "token open" {
			continue
		}
		if rec.Default != "oaep-sha256" || rec.Paddings["oaep-sha256"] != "raw" || rec.Paddings["oaep-sha1"] != "native" {
			t.Errorf("token open: default %q, paddings %v; want oaep-sha256 raw, oaep-sha1 native", rec.Default, rec.Paddings)
		}
		return
	}
	t.Errorf("no token open line in the log:\n%s", logs)
}

// A client that names a padding the daemon does not accept, or names one
// when the daemon does not let it, gets PARAM_ILLEGAL, and the key stays.
func TestDecryptPaddingNotAccepted(t *testing.T) {
	for _, tt := range []struct {
		name, keys, decrypt, padding string
	}{
		{"not among keys.paddings", `paddings = ["oaep-sha256", "oaep-sha1"]`, `allow_client_padding = true`, "pkcs1v15"},
		{"allow_client_padding off", `paddings = ["oaep-sha256"]`, ``, "oaep-sha256"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := start(t, decryptConfig(t, tt.keys, tt.decrypt))
			k := c.apply("")
			ct := encryptFor(t, k, "pw")
			body := map[string]string{"uniqueId": k.UniqueID, "ciphertext": base64.StdEncoding.EncodeToString(ct), "padding": tt.padding}
			if status, _, raw := c.rawDecrypt(body); status != http.StatusBadRequest || !bytes.Contains(raw, []byte(`"PARAM_ILLEGAL"`)) {
				t.Errorf("HTTP %d %s, want 400 PARAM_ILLEGAL", status, raw)
			}
			if status, _, pw, err := c.decrypt(k.UniqueID, ct); status != 200 || pw != "pw" {
				t.Errorf("then without padding: %d %q %v; want the password (the key was not used)", status, pw, err)
			}
		})
	}
}

// peerClientEnv makes the test binary a client of the decrypt socket at
// its value, run by TestSocketPeerCredentials under other uids: it prints
// "pid N", then "status N BODY" or "error ERR".
const peerClientEnv = "KEYISSUERD_TEST_PEER_CLIENT"

func init() {
	if sock := os.Getenv(peerClientEnv); sock != "" {
		os.Exit(peerClient(sock))
	}
}

func peerClient(sock string) int {
	fmt.Printf("pid %d\n", os.Getpid())
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	resp, err := c.Get("http://keyissuer/v1/health")
	if err != nil {
		fmt.Printf("error %v\n", err)
		return 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	fmt.Printf("status %d %s\n", resp.StatusCode, b)
	return 0
}

// TestSocketPeerCredentials runs clients as other users against a daemon
// whose socket is group-accessible: the file's mode and group let them
// connect, and the peer check decides. Needs root, to switch uids.
func TestSocketPeerCredentials(t *testing.T) {
	requireRoot(t, "connecting as other users needs root")
	const (
		sockGroup  = 64100 // the socket file's group
		allowedUID = 64101
		allowedGID = 64102
		nobody     = 65534
	)
	cfgPath := decryptConfig(t, ``, fmt.Sprintf("mode = \"0660\"\ngroup = \"%d\"\nallowed_uids = [%d]\nallowed_gids = [%d]",
		sockGroup, allowedUID, allowedGID))
	// Other users must get through the config's folder to the socket's.
	if err := os.Chmod(filepath.Dir(cfgPath), 0o711); err != nil {
		t.Fatal(err)
	}
	c := start(t, cfgPath)

	for path, want := range map[string]os.FileMode{c.socket: os.ModeSocket | 0o660, filepath.Dir(c.socket): os.ModeDir | 0o750} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode() != want || st.Gid != sockGroup || st.Uid != 0 {
			t.Errorf("%s: mode %v, owner %d:%d; want %v, 0:%d", path, fi.Mode(), st.Uid, st.Gid, want, sockGroup)
		}
	}

	// The test binary, where other users can run it.
	binDir, err := os.MkdirTemp("", "kidbin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(binDir) })
	bin := filepath.Join(binDir, "client")
	if err := copyFile(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{binDir, bin} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}

	tests := []struct {
		name       string
		uid, gid   uint32
		groups     []uint32
		wantStatus int // 0: the connection itself is refused
	}{
		{"a stranger in the socket's group", nobody, nobody, []uint32{sockGroup}, http.StatusForbidden},
		{"an allowed uid", allowedUID, nobody, []uint32{sockGroup}, http.StatusOK},
		{"an allowed effective gid", nobody, allowedGID, []uint32{sockGroup}, http.StatusOK},
		{"an allowed supplementary gid", nobody, nobody, []uint32{sockGroup, allowedGID}, http.StatusOK},
		{"an allowed uid outside the socket's group", allowedUID, nobody, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(bin)
			// No second of sleep at exit under the race detector.
			cmd.Env = append(os.Environ(), peerClientEnv+"="+c.socket, "GORACE=atexit_sleep_ms=0")
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: tt.uid, Gid: tt.gid, Groups: tt.groups}}
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("client: %v\n%s", err, out)
			}
			var pid, status int
			var rest string
			sc := bufio.NewScanner(bytes.NewReader(out))
			for sc.Scan() {
				f := strings.SplitN(sc.Text(), " ", 3)
				switch f[0] {
				case "pid":
					pid, _ = strconv.Atoi(f[1])
				case "status":
					status, _ = strconv.Atoi(f[1])
					rest = f[2]
				case "error":
					rest = sc.Text()
				}
			}
			if status != tt.wantStatus {
				t.Fatalf("HTTP status %d (%s), want %d", status, rest, tt.wantStatus)
			}
			switch tt.wantStatus {
			case 0:
				if !strings.Contains(rest, "permission denied") {
					t.Errorf("connect: %s, want permission denied", rest)
				}
			case http.StatusForbidden:
				if !strings.Contains(rest, `"FORBIDDEN"`) {
					t.Errorf("body %s, want FORBIDDEN", rest)
				}
				// The audit line names the peer.
				if !refusalLogged(c.stderr.String(), tt.uid, tt.gid, pid) {
					t.Errorf("no refusal logged for uid %d gid %d pid %d:\n%s", tt.uid, tt.gid, pid, c.stderr.String())
				}
			}
		})
	}
}

func refusalLogged(logs string, uid, gid uint32, pid int) bool {
	for _, line := range strings.Split(logs, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil {
			continue
		}
		if rec["msg"] == "decrypt socket: refused a peer" && rec["uid"] == float64(uid) &&
			rec["gid"] == float64(gid) && rec["pid"] == float64(pid) {
			return true
		}
	}
	return false
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o700)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
