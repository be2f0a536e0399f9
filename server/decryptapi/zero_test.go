package decryptapi_test

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/keyissuer/keyissuer/hsm"
	"github.com/keyissuer/keyissuer/server/peercred"
)

// keepingIssuer returns its password in a buffer it keeps, to see it zeroed.
type keepingIssuer struct {
	fakeIssuer
	given []byte
}

func (k *keepingIssuer) DecryptWithPadding(ctx context.Context, id string, ct []byte, p hsm.Padding) ([]byte, error) {
	k.given = bytes.Clone(testPassword)
	return k.given, nil
}

// retainingWriter keeps the slices written to it rather than copying
// them, as net/http's buffer does not: what the handler zeroes after the
// write shows here.
type retainingWriter struct {
	header http.Header
	status int
	writes [][]byte
}

func (w *retainingWriter) Header() http.Header { return w.header }
func (w *retainingWriter) WriteHeader(s int)   { w.status = s }
func (w *retainingWriter) Write(p []byte) (int, error) {
	w.writes = append(w.writes, p)
	return len(p), nil
}

// The decrypt API zeroes the password the issuer gave it and the buffer
// it wrote the answer from, once written.
func TestDecryptZeroesThePassword(t *testing.T) {
	is := &keepingIssuer{}
	req := httptest.NewRequest(http.MethodPost, "/v1/decrypt", bytes.NewReader(decryptBody(testID, testCTB64)))
	req = req.WithContext(peercred.NewContext(req.Context(), self))
	w := &retainingWriter{header: http.Header{}}
	newHandler(is).ServeHTTP(w, req)
	if w.status != http.StatusOK || len(w.writes) != 1 {
		t.Fatalf("status %d, %d writes; want 200 and one write", w.status, len(w.writes))
	}
	if !bytes.Equal(is.given, make([]byte, len(is.given))) {
		t.Errorf("the issuer's password buffer holds %q after the answer, want zeros", is.given)
	}
	if b := w.writes[0]; len(b) == 0 || !bytes.Equal(b, make([]byte, len(b))) {
		t.Errorf("the answer's buffer holds %q after the write, want zeros", b)
	}
}
