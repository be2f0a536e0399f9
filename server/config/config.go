// Package config reads keyissuerd's TOML configuration. The field comments
// of [Config] are the reference; config.example.toml at the repository root
// shows every key. Unknown keys are an error, every validation error names
// the field, and relative paths are taken relative to the config file.
package config

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/keyissuer/keyissuer/hsm"
)

// Config is the whole configuration file.
type Config struct {
	Token   Token   `toml:"token"`
	Keys    Keys    `toml:"keys"`
	Pool    Pool    `toml:"pool"`
	Store   Store   `toml:"store"`
	API     API     `toml:"api"`
	Decrypt Decrypt `toml:"decrypt"`
	Log     Log     `toml:"log"`

	// Admin and Audit: see ops.go.
	Admin Admin `toml:"admin"`
	Audit Audit `toml:"audit"`

	// Limits and Clients: see access.go.
	Limits  Limits   `toml:"limits"`
	Clients []Client `toml:"clients"`
}

// Token selects the PKCS#11 token and says how keys live in it.
type Token struct {
	// Module is the PKCS#11 library. Default: SoftHSM2's Debian path,
	// /usr/lib/softhsm/libsofthsm2.so.
	Module string `toml:"module"`
	// Label selects the token by label; Serial by serial number. Exactly
	// one of them.
	Label  string `toml:"label"`
	Serial string `toml:"serial"`
	// PINEnv names an environment variable holding the user PIN; PINFile a
	// file holding it (mode 0600 or stricter; surrounding whitespace is
	// ignored). Exactly one of PINEnv, PINFile and PIN.
	PINEnv  string `toml:"pin_env"`
	PINFile string `toml:"pin_file"`
	// PIN in the file itself is refused unless AllowPlainPIN is true.
	PIN           string `toml:"pin"`
	AllowPlainPIN bool   `toml:"allow_plain_pin"`
	// Storage is "session" (default: keys are session objects, gone when
	// the daemon stops) or "token" (token objects, kept across restarts).
	Storage string `toml:"storage"`
	// LabelPrefix starts the CKA_LABEL and CKA_ID of every key object
	// keyissuer makes: A-Z, a-z, 0-9, '.', '_', '-' and ':', ending with
	// ':'. An object is keyissuer's only if its label is exactly the
	// prefix and a uniqueId, so "keyissuer:" never touches the objects of
	// "keyissuer:host-b:". Give each daemon sharing a token its own
	// prefix. Default "keyissuer:".
	LabelPrefix string `toml:"label_prefix"`
	// Sessions is how many PKCS#11 sessions to keep open (default 8; at
	// least pool.generators + 1).
	Sessions int `toml:"sessions"`
	// Dedicated states that the token (the partition) is keyissuer's
	// alone. Only then are key objects that a crash left half-made (no
	// label, no id, no key; SoftHSM in token storage) destroyed; otherwise
	// they are logged and left. Default false. See OPERATIONS.md.
	Dedicated bool `toml:"dedicated"`
	// HalfMadeGrace is how long an object must stay half-made before a
	// dedicated token's sweep destroys it: longer than any other process
	// on the token takes to make an object (default 1m). A daemon alone on
	// its token may set it as short as 1ms.
	HalfMadeGrace time.Duration `toml:"half_made_grace"`
}

// Keys sets the keys' size, padding and life.
type Keys struct {
	// Bits is the RSA modulus size: 2048 (default), 3072 or 4096.
	Bits int `toml:"bits"`
	// Paddings are the schemes clients may encrypt with, each probed at
	// start-up: oaep-sha256, oaep-sha256-mgf1-sha1, oaep-sha1, pkcs1v15.
	// The first applies when a decrypt names none; listing more than one
	// needs decrypt.allow_client_padding. Default ["oaep-sha256"].
	Paddings []string `toml:"paddings"`
	// Layout says where the salt sits in the plaintext: password-salt
	// (default), salt-password, password|salt or none (no salt check).
	Layout string `toml:"layout"`
	// TTL is how long an issued key waits for its decrypt (default 10m).
	TTL time.Duration `toml:"ttl"`
	// Retention is how long records of finished keys are kept (default
	// 720h).
	Retention time.Duration `toml:"retention"`
	// ReapInterval is how often expired keys are destroyed (default 5s).
	ReapInterval time.Duration `toml:"reap_interval"`
}

// Pool sets the pool of pre-generated keys.
type Pool struct {
	// Size is how many keys are kept ready (default 64).
	Size int `toml:"size"`
	// Generators is how many keys are generated at once (default 2).
	Generators int `toml:"generators"`
	// ApplyWait is how long an apply waits for a key when the pool is
	// empty before it fails with a retryable error (default 2s).
	ApplyWait time.Duration `toml:"apply_wait"`
}

// Store sets the record store.
type Store struct {
	// Path is the bbolt file (default data/keyissuer.db).
	Path string `toml:"path"`
	// CommitDelay is how long a write waits for others to share its
	// commit (default 0: none; writes that arrive during a commit share the
	// next one anyway).
	CommitDelay time.Duration `toml:"commit_delay"`
}

// API sets the public HTTP listener (applyPublicKey).
type API struct {
	// Listen is host:port (default 127.0.0.1:8080).
	Listen string `toml:"listen"`
	// MaxBodyBytes caps a request body (default 4096).
	MaxBodyBytes int64 `toml:"max_body_bytes"`
	// Timeouts of the HTTP server (defaults 5s, 10s, 60s).
	ReadTimeout  time.Duration `toml:"read_timeout"`
	WriteTimeout time.Duration `toml:"write_timeout"`
	IdleTimeout  time.Duration `toml:"idle_timeout"`

	// Request signatures and the blocklist (access.go).
	//
	// AllowUnsigned accepts requests without a Signature header, as from
	// an anonymous caller, or as from the registered client their
	// Client-Id names. For local development only: anyone who reaches
	// api.listen can then apply. A request that carries a Signature is
	// always verified. Default false.
	AllowUnsigned bool `toml:"allow_unsigned"`
	// ClockSkew is how far a signed request's Request-Time may be from
	// the daemon's clock, either way (default 5m).
	ClockSkew time.Duration `toml:"clock_skew"`
	// SigningKeyLabel is the CKA_LABEL of the RSA key pair in the token
	// that signs every response; it must exist at start-up (create it
	// with `keyissuer signing-key -create`). Empty (the default) leaves
	// responses unsigned, which the wallet SDKs reject.
	SigningKeyLabel string `toml:"signing_key_label"`
	// SigningKeyVersion is the keyVersion of response signatures
	// (default 1).
	SigningKeyVersion int `toml:"signing_key_version"`
	// BlocklistFile lists blocked customerIds, one per line ('#' starts a
	// comment); their applies get USER_STATUS_ABNORMAL. It is read at
	// start-up and again within BlocklistPoll (default 5s) of every
	// change, without a restart. Empty (the default): no blocklist.
	BlocklistFile string        `toml:"blocklist_file"`
	BlocklistPoll time.Duration `toml:"blocklist_poll"`

	// HTTPS (tls.go).
	//
	// TLSCertFile and TLSKeyFile, both or neither, turn HTTPS on for
	// Listen: the certificate in PEM (the server's first, then any
	// intermediates) and its private key in PEM. TLS 1.2 at least. SIGHUP
	// reads both again; a pair that does not load keeps the running one.
	TLSCertFile string `toml:"tls_cert_file"`
	TLSKeyFile  string `toml:"tls_key_file"`
	// TLSClientCAFile, with HTTPS, requires every client to present a
	// certificate that chains to one of the CA certificates in this PEM
	// file (mutual TLS); without one the handshake fails. Read at
	// start-up only.
	TLSClientCAFile string `toml:"tls_client_ca_file"`
}

// Decrypt sets the local decrypt socket.
type Decrypt struct {
	// Socket is the Unix socket path (default run/decrypt.sock).
	Socket string `toml:"socket"`
	// Mode is the socket file's permission bits, octal (default "0600").
	Mode string `toml:"mode"`

	// Access control (decrypt.go).
	//
	// Group is the socket file's group, a name or a numeric gid (default:
	// the daemon's group). With mode "0660" its members can connect.
	Group string `toml:"group"`
	// AllowedUIDs and AllowedGIDs say whose processes may call: each
	// connection's peer, as the kernel reports it (SO_PEERCRED), must
	// have one of the uids, or one of the gids as its effective or a
	// supplementary group. The daemon's own user and root are always
	// allowed; with both lists empty (the default) nobody else is.
	AllowedUIDs []uint32 `toml:"allowed_uids"`
	AllowedGIDs []uint32 `toml:"allowed_gids"`
	// AllowClientPadding lets a decrypt request name its padding, one of
	// keys.paddings (default false: the first of keys.paddings applies).
	AllowClientPadding bool `toml:"allow_client_padding"`
}

// Log sets logging.
type Log struct {
	// Level is debug, info (default), warn or error.
	Level string `toml:"level"`
	// Format is text, json, or auto (default: text on a terminal, JSON
	// otherwise).
	Format string `toml:"format"`
}

// DefaultModule is SoftHSM2's module on Debian and Ubuntu.
const DefaultModule = "/usr/lib/softhsm/libsofthsm2.so"

// Load reads, defaults and validates the file at path.
func Load(path string) (Config, error) {
	var c Config
	md, err := toml.DecodeFile(path, &c)
	if err != nil {
		// The TOML library quotes the bad value; a PIN must not be shown.
		var pe toml.ParseError
		if errors.As(err, &pe) && pe.LastKey == "token.pin" {
			return Config{}, fmt.Errorf("failed to read config %s: line %d: token.pin: not a valid TOML string (value not shown); quote the PIN", path, pe.Position.Line)
		}
		return Config{}, fmt.Errorf("failed to read config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return Config{}, fmt.Errorf("config %s: unknown key(s): %s", path, strings.Join(keys, ", "))
	}
	c.SetDefaults()
	c.resolve(filepath.Dir(path))
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// SetDefaults fills every unset field with its default.
func (c *Config) SetDefaults() {
	str := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	dur := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	num := func(p *int, v int) {
		if *p == 0 {
			*p = v
		}
	}
	str(&c.Token.Module, DefaultModule)
	str(&c.Token.Storage, string(hsm.StorageSession))
	str(&c.Token.LabelPrefix, "keyissuer:")
	num(&c.Token.Sessions, 8)
	dur(&c.Token.HalfMadeGrace, time.Minute)
	num(&c.Keys.Bits, 2048)
	c.setDecryptDefaults()
	dur(&c.Keys.TTL, 10*time.Minute)
	dur(&c.Keys.Retention, 30*24*time.Hour)
	dur(&c.Keys.ReapInterval, 5*time.Second)
	num(&c.Pool.Size, 64)
	num(&c.Pool.Generators, 2)
	dur(&c.Pool.ApplyWait, 2*time.Second)
	str(&c.Store.Path, "data/keyissuer.db")
	str(&c.API.Listen, "127.0.0.1:8080")
	if c.API.MaxBodyBytes == 0 {
		c.API.MaxBodyBytes = 4096
	}
	dur(&c.API.ReadTimeout, 5*time.Second)
	dur(&c.API.WriteTimeout, 10*time.Second)
	dur(&c.API.IdleTimeout, 60*time.Second)
	str(&c.Decrypt.Socket, "run/decrypt.sock")
	str(&c.Decrypt.Mode, "0600")
	str(&c.Log.Level, "info")
	str(&c.Log.Format, "auto")
	c.setAccessDefaults()
	c.setOpsDefaults()
}

// resolve makes relative paths relative to dir, the config file's folder.
func (c *Config) resolve(dir string) {
	for _, p := range []*string{&c.Token.PINFile, &c.Store.Path, &c.Decrypt.Socket} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(dir, *p)
		}
	}
	// A bare library name is left to the dynamic loader's search path.
	if m := c.Token.Module; strings.Contains(m, "/") && !filepath.IsAbs(m) {
		c.Token.Module = filepath.Join(dir, m)
	}
	c.resolveAccess(dir)
	c.resolveOps(dir)
	c.resolveTLS(dir)
}

// Validate checks every field and names the first bad one.
func (c *Config) Validate() error {
	t := c.Token
	var pins int
	for _, set := range []bool{t.PINEnv != "", t.PINFile != "", t.PIN != ""} {
		if set {
			pins++
		}
	}
	bad := func(field string, format string, args ...any) error {
		return fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...))
	}
	switch {
	case (t.Label == "") == (t.Serial == ""):
		return bad("token.label", "set exactly one of token.label and token.serial")
	case pins != 1:
		return bad("token.pin_env/pin_file/pin", "set exactly one of token.pin_env, token.pin_file and token.pin")
	case t.PIN != "" && !t.AllowPlainPIN:
		return bad("token.pin", "a PIN in the config file is refused; use pin_env or pin_file (or set allow_plain_pin = true for a throw-away token)")
	case t.Storage != string(hsm.StorageSession) && t.Storage != string(hsm.StorageToken):
		return bad("token.storage", "%q is not session or token", t.Storage)
	case t.LabelPrefix == "" || len(t.LabelPrefix) > 32:
		return bad("token.label_prefix", "must be 1 to 32 characters")
	case c.Pool.Generators < 1 || c.Pool.Generators > 64:
		return bad("pool.generators", "%d is not between 1 and 64", c.Pool.Generators)
	case t.Sessions < c.Pool.Generators+1:
		return bad("token.sessions", "%d is too few: need at least pool.generators + 1 = %d", t.Sessions, c.Pool.Generators+1)
	case t.Sessions > 256:
		return bad("token.sessions", "%d is more than 256", t.Sessions)
	}
	if err := hsm.CheckLabelPrefix(t.LabelPrefix); err != nil {
		return bad("token.label_prefix", "%v", err)
	}
	if err := c.validateDecrypt(); err != nil {
		return err
	}
	switch c.Keys.Bits {
	case 2048, 3072, 4096:
	default:
		return bad("keys.bits", "%d is not 2048, 3072 or 4096", c.Keys.Bits)
	}
	durs := []struct {
		field    string
		v, least time.Duration
	}{
		{"token.half_made_grace", c.Token.HalfMadeGrace, time.Millisecond},
		{"keys.ttl", c.Keys.TTL, 10 * time.Second},
		{"keys.retention", c.Keys.Retention, time.Minute},
		{"keys.reap_interval", c.Keys.ReapInterval, 100 * time.Millisecond},
		{"pool.apply_wait", c.Pool.ApplyWait, time.Millisecond},
		{"store.commit_delay", c.Store.CommitDelay, 0},
		{"api.read_timeout", c.API.ReadTimeout, 100 * time.Millisecond},
		{"api.write_timeout", c.API.WriteTimeout, 100 * time.Millisecond},
		{"api.idle_timeout", c.API.IdleTimeout, 100 * time.Millisecond},
	}
	for _, d := range durs {
		if d.v < d.least {
			return bad(d.field, "%s is below the minimum %s (write durations as strings such as \"10m\")", d.v, d.least)
		}
	}
	switch {
	case c.Pool.Size < 1 || c.Pool.Size > 100000:
		return bad("pool.size", "%d is not between 1 and 100000", c.Pool.Size)
	case c.API.MaxBodyBytes < 64 || c.API.MaxBodyBytes > 1<<20:
		return bad("api.max_body_bytes", "%d is not between 64 and 1048576", c.API.MaxBodyBytes)
	}
	if _, port, err := net.SplitHostPort(c.API.Listen); err != nil {
		return bad("api.listen", "%q is not host:port", c.API.Listen)
	} else if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && port != "0") {
		return bad("api.listen", "%q: the port must be a number from 0 to 65535", c.API.Listen)
	}
	if err := c.validateOps(); err != nil {
		return err
	}
	if err := c.validateTLS(); err != nil {
		return err
	}
	if _, err := c.SocketMode(); err != nil {
		return bad("decrypt.mode", "%v", err)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return bad("log.level", "%q is not debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "auto", "text", "json":
	default:
		return bad("log.format", "%q is not auto, text or json", c.Log.Format)
	}
	return c.validateAccess()
}

// SocketMode parses Decrypt.Mode.
func (c *Config) SocketMode() (os.FileMode, error) {
	m, err := strconv.ParseUint(c.Decrypt.Mode, 8, 32)
	if err != nil || m > 0o777 {
		return 0, fmt.Errorf("%q is not an octal file mode such as \"0600\"", c.Decrypt.Mode)
	}
	if m&0o600 != 0o600 {
		return 0, fmt.Errorf("%q must let the owner read and write", c.Decrypt.Mode)
	}
	if m&0o007 != 0 {
		return 0, fmt.Errorf("%q gives access to every user; use group permissions", c.Decrypt.Mode)
	}
	return os.FileMode(m), nil
}

// ReadPIN returns the user PIN from where the config says it is. Errors
// never contain the PIN.
func (t Token) ReadPIN() (string, error) {
	var pin string
	switch {
	case t.PINEnv != "":
		v, ok := os.LookupEnv(t.PINEnv)
		if !ok {
			return "", fmt.Errorf("token.pin_env: environment variable %s is not set", t.PINEnv)
		}
		pin = v
	case t.PINFile != "":
		// One open: the mode checked is the mode of the file read.
		f, err := os.Open(t.PINFile)
		if err != nil {
			return "", fmt.Errorf("token.pin_file: %w", err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return "", fmt.Errorf("token.pin_file: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return "", fmt.Errorf("token.pin_file: %s is readable by others (mode %04o); chmod 600 it", t.PINFile, fi.Mode().Perm())
		}
		b, err := io.ReadAll(io.LimitReader(f, 4096))
		if err != nil {
			return "", fmt.Errorf("token.pin_file: %w", err)
		}
		pin = string(b)
	default:
		pin = t.PIN
	}
	pin = strings.TrimSpace(pin)
	if pin == "" {
		return "", errors.New("token: the PIN is empty")
	}
	return pin, nil
}
