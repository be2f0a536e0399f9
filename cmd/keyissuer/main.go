// Command keyissuer is the command-line client of keyissuerd: it applies for
// a key as a merchant would, encrypts a password as a merchant's page would,
// and decrypts or inspects a key over the local socket as the
// password-decrypt service would.
//
// Usage:
//
//	keyissuer apply   [-url URL] [-customer-id ID] [-client-id ID -key client.pem [-key-version N]] [-server-key FILE]
//	keyissuer signing-key (-config FILE | -token-label L -pin-file F) [-label L] [-create] [-base64]
//	keyissuer encrypt -public-key B64 -salt SALT [-padding P] [-layout L] < password
//	keyissuer decrypt [-socket PATH] -unique-id ID [-padding P] < ciphertext.b64
//	keyissuer key     [-socket PATH] -unique-id ID
//	keyissuer health  [-socket PATH]
//	keyissuer status  [-admin URL] [-json]
//	keyissuer audit verify [-key FILE] [-log FILE] FILE...
//	keyissuer dev-tls [-dir .dev-tls]
//	keyissuer version
package main

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/decryptclient"
	"github.com/keyissuer/keyissuer/server/devtls"
)

const usage = `keyissuer: the keyissuerd client

  keyissuer apply   [-url URL] [-customer-id ID] [-client-id ID -key client.pem [-key-version N]] [-server-key FILE]
                                                        apply for a public key (prints publicKeyInfo); with -key,
                                                        signed as the merchant; with -server-key, the answer verified
  keyissuer signing-key -config FILE [-create] [-base64]
                                                        keyissuerd's response-signing public key, for merchants;
                                                        -create makes the key pair in the token if it is missing
  keyissuer encrypt -public-key B64 -salt SALT [-padding P] [-layout L] < password
                                                        encrypt password and salt (prints base64)
  keyissuer decrypt [-socket PATH] -unique-id ID [-padding P] < ciphertext.b64
                                                        the key's one decrypt (prints the password);
                                                        -padding only if the daemon allows callers to choose
  keyissuer key     [-socket PATH] -unique-id ID        a key's state
  keyissuer health  [-socket PATH]                      the daemon's health
  keyissuer status  [-admin URL] [-json]                the daemon's status (admin listener)
  keyissuer audit verify [-key F] [-log F] FILE...      check the audit trail's chain and signed checkpoints (oldest file first)
  keyissuer dev-tls [-dir .dev-tls]                     a development CA and a server certificate for 127.0.0.1
                                                        and localhost (make dev-tls); never for production
  keyissuer version
`

const (
	defaultURL    = "http://127.0.0.1:8080/ams/api/v1/customer/applyPublicKey"
	defaultSocket = "run/decrypt.sock"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := run(ctx, os.Args[1], os.Args[2:], os.Stdin, os.Stdout)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "keyissuer:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cmd string, args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("keyissuer "+cmd, flag.ContinueOnError)
	socket := fs.String("socket", defaultSocket, "keyissuerd's decrypt socket")
	uniqueID := fs.String("unique-id", "", "the key's uniqueId")
	switch cmd {
	case "apply":
		return applyCmd(ctx, args, stdout, os.Stderr) // apply.go
	case "signing-key":
		return signingKeyCmd(ctx, args, stdout, os.Stderr)
	case "dev-tls":
		dir := fs.String("dir", ".dev-tls", "the `directory` to write ca.pem, ca.key, server.pem and server.key to")
		if err := fs.Parse(args); err != nil {
			return err
		}
		if err := devtls.WriteDev(*dir); err != nil {
			return fmt.Errorf("dev-tls: %w", err)
		}
		_, err := fmt.Fprintf(stdout, "development CA %s/ca.pem; server certificate %s/server.pem (key server.key) for %s\n",
			*dir, *dir, strings.Join(devtls.Hosts, ", "))
		return err
	case "encrypt":
		pub := fs.String("public-key", "", "publicKey from apply (base64 DER)")
		salt := fs.String("salt", "", "salt from apply")
		padding := fs.String("padding", string(hsm.OAEPSHA256), "padding: "+paddingNames())
		layout := fs.String("layout", string(issuer.LayoutPasswordSalt), "where the salt goes: "+layoutNames())
		if err := fs.Parse(args); err != nil {
			return err
		}
		return encrypt(*pub, *salt, *padding, *layout, stdin, stdout)
	case "decrypt":
		padding := fs.String("padding", "", "the ciphertext's padding, if the daemon lets callers choose (decrypt.allow_client_padding): "+paddingNames())
		if err := fs.Parse(args); err != nil {
			return err
		}
		if *uniqueID == "" {
			return errors.New("decrypt: -unique-id is required")
		}
		in, err := io.ReadAll(io.LimitReader(stdin, 64<<10))
		if err != nil {
			return err
		}
		ct, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(in)))
		if err != nil {
			return errors.New("decrypt: standard input is not base64")
		}
		pw, err := decryptclient.New(*socket).DecryptWithPadding(ctx, *uniqueID, ct, *padding)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s\n", pw)
		clear(pw)
		return err
	case "key":
		if err := fs.Parse(args); err != nil {
			return err
		}
		if *uniqueID == "" {
			return errors.New("key: -unique-id is required")
		}
		k, err := decryptclient.New(*socket).Key(ctx, *uniqueID)
		if err != nil {
			return err
		}
		return printJSON(stdout, k)
	case "health":
		if err := fs.Parse(args); err != nil {
			return err
		}
		h, err := decryptclient.New(*socket).Health(ctx)
		if h != nil {
			printJSON(stdout, h)
		}
		return err
	case "status":
		return status(ctx, args, stdout)
	case "audit":
		return auditCmd(args, stdout)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "keyissuer", version())
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf("unknown command %q\n\n%s", cmd, usage)
}

func encrypt(pubB64, salt, padding, layout string, stdin io.Reader, stdout io.Writer) error {
	l, err := issuer.ParseLayout(layout)
	if err != nil {
		return fmt.Errorf("encrypt: -layout: %w", err)
	}
	if pubB64 == "" || (salt == "" && l != issuer.LayoutNone) {
		return errors.New("encrypt: -public-key and -salt are required")
	}
	der, err := base64.StdEncoding.DecodeString(pubB64)
	if err != nil {
		return errors.New("encrypt: -public-key is not base64")
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return fmt.Errorf("encrypt: -public-key: %w", err)
	}
	rsaPub, ok := pub.(*rsa.PublicKey)
	if !ok {
		return errors.New("encrypt: -public-key is not an RSA key")
	}
	pw, err := io.ReadAll(io.LimitReader(stdin, 4096))
	if err != nil {
		return err
	}
	pw = bytes.TrimRight(pw, "\r\n")
	pt := l.Plaintext(pw, salt)
	clear(pw)
	ct, err := hsm.Encrypt(rsaPub, hsm.Padding(padding), pt)
	clear(pt)
	if err != nil {
		return fmt.Errorf("encrypt: %w", err)
	}
	_, err = fmt.Fprintln(stdout, base64.StdEncoding.EncodeToString(ct))
	return err
}

func paddingNames() string {
	var names []string
	for _, p := range hsm.Paddings() {
		names = append(names, string(p))
	}
	return strings.Join(names, ", ")
}

func layoutNames() string {
	var names []string
	for _, l := range issuer.Layouts() {
		names = append(names, string(l))
	}
	return strings.Join(names, ", ")
}

func printJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

func version() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		return bi.Main.Version
	}
	return "unknown"
}
