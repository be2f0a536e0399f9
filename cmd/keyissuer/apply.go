package main

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/server/apisig"
	"github.com/keyissuer/keyissuer/server/config"
)

// applyCmd is `keyissuer apply`: a merchant's applyPublicKey, signed with
// the merchant's key when -client-id and -key are given, its answer
// checked against keyissuer's response-signing key when -server-key is.
func applyCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("keyissuer apply", flag.ContinueOnError)
	endpoint := fs.String("url", defaultURL, "the applyPublicKey endpoint")
	customerID := fs.String("customer-id", "", "customerId to send (optional)")
	clientID := fs.String("client-id", "", "the merchant's Client-Id")
	keyFile := fs.String("key", "", "the merchant's RSA private key (PEM `file`): sign the request")
	keyVersion := fs.Int("key-version", 1, "keyVersion of -key")
	serverKey := fs.String("server-key", "", "keyissuer's response-signing public key (PEM or base64 `file`, from `keyissuer signing-key`): verify the answer")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("apply: unexpected argument %q", fs.Arg(0))
	}
	var signer *rsa.PrivateKey
	switch {
	case *keyFile != "" && *clientID == "":
		return errors.New("apply: -key needs -client-id")
	case *keyFile != "":
		k, err := apisig.ReadPrivateKey(*keyFile)
		if err != nil {
			return fmt.Errorf("apply: -key: %w", err)
		}
		signer = k
	}
	var verifier *rsa.PublicKey
	if *serverKey != "" {
		var err error
		if verifier, err = readPublicKey("apply: -server-key", *serverKey); err != nil {
			return err
		}
	}
	u, err := url.Parse(*endpoint)
	if err != nil {
		return fmt.Errorf("apply: -url: %w", err)
	}

	body := []byte(`{}`)
	if *customerID != "" {
		body, _ = json.Marshal(map[string]string{"customerId": *customerID})
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json; charset=UTF-8")
	switch {
	case signer != nil:
		if err := apisig.SignRequest(req, *clientID, *keyVersion, signer, body, time.Now()); err != nil {
			return err
		}
	case *clientID != "":
		req.Header.Set(apisig.HeaderClientID, *clientID) // unsigned: only where the daemon allows it
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	unsignedRefusal := false
	switch {
	case verifier != nil && resp.Header.Get(apisig.HeaderSignature) == "":
		// keyissuer signs only the answers to requests that authenticated
		// (as the wallet SDKs, which check a signature only when there is
		// one): an unsigned answer is believed only as a refusal.
		unsignedRefusal = true
	case verifier != nil:
		// Checked before anything of the answer is believed.
		if err := apisig.VerifyResponse(resp.Header, u.EscapedPath(), raw, verifier); err != nil {
			return fmt.Errorf("apply: the answer's signature does not verify with -server-key (HTTP %d): %w", resp.StatusCode, err)
		}
	case resp.Header.Get(apisig.HeaderSignature) != "":
		fmt.Fprintln(stderr, "keyissuer: the answer is signed, but not checked: give -server-key")
	}
	var out struct {
		Result struct {
			ResultCode, ResultStatus, ResultMessage string
		} `json:"result"`
		PublicKeyInfo json.RawMessage `json:"publicKeyInfo"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return fmt.Errorf("apply: unexpected answer (HTTP %d): %w", resp.StatusCode, err)
	}
	if out.Result.ResultStatus != "S" {
		unsigned := ""
		if unsignedRefusal {
			unsigned = " (unsigned: the request did not authenticate)"
		}
		return fmt.Errorf("apply: %s/%s: %s%s", out.Result.ResultCode, out.Result.ResultStatus, out.Result.ResultMessage, unsigned)
	}
	if unsignedRefusal {
		return fmt.Errorf("apply: the answer says %s but is not signed: not believed", out.Result.ResultCode)
	}
	return printJSON(stdout, out.PublicKeyInfo)
}

// readPublicKey is [apisig.ReadPublicKey]; what names the flag in errors.
func readPublicKey(what, path string) (*rsa.PublicKey, error) {
	pub, err := apisig.ReadPublicKey(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return pub, nil
}

// signingKeyCmd is `keyissuer signing-key`: print, and with -create first
// make, the response-signing key pair in the token that keyissuerd's
// config names. Merchants configure its public key in their SDKs.
func signingKeyCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("keyissuer signing-key", flag.ContinueOnError)
	configPath := fs.String("config", "", "keyissuerd's configuration `file`: the token, its PIN and api.signing_key_label")
	module := fs.String("module", config.DefaultModule, "PKCS#11 module, without -config")
	tokenLabel := fs.String("token-label", "", "the token's label, without -config")
	pinFile := fs.String("pin-file", "", "a file holding the user PIN (mode 0600), without -config")
	label := fs.String("label", "", "the key pair's CKA_LABEL (default api.signing_key_label)")
	create := fs.Bool("create", false, "create the key pair if the token has none under the label")
	bits := fs.Int("bits", 2048, "modulus size of a created key: 2048, 3072 or 4096")
	b64 := fs.Bool("base64", false, "print the base64 of the DER SubjectPublicKeyInfo instead of PEM")
	if err := fs.Parse(args); err != nil {
		return err
	}
	tc := config.Token{Module: *module, Label: *tokenLabel, PINFile: *pinFile, LabelPrefix: "keyissuer:"}
	if *configPath != "" {
		cfg, err := config.Load(*configPath)
		if err != nil {
			return err
		}
		tc = cfg.Token
		if *label == "" {
			*label = cfg.API.SigningKeyLabel
		}
	} else if *tokenLabel == "" || *pinFile == "" {
		return errors.New("signing-key: give -config, or -token-label and -pin-file")
	}
	if *label == "" {
		return errors.New("signing-key: no label: set api.signing_key_label or give -label")
	}
	pin, err := tc.ReadPIN()
	if err != nil {
		return fmt.Errorf("signing-key: %w", err)
	}
	tok, err := hsm.Open(ctx, hsm.Config{
		Module: tc.Module, TokenLabel: tc.Label, TokenSerial: tc.Serial, PIN: pin,
		LabelPrefix: tc.LabelPrefix, Sessions: 2,
	})
	if err != nil {
		return fmt.Errorf("signing-key: %w", err)
	}
	defer tok.Close()
	var s *hsm.Signer
	if *create {
		var created bool
		if s, created, err = tok.CreateSigningKey(ctx, *label, *bits); err == nil && created {
			fmt.Fprintf(stderr, "keyissuer: created response-signing key %q in token %q\n", *label, tok.Info().Label)
		}
	} else if s, err = tok.Signer(ctx, *label); errors.Is(err, hsm.ErrNoSigningKey) {
		return fmt.Errorf("signing-key: token %q has no key pair labelled %q; make one with -create", tok.Info().Label, *label)
	}
	if err != nil {
		return fmt.Errorf("signing-key: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(s.Public())
	if err != nil {
		return err
	}
	if *b64 {
		_, err = fmt.Fprintln(stdout, base64.StdEncoding.EncodeToString(der))
		return err
	}
	return pem.Encode(stdout, &pem.Block{Type: "PUBLIC KEY", Bytes: der})
}
