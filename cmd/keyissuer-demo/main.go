// Command keyissuer-demo is a merchant checkout page that takes a wallet
// password end to end through keyissuerd: it plays the merchant (package
// merchant: the page and its backend) and the wallet (package wallet: the
// password-decrypt service), against a keyissuerd it does not start.
// `make demo` runs both; open http://127.0.0.1:8090/.
//
// Usage:
//
//	keyissuer-demo setup [-config config.example.toml] [-dir .demo] [-out config.demo.toml]
//	keyissuer-demo [-listen 127.0.0.1:8090] [-api URL] [-ca FILE] [-socket PATH]
//	               [-server-key FILE] [-client-id ID] [-merchant-key FILE] [-password PW]
//
// setup makes the demo merchant's key (a development fixture, in -dir) and
// writes keyissuerd's config for the demo: -config with the merchant
// registered as a [[clients]] entry.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/keyissuer/keyissuer/cmd/keyissuer-demo/merchant"
	"github.com/keyissuer/keyissuer/cmd/keyissuer-demo/wallet"
	"github.com/keyissuer/keyissuer/server/apisig"
	"github.com/keyissuer/keyissuer/server/decryptclient"
)

// DemoClientID is the demo merchant's Client-Id in keyissuerd's config.
const DemoClientID = "DEMO_MERCHANT"

// walletPath is where the demo mounts the wallet's password check.
const walletPath = "/wallet/verify"

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	var err error
	if len(os.Args) > 1 && os.Args[1] == "setup" {
		err = setup(os.Args[2:])
	} else {
		err = serve(log, os.Args[1:])
	}
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "keyissuer-demo:", err)
		os.Exit(1)
	}
}

// Options are the demo's settings.
type Options struct {
	APIURL      string
	CAFile      string // trust for an https APIURL; empty: the system's
	Socket      string
	ServerKey   *rsa.PublicKey
	ClientID    string
	MerchantKey *rsa.PrivateKey
	Password    string
	Log         *slog.Logger
}

func serve(log *slog.Logger, args []string) error {
	fs := flag.NewFlagSet("keyissuer-demo", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8090", "`host:port` of the checkout page")
	api := fs.String("api", "http://127.0.0.1:8080/ams/api/v1/customer/applyPublicKey", "keyissuerd's applyPublicKey `URL`")
	ca := fs.String("ca", "", "the CA `file` (PEM) an https -api is trusted with, e.g. .dev-tls/ca.pem")
	socket := fs.String("socket", "run/decrypt.sock", "keyissuerd's decrypt `socket`")
	serverKey := fs.String("server-key", ".softhsm/response-signing.pub", "keyissuerd's response-signing public key (`file`, PEM)")
	clientID := fs.String("client-id", DemoClientID, "the merchant's Client-Id")
	merchantKey := fs.String("merchant-key", ".demo/merchant.pem", "the merchant's private key (`file`, PEM), from keyissuer-demo setup")
	password := fs.String("password", "correct horse", "the demo buyer's wallet `password`")
	if err := fs.Parse(args); err != nil {
		return err
	}
	o := Options{APIURL: *api, CAFile: *ca, Socket: *socket, ClientID: *clientID, Password: *password, Log: log}
	var err error
	if o.ServerKey, err = apisig.ReadPublicKey(*serverKey); err != nil {
		return fmt.Errorf("-server-key: %w (make softhsm writes it; `keyissuer signing-key -config FILE` prints it)", err)
	}
	if o.MerchantKey, err = apisig.ReadPrivateKey(*merchantKey); err != nil {
		return fmt.Errorf("-merchant-key: %w (keyissuer-demo setup makes it)", err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	h, err := NewHandler(ln.Addr().String(), o)
	if err != nil {
		ln.Close()
		return err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 60 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Info("checkout page: open http://"+ln.Addr().String()+"/", "keyissuerd", o.APIURL, "decrypt_socket", o.Socket,
		"wallet_password", "the -password flag (default: correct horse)")
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// NewHandler wires the merchant and the wallet for a demo served at addr:
// the merchant at /, the wallet's password check at /wallet/verify, which
// the merchant's backend calls over HTTP as it would call a real wallet.
func NewHandler(addr string, o Options) (http.Handler, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	hash, err := wallet.HashPassword(o.Password)
	if err != nil {
		return nil, err
	}
	client := &http.Client{Timeout: 30 * time.Second}
	if o.CAFile != "" {
		b, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("-ca: %s holds no PEM certificate", o.CAFile)
		}
		client.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	}
	mux := http.NewServeMux()
	mux.Handle(walletPath, wallet.New(wallet.Config{
		Decrypter:    decryptclient.New(o.Socket),
		PasswordHash: hash,
		Log:          o.Log.With("party", "wallet"),
	}))
	mux.Handle("/", merchant.New(merchant.Config{
		APIURL:     o.APIURL,
		ClientID:   o.ClientID,
		Key:        o.MerchantKey,
		KeyVersion: 1,
		ServerKey:  o.ServerKey,
		CustomerID: "2188000123456789",
		HTTP:       client,
		WalletURL:  "http://" + addr + walletPath,
		Log:        o.Log.With("party", "merchant"),
	}))
	return mux, nil
}

// setup makes the demo merchant's key, once, and writes keyissuerd's demo
// config: the base config with the merchant registered.
func setup(args []string) error {
	fs := flag.NewFlagSet("keyissuer-demo setup", flag.ContinueOnError)
	base := fs.String("config", "config.example.toml", "keyissuerd's base config `file`")
	dir := fs.String("dir", ".demo", "where the merchant's key goes (`directory`)")
	out := fs.String("out", "config.demo.toml", "the demo config to write (`file`, beside -config: its relative paths are kept)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	keyFile := filepath.Join(*dir, "merchant.pem")
	key, err := apisig.ReadPrivateKey(keyFile)
	if errors.Is(err, os.ErrNotExist) {
		key, err = WriteMerchantKey(keyFile)
	}
	if err != nil {
		return err
	}
	cfg, err := os.ReadFile(*base)
	if err != nil {
		return err
	}
	cfg, err = RegisterMerchant(cfg, DemoClientID, &key.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(*out, cfg, 0o600); err != nil {
		return err
	}
	fmt.Printf("demo merchant %s: key %s (development fixture), registered in %s\n", DemoClientID, keyFile, *out)
	return nil
}

// WriteMerchantKey makes a 2048-bit RSA key and writes it to path (mode
// 0600, PKCS #8 PEM), marked as a development fixture.
func WriteMerchantKey(path string) (*rsa.PrivateKey, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	b := []byte("# DEVELOPMENT FIXTURE: the keyissuer demo merchant's signing key, made by\n" +
		"# `keyissuer-demo setup` (make demo). Never register it anywhere but a demo.\n")
	b = append(b, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})...)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return nil, err
	}
	return key, nil
}

// RegisterMerchant appends a [[clients]] entry for clientID with pub as its
// keyVersion 1 to a keyissuerd config.
func RegisterMerchant(cfg []byte, clientID string, pub *rsa.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	entry := fmt.Sprintf("\n# Added by keyissuer-demo setup: the demo merchant (a development fixture).\n"+
		"[[clients]]\nid = %q\n[clients.public_keys]\n1 = \"\"\"\n%s\"\"\"\n",
		clientID, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	return append(cfg, entry...), nil
}
