// Package decryptclient is the Go client of keyissuerd's local decrypt API,
// for the password-decrypt service.
//
//	c := decryptclient.New("/run/keyissuer/decrypt.sock")
//	password, err := c.Decrypt(ctx, uniqueID, ciphertext)
//	var e *decryptclient.Error
//	switch {
//	case err == nil:
//		defer clear(password)
//	case errors.As(err, &e) && e.Code == decryptclient.DecryptFailed:
//		// wrong padding or salt: the key is gone, the user starts over
//	case errors.As(err, &e) && e.Code == decryptclient.KeyConsumed:
//		// the key was used already: the user starts over
//	default:
//		// HSM_UNAVAILABLE after every retry, FORBIDDEN, the socket...
//	}
//
// Decrypt retries only HSM_UNAVAILABLE, the one error after which the key
// is known to be unused. When the daemon lets callers choose the padding
// (decrypt.allow_client_padding), [Client.DecryptWithPadding] names it.
package decryptclient

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Error codes of the decrypt API.
const (
	ParamIllegal  = "PARAM_ILLEGAL"
	KeyNotFound   = "KEY_NOT_FOUND"
	KeyConsumed   = "KEY_CONSUMED"
	KeyExpired    = "KEY_EXPIRED"
	KeyLost       = "KEY_LOST"
	DecryptFailed = "DECRYPT_FAILED"
	// DecryptAbandoned: the request was cancelled while its decrypt waited
	// for the token; nothing was decrypted, the key is consumed.
	DecryptAbandoned = "DECRYPT_ABANDONED"
	HSMUnavailable   = "HSM_UNAVAILABLE"
	Forbidden        = "FORBIDDEN" // this process's user may not use the socket
	Internal         = "INTERNAL"
)

// Error is an error answered by the daemon.
type Error struct {
	Status  int    // HTTP status
	Code    string // one of the codes above
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s (HTTP %d): %s", e.Code, e.Status, e.Message)
}

// Retryable reports whether the same request may succeed later: only when
// the token was unavailable, which leaves the key unused.
func (e *Error) Retryable() bool { return e.Code == HSMUnavailable }

// Client talks to keyissuerd over its Unix socket. It is safe for
// concurrent use.
type Client struct {
	http     *http.Client
	Attempts int           // tries for a retryable error (default 3)
	Backoff  time.Duration // wait before the first retry, doubled after (default 200ms)
}

// New returns a client for the socket at path.
func New(path string) *Client {
	return &Client{
		http: &http.Client{
			Timeout: 30 * time.Second,
			Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "unix", path)
				},
				MaxIdleConnsPerHost: 16,
			},
		},
		Attempts: 3,
		Backoff:  200 * time.Millisecond,
	}
}

// Decrypt asks for the one decrypt of uniqueID's key and returns the
// password. The caller should zero it when done.
func (c *Client) Decrypt(ctx context.Context, uniqueID string, ciphertext []byte) ([]byte, error) {
	return c.DecryptWithPadding(ctx, uniqueID, ciphertext, "")
}

// DecryptWithPadding is Decrypt with the padding the ciphertext was made
// with: one of the daemon's keys.paddings, such as "oaep-sha1", or "" for
// the daemon's default. The daemon refuses it with PARAM_ILLEGAL unless
// decrypt.allow_client_padding is on.
func (c *Client) DecryptWithPadding(ctx context.Context, uniqueID string, ciphertext []byte, padding string) ([]byte, error) {
	req := map[string]string{
		"uniqueId":   uniqueID,
		"ciphertext": base64.StdEncoding.EncodeToString(ciphertext),
	}
	if padding != "" {
		req["padding"] = padding
	}
	body, _ := json.Marshal(req)
	backoff := c.Backoff
	for attempt := 1; ; attempt++ {
		var out struct {
			// Decoded from base64 straight into a slice the caller can
			// zero; a string could not be.
			Password []byte `json:"password"`
		}
		err := c.do(ctx, http.MethodPost, "/v1/decrypt", body, &out)
		var e *Error
		if err == nil {
			return out.Password, nil
		}
		if !errors.As(err, &e) || !e.Retryable() || attempt >= c.Attempts {
			return nil, err
		}
		select {
		case <-time.After(backoff):
			backoff *= 2
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Key is a key's record as the daemon reports it.
type Key struct {
	UniqueID   string `json:"uniqueId"`
	State      string `json:"state"`
	CustomerID string `json:"customerId,omitempty"`
	ClientID   string `json:"clientId,omitempty"`
	IssuedAt   string `json:"issuedAt"`
	ExpiresAt  string `json:"expiresAt"`
	ClosedAt   string `json:"closedAt,omitempty"`
	ConsumedAt string `json:"consumedAt,omitempty"`
}

// Key returns the state of uniqueID's key.
func (c *Client) Key(ctx context.Context, uniqueID string) (Key, error) {
	var k Key
	err := c.do(ctx, http.MethodGet, "/v1/keys/"+url.PathEscape(uniqueID), nil, &k)
	return k, err
}

// Health returns the daemon's health report as raw JSON. A degraded
// daemon (token down) returns the report and an HSM_UNAVAILABLE *Error.
func (c *Client) Health(ctx context.Context) (json.RawMessage, error) {
	var h json.RawMessage
	err := c.do(ctx, http.MethodGet, "/v1/health", nil, &h)
	return h, err
}

func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://keyissuer"+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("failed to reach keyissuerd: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("failed to read keyissuerd's answer: %w", err)
	}
	if resp.StatusCode == http.StatusOK {
		err := json.Unmarshal(b, out)
		clear(b) // a decrypt's answer holds the password, in base64
		return err
	}
	var e struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(b, &e) != nil || e.Error.Code == "" {
		// A degraded daemon answers the health report with a 503. Any
		// other answer without a code is not the daemon's: never call it
		// retryable.
		if raw, ok := out.(*json.RawMessage); ok && resp.StatusCode == http.StatusServiceUnavailable && json.Valid(b) {
			*raw = append((*raw)[:0], b...)
			return &Error{Status: resp.StatusCode, Code: HSMUnavailable, Message: "degraded"}
		}
		return &Error{Status: resp.StatusCode, Code: Internal, Message: "unexpected answer"}
	}
	return &Error{Status: resp.StatusCode, Code: e.Error.Code, Message: e.Error.Message}
}
