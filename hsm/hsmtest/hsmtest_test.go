package hsmtest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"
)

func TestMain(m *testing.M) { Main(m) }

func TestNewToken(t *testing.T) {
	var (
		mu   sync.Mutex
		toks []Token
	)
	t.Run("create", func(t *testing.T) {
		for i := range 3 {
			t.Run(fmt.Sprint(i), func(t *testing.T) {
				t.Parallel()
				tok := NewToken(t)
				mu.Lock()
				toks = append(toks, tok)
				mu.Unlock()
			})
		}
	})
	if t.Failed() {
		t.FailNow()
	}

	p := initModule(t, Module())
	slots := slotsByLabel(t, p)
	for i, tok := range toks {
		if tok.Module != Module() {
			t.Errorf("Module = %q, want %q", tok.Module, Module())
		}
		slot, ok := slots[tok.Label]
		if !ok {
			t.Errorf("token %q not found; tokens: %v", tok.Label, slots)
			continue
		}
		other := toks[(i+1)%len(toks)]
		tests := []struct {
			name    string
			user    uint
			pin     string
			wantErr error
		}{
			{"user", pkcs11.CKU_USER, tok.PIN, nil},
			{"so", pkcs11.CKU_SO, tok.SOPIN, nil},
			{"other token's PIN", pkcs11.CKU_USER, other.PIN, pkcs11.Error(pkcs11.CKR_PIN_INCORRECT)},
		}
		for _, tt := range tests {
			t.Run(tok.Label+"/"+tt.name, func(t *testing.T) {
				sh, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
				if err != nil {
					t.Fatalf("OpenSession: %v", err)
				}
				defer p.CloseSession(sh)
				err = p.Login(sh, tt.user, tt.pin)
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Login = %v, want %v", err, tt.wantErr)
				}
				if err == nil {
					if err := p.Logout(sh); err != nil {
						t.Errorf("Logout: %v", err)
					}
				}
			})
		}
	}
}

// TestNewTokenAfterInitialize pins down the SoftHSM behaviour the package
// documentation describes: a token created after C_Initialize is invisible
// until C_Finalize and C_Initialize again, and NewToken says so.
func TestNewTokenAfterInitialize(t *testing.T) {
	NewToken(t) // SoftHSM must be there, and the directory not empty
	p := initModule(t, Module())
	before := len(slotsByLabel(t, p))

	ft := &fatalTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		NewToken(ft)
	}()
	<-done
	if !strings.Contains(ft.msg, "created after the PKCS#11 module was initialised") {
		t.Fatalf("NewToken after C_Initialize: fatal message %q, want one about C_Initialize", ft.msg)
	}
	if got := len(slotsByLabel(t, p)); got != before {
		t.Errorf("with the module initialised: %d tokens, want still %d", got, before)
	}

	if err := p.Finalize(); err != nil {
		t.Fatalf("Finalize: %v", err)
	}
	if err := p.Initialize(); err != nil {
		t.Fatalf("Initialize: %v", err)
	}
	if got := len(slotsByLabel(t, p)); got != before+1 {
		t.Errorf("after C_Finalize and C_Initialize: %d tokens, want %d", got, before+1)
	}
}

func TestMoveTokenDir(t *testing.T) {
	NewToken(t) // the directory exists
	dir := filepath.Join(filepath.Dir(os.Getenv("SOFTHSM2_CONF")), "tokens")
	restore := MoveTokenDir(t)
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("token directory after MoveTokenDir: %v, want it gone", err)
	}
	restore()
	restore() // a second call, and the Cleanup's, do nothing
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("token directory after restore: %v", err)
	}
}

// BenchmarkNewToken measures how long softhsm2-util takes to make a token.
func BenchmarkNewToken(b *testing.B) {
	for b.Loop() {
		NewToken(b)
	}
}

// initModule loads and initialises the module, and finalises it at the end
// of the test.
func initModule(t *testing.T, path string) *pkcs11.Ctx {
	t.Helper()
	p := pkcs11.New(path)
	if p == nil {
		t.Fatalf("failed to load %s", path)
	}
	if err := p.Initialize(); err != nil {
		p.Destroy()
		t.Fatalf("Initialize: %v", err)
	}
	t.Cleanup(func() {
		p.Finalize()
		p.Destroy()
	})
	return p
}

// slotsByLabel maps the labels of the initialised tokens to their slots.
func slotsByLabel(t *testing.T, p *pkcs11.Ctx) map[string]uint {
	t.Helper()
	slots, err := p.GetSlotList(true)
	if err != nil {
		t.Fatalf("GetSlotList: %v", err)
	}
	m := map[string]uint{}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil {
			t.Fatalf("GetTokenInfo(%d): %v", s, err)
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 {
			m[strings.TrimSpace(ti.Label)] = s
		}
	}
	return m
}

// fatalTB records a fatal failure instead of failing the test.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Helper() {}

func (f *fatalTB) Fatal(args ...any) {
	f.msg = fmt.Sprint(args...)
	runtime.Goexit()
}

func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// TestOpenCryptoki: the soft token is set up (idempotently: a second
// binary finds it ready) and a user logs in with the fixture PIN.
func TestOpenCryptoki(t *testing.T) {
	tok := OpenCryptokiToken(t)
	if tok.Kind != OpenCryptoki || tok.Prefix == "" {
		t.Fatalf("token %+v: want kind opencryptoki and a prefix", tok)
	}
	// Set-up again, as another test binary would.
	again, skip, err := setupOpenCryptoki()
	if err != nil || skip != "" || again.Label != tok.Label {
		t.Fatalf("second set-up = %+v, %q, %v", again, skip, err)
	}
	p := initModule(t, tok.Module)
	slots := slotsByLabel(t, p)
	slot, ok := slots[tok.Label]
	if !ok {
		t.Fatalf("token %q not found; tokens: %v", tok.Label, slots)
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer p.CloseSession(s)
	if err := p.Login(s, pkcs11.CKU_USER, tok.PIN); err != nil {
		t.Fatalf("Login: %v", err)
	}
	p.Logout(s)
}
