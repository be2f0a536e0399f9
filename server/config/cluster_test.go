package config_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/server/config"
)

const pgBase = base + "storage = \"token\"\n[store]\nbackend = \"postgres\"\ndsn = \"host=127.0.0.1 user=k dbname=k\"\n"

func TestLoadCluster(t *testing.T) {
	dir := t.TempDir()
	c, err := config.Load(writeConfig(t, dir, pgBase+"password_file = \"pg.pw\"\n[cluster]\ninstance_id = \"ki-1\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.Clustered() || c.Cluster.InstanceID != "ki-1" || c.Store.PasswordFile != filepath.Join(dir, "pg.pw") {
		t.Errorf("Load() = %+v, %+v", c.Store, c.Cluster)
	}
	if c, err := config.Load(writeConfig(t, dir, base)); err != nil || c.Clustered() || c.Store.Backend != "bolt" {
		t.Errorf("default backend = %q (%v), want bolt", c.Store.Backend, err)
	}
}

func TestLoadClusterErrors(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		wantErr string // what the error must say
	}{
		{"unknown backend", base + "[store]\nbackend = \"sqlite\"\n", "store.backend"},
		{"dsn with bolt", base + "[store]\ndsn = \"host=x\"\n", "store.dsn"},
		{"no dsn", base + "storage = \"token\"\n[store]\nbackend = \"postgres\"\n", "store.dsn"},
		{"password in the dsn", base + "storage = \"token\"\n[store]\nbackend = \"postgres\"\ndsn = \"host=x password=hunter2\"\n", "store.dsn"},
		{"password in the URL", base + "storage = \"token\"\n[store]\nbackend = \"postgres\"\ndsn = \"postgres://k:hunter2@x/k\"\n", "store.dsn"},
		{"two password sources", pgBase + "password_file = \"a\"\npassword_env = \"B\"\n", "store.password_file"},
		{"session storage", base + "storage = \"session\"\n[store]\nbackend = \"postgres\"\ndsn = \"host=x\"\n", "no other instance could decrypt"},
		{"bad instance id", pgBase + "[cluster]\ninstance_id = \"a b\"\n", "cluster.instance_id"},
		{"lease under three heartbeats", pgBase + "[cluster]\nheartbeat = \"2s\"\nlease = \"5s\"\n", "cluster.lease"},
		{"max_conns 1", pgBase + "max_conns = 1\n", "store.max_conns"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := config.Load(writeConfig(t, t.TempDir(), tt.body))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Load() = %v, want an error saying %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("error %q shows the password", err)
			}
		})
	}
}

func TestReadStorePassword(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte("s3cret\n"), 0o600)
	open := filepath.Join(dir, "open")
	os.WriteFile(open, []byte("s3cret\n"), 0o644)
	t.Setenv("KEYISSUER_TEST_PG_PW", "fromenv")
	tests := []struct {
		name    string
		s       config.Store
		want    string
		wantErr string
	}{
		{name: "none", s: config.Store{}, want: ""},
		{name: "file", s: config.Store{PasswordFile: good}, want: "s3cret"},
		{name: "env", s: config.Store{PasswordEnv: "KEYISSUER_TEST_PG_PW"}, want: "fromenv"},
		{name: "file readable by others", s: config.Store{PasswordFile: open}, wantErr: "store.password_file"},
		{name: "env unset", s: config.Store{PasswordEnv: "KEYISSUER_TEST_PG_UNSET"}, wantErr: "store.password_env"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.s.ReadStorePassword()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), "s3cret") {
					t.Fatalf("ReadStorePassword() = %v, want an error naming %s without the password", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("ReadStorePassword() = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}
