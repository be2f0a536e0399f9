package daemon_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/hsm/hsmtest"
	"github.com/keyissuer/keyissuer/server/config"
	"github.com/keyissuer/keyissuer/server/daemon"
)

// The signed public API end to end: keyissuerd with its response-signing
// key in SoftHSM, a registered merchant that signs as the wallet SDKs do,
// and a flood against the outstanding-key caps.

const (
	signingLabel = "e2e-response-signing"
	merchantID   = "SANDBOX_E2E_MERCHANT"
)

// merchantKey is the registered merchant's key.
var merchantKey = sync.OnceValue(func() *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	return k
})

// signingKey makes the response-signing key in the shared test token, once,
// and returns its public half. The Token is closed again, so the module is
// free for the daemon.
var signingKeyOnce sync.Once
var signingPub *rsa.PublicKey

func signingKey(t *testing.T) *rsa.PublicKey {
	t.Helper()
	signingKeyOnce.Do(func() {
		st := hsmtest.Shared(t)
		tok, err := hsm.Open(context.Background(), hsm.Config{
			Module: st.Module, TokenLabel: st.Label, PIN: st.PIN, LabelPrefix: "e2e-signing:", Sessions: 2,
		})
		if err != nil {
			t.Fatalf("hsm.Open: %v", err)
		}
		defer tok.Close()
		s, _, err := tok.CreateSigningKey(context.Background(), signingLabel, 2048)
		if err != nil {
			t.Fatalf("CreateSigningKey: %v", err)
		}
		signingPub = s.Public()
	})
	if signingPub == nil {
		t.Fatal("no response-signing key (see the first test that made it)")
	}
	return signingPub
}

// signedSetup is setup's config with signed requests only, the signing key,
// the merchant registered, and extra appended (more tables).
func signedSetup(t *testing.T, extra string) string {
	t.Helper()
	signingKey(t)
	return signedSetupOn(t, hsmtest.Shared(t), signingLabel, extra)
}

// signedSetupOn is signedSetup on tok, with the signing key under label.
func signedSetupOn(t *testing.T, tok hsmtest.Token, label, extra string) string {
	t.Helper()
	path, _ := setupOn(t, tok, "session")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&merchantKey().PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.Replace(string(b), "allow_unsigned = true\n",
		fmt.Sprintf("allow_unsigned = false\nsigning_key_label = %q\n", label), 1)
	s += fmt.Sprintf("\n[[clients]]\nid = %q\npublic_keys = { 1 = %q }\n", merchantID,
		string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})))
	s += extra
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

type applyAnswer struct {
	Result struct {
		ResultCode, ResultStatus, ResultMessage string
	} `json:"result"`
	PublicKeyInfo *publicKeyInfo `json:"publicKeyInfo"`
}

// sdkApply posts body to apiURL signed as the wallet SDKs sign (no
// keyissuer code involved) and checks the answer's signature as they check
// it: the third comma-separated item of the Signature header.
func sdkApply(t *testing.T, client *http.Client, apiURL, body string) applyAnswer {
	t.Helper()
	a, err := trySDKApply(client, apiURL, body)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func trySDKApply(client *http.Client, apiURL, body string) (applyAnswer, error) {
	return trySDKApplyAt(client, apiURL, body, strconv.FormatInt(time.Now().UnixMilli(), 10), true, signingPub)
}

// trySDKApplyTo is trySDKApply with answers signed by signingPub.
func trySDKApplyTo(client *http.Client, apiURL, body string, signingPub *rsa.PublicKey) (applyAnswer, error) {
	return trySDKApplyAt(client, apiURL, body, strconv.FormatInt(time.Now().UnixMilli(), 10), true, signingPub)
}

// trySDKApplyAt is trySDKApply with the Request-Time given; the answer's
// signature is checked against signingPub only if wantSigned (and then
// required).
func trySDKApplyAt(client *http.Client, apiURL, body, reqTime string, wantSigned bool, signingPub *rsa.PublicKey) (applyAnswer, error) {
	var a applyAnswer
	u, err := url.Parse(apiURL)
	if err != nil {
		return a, err
	}
	d := sha256.Sum256([]byte("POST " + u.Path + "\n" + merchantID + "." + reqTime + "." + body))
	sig, err := rsa.SignPKCS1v15(nil, merchantKey(), crypto.SHA256, d[:])
	if err != nil {
		return a, err
	}
	req, err := http.NewRequest(http.MethodPost, apiURL, strings.NewReader(body))
	if err != nil {
		return a, err
	}
	req.Header.Set("Content-Type", "application/json; charset=UTF-8")
	req.Header.Set("Client-Id", merchantID)
	req.Header.Set("Request-Time", reqTime)
	req.Header.Set("Signature", "algorithm=RSA256,keyVersion=1,signature="+url.QueryEscape(base64.StdEncoding.EncodeToString(sig)))
	resp, err := client.Do(req)
	if err != nil {
		return a, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return a, err
	}

	if !wantSigned {
		if resp.Header.Get("Signature") != "" {
			return a, fmt.Errorf("the answer is signed: %s", raw)
		}
		return a, json.Unmarshal(raw, &a)
	}
	if resp.Header.Get("Signature") == "" {
		// As the SDKs: an unsigned answer is taken as it is, but only a
		// refusal (of a request that did not authenticate, a rate limit,
		// a replay) may come unsigned.
		if err := json.Unmarshal(raw, &a); err != nil || a.Result.ResultCode == "SUCCESS" {
			return a, fmt.Errorf("unsigned answer %s", raw)
		}
		return a, nil
	}
	item := strings.Split(resp.Header.Get("Signature"), ",")
	if len(item) != 3 {
		return a, fmt.Errorf("Signature header %q has %d items, want 3", resp.Header.Get("Signature"), len(item))
	}
	b64, err := url.QueryUnescape(strings.Split(item[2], "=")[1])
	if err != nil {
		return a, err
	}
	rsig, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return a, err
	}
	content := "POST " + u.Path + "\n" + resp.Header.Get("Client-Id") + "." + resp.Header.Get("Response-Time") + "." + string(raw)
	rd := sha256.Sum256([]byte(content))
	if err := rsa.VerifyPKCS1v15(signingPub, crypto.SHA256, rd[:], rsig); err != nil {
		return a, fmt.Errorf("the answer's signature does not verify: %w\n%s", err, raw)
	}
	if err := json.Unmarshal(raw, &a); err != nil {
		return a, fmt.Errorf("answer %q: %w", raw, err)
	}
	return a, nil
}

// TestSignedApply runs keyissuerd as a process with signed requests only:
// the merchant's signed apply gets a key whose answer verifies with the
// token's signing key; an unsigned one is refused; the key then decrypts.
func TestSignedApply(t *testing.T) {
	c := start(t, signedSetup(t, ""))
	a := sdkApply(t, http.DefaultClient, c.api, `{"customerId":"2188000123456789"}`)
	if a.Result.ResultCode != "SUCCESS" || a.PublicKeyInfo == nil {
		t.Fatalf("signed apply: %+v", a.Result)
	}
	resp, err := http.Post(c.api, "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	var refused applyAnswer
	json.NewDecoder(resp.Body).Decode(&refused)
	resp.Body.Close()
	if refused.Result.ResultCode != "INVALID_CLIENT" || refused.Result.ResultStatus != "F" || refused.PublicKeyInfo != nil {
		t.Errorf("unsigned apply: %+v, want INVALID_CLIENT/F", refused.Result)
	}
	if resp.Header.Get("Signature") != "" {
		t.Error("the refusal of a request that did not authenticate is signed")
	}
	ct := encryptFor(t, *a.PublicKeyInfo, "correct horse")
	if status, code, pw, err := c.decrypt(a.PublicKeyInfo.UniqueID, ct); err != nil || status != 200 || pw != "correct horse" {
		t.Fatalf("decrypt: %d %s %q %v", status, code, pw, err)
	}
	var rec struct{ ClientID string }
	c.getJSON("/v1/keys/"+a.PublicKeyInfo.UniqueID, &rec)
	if rec.ClientID != merchantID {
		t.Errorf("record's clientId = %q, want %q", rec.ClientID, merchantID)
	}
	c.stop()
}

// TestSignedApplyMissingKey: a daemon whose signing key is not in the
// token refuses to start, and says how to make one.
func TestSignedApplyMissingKey(t *testing.T) {
	path := signedSetup(t, "")
	b, _ := os.ReadFile(path)
	os.WriteFile(path, bytes.Replace(b, []byte(signingLabel), []byte("no-such-signing-key"), 1), 0o600)
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	_, err = daemon.New(context.Background(), cfg, daemon.Options{})
	if err == nil || !strings.Contains(err.Error(), "signing-key -create") {
		t.Fatalf("daemon.New = %v, want an error saying how to create the key", err)
	}
}

// TestApplyFlood floods applyPublicKey from many connections, in-process:
// outstanding keys never pass limits.max_outstanding, no customer gets past
// its cap, every answer is SUCCESS or a retryable refusal, and the daemon
// keeps serving: once keys are used, applies succeed again. Bounded: a
// fixed number of requests, on loopback.
func TestApplyFlood(t *testing.T) {
	const (
		maxTotal, perCustomer = 6, 2
		workers, perWorker    = 16, 15
		customers             = 5
	)
	path := signedSetup(t, fmt.Sprintf("\n[limits]\nrate = 100000.0\nmax_outstanding = %d\nmax_outstanding_per_customer = %d\n", maxTotal, perCustomer))
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	// Keys for every place under the cap are ready before the flood, so
	// no apply waits on the token, however slow it is on a busy machine.
	cfg.Pool.Size, cfg.Pool.Generators = maxTotal+2, 2
	cfg.Pool.ApplyWait, cfg.API.WriteTimeout = time.Minute, 2*time.Minute
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, cfg, daemon.Options{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	apiURL := "http://" + d.APIAddr() + "/ams/api/v1/customer/applyPublicKey"
	c := &child{t: t, api: apiURL, socket: cfg.Decrypt.Socket}
	waitFor(t, "a full pool", func() bool { return d.Issuer().Stats().PoolReady >= cfg.Pool.Size })

	// Watch the outstanding count through the flood.
	stopWatch := make(chan struct{})
	var watch sync.WaitGroup
	var maxSeen int
	watch.Go(func() {
		for {
			if n := d.Issuer().Stats().Outstanding; n > maxSeen {
				maxSeen = n
			}
			select {
			case <-stopWatch:
				return
			default:
				time.Sleep(time.Millisecond)
			}
		}
	})

	var (
		mu     sync.Mutex
		codes  = map[string]int{}
		issued = map[string][]publicKeyInfo{} // by customerId
		wg     sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			client := &http.Client{Transport: &http.Transport{}}
			defer client.CloseIdleConnections()
			for i := range perWorker {
				cust := fmt.Sprintf("21880000000000%02d", (w*perWorker+i)%customers)
				a, err := trySDKApply(client, apiURL, fmt.Sprintf(`{"customerId":%q}`, cust))
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				codes[a.Result.ResultCode+"/"+a.Result.ResultStatus]++
				if a.Result.ResultCode == "SUCCESS" {
					issued[cust] = append(issued[cust], *a.PublicKeyInfo)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(stopWatch)
	watch.Wait()
	t.Logf("answers: %v; most outstanding seen: %d", codes, maxSeen)

	total := 0
	for cust, keys := range issued {
		total += len(keys)
		if len(keys) > perCustomer {
			t.Errorf("customer %s got %d keys, cap %d", cust, len(keys), perCustomer)
		}
	}
	// Nothing was decrypted and the keys live a minute, so every key issued
	// is still outstanding: the count of successes is the strict check.
	if total > maxTotal || maxSeen > maxTotal {
		t.Errorf("%d keys issued, %d seen outstanding at once; cap %d", total, maxSeen, maxTotal)
	}
	if total == 0 {
		t.Error("no key issued at all")
	}
	for code, n := range codes {
		switch code {
		case "SUCCESS/S", "REQUEST_TRAFFIC_EXCEED_LIMIT/U":
		case "REPEAT_REQUEST/U": // two workers signed the same body in the same millisecond
		default:
			t.Errorf("%d answers %s, want SUCCESS/S or REQUEST_TRAFFIC_EXCEED_LIMIT/U", n, code)
		}
	}
	if n := codes["SUCCESS/S"] + codes["REQUEST_TRAFFIC_EXCEED_LIMIT/U"] + codes["REPEAT_REQUEST/U"]; n != workers*perWorker {
		t.Errorf("%d answers, want %d", n, workers*perWorker)
	}
	var health struct{ OutstandingKeys int }
	if status := c.getJSON("/v1/health", &health); status != 200 || health.OutstandingKeys != total {
		t.Errorf("health after the flood: %d, %d outstanding; want 200, %d", status, health.OutstandingKeys, total)
	}

	// Still serving: use every key, and a customer that was capped gets a
	// key again.
	for _, keys := range issued {
		for _, k := range keys {
			if status, code, _, err := c.decrypt(k.UniqueID, encryptFor(t, k, "pw")); err != nil || status != 200 {
				t.Fatalf("decrypt after the flood: %d %s %v", status, code, err)
			}
		}
	}
	for cust := range issued {
		if a := sdkApply(t, http.DefaultClient, apiURL, fmt.Sprintf(`{"customerId":%q}`, cust)); a.Result.ResultCode != "SUCCESS" {
			t.Errorf("apply for %s after its keys were used: %+v", cust, a.Result)
		}
		break
	}
}

// TestBlocklistReload: a blocked customer gets USER_STATUS_ABNORMAL, and
// once the file no longer lists it, a key, without a restart.
func TestBlocklistReload(t *testing.T) {
	path := signedSetup(t, "")
	blocked := filepath.Join(filepath.Dir(path), "blocked.txt")
	if err := os.WriteFile(blocked, []byte("# fraud\n2188000000000666\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	b = bytes.Replace(b, []byte("allow_unsigned = false\n"), []byte("allow_unsigned = false\nblocklist_file = \"blocked.txt\"\nblocklist_poll = \"100ms\"\n"), 1)
	os.WriteFile(path, b, 0o600)
	c := start(t, path)

	body := `{"customerId":"2188000000000666"}`
	if a := sdkApply(t, http.DefaultClient, c.api, body); a.Result.ResultCode != "USER_STATUS_ABNORMAL" || a.Result.ResultStatus != "F" {
		t.Fatalf("blocked customer: %+v, want USER_STATUS_ABNORMAL/F", a.Result)
	}
	if a := sdkApply(t, http.DefaultClient, c.api, `{"customerId":"2188000000000667"}`); a.Result.ResultCode != "SUCCESS" {
		t.Fatalf("another customer: %+v", a.Result)
	}
	tmp := blocked + ".new"
	os.WriteFile(tmp, []byte("# fraud, cleared\n"), 0o600)
	os.Rename(tmp, blocked)
	waitFor(t, "the cleared blocklist to be reloaded", func() bool {
		a := sdkApply(t, http.DefaultClient, c.api, body)
		if a.Result.ResultCode != "SUCCESS" && a.Result.ResultCode != "USER_STATUS_ABNORMAL" {
			t.Fatalf("while the blocklist reloads: %+v", a.Result)
		}
		return a.Result.ResultCode == "SUCCESS"
	})
	if !strings.Contains(c.stderr.String(), "blocklist reloaded") {
		t.Error("no log line says the blocklist was reloaded")
	}
	c.stop()
}
