package config_test

import (
	"bufio"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/config"
)

const examplePath = "../../config.example.toml"

// writeConfig writes body as a config file in dir and returns its path.
func writeConfig(tb testing.TB, dir, body string) string {
	tb.Helper()
	p := filepath.Join(dir, "keyissuer.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		tb.Fatal(err)
	}
	return p
}

func TestLoadExample(t *testing.T) {
	c, err := config.Load(examplePath)
	if err != nil {
		t.Fatalf("Load(%s): %v", examplePath, err)
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	abs := func(p string) string {
		t.Helper()
		a, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"token.module", c.Token.Module, config.DefaultModule},
		{"token.label", c.Token.Label, "keyissuer-dev"},
		{"token.serial", c.Token.Serial, ""},
		{"token.pin_file", abs(c.Token.PINFile), filepath.Join(root, ".softhsm/user.pin")},
		{"token.pin_env", c.Token.PINEnv, ""},
		{"token.pin", c.Token.PIN, ""},
		{"token.allow_plain_pin", c.Token.AllowPlainPIN, false},
		{"token.storage", c.Token.Storage, "session"},
		{"token.label_prefix", c.Token.LabelPrefix, "keyissuer:"},
		{"token.sessions", c.Token.Sessions, 8},
		{"keys.bits", c.Keys.Bits, 2048},
		{"keys.paddings", strings.Join(c.Keys.Paddings, ","), "oaep-sha256"},
		{"keys.layout", c.Keys.Layout, "password-salt"},
		{"keys.ttl", c.Keys.TTL, 10 * time.Minute},
		{"keys.retention", c.Keys.Retention, 720 * time.Hour},
		{"keys.reap_interval", c.Keys.ReapInterval, 5 * time.Second},
		{"pool.size", c.Pool.Size, 64},
		{"pool.generators", c.Pool.Generators, 2},
		{"pool.apply_wait", c.Pool.ApplyWait, 2 * time.Second},
		{"store.path", abs(c.Store.Path), filepath.Join(root, "data/keyissuer.db")},
		{"store.commit_delay", c.Store.CommitDelay, time.Duration(0)},
		{"api.listen", c.API.Listen, "127.0.0.1:8080"},
		{"api.max_body_bytes", c.API.MaxBodyBytes, int64(4096)},
		{"api.read_timeout", c.API.ReadTimeout, 5 * time.Second},
		{"api.write_timeout", c.API.WriteTimeout, 10 * time.Second},
		{"api.idle_timeout", c.API.IdleTimeout, 60 * time.Second},
		{"decrypt.socket", abs(c.Decrypt.Socket), filepath.Join(root, "run/decrypt.sock")},
		{"decrypt.mode", c.Decrypt.Mode, "0600"},
		{"decrypt.group", c.Decrypt.Group, ""},
		{"decrypt.allowed_uids", len(c.Decrypt.AllowedUIDs), 0},
		{"decrypt.allowed_gids", len(c.Decrypt.AllowedGIDs), 0},
		{"decrypt.allow_client_padding", c.Decrypt.AllowClientPadding, false},
		{"log.level", c.Log.Level, "info"},
		{"log.format", c.Log.Format, "auto"},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
	if m, err := c.SocketMode(); err != nil || m != 0o600 {
		t.Errorf("SocketMode() = %v, %v; want 0600", m, err)
	}
}

// TestExampleShowsDefaults checks the example's claim that it shows every
// key with its default: a minimal file loads to the same configuration.
func TestExampleShowsDefaults(t *testing.T) {
	example, err := config.Load(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	minimal, err := config.Load(writeConfig(t, dir, "[token]\nlabel = \"keyissuer-dev\"\npin_file = \".softhsm/user.pin\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	// The example turns on what local development needs.
	if !example.API.AllowUnsigned || example.API.SigningKeyLabel == "" {
		t.Errorf("the example has allow_unsigned %v, signing_key_label %q; want true and the dev token's key",
			example.API.AllowUnsigned, example.API.SigningKeyLabel)
	}
	example.API.AllowUnsigned, example.API.SigningKeyLabel = false, ""
	// The paths differ by the file's folder only.
	for _, p := range []struct{ ex, min *string }{
		{&example.Token.PINFile, &minimal.Token.PINFile},
		{&example.Store.Path, &minimal.Store.Path},
		{&example.Decrypt.Socket, &minimal.Decrypt.Socket},
		{&example.Audit.Path, &minimal.Audit.Path},
	} {
		rel, err := filepath.Rel(dir, *p.min)
		if err != nil || !strings.HasSuffix(filepath.ToSlash(*p.ex), "/"+filepath.ToSlash(rel)) {
			t.Errorf("path %q in the example, %q by default", *p.ex, *p.min)
		}
		*p.ex, *p.min = "", ""
	}
	if !reflect.DeepEqual(example, minimal) {
		t.Errorf("the example differs from the defaults:\nexample  %+v\ndefaults %+v", example, minimal)
	}
}

var (
	sectionRE = regexp.MustCompile(`^\[([a-z_]+)\]\s*$`)
	// arrayRE matches an array of tables or a sub-table, live or commented
	// out ("# [[clients]]", "# [clients.public_keys]").
	arrayRE = regexp.MustCompile(`^(#\s*)?(\[\[([a-z_]+)\]\]|\[([a-z_]+\.[a-z_]+)\])\s*$`)
	// keyRE matches a key line, live or commented out ("# pin = ...").
	keyRE = regexp.MustCompile(`^(#\s*)?([a-z_]+)\s*=`)
)

// TestExampleDocumentsEveryKey checks that config.example.toml mentions
// every key of Config, live or commented out, in its section, and that
// every live key has a comment in its paragraph before it.
func TestExampleDocumentsEveryKey(t *testing.T) {
	f, err := os.Open(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mentioned := map[string]bool{}
	var section string
	commented := false // a comment precedes, in this paragraph
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if m := sectionRE.FindStringSubmatch(line); m != nil {
			section, commented = m[1], false
			continue
		}
		if m := arrayRE.FindStringSubmatch(line); m != nil {
			section = m[3] + m[4]
			mentioned[section] = true
			continue
		}
		if line == "" {
			commented = false
			continue
		}
		m := keyRE.FindStringSubmatch(line)
		if m == nil {
			if strings.HasPrefix(line, "#") {
				commented = true
			}
			continue
		}
		key := section + "." + m[2]
		mentioned[key] = true
		if m[1] == "" && !commented {
			t.Errorf("line %d: key %s has no comment before it", n, key)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	for _, key := range configKeys(reflect.TypeFor[config.Config](), "") {
		if !mentioned[key] {
			t.Errorf("key %s is not in %s", key, examplePath)
		}
	}
}

// configKeys lists the dotted TOML keys of the struct type typ.
func configKeys(typ reflect.Type, prefix string) []string {
	var keys []string
	for f := range typ.Fields() {
		name := f.Tag.Get("toml")
		if name == "" || name == "-" {
			continue
		}
		if f.Type.Kind() == reflect.Struct {
			keys = append(keys, configKeys(f.Type, prefix+name+".")...)
			continue
		}
		if f.Type.Kind() == reflect.Slice && f.Type.Elem().Kind() == reflect.Struct {
			keys = append(keys, configKeys(f.Type.Elem(), prefix+name+".")...) // [[name]]
			continue
		}
		keys = append(keys, prefix+name)
	}
	return keys
}

// base is the smallest valid config; the tables add to it. TOML lets a
// table's keys come after other tables, so "[token]\n..." additions work.
const base = `[token]
label = "t"
pin_env = "KEYISSUER_TEST_PIN"
`

func TestLoad(t *testing.T) {
	tests := []struct {
		name  string
		body  string
		check func(testing.TB, config.Config)
	}{
		{
			name: "minimal",
			body: base,
			check: func(tb testing.TB, c config.Config) {
				if c.Token.Label != "t" || c.Token.PINEnv != "KEYISSUER_TEST_PIN" || c.Token.Storage != "session" {
					tb.Errorf("token = %+v", c.Token)
				}
			},
		},
		{
			name: "serial instead of label",
			body: "[token]\nserial = \"0123456789abcdef\"\npin_env = \"X\"\n",
			check: func(tb testing.TB, c config.Config) {
				if c.Token.Serial != "0123456789abcdef" || c.Token.Label != "" {
					tb.Errorf("token = %+v", c.Token)
				}
			},
		},
		{
			name: "plain PIN allowed",
			body: "[token]\nlabel = \"t\"\npin = \"1234\"\nallow_plain_pin = true\n",
			check: func(tb testing.TB, c config.Config) {
				if pin, err := c.Token.ReadPIN(); err != nil || pin != "1234" {
					tb.Errorf("ReadPIN() = %q, %v; want 1234", pin, err)
				}
			},
		},
		{
			name: "token storage",
			body: base + "storage = \"token\"\n",
			check: func(tb testing.TB, c config.Config) {
				if c.Token.Storage != "token" {
					tb.Errorf("storage = %q", c.Token.Storage)
				}
			},
		},
		{
			// 0 is the zero value, so it cannot be told from absent: an
			// explicit generators = 0 means the default, 2.
			name: "explicit pool.generators 0 means the default",
			body: base + "[pool]\ngenerators = 0\n",
			check: func(tb testing.TB, c config.Config) {
				if c.Pool.Generators != 2 {
					tb.Errorf("pool.generators = %d, want the default 2", c.Pool.Generators)
				}
			},
		},
		{
			name: "sessions exactly generators + 1",
			body: base + "sessions = 5\n[pool]\ngenerators = 4\n",
			check: func(tb testing.TB, c config.Config) {
				if c.Token.Sessions != 5 || c.Pool.Generators != 4 {
					tb.Errorf("sessions %d, generators %d", c.Token.Sessions, c.Pool.Generators)
				}
			},
		},
		{
			name: "every key size and padding",
			body: base + "[keys]\nbits = 4096\npaddings = [\"oaep-sha256-mgf1-sha1\"]\nttl = \"10s\"\n",
			check: func(tb testing.TB, c config.Config) {
				if c.Keys.Bits != 4096 || len(c.Keys.Paddings) != 1 || c.Keys.Paddings[0] != "oaep-sha256-mgf1-sha1" || c.Keys.TTL != 10*time.Second {
					tb.Errorf("keys = %+v", c.Keys)
				}
			},
		},
		{
			name: "group-readable socket",
			body: base + "[decrypt]\nmode = \"0660\"\n",
			check: func(tb testing.TB, c config.Config) {
				if m, err := c.SocketMode(); err != nil || m != 0o660 {
					tb.Errorf("SocketMode() = %v, %v; want 0660", m, err)
				}
			},
		},
		{
			name: "absolute paths kept",
			body: "[token]\nlabel = \"t\"\npin_file = \"/etc/keyissuer/pin\"\n[store]\npath = \"/var/lib/k.db\"\n[decrypt]\nsocket = \"/run/k.sock\"\n",
			check: func(tb testing.TB, c config.Config) {
				if c.Token.PINFile != "/etc/keyissuer/pin" || c.Store.Path != "/var/lib/k.db" || c.Decrypt.Socket != "/run/k.sock" {
					tb.Errorf("paths %q %q %q", c.Token.PINFile, c.Store.Path, c.Decrypt.Socket)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := config.Load(writeConfig(t, t.TempDir(), tt.body))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if err := c.Validate(); err != nil {
				t.Errorf("Validate after Load: %v", err)
			}
			tt.check(t, c)
		})
	}
}

func TestLoadRelativePaths(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "etc", "keyissuer")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load(writeConfig(t, dir, `[token]
label = "t"
pin_file = "secrets/user.pin"
[store]
path = "../data/k.db"
[decrypt]
socket = "d.sock"
`))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, got, want string }{
		{"token.pin_file", c.Token.PINFile, filepath.Join(dir, "secrets/user.pin")},
		{"store.path", c.Store.Path, filepath.Join(dir, "../data/k.db")},
		{"decrypt.socket", c.Decrypt.Socket, filepath.Join(dir, "d.sock")},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %q, want %q", tt.name, tt.got, tt.want)
		}
	}

	// The defaults are relative too.
	c, err = config.Load(writeConfig(t, dir, base))
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "data/keyissuer.db"); c.Store.Path != want {
		t.Errorf("default store.path = %q, want %q", c.Store.Path, want)
	}
	if want := filepath.Join(dir, "run/decrypt.sock"); c.Decrypt.Socket != want {
		t.Errorf("default decrypt.socket = %q, want %q", c.Decrypt.Socket, want)
	}
}

const plainPIN = "s3cretPIN"

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		wantErr string // the field the error must name
	}{
		{"unknown key in a table", base + "[api]\nlisen = \"127.0.0.1:8080\"\n", "api.lisen"},
		{"unknown top-level key", "lisen = 1\n" + base, "lisen"},
		{"unknown table", base + "[apis]\nlisten = \"x:1\"\n", "apis.listen"},
		{"not TOML", "[token\nlabel = \"t\"\n", "toml"},
		{"wrong type", base + "[keys]\nbits = \"2048\"\n", "keys.bits"},
		{"label and serial", base + "serial = \"0123\"\n", "token.label"},
		{"neither label nor serial", "[token]\npin_env = \"X\"\n", "token.label"},
		{"no PIN source", "[token]\nlabel = \"t\"\n", "token.pin"},
		{"two PIN sources", base + "pin_file = \"pin\"\n", "token.pin"},
		{"three PIN sources", base + "pin_file = \"pin\"\npin = \"" + plainPIN + "\"\nallow_plain_pin = true\n", "token.pin"},
		{"plain PIN without allow_plain_pin", "[token]\nlabel = \"t\"\npin = \"" + plainPIN + "\"\n", "token.pin"},
		{"plain PIN with allow_plain_pin false", "[token]\nlabel = \"t\"\npin = \"" + plainPIN + "\"\nallow_plain_pin = false\n", "token.pin"},
		{"storage disk", base + "storage = \"disk\"\n", "token.storage"},
		{"empty label_prefix is the default, 33 characters is too long", base + "label_prefix = \"" + strings.Repeat("p", 33) + "\"\n", "token.label_prefix"},
		{"label_prefix without the ':' delimiter", base + "label_prefix = \"keyissuer\"\n", "token.label_prefix"},
		{"label_prefix with a space", base + "label_prefix = \"key issuer:\"\n", "token.label_prefix"},
		{"sessions below generators + 1", base + "sessions = 4\n[pool]\ngenerators = 4\n", "token.sessions"},
		{"sessions below the default generators + 1", base + "sessions = 2\n", "token.sessions"},
		{"too many sessions", base + "sessions = 257\n", "token.sessions"},
		{"bits 1024", base + "[keys]\nbits = 1024\n", "keys.bits"},
		{"padding oaep-md5", base + "[keys]\npaddings = [\"oaep-md5\"]\n", "keys.paddings"},
		{"the old keys.padding", base + "[keys]\npadding = \"oaep-sha256\"\n", "keys.padding"},
		{"ttl 1s", base + "[keys]\nttl = \"1s\"\n", "keys.ttl"},
		// TOML integers are nanoseconds for a time.Duration: 600ns.
		{"ttl as integer 600", base + "[keys]\nttl = 600\n", "keys.ttl"},
		{"ttl negative", base + "[keys]\nttl = \"-10m\"\n", "keys.ttl"},
		{"ttl not a duration", base + "[keys]\nttl = \"ten minutes\"\n", "keys.ttl"},
		{"retention too short", base + "[keys]\nretention = \"1s\"\n", "keys.retention"},
		{"reap_interval too short", base + "[keys]\nreap_interval = \"1ms\"\n", "keys.reap_interval"},
		{"pool.size negative", base + "[pool]\nsize = -1\n", "pool.size"},
		{"pool.size too large", base + "[pool]\nsize = 100001\n", "pool.size"},
		{"pool.generators negative", base + "[pool]\ngenerators = -1\n", "pool.generators"},
		{"pool.apply_wait negative", base + "[pool]\napply_wait = \"-1s\"\n", "pool.apply_wait"},
		{"store.commit_delay negative", base + "[store]\ncommit_delay = \"-1ms\"\n", "store.commit_delay"},
		{"api.listen without host", base + "[api]\nlisten = \"8080\"\n", "api.listen"},
		{"api.max_body_bytes too small", base + "[api]\nmax_body_bytes = 10\n", "api.max_body_bytes"},
		{"api.read_timeout too short", base + "[api]\nread_timeout = \"1ms\"\n", "api.read_timeout"},
		{"decrypt.mode 0666", base + "[decrypt]\nmode = \"0666\"\n", "decrypt.mode"},
		{"decrypt.mode 0644", base + "[decrypt]\nmode = \"0644\"\n", "decrypt.mode"},
		{"decrypt.mode 0400", base + "[decrypt]\nmode = \"0400\"\n", "decrypt.mode"},
		{"decrypt.mode abc", base + "[decrypt]\nmode = \"abc\"\n", "decrypt.mode"},
		{"decrypt.mode beyond 0777", base + "[decrypt]\nmode = \"01600\"\n", "decrypt.mode"},
		{"decrypt.mode as integer", base + "[decrypt]\nmode = 600\n", "decrypt.mode"},
		{"log.level", base + "[log]\nlevel = \"verbose\"\n", "log.level"},
		{"log.format", base + "[log]\nformat = \"xml\"\n", "log.format"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeConfig(t, t.TempDir(), tt.body)
			c, err := config.Load(p)
			if err == nil {
				t.Fatalf("Load accepted:\n%s\nas %+v", tt.body, c)
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.wantErr) {
				t.Errorf("error %q does not name %s", msg, tt.wantErr)
			}
			if !strings.Contains(msg, p) {
				t.Errorf("error %q does not name the file", msg)
			}
			if strings.Contains(msg, plainPIN) {
				t.Errorf("error %q contains the PIN", msg)
			}
			if !reflect.DeepEqual(c, config.Config{}) {
				t.Errorf("Load returned %+v with its error", c)
			}
		})
	}
}

// TestLoadErrorsHidePlainPIN writes PINs that are not valid TOML strings,
// as someone who forgot the quotes would; the error must name token.pin
// without printing the PIN.
func TestLoadErrorsHidePlainPIN(t *testing.T) {
	tests := []struct {
		name string
		pin  string // as written, unquoted
	}{
		{"leading zeroes", "0071234"},
		{"out of range", "98765432109876543210"},
		{"date-like", "1986-0704"},
		{"underscores", "9_87__6"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := "[token]\nlabel = \"t\"\nallow_plain_pin = true\npin = " + tt.pin + "\n"
			_, err := config.Load(writeConfig(t, t.TempDir(), body))
			if err == nil {
				t.Fatal("Load accepted an unquoted PIN")
			}
			if !strings.Contains(err.Error(), "token.pin") {
				t.Errorf("error %q does not name token.pin", err)
			}
			if strings.Contains(err.Error(), tt.pin) {
				t.Errorf("error %q contains the PIN", err)
			}
		})
	}
}

func TestReadPIN(t *testing.T) {
	const pin = "pin-7f3a9c"
	dir := t.TempDir()
	writePIN := func(name, content string, mode os.FileMode) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // exactly mode, whatever the umask
			t.Fatal(err)
		}
		return p
	}
	t.Setenv("KEYISSUER_TEST_PIN", pin)
	t.Setenv("KEYISSUER_TEST_PIN_PADDED", " \t"+pin+"\n")
	t.Setenv("KEYISSUER_TEST_PIN_EMPTY", "")
	t.Setenv("KEYISSUER_TEST_PIN_BLANK", " \n ")
	t.Setenv("KEYISSUER_TEST_PIN_UNSET", "x")
	os.Unsetenv("KEYISSUER_TEST_PIN_UNSET") // t.Setenv restores it after the test

	tests := []struct {
		name    string
		token   config.Token
		want    string
		wantErr string
	}{
		{name: "env", token: config.Token{PINEnv: "KEYISSUER_TEST_PIN"}, want: pin},
		{name: "env with whitespace", token: config.Token{PINEnv: "KEYISSUER_TEST_PIN_PADDED"}, want: pin},
		{name: "env unset", token: config.Token{PINEnv: "KEYISSUER_TEST_PIN_UNSET"}, wantErr: "KEYISSUER_TEST_PIN_UNSET"},
		{name: "env empty", token: config.Token{PINEnv: "KEYISSUER_TEST_PIN_EMPTY"}, wantErr: "empty"},
		{name: "env blank", token: config.Token{PINEnv: "KEYISSUER_TEST_PIN_BLANK"}, wantErr: "empty"},
		{name: "file 0600 with newline", token: config.Token{PINFile: writePIN("a.pin", pin+"\n", 0o600)}, want: pin},
		{name: "file 0400 with CRLF", token: config.Token{PINFile: writePIN("b.pin", pin+"\r\n", 0o400)}, want: pin},
		{name: "file 0644 refused", token: config.Token{PINFile: writePIN("c.pin", pin+"\n", 0o644)}, wantErr: "token.pin_file"},
		{name: "file 0640 refused", token: config.Token{PINFile: writePIN("d.pin", pin, 0o640)}, wantErr: "token.pin_file"},
		{name: "file 0604 refused", token: config.Token{PINFile: writePIN("e.pin", pin, 0o604)}, wantErr: "token.pin_file"},
		{name: "file empty", token: config.Token{PINFile: writePIN("f.pin", "", 0o600)}, wantErr: "empty"},
		{name: "file blank", token: config.Token{PINFile: writePIN("g.pin", "\n\n", 0o600)}, wantErr: "empty"},
		{name: "file missing", token: config.Token{PINFile: filepath.Join(dir, "missing.pin")}, wantErr: "token.pin_file"},
		{name: "file is a directory", token: config.Token{PINFile: dir}, wantErr: "token.pin_file"},
		{name: "plain", token: config.Token{PIN: pin, AllowPlainPIN: true}, want: pin},
		{name: "none", token: config.Token{}, wantErr: "empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.token.ReadPIN()
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("ReadPIN() = %q, want an error", got)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q does not contain %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), pin) {
					t.Errorf("error %q contains the PIN", err)
				}
				if got != "" {
					t.Errorf("ReadPIN returned %q with its error", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("ReadPIN: %v", err)
			}
			if got != tt.want {
				t.Errorf("ReadPIN() = %q, want %q", got, tt.want)
			}
		})
	}
}

// FuzzLoad writes arbitrary bytes as a config file and loads it: Load never
// panics, and what it accepts is valid and has absolute paths.
func FuzzLoad(f *testing.F) {
	f.Add([]byte(base))
	if b, err := os.ReadFile(examplePath); err == nil {
		f.Add(b)
	}
	// One file, rewritten: a fuzz worker runs its inputs one at a time.
	p := filepath.Join(f.TempDir(), "keyissuer.toml")
	f.Fuzz(func(t *testing.T, body []byte) {
		if err := os.WriteFile(p, body, 0o600); err != nil {
			t.Fatal(err)
		}
		c, err := config.Load(p)
		if err != nil {
			if !reflect.DeepEqual(c, config.Config{}) {
				t.Fatalf("Load returned %+v with its error %v", c, err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Load accepted a config that Validate rejects: %v", err)
		}
		if _, err := c.SocketMode(); err != nil {
			t.Fatalf("Load accepted a bad socket mode: %v", err)
		}
		for _, path := range []string{c.Store.Path, c.Decrypt.Socket} {
			if !filepath.IsAbs(path) {
				t.Fatalf("path %q is not absolute", path)
			}
		}
		if c.Token.PINFile != "" && !filepath.IsAbs(c.Token.PINFile) {
			t.Fatalf("pin_file %q is not absolute", c.Token.PINFile)
		}
	})
}
