package daemon_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/daemon/internal/daemontest"
)

// The documented deployment, end to end (issue 14, item 9): `make install`
// into a scratch root, the users and groups of its sysusers file, the
// operator's steps of OPERATIONS.md's Install section, the directories
// systemd makes for the unit, and keyissuerd run with the unit's User=,
// Group=, SupplementaryGroups= and UMask=. Then the password-decrypt
// service's user, a member of the socket's group, is served over the
// socket, and a third user cannot connect. Names are mapped to throwaway
// users and groups, removed at the end. Needs root.
func TestInstalledSocketGroupDeployment(t *testing.T) {
	requireRoot(t, "making users and switching to them needs root")
	for _, tool := range []string{"make", "setpriv", "useradd", "groupadd", "usermod", "userdel", "groupdel", "softhsm2-util"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s: %v (.ci/run installs it)", tool, err)
		}
	}
	scratch, err := os.MkdirTemp("", "kiinst")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(scratch) })
	must(t, os.Chmod(scratch, 0o755)) // /, as other users see it
	root := filepath.Join(scratch, "root")

	// make install, as OPERATIONS.md says, staged in root.
	repo, err := filepath.Abs("../..")
	must(t, err)
	install := exec.Command("make", "-C", repo, "install", "DESTDIR="+root, "BIN="+filepath.Join(scratch, "bin"))
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	unit := parseUnit(t, filepath.Join(root, "usr/local/lib/systemd/system/keyissuerd.service"))

	// systemd-sysusers: the file's users and groups, under throwaway names.
	names := &nameMap{t: t, suffix: randomHex(t)}
	for _, line := range readLines(t, filepath.Join(root, "usr/local/lib/sysusers.d/keyissuer.conf")) {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "g":
			names.group(f[1])
		case "u":
			names.user(f[1])
		}
	}
	// Every name the unit runs with comes from the sysusers file.
	daemonUser := names.lookupUser(unit.one("User"))
	daemonGroup := names.lookupGroup(unit.one("Group"))
	var supplementary []string
	for _, g := range unit.fields("SupplementaryGroups") {
		supplementary = append(supplementary, strconv.Itoa(names.lookupGroup(g)))
	}
	socketGroupName := "keyissuer-decrypt"
	socketGID := names.lookupGroup(socketGroupName)
	// The password-decrypt service's user, a member of the socket's group
	// (usermod -aG), and a third user who is not.
	service := names.newUser("svc")
	third := names.newUser("oth")
	names.run("usermod", "-aG", names.m[socketGroupName], names.m["svc"])

	// What systemd makes for the unit, as it makes them. Real paths are
	// mapped into root.
	mapped := func(p string) string { return filepath.Join(root, p) }
	for _, d := range []string{"/run", "/var/lib", "/var/log", "/var/lib/softhsm"} {
		must(t, os.MkdirAll(mapped(d), 0o755))
		must(t, os.Chmod(mapped(d), 0o755))
	}
	for _, kind := range []struct{ key, base string }{
		{"RuntimeDirectory", "/run"}, {"StateDirectory", "/var/lib"}, {"LogsDirectory", "/var/log"}, {"ConfigurationDirectory", "/etc"},
	} {
		for _, name := range unit.fields(kind.key) {
			d := mapped(filepath.Join(kind.base, name))
			must(t, os.MkdirAll(d, 0o755))
			if kind.key != "ConfigurationDirectory" { // left owned by root
				must(t, os.Chown(d, daemonUser, daemonGroup))
			}
			must(t, os.Chmod(d, unit.mode(kind.key+"Mode", 0o755)))
		}
	}

	// The token: SoftHSM with the unit's SOFTHSM2_CONF and writable path.
	conf := unit.env("SOFTHSM2_CONF")
	tokens := unit.one("ReadWritePaths")
	must(t, os.MkdirAll(mapped(filepath.Dir(conf)), 0o755))
	must(t, os.MkdirAll(mapped(tokens), 0o700))
	must(t, os.WriteFile(mapped(conf), []byte("directories.tokendir = "+mapped(tokens)+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o644))
	const pin = "test-fixture-pin-4711" // a throw-away token's PIN
	initToken := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "keyissuer", "--pin", pin, "--so-pin", pin+"-so")
	initToken.Env = append(os.Environ(), "SOFTHSM2_CONF="+mapped(conf))
	if out, err := initToken.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util: %v\n%s", err, out)
	}
	names.run("chown", "-R", names.m["keyissuer"]+":", mapped(tokens))

	// The operator's steps: the PIN file, and the config's decrypt.group
	// and allowed_gids as its comments say. Paths are mapped into root,
	// ports made free and the pool small; nothing else is changed.
	etc := mapped("/etc/keyissuer")
	pinFile := filepath.Join(etc, "user.pin")
	must(t, os.WriteFile(pinFile, []byte(pin+"\n"), 0o600))
	must(t, os.Chown(pinFile, daemonUser, -1))
	cfgPath := filepath.Join(etc, "config.toml")
	cfgText := mustRead(t, cfgPath)
	for _, r := range []struct{ old, new string }{
		{`# group = "keyissuer-decrypt"`, `group = "` + names.m[socketGroupName] + `"`},
		{`# allowed_gids = [GID]`, fmt.Sprintf(`allowed_gids = [%d]`, socketGID)},
		{`"/run/`, `"` + root + `/run/`}, {`"/var/`, `"` + root + `/var/`}, {`"/etc/keyissuer/`, `"` + root + `/etc/keyissuer/`},
		{`"127.0.0.1:8080"`, `"127.0.0.1:0"`}, {`"127.0.0.1:9464"`, `"127.0.0.1:0"`},
		{"size = 64", "size = 2"},
	} {
		if !strings.Contains(cfgText, r.old) {
			t.Fatalf("the installed config has no %q to edit:\n%s", r.old, cfgText)
		}
		cfgText = strings.ReplaceAll(cfgText, r.old, r.new)
	}
	fi, err := os.Stat(cfgPath)
	must(t, err)
	must(t, os.WriteFile(cfgPath, []byte(cfgText), fi.Mode().Perm())) // $EDITOR keeps the mode
	for _, step := range operatorSteps(t, repo) {
		for i, a := range step {
			if strings.HasPrefix(a, "/") {
				step[i] = mapped(a)
			}
		}
		names.run(step[0], step[1:]...)
	}

	// keyissuerd, as the unit runs it.
	exe := strings.Fields(unit.one("ExecStart"))
	if len(exe) != 3 || exe[1] != "-config" {
		t.Fatalf("ExecStart=%q: want keyissuerd -config FILE", unit.one("ExecStart"))
	}
	groups := []string{"--clear-groups"} // no SupplementaryGroups=
	if len(supplementary) > 0 {
		groups = []string{"--groups", strings.Join(supplementary, ",")}
	}
	cmd := exec.Command("setpriv", append(append([]string{"--reuid", strconv.Itoa(daemonUser), "--regid", strconv.Itoa(daemonGroup)},
		groups...), "--no-new-privs", "--",
		"/bin/sh", "-c", `umask "$0" && exec "$@"`, unit.one("UMask"), mapped(exe[0]), "-config", mapped(exe[2]))...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "SOFTHSM2_CONF=" + mapped(conf)}
	logs := &daemontest.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	must(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Errorf("keyissuerd (pid %d) did not exit after SIGKILL", cmd.Process.Pid)
			}
		}
	})
	socket := waitServing(t, logs, done)

	fi, err = os.Lstat(socket)
	must(t, err)
	if st := fi.Sys().(*syscall.Stat_t); fi.Mode() != os.ModeSocket|0o660 || int(st.Gid) != socketGID || int(st.Uid) != daemonUser {
		t.Errorf("socket %s: mode %v owner %d:%d, want a 0660 socket owned by %d:%d", socket, fi.Mode(), st.Uid, st.Gid, daemonUser, socketGID)
	}

	// The clients: this test binary, run as each user.
	client := filepath.Join(scratch, "client")
	must(t, copyFile(os.Args[0], client))
	must(t, os.Chmod(client, 0o755))
	for _, tt := range []struct {
		name string
		user *user.User
		want string
	}{
		{"the password-decrypt service's user, in " + socketGroupName, service, "status 200"},
		{"a third user", third, "permission denied"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := exec.Command("setpriv", "--reuid", tt.user.Uid, "--regid", tt.user.Gid, "--init-groups", "--", client)
			c.Env = []string{peerClientEnv + "=" + socket, "GORACE=atexit_sleep_ms=0"}
			out, err := c.CombinedOutput()
			if err != nil {
				t.Fatalf("client: %v\n%s", err, out)
			}
			if !strings.Contains(string(out), tt.want) {
				t.Errorf("as %s: %s; want %q", tt.user.Username, bytes.TrimSpace(out), tt.want)
			}
		})
	}
	if t.Failed() {
		t.Logf("keyissuerd's log:\n%s", logs.String())
	}
}

// requireRoot skips a test that needs root, for why, on a developer's
// machine, and fails it under CI, which runs as root.
func requireRoot(t *testing.T, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal(why + ", and CI runs as root")
		}
		t.Skip(why)
	}
}

// operatorSteps returns the commands of OPERATIONS.md's Install section that
// set owners and groups (chgrp, chown, chmod, usermod), which the test runs
// on the scratch root with its throwaway names. It requires at least the
// usermod that puts the service's user in the socket's group.
func operatorSteps(t *testing.T, repo string) [][]string {
	t.Helper()
	doc := mustRead(t, filepath.Join(repo, "OPERATIONS.md"))
	_, section, ok := strings.Cut(doc, "\n## Install\n")
	if !ok {
		t.Fatal("OPERATIONS.md has no Install section")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	_, block, ok := strings.Cut(section, "```sh\n")
	block, _, _ = strings.Cut(block, "```")
	if !ok {
		t.Fatal("OPERATIONS.md's Install section has no sh block")
	}
	var steps [][]string
	sawUsermod := false
	for _, line := range strings.Split(block, "\n") {
		line, _, _ = strings.Cut(line, "#")
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "chgrp", "chown", "chmod":
			steps = append(steps, f)
		case "usermod":
			sawUsermod = true
		}
	}
	if !sawUsermod {
		t.Error("OPERATIONS.md's Install section does not put the password-decrypt service's user in the socket's group")
	}
	return steps
}

// nameMap maps the names of the sysusers file to throwaway users and groups.
type nameMap struct {
	t      *testing.T
	suffix string
	m      map[string]string
}

func (n *nameMap) throwaway(name string) string {
	if n.m == nil {
		n.m = map[string]string{}
	}
	if _, ok := n.m[name]; ok {
		n.t.Fatalf("%s is made twice", name)
	}
	n.m[name] = fmt.Sprintf("kt%s%d", n.suffix, len(n.m))
	return n.m[name]
}

func (n *nameMap) group(name string) {
	g := n.throwaway(name)
	n.run("groupadd", "--system", g)
	n.t.Cleanup(func() { exec.Command("groupdel", g).Run() })
}

// user is sysusers' "u": a system user with a group of its name.
func (n *nameMap) user(name string) {
	u := n.throwaway(name)
	n.run("useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", u)
	n.t.Cleanup(func() { exec.Command("userdel", u).Run(); exec.Command("groupdel", u).Run() })
}

func (n *nameMap) newUser(name string) *user.User {
	n.user(name)
	u, err := user.Lookup(n.m[name])
	must(n.t, err)
	return u
}

func (n *nameMap) lookupUser(name string) int {
	u, err := user.Lookup(n.m[name])
	if err != nil {
		n.t.Fatalf("user %s (%s) of the unit: %v", name, n.m[name], err)
	}
	id, _ := strconv.Atoi(u.Uid)
	return id
}

func (n *nameMap) lookupGroup(name string) int {
	g, err := user.LookupGroup(n.m[name])
	if err != nil {
		n.t.Fatalf("group %s (%q) is not made by the sysusers file: %v", name, n.m[name], err)
	}
	id, _ := strconv.Atoi(g.Gid)
	return id
}

// run runs a command, the real names among its arguments (alone, or as the
// parts of owner:group) replaced by the throwaway ones.
func (n *nameMap) run(name string, args ...string) {
	n.t.Helper()
	for i, a := range args {
		parts := strings.Split(a, ":")
		for j, p := range parts {
			if m, ok := n.m[p]; ok {
				parts[j] = m
			}
		}
		args[i] = strings.Join(parts, ":")
	}
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		n.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// unitFile is the [Service] settings of a unit: key to values, in order.
type unitFile struct {
	t    *testing.T
	vals map[string][]string
}

func parseUnit(t *testing.T, path string) *unitFile {
	u := &unitFile{t: t, vals: map[string][]string{}}
	for _, line := range readLines(t, path) {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "[") {
			u.vals[k] = append(u.vals[k], v)
		}
	}
	return u
}

func (u *unitFile) one(key string) string {
	vs := u.vals[key]
	if len(vs) != 1 {
		u.t.Fatalf("the unit has %d %s= settings, want 1", len(vs), key)
	}
	return vs[0]
}

func (u *unitFile) fields(key string) []string {
	var out []string
	for _, v := range u.vals[key] {
		out = append(out, strings.Fields(v)...)
	}
	return out
}

func (u *unitFile) mode(key string, def os.FileMode) os.FileMode {
	if len(u.vals[key]) == 0 {
		return def
	}
	m, err := strconv.ParseUint(u.one(key), 8, 32)
	if err != nil {
		u.t.Fatalf("%s=%s: %v", key, u.one(key), err)
	}
	return os.FileMode(m)
}

func (u *unitFile) env(name string) string {
	for _, v := range u.fields("Environment") {
		if val, ok := strings.CutPrefix(v, name+"="); ok {
			return val
		}
	}
	u.t.Fatalf("the unit sets no %s", name)
	return ""
}

// waitServing waits for keyissuerd's "serving" line and returns the socket.
func waitServing(t *testing.T, logs *daemontest.SyncBuffer, done chan error) string {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		sc := bufio.NewScanner(strings.NewReader(logs.String()))
		for sc.Scan() {
			var rec map[string]any
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec["msg"] == "serving" {
				s, _ := rec["decrypt_socket"].(string)
				return s
			}
		}
		select {
		case err := <-done:
			done <- err // for the cleanup
			t.Fatalf("keyissuerd exited before serving: %v\n%s", err, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("keyissuerd did not serve within 90s:\n%s", logs.String())
	return ""
}

func randomHex(t *testing.T) string {
	b := make([]byte, 3)
	_, err := rand.Read(b)
	must(t, err)
	return hex.EncodeToString(b)
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(mustRead(t, path), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return out
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
