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
	log := NewLogger(cfg.Log)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log.Info("starting keyissuerd", "version", Version(), "config", configPath)
	d, err := daemon.New(ctx, cfg, daemon.Options{Log: log})
	if err != nil {
		return err
	}
	err = d.Run(ctx)
	log.Info("stopped")
	return err
}

// NewLogger logs text on a terminal and JSON otherwise, at the configured
// level.
func NewLogger(c config.Log) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(c.Level)) // validated by config
	opts := &slog.HandlerOptions{Level: level}
	text := c.Format == "text"
	if c.Format == "auto" {
		fi, err := os.Stderr.Stat()
		text = err == nil && fi.Mode()&os.ModeCharDevice != 0
	}
	if text {
		return slog.New(slog.NewTextHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, opts))
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
