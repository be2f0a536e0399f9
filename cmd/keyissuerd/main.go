// Command keyissuerd is the keyissuer daemon: it issues one-time RSA public
// keys over HTTP and performs each key's single decrypt for the local
// password-decrypt service, with every private key inside a PKCS#11 token.
//
// Usage:
//
//	keyissuerd -config config.toml
//	keyissuerd -version
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
)

func main() {
	configPath := flag.String("config", "config.toml", "configuration `file`")
	version := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *version {
		fmt.Println("keyissuerd", Version())
		return
	}
	if err := run(*configPath); err != nil {
		fmt.Fprintln(os.Stderr, "keyissuerd:", err)
		os.Exit(1)
	}
}

func run(configPath string) error {
	cfg, err := config.Load(configPath)
	if err != nil {
		return err
	}
	level := new(slog.LevelVar)
	log, console := NewLogger(cfg.Log, level)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// SIGHUP reloads the config file's reloadable parts and reopens the
	// audit trail; the daemon refuses an invalid file and keeps running.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	log.Info("starting keyissuerd", "version", Version(), "config", configPath)
	d, err := daemon.New(ctx, cfg, daemon.Options{Log: log,
		LogLevel: level, ConfigPath: configPath, ReloadSignal: hup, Console: console})
	if err != nil {
		return err
	}
	err = d.Run(ctx)
	log.Info("stopped")
	return err
}

// NewLogger logs text on a terminal and JSON otherwise, at the configured
// level, which it sets in level for reloads to change. On a terminal it
// also returns the console the log shares with the warm-up progress line.
func NewLogger(c config.Log, level *slog.LevelVar) (*slog.Logger, *daemon.Console) {
	var l slog.Level
	l.UnmarshalText([]byte(c.Level)) // validated by config
	level.Set(l)
	opts := &slog.HandlerOptions{Level: level}
	fi, err := os.Stderr.Stat()
	tty := err == nil && fi.Mode()&os.ModeCharDevice != 0
	text := c.Format == "text" || (c.Format == "auto" && tty)
	var console *daemon.Console
	var w io.Writer = os.Stderr
	if tty {
		console = daemon.NewConsole(os.Stderr)
		w = console
	}
	if text {
		return slog.New(slog.NewTextHandler(w, opts)), console
	}
	return slog.New(slog.NewJSONHandler(w, opts)), console
}

// Version is the module version, or the VCS revision of a local build.
func Version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 && (v == "" || v == "(devel)") {
			v = s.Value[:12]
		}
	}
	return v
}
