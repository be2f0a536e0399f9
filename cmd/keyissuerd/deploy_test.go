package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/server/config"
)

// The deployment files stay valid: the host config loads, and systemd
// accepts the unit (where systemd-analyze exists).
func TestDeployFiles(t *testing.T) {
	cfg, err := config.Load("deploy/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Decrypt.Socket != "/run/keyissuer/decrypt.sock" || !strings.HasPrefix(cfg.Store.Path, "/var/lib/keyissuer/") ||
		!strings.HasPrefix(cfg.Audit.Path, "/var/log/keyissuer/") {
		t.Errorf("the host config's paths do not match the unit's directories: %s %s %s", cfg.Decrypt.Socket, cfg.Store.Path, cfg.Audit.Path)
	}
	unit, err := os.ReadFile("deploy/keyissuerd.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "User=keyissuer", "NoNewPrivileges=yes", "ProtectSystem=strict",
		"PrivateTmp=yes", "RuntimeDirectory=keyissuer", "StateDirectory=keyissuer", "ReadWritePaths=", "CapabilityBoundingSet=\n"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("the unit lacks %q", want)
		}
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		msg := "no systemd-analyze (Debian package systemd): the unit is not verified"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; .ci/run should have installed it")
		}
		t.Skip(msg)
	}
	// verify wants ExecStart to exist.
	tmp := filepath.Join(t.TempDir(), "keyissuerd.service")
	os.WriteFile(tmp, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/keyissuerd", "/bin/true")), 0o644)
	if out, err := exec.Command(analyze, "verify", tmp).CombinedOutput(); err != nil {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
