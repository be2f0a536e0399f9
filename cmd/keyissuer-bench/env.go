package main

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/keyissuer/keyissuer/server/config"
)

// machine describes where the benchmark ran.
type machine struct {
	Cores          int    `json:"cores"`
	CPUModel       string `json:"cpuModel"`
	MemoryMiB      int    `json:"memoryMiB"`
	Kernel         string `json:"kernel"`
	GoVersion      string `json:"goVersion"`
	SoftHSMVersion string `json:"softhsmVersion"`
	LoadBefore     string `json:"loadBefore"` // /proc/loadavg when the run started
	LoadAfter      string `json:"loadAfter"`
}

func describeMachine() machine {
	m := machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version(), CPUModel: "unknown"}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				kb, _ := strconv.Atoi(f[1])
				m.MemoryMiB = kb / 1024
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("softhsm2-util", "--version").Output(); err == nil {
		m.SoftHSMVersion = strings.TrimSpace(string(out))
	}
	m.LoadBefore = loadavg()
	return m
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// softHSM is a fresh SoftHSM2 token in a private directory: its own
// configuration, found through SOFTHSM2_CONF, which the benchmark sets for
// itself and for every keyissuerd it starts. It never touches the
// development token in .softhsm/ nor /var/lib/softhsm.
type softHSM struct {
	Module  string
	Conf    string
	Label   string
	PIN     string
	PINFile string
}

func newSoftHSM(dir string) (*softHSM, error) {
	module := os.Getenv("SOFTHSM2_MODULE")
	if module == "" {
		module = config.DefaultModule
	}
	if _, err := os.Stat(module); err != nil {
		return nil, fmt.Errorf("SoftHSM2 module: %w (install it with `apt-get install softhsm2`, or run ./softhsm-setup.sh as root)", err)
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return nil, err
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	text := "directories.tokendir = " + tokens + "\n" +
		"objectstore.backend = file\n" +
		"log.level = ERROR\n" +
		"slots.removable = false\n"
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		return nil, err
	}
	h := &softHSM{Module: module, Conf: conf, Label: "keyissuer-bench", PIN: rand.Text()}
	h.PINFile = filepath.Join(dir, "user.pin")
	if err := os.WriteFile(h.PINFile, []byte(h.PIN), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", h.Label,
		"--so-pin", rand.Text(), "--pin", h.PIN)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	// This process's own PKCS#11 calls (the raw baselines) must see the
	// same token; SoftHSM reads SOFTHSM2_CONF at C_Initialize.
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		return nil, err
	}
	return h, nil
}
