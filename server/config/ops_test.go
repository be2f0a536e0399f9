package config_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/server/config"
)

func TestOpsConfig(t *testing.T) {
	const base = "[token]\nlabel = \"t\"\npin_env = \"PIN\"\n"
	tests := []struct {
		name    string
		body    string
		wantErr string
	}{
		{"defaults", "", ""},
		{"interval", "[audit]\nfsync = \"interval\"\nfsync_interval = \"250ms\"\n", ""},
		{"bad fsync", "[audit]\nfsync = \"sometimes\"\n", "audit.fsync"},
		{"short interval", "[audit]\nfsync_interval = \"1ms\"\n", "audit.fsync_interval"},
		{"short summary interval", "[audit]\nsummary_interval = \"10ms\"\n", "audit.summary_interval"},
		{"checkpoints", "[audit]\ncheckpoint_interval = \"30s\"\n", ""},
		{"short checkpoint interval", "[audit]\ncheckpoint_interval = \"10ms\"\n", "audit.checkpoint_interval"},
		{"long checkpoint interval", "[audit]\ncheckpoint_interval = \"25h\"\n", "audit.checkpoint_interval"},
		{"bad listen", "[admin]\nlisten = \"localhost\"\n", "admin.listen"},
		{"bad port", "[admin]\nlisten = \"127.0.0.1:http\"\n", "admin.listen"},
		{"same as api", "[admin]\nlisten = \"127.0.0.1:8080\"\n", "admin.listen"},
		{"both port 0", "[admin]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n", ""},
		{"unknown key", "[audit]\nhmac = \"x\"\n", "audit.hmac"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			c, err := config.Load(writeConfig(t, dir, base+tt.body))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("Load: %v, want an error naming %s", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Audit.Path != filepath.Join(dir, "data/audit.jsonl") {
				t.Errorf("audit.path %q, want it relative to the config file", c.Audit.Path)
			}
		})
	}
}
