package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// The checkout demo in a real browser: headless Chromium drives the page
// of keyissuer-demo's handler, whose merchant applies at a real keyissuerd
// on a SoftHSM token and whose wallet decrypts over its socket.

func TestMain(m *testing.M) { hsmtest.Main(m) }

// artifactsEnv names a directory for the screenshots; without it they go
// to a temporary directory the test logs.
const artifactsEnv = "KEYISSUER_TEST_ARTIFACTS"

// needChromium returns Debian's chromium, skipping without it on a
// developer's machine and failing under CI=true, where .ci/run installs it.
func needChromium(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/usr/bin/chromium", "chromium"} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	msg := "chromium not found (Debian package chromium)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + "; .ci/run should have installed it")
	}
	t.Skip(msg)
	return ""
}

// startKeyissuerd runs keyissuerd in this process on the shared SoftHSM
// token, with a response-signing key and merchant registered, and returns
// its applyPublicKey URL, decrypt socket and response-signing public key.
func startKeyissuerd(t *testing.T, merchant *rsa.PublicKey) (apiURL, socket string, signing *rsa.PublicKey) {
	t.Helper()
	tok := hsmtest.Shared(t)
	const signingLabel = "demo-response-signing"
	ht, err := hsm.Open(context.Background(), hsm.Config{Module: tok.Module, TokenLabel: tok.Label, PIN: tok.PIN,
		LabelPrefix: "demo-signing:", Sessions: 2})
	if err != nil {
		t.Fatal(err)
	}
	s, _, err := ht.CreateSigningKey(context.Background(), signingLabel, 2048)
	ht.Close()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "kid") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.WriteFile(filepath.Join(dir, "pin"), []byte(tok.PIN), 0o600)
	cfgText := fmt.Sprintf(`
[token]
module = %q
label = %q
pin_file = "pin"
label_prefix = "demo:"
sessions = 4
[pool]
size = 3
generators = 1
apply_wait = "60s"
[api]
listen = "127.0.0.1:0"
write_timeout = "90s"
signing_key_label = %q
[admin]
listen = "127.0.0.1:0"
[log]
level = "warn"
`, tok.Module, tok.Label, signingLabel)
	b, err := RegisterMerchant([]byte(cfgText), DemoClientID, merchant)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "config.toml")
	os.WriteFile(path, b, 0o600)
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, cfg, daemon.Options{Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("keyissuerd: %v", err)
		}
	})
	return "http://" + d.APIAddr() + publicapi.ApplyPath, cfg.Decrypt.Socket, s.Public()
}

// TestCheckoutInBrowser: the right password ends in "verified", a wrong
// one in "wrong password", and the replayed ciphertext in "key already
// used"; the console stays free of errors; each outcome is a screenshot.
func TestCheckoutInBrowser(t *testing.T) {
	chromium := needChromium(t)
	merchantKey, err := rsa.GenerateKey(rand.Reader, 2048) // a test fixture
	if err != nil {
		t.Fatal(err)
	}
	apiURL, socket, signing := startKeyissuerd(t, &merchantKey.PublicKey)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h, err := NewHandler(ln.Addr().String(), Options{APIURL: apiURL, Socket: socket, ServerKey: signing,
		ClientID: DemoClientID, MerchantKey: merchantKey, Password: "correct horse"})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	pageURL := "http://" + ln.Addr().String() + "/"

	artifacts := os.Getenv(artifactsEnv)
	if artifacts == "" {
		artifacts = t.TempDir()
	} else if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshots in %s (set %s to keep them elsewhere)", artifacts, artifactsEnv)

	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.WindowSize(720, 760),
		chromedp.UserDataDir(t.TempDir()),
	)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(allocCtx)
	defer cancel()

	// Every console message, exception and browser log entry of the page.
	var (
		mu       sync.Mutex
		messages []chromedp.ConsoleMessage
	)
	console := chromedp.Console(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		for m, err := range console {
			if err != nil {
				return
			}
			mu.Lock()
			messages = append(messages, m)
			mu.Unlock()
		}
	})
	defer func() { cancel(); wg.Wait() }()

	// Each step is bounded, so that a page that never finishes fails with
	// the step's name rather than hanging the test.
	run := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, scancel := context.WithTimeout(ctx, 2*time.Minute)
		defer scancel()
		if err := chromedp.Do(sctx, steps...); err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				status, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById("status").innerText`))
				t.Fatalf("%s: gave up after 2 minutes; #status reads:\n%s", what, status)
			}
			t.Fatalf("%s: %v", what, err)
		}
	}
	// outcome submits with the action given and returns the outcome the
	// page settles on and #status's text.
	outcome := func(what string, submit chromedp.Action[chromedp.Void]) (string, string) {
		t.Helper()
		run(what,
			js(`delete document.getElementById("status").dataset.outcome`),
			submit,
			chromedp.WaitVisible(chromedp.CSS(`#status[data-outcome] li.final`)),
		)
		got, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById("status").dataset.outcome`))
		if err != nil {
			t.Fatal(err)
		}
		text, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(`#status`)))
		if err != nil {
			t.Fatal(err)
		}
		shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(artifacts, "checkout-"+strings.ReplaceAll(what, " ", "-")+".png")
		if err := os.WriteFile(file, shot, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %s; #status:\n%s", what, got, text)
		return got, text
	}
	typePassword := func(pw string) chromedp.Action[chromedp.Void] {
		return chromedp.Steps(js(`document.getElementById("password").value = ""`), chromedp.SendKeys(chromedp.CSS(`#password`), pw))
	}

	run("load the page", chromedp.Navigate(pageURL), chromedp.WaitVisible(chromedp.CSS(`#pay`)))
	if got, text := outcome("right password", chromedp.Steps(typePassword("correct horse"), chromedp.Click(chromedp.CSS(`#pay`)))); got != "verified" || !strings.Contains(text, "verified") {
		t.Errorf("right password: outcome %q, want verified", got)
	}
	if got, text := outcome("wrong password", chromedp.Steps(typePassword("battery staple"), chromedp.Click(chromedp.CSS(`#pay`)))); got != "wrong_password" || !strings.Contains(text, "wrong password") {
		t.Errorf("wrong password: outcome %q, want wrong_password", got)
	}
	if got, text := outcome("replay", chromedp.Click(chromedp.CSS(`#replay`))); got != "key_already_used" || !strings.Contains(text, "key already used") {
		t.Errorf("replay: outcome %q, want key_already_used", got)
	}

	cancel()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	for _, m := range messages {
		if m.Type == chromedp.ConsoleError || m.IsException() {
			t.Errorf("console: %s (%s:%d)", m, m.URL, m.Line)
		}
	}
}

// js runs a JavaScript statement in the page, its value ignored.
func js(statement string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		_, err := chromedp.Evaluate[any](statement)(ctx, t)
		return err
	})
}
