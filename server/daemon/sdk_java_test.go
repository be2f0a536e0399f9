package daemon_test

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyissuer/keyissuer/server/devtls"
	"github.com/keyissuer/keyissuer/server/publicapi"
)

// TestJavaSDKTransport applies over HTTPS as the wallet SDKs' Java
// transport does (testdata/sdk/SdkApply.java, compiled here): an
// HttpsURLConnection that trusts the test CA through a keytool trust
// store, the SDK's header layout and signing, on the production and the
// sandbox path, and the answer's signature checked as the SDK checks it.
func TestJavaSDKTransport(t *testing.T) {
	javac := needTool(t, "javac", "default-jdk-headless")
	keytool := needTool(t, "keytool", "default-jdk-headless")
	java := needTool(t, "java", "default-jdk-headless")
	path := signedSetup(t, "")
	ca := addTLS(t, path, "")
	c := start(t, path)

	dir := t.TempDir()
	runTool(t, javac, "-d", dir, "testdata/sdk/SdkApply.java")
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, devtls.CertPEM(ca.Cert), 0o644)
	trust := filepath.Join(dir, "trust.p12")
	runTool(t, keytool, "-importcert", "-noprompt", "-alias", "keyissuer-test-ca", "-file", caFile,
		"-keystore", trust, "-storetype", "PKCS12", "-storepass", "changeit")
	der, err := x509.MarshalPKCS8PrivateKey(merchantKey())
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "merchant.key.b64") // a test fixture, made for this run
	os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString(der)), 0o600)
	spki, err := x509.MarshalPKIXPublicKey(signingKey(t))
	if err != nil {
		t.Fatal(err)
	}
	pubFile := filepath.Join(dir, "keyissuer.pub.b64")
	os.WriteFile(pubFile, []byte(base64.StdEncoding.EncodeToString(spki)), 0o644)

	apply := func(trustStore, apiPath string) (string, error) {
		args := []string{"-cp", dir}
		if trustStore != "" {
			args = append(args, "-Djavax.net.ssl.trustStore="+trustStore, "-Djavax.net.ssl.trustStorePassword=changeit")
		}
		args = append(args, "SdkApply", strings.Replace(c.api, publicapi.ApplyPath, apiPath, 1), merchantID, keyFile, pubFile,
			`{"customerId":"2188000123456789"}`)
		out, err := exec.Command(java, args...).CombinedOutput()
		return string(out), err
	}
	for _, p := range []string{publicapi.ApplyPath, publicapi.SandboxApplyPath} {
		out, err := apply(trust, p)
		if err != nil {
			t.Errorf("%s: %v\n%s", p, err, out)
			continue
		}
		fields := strings.SplitN(strings.TrimSpace(out), " ", 3)
		var a applyAnswer
		if len(fields) != 3 || fields[0] != "verified" || json.Unmarshal([]byte(fields[2]), &a) != nil ||
			a.Result.ResultCode != "SUCCESS" || a.PublicKeyInfo == nil {
			t.Errorf("%s: %s", p, out)
			continue
		}
		t.Logf("%s: %s, uniqueId %s", p, fields[1], a.PublicKeyInfo.UniqueID)
	}
	// Without the CA in its trust store, the JVM refuses the server.
	if out, err := apply("", publicapi.ApplyPath); err == nil || !strings.Contains(out, "PKIX") {
		t.Errorf("without the test CA: %v\n%s; want a PKIX path error", err, out)
	}
	c.stop()
}

// runTool runs a program and fails the test with its output if it fails.
func runTool(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
}
