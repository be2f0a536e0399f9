// Package wycheproof finds Project Wycheproof's RSA decryption vectors for
// the tests of hsm and its packages. The vectors live outside the
// repository, in ../shared/testdata/wycheproof from the module root (see
// their README.md), or wherever $KEYISSUER_WYCHEPROOF_DIR says.
package wycheproof

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Dir returns the directory of the vectors: $KEYISSUER_WYCHEPROOF_DIR if
// set, else ../shared/testdata/wycheproof from the module root. Without
// them it skips the test, or fails it under CI=true, where a missing
// conformance suite must not pass unnoticed.
func Dir(tb testing.TB) string {
	tb.Helper()
	dir := os.Getenv("KEYISSUER_WYCHEPROOF_DIR")
	var err error
	if dir == "" {
		dir, err = defaultDir()
	}
	if err == nil {
		_, err = os.Stat(filepath.Join(dir, "README.md"))
	}
	if err != nil {
		msg := fmt.Sprintf("Wycheproof vectors not found in %s (set KEYISSUER_WYCHEPROOF_DIR): %v", dir, err)
		if os.Getenv("CI") == "true" {
			tb.Fatal(msg)
		}
		tb.Skip(msg)
	}
	return dir
}

// defaultDir is ../shared/testdata/wycheproof from the module root, the
// nearest directory above the working directory (the test's package) that
// holds a go.mod.
func defaultDir() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, "..", "shared", "testdata", "wycheproof"), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}
