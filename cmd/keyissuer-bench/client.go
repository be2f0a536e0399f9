package main

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/server/apisig"
)

const (
	applyPath = "/ams/api/v1/customer/applyPublicKey"
	password  = "correct horse battery staple"
)

// apiClient is the merchant side of applyPublicKey: a registered client
// that signs its requests and checks the signatures of the answers, as the
// wallet SDKs do. Each request names its own customerId, so that the
// per-customer cap on outstanding keys never bites.
type apiClient struct {
	id        string
	key       *rsa.PrivateKey
	serverPub *rsa.PublicKey // keyissuer's response-signing key
	seq       atomic.Int64
}

// signedRequest is an applyPublicKey request, signed ahead of the run that
// sends it: signing (an RSA private-key operation, ~1 ms) is the client's
// business, not the server's, and would otherwise take the client's CPU
// from the same 2 cores.
type signedRequest struct {
	body   []byte
	header http.Header
}

func (c *apiClient) sign(body []byte) (signedRequest, error) {
	req, err := http.NewRequest(http.MethodPost, "http://keyissuerd"+applyPath, bytes.NewReader(body))
	if err != nil {
		return signedRequest{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	if err := apisig.SignRequest(req, c.id, 1, c.key, body, time.Now()); err != nil {
		return signedRequest{}, err
	}
	return signedRequest{body: body, header: req.Header}, nil
}

// request makes a signed apply request for a new customerId.
func (c *apiClient) request() (signedRequest, error) {
	n := c.seq.Add(1)
	return c.sign(fmt.Appendf(nil, `{"customerId": "21%014d"}`, n))
}

// requests signs n apply requests, untimed, on every core.
func (c *apiClient) requests(ctx context.Context, n int) ([]signedRequest, error) {
	out := make([]signedRequest, n)
	run := countedRun(ctx, runtime.NumCPU(), n, func(_ context.Context, _, i int) error {
		var err error
		out[i], err = c.request()
		return err
	})
	if run.Errors > 0 {
		return nil, run.FirstErr
	}
	return out, nil
}

// A body the API refuses with PARAM_ILLEGAL before it takes a key: it opens
// and warms connections without spending the pool.
func (c *apiClient) rejected() (signedRequest, error) {
	// A body of its own: two signed in one millisecond would otherwise be
	// one request twice.
	return c.sign(fmt.Appendf(nil, `{"customerId": 21, "warm": "%d"}`, c.seq.Add(1)))
}

type applyResponse struct {
	Result struct {
		ResultCode    string `json:"resultCode"`
		ResultStatus  string `json:"resultStatus"`
		ResultMessage string `json:"resultMessage"`
	} `json:"result"`
	PublicKeyInfo *struct {
		UniqueID  string `json:"uniqueId"`
		Salt      string `json:"salt"`
		PublicKey string `json:"publicKey"`
	} `json:"publicKeyInfo"`
}

// issuedKey is a key applied for, with the ciphertext of the benchmark's
// password under it once encrypted.
type issuedKey struct {
	UniqueID   string
	Salt       string
	Public     *rsa.PublicKey
	Ciphertext string // standard base64
}

// post sends one signed apply request to url, checks the answer's
// signature and decodes it. The same code drives keyissuer and the bare
// handler, so both pay the same client costs.
func (c *apiClient) post(ctx context.Context, hc *http.Client, url string, sr signedRequest) (applyResponse, []byte, http.Header, error) {
	var ar applyResponse
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(sr.body))
	if err != nil {
		return ar, nil, nil, err
	}
	maps.Copy(req.Header, sr.header)
	resp, err := hc.Do(req)
	if err != nil {
		return ar, nil, nil, err
	}
	raw, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return ar, nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return ar, raw, resp.Header, fmt.Errorf("%w: HTTP %d: %.200s", errBadResponse, resp.StatusCode, raw)
	}
	if c.serverPub != nil {
		if err := apisig.VerifyResponse(resp.Header, applyPath, raw, c.serverPub); err != nil {
			return ar, raw, resp.Header, fmt.Errorf("%w: the answer's signature: %v", errBadResponse, err)
		}
	}
	if err := json.Unmarshal(raw, &ar); err != nil {
		return ar, raw, resp.Header, fmt.Errorf("%w: %v", errBadResponse, err)
	}
	return ar, raw, resp.Header, nil
}

// apply sends a signed apply request and returns the key it got.
func (d *daemon) apply(ctx context.Context, sr signedRequest) (issuedKey, error) {
	ar, _, _, err := d.client.post(ctx, d.api, d.apiURL, sr)
	if err != nil {
		return issuedKey{}, err
	}
	if ar.Result.ResultCode != "SUCCESS" || ar.PublicKeyInfo == nil {
		return issuedKey{}, fmt.Errorf("%w: apply: %s %s", errBadResponse, ar.Result.ResultCode, ar.Result.ResultMessage)
	}
	der, err := base64.StdEncoding.DecodeString(ar.PublicKeyInfo.PublicKey)
	if err != nil {
		return issuedKey{}, fmt.Errorf("%w: publicKey: %v", errBadResponse, err)
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return issuedKey{}, fmt.Errorf("%w: publicKey: %v", errBadResponse, err)
	}
	rpub, ok := pub.(*rsa.PublicKey)
	if !ok {
		return issuedKey{}, fmt.Errorf("%w: publicKey is not RSA", errBadResponse)
	}
	return issuedKey{UniqueID: ar.PublicKeyInfo.UniqueID, Salt: ar.PublicKeyInfo.Salt, Public: rpub}, nil
}

// applyNow signs a request and applies (untimed paths).
func (d *daemon) applyNow(ctx context.Context) (issuedKey, error) {
	sr, err := d.client.request()
	if err != nil {
		return issuedKey{}, err
	}
	return d.apply(ctx, sr)
}

// warmConnections opens n keep-alive connections to url with requests
// refused before any key is taken. Each is signed afresh: keyissuerd
// accepts a signed request once (REPEAT_REQUEST).
func (c *apiClient) warmConnections(ctx context.Context, hc *http.Client, url string, n int) error {
	srs := make([]signedRequest, n)
	for i := range srs {
		var err error
		if srs[i], err = c.rejected(); err != nil {
			return err
		}
	}
	countedRun(ctx, n, n, func(ctx context.Context, _, i int) error {
		_, _, _, err := c.post(ctx, hc, url, srs[i])
		return err
	})
	return nil
}

// applyMany applies for n keys with concurrency c, untimed, and encrypts
// the password under each, as a merchant's page would.
func (d *daemon) applyMany(ctx context.Context, n, c int) ([]issuedKey, error) {
	keys := make([]issuedKey, n)
	run := countedRun(ctx, c, n, func(ctx context.Context, _, i int) error {
		k, err := d.applyNow(ctx)
		if err != nil {
			return err
		}
		keys[i] = k
		return nil
	})
	if run.Errors > 0 {
		return nil, fmt.Errorf("untimed applies failed: %d of %d: %w", run.Errors, n, run.FirstErr)
	}
	for i := range keys {
		if err := keys[i].encrypt(); err != nil {
			return nil, err
		}
	}
	return keys, nil
}

func (k *issuedKey) encrypt() error {
	ct, err := hsm.Encrypt(k.Public, hsm.OAEPSHA256, []byte(password+k.Salt))
	if err != nil {
		return err
	}
	k.Ciphertext = base64.StdEncoding.EncodeToString(ct)
	return nil
}

// decrypt asks for the key's one decrypt over the socket and checks the
// password that comes back.
func (d *daemon) decrypt(ctx context.Context, k issuedKey) error {
	body, _ := json.Marshal(map[string]string{"uniqueId": k.UniqueID, "ciphertext": k.Ciphertext})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://keyissuerd/v1/decrypt", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := d.sock.Do(req)
	if err != nil {
		return err
	}
	raw, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%w: decrypt: HTTP %d: %.200s", errBadResponse, resp.StatusCode, raw)
	}
	var out struct {
		Password string `json:"password"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return fmt.Errorf("%w: decrypt: %v", errBadResponse, err)
	}
	if out.Password != base64.StdEncoding.EncodeToString([]byte(password)) {
		return fmt.Errorf("%w: decrypt returned the wrong password", errBadResponse)
	}
	return nil
}

// canned is the bare handler's answer: a real applyPublicKey answer of
// keyissuer's, headers and body.
type canned struct {
	Header http.Header `json:"header"`
	Body   []byte      `json:"body"`
}

// serveBare is the baseline of row 2: a bare net/http handler that answers
// every request with a canned applyPublicKey answer (the same headers and
// body, signature included, so the client checks it at the same cost), run
// as its own process like keyissuerd, with the same server timeouts.
func serveBare(addr, responsePath string) error {
	b, err := os.ReadFile(responsePath)
	if err != nil {
		return err
	}
	var c canned
	if err := json.Unmarshal(b, &c); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			maps.Copy(w.Header(), c.Header)
			w.WriteHeader(http.StatusOK)
			w.Write(c.Body)
		}),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       5 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		return err
	}
	return nil
}
