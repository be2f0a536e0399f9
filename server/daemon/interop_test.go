package daemon_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/issuer"
	"github.com/keyissuer/keyissuer/server/decryptclient"
)

// Interop: ciphertexts made by real clients on this machine (the openssl
// CLI, Node's crypto module and WebCrypto, and Java's JCE when a JDK is
// installed) from public keys a real daemon issued, decrypted over its
// socket by the Go client. One daemon per plaintext layout.

// clientCase is one client setting and the padding keyissuer must take it
// as: the padding matrix of the README.
type clientCase struct {
	tool    string // openssl, node or java
	scheme  string // the client's own name for its setting
	padding hsm.Padding
}

var (
	opensslCases = []clientCase{
		{"openssl", "rsa_padding_mode:oaep", hsm.OAEPSHA1}, // OAEP's defaults: SHA-1, MGF1-SHA-1
		{"openssl", "rsa_padding_mode:oaep rsa_oaep_md:sha256", hsm.OAEPSHA256},
		{"openssl", "rsa_padding_mode:oaep rsa_oaep_md:sha256 rsa_mgf1_md:sha1", hsm.OAEPSHA256MGF1SHA1},
		{"openssl", "", hsm.PKCS1v15}, // pkeyutl -encrypt's default
	}
	nodeCases = []clientCase{
		{"node", "publicEncrypt-default", hsm.OAEPSHA1},
		{"node", "publicEncrypt-oaepHash-sha256", hsm.OAEPSHA256},
		{"node", "publicEncrypt-RSA_PKCS1_PADDING", hsm.PKCS1v15},
		{"node", "webcrypto-RSA-OAEP-SHA-256", hsm.OAEPSHA256},
		{"node", "webcrypto-RSA-OAEP-SHA-1", hsm.OAEPSHA1},
	}
	// Java's transformations with SunJCE's default parameters, and the
	// explicit OAEPParameterSpec that matches WebCrypto.
	javaCases = []clientCase{
		{"java", "RSA/ECB/OAEPWithSHA-256AndMGF1Padding", hsm.OAEPSHA256MGF1SHA1},
		{"java", "RSA/ECB/OAEPWithSHA-1AndMGF1Padding", hsm.OAEPSHA1},
		{"java", "RSA/ECB/OAEPPadding", hsm.OAEPSHA1},
		{"java", "RSA/ECB/OAEPPadding+SHA-256", hsm.OAEPSHA256},
		{"java", "RSA/ECB/PKCS1Padding", hsm.PKCS1v15},
	}
)

// needTool returns the path of a client program the interop test needs.
// Missing, the test skips, except in CI (CI=true), where .ci/run installs
// it and a skip would hide a gap.
func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, missing := lookTool(t, name, pkg)
	if p == "" {
		t.Skip(missing)
	}
	return p
}

// optionalTool returns the path of a client program that some cases need,
// or "" and a log line without it. In CI (CI=true) it is required.
func optionalTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, missing := lookTool(t, name, pkg)
	if p == "" {
		t.Log(missing + ": its cases do not run")
	}
	return p
}

// lookTool finds a client program, or says why not; in CI a missing one
// fails the test.
func lookTool(t *testing.T, name, pkg string) (path, missing string) {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p, ""
	}
	missing = fmt.Sprintf("%s not found (Debian package %s): %v", name, pkg, err)
	if os.Getenv("CI") == "true" {
		t.Fatal(missing + "; .ci/run should have installed it")
	}
	return "", missing
}

// TestInteropClients runs on each token: openCryptoki does natively the
// OAEP-SHA-256 schemes that SoftHSM does raw, and pkcs1v15 the other way
// round. The layouts, decoded by the issuer whatever the token, run on
// SoftHSM only.
func TestInteropClients(t *testing.T) { hsmtest.ForEach(t, testInteropClients) }

func testInteropClients(t *testing.T, tok hsmtest.Token) {
	openssl := needTool(t, "openssl", "openssl")
	node := needTool(t, "node", "nodejs")
	// Without a JDK a developer's machine runs the other cases; CI
	// (.ci/run installs default-jdk-headless) runs them all. Encrypt.java
	// runs as a source file, which takes a JDK's compiler, not only java.
	java := optionalTool(t, "java", "default-jdk-headless")
	if java != "" && optionalTool(t, "javac", "default-jdk-headless") == "" {
		java = ""
	}
	const password = "pässwörd|42 ☃"
	layouts := issuer.Layouts()
	if tok.Kind != hsmtest.SoftHSM {
		layouts = []issuer.Layout{issuer.LayoutPasswordSalt}
	}
	for _, layout := range layouts {
		t.Run(string(layout), func(t *testing.T) {
			c := start(t, decryptConfigOn(t, tok,
				fmt.Sprintf(`paddings = ["oaep-sha256", "oaep-sha1", "oaep-sha256-mgf1-sha1", "pkcs1v15"]`+"\nlayout = %q", layout),
				`allow_client_padding = true`))
			cases := append(append([]clientCase{}, opensslCases...), nodeCases...)
			if java != "" && layout == issuer.LayoutPasswordSalt {
				cases = append(cases, javaCases...) // one layout is enough for a JVM's start-up
			}
			// A key for each case, and the plaintext for it.
			keys := make([]publicKeyInfo, len(cases))
			pts := make([][]byte, len(cases))
			for i := range cases {
				keys[i] = c.apply("")
				pts[i] = issuer.Layout(layout).Plaintext([]byte(password), keys[i].Salt)
			}
			cts := make([][]byte, len(cases))
			var nodeIn, javaIn bytes.Buffer
			for i, cc := range cases {
				line := fmt.Sprintf("%s %s %s\n", cc.scheme, keys[i].PublicKey, base64.StdEncoding.EncodeToString(pts[i]))
				switch cc.tool {
				case "openssl":
					cts[i] = opensslEncrypt(t, openssl, keys[i], cc.scheme, pts[i])
				case "node":
					nodeIn.WriteString(line)
				case "java":
					javaIn.WriteString(line)
				}
			}
			nodeOut := runClient(t, &nodeIn, node, "testdata/interop/encrypt.js")
			var javaOut map[string][]byte
			if javaIn.Len() > 0 {
				javaOut = runClient(t, &javaIn, java, "testdata/interop/Encrypt.java")
			}
			for i, cc := range cases {
				switch cc.tool {
				case "node":
					cts[i] = nodeOut[cc.scheme]
				case "java":
					cts[i] = javaOut[cc.scheme]
				}
			}

			client := decryptclient.New(c.socket)
			for i, cc := range cases {
				name := cc.tool + " " + cc.scheme
				if cc.scheme == "" {
					name = cc.tool + " default"
				}
				if len(cts[i]) != 256 {
					t.Errorf("%s: ciphertext of %d bytes", name, len(cts[i]))
					continue
				}
				got, err := client.DecryptWithPadding(context.Background(), keys[i].UniqueID, cts[i], string(cc.padding))
				if err != nil || string(got) != password {
					t.Errorf("%s as %s: got %q, %v; want the password", name, cc.padding, got, err)
					continue
				}
				t.Logf("%-8s %-58s -> %s", cc.tool, cc.scheme, cc.padding)
			}
		})
	}
}

// opensslEncrypt runs `openssl pkeyutl -encrypt` with each of the
// space-separated -pkeyopt settings in opts.
func opensslEncrypt(t *testing.T, openssl string, k publicKeyInfo, opts string, pt []byte) []byte {
	t.Helper()
	dir := t.TempDir()
	var pem bytes.Buffer
	pem.WriteString("-----BEGIN PUBLIC KEY-----\n")
	for s := k.PublicKey; s != ""; {
		n := min(64, len(s))
		pem.WriteString(s[:n] + "\n")
		s = s[n:]
	}
	pem.WriteString("-----END PUBLIC KEY-----\n")
	keyFile := filepath.Join(dir, "key.pem")
	if err := os.WriteFile(keyFile, pem.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"pkeyutl", "-encrypt", "-pubin", "-inkey", keyFile}
	for _, o := range strings.Fields(opts) {
		args = append(args, "-pkeyopt", o)
	}
	cmd := exec.Command(openssl, args...)
	cmd.Stdin = bytes.NewReader(pt)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	ct, err := cmd.Output()
	if err != nil {
		t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return ct
}

// runClient runs a client program on in's lines and returns its
// ciphertexts by scheme.
func runClient(t *testing.T, in *bytes.Buffer, prog, script string) map[string][]byte {
	t.Helper()
	if in.Len() == 0 {
		return nil
	}
	cmd := exec.Command(prog, script)
	cmd.Stdin = in
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", prog, script, err, stderr.String())
	}
	cts := map[string][]byte{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		scheme, b64, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			t.Fatalf("%s: bad output line %q", script, sc.Text())
		}
		ct, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			t.Fatalf("%s: %s: %v", script, scheme, err)
		}
		cts[scheme] = ct
	}
	return cts
}
