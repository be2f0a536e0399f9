package config

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer/store/postgres"
)

// Store backends.
const (
	BackendBolt     = "bolt"
	BackendPostgres = "postgres"
)

// Cluster sets cluster mode: several instances on one token that all of
// them log in to (a network HSM partition) and one PostgreSQL record store
// (store.backend = "postgres"). Its keys matter only with that backend.
//
// The store's PostgreSQL keys (in [store]): DSN is a libpq connection
// string or postgres:// URL without the password; PasswordFile (mode 0600
// or stricter) or PasswordEnv holds the password (neither: no password,
// for peer or trust authentication); MaxConns bounds the connections of
// one instance (default 16).
type Cluster struct {
	// InstanceID names this instance, stable across its restarts and
	// unique in the cluster: letters, digits, '.', '_' and '-', at most 64
	// (default: the host name). An instance refuses to start while another
	// live instance holds the id.
	InstanceID string `toml:"instance_id"`
	// Heartbeat is how often the instance renews its lease (default 2s).
	Heartbeat time.Duration `toml:"heartbeat"`
	// Lease is how long an instance counts as alive after its last
	// heartbeat (default 15s). Once it has passed, a neighbour destroys
	// the instance's pooled keys and finishes its decrypts in flight.
	Lease time.Duration `toml:"lease"`
}

var instanceIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

func (c *Config) setClusterDefaults() {
	if c.Store.Backend == "" {
		c.Store.Backend = BackendBolt
	}
	if c.Store.MaxConns == 0 {
		c.Store.MaxConns = 16
	}
	if c.Cluster.Heartbeat == 0 {
		c.Cluster.Heartbeat = 2 * time.Second
	}
	if c.Cluster.Lease == 0 {
		c.Cluster.Lease = 15 * time.Second
	}
}

func (c *Config) resolveCluster(dir string) {
	if p := c.Store.PasswordFile; p != "" && !filepath.IsAbs(p) {
		c.Store.PasswordFile = filepath.Join(dir, p)
	}
}

// Clustered reports whether the instance runs in cluster mode (the
// postgres backend).
func (c *Config) Clustered() bool { return c.Store.Backend == BackendPostgres }

func (c *Config) validateCluster() error {
	s := c.Store
	switch s.Backend {
	case BackendBolt:
		if s.DSN != "" || s.PasswordFile != "" || s.PasswordEnv != "" {
			return errors.New(`store.dsn: set only with store.backend = "postgres"`)
		}
		return nil
	case BackendPostgres:
	default:
		return fmt.Errorf("store.backend: %q is not bolt or postgres", s.Backend)
	}
	switch {
	case s.DSN == "":
		return errors.New(`store.dsn: required with store.backend = "postgres"`)
	case s.PasswordFile != "" && s.PasswordEnv != "":
		return errors.New("store.password_file: set at most one of store.password_file and store.password_env")
	case s.MaxConns < 2 || s.MaxConns > 1000:
		return fmt.Errorf("store.max_conns: %d is not between 2 and 1000", s.MaxConns)
	case c.Token.Storage != string(hsm.StorageToken):
		return errors.New(`token.storage: "session" cannot be used with store.backend = "postgres": ` +
			"session objects live only in this process's sessions, so no other instance could decrypt " +
			`a key this one issued, nor clean up after it; set token.storage = "token" on a token every instance logs in to`)
	case c.Cluster.InstanceID != "" && !instanceIDRE.MatchString(c.Cluster.InstanceID):
		return fmt.Errorf("cluster.instance_id: %q is not 1 to 64 letters, digits, '.', '_' or '-'", c.Cluster.InstanceID)
	case c.Cluster.Heartbeat < 100*time.Millisecond:
		return fmt.Errorf("cluster.heartbeat: %s is below the minimum 100ms", c.Cluster.Heartbeat)
	case c.Cluster.Lease < 3*c.Cluster.Heartbeat:
		return fmt.Errorf("cluster.lease: %s is less than three heartbeats (%s)", c.Cluster.Lease, 3*c.Cluster.Heartbeat)
	}
	if err := postgres.CheckDSN(s.DSN); err != nil {
		return fmt.Errorf("store.dsn: %w", err)
	}
	return nil
}

// ReadStorePassword returns the PostgreSQL password from where the config
// says it is, or "" if it names none. Errors never contain the password.
func (s Store) ReadStorePassword() (string, error) {
	if s.PasswordEnv == "" && s.PasswordFile == "" {
		return "", nil
	}
	pw, err := readSecret("store.password_env", s.PasswordEnv, "store.password_file", s.PasswordFile)
	if err != nil {
		return "", err
	}
	if pw = strings.TrimSpace(pw); pw == "" {
		return "", errors.New("store: the password is empty")
	}
	return pw, nil
}
