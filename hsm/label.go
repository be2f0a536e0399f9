package hsm

import (
	"errors"
	"fmt"
	"strings"
)

// KeyIDLen is the length of a key id, which is the uniqueId the issuer
// hands out: KeyIDLen characters of A-Z, a-z and 0-9.
const KeyIDLen = 32

// ValidKeyID reports whether id has the one shape a key id has:
// [KeyIDLen] characters of A-Z, a-z and 0-9.
func ValidKeyID(id string) bool {
	if len(id) != KeyIDLen {
		return false
	}
	for i := range len(id) {
		if !isAlnum(id[i]) {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9'
}

// LabelDelimiter ends every label prefix.
const LabelDelimiter = ':'

// CheckLabelPrefix checks that prefix can start the labels of keyissuer's
// key objects: one or more characters of A-Z, a-z, 0-9, '.', '_', '-' and
// ':', the last of them a ':'. Exact matching ([ParseLabel]) already keeps
// two prefixes from ever claiming the same label; the rule keeps labels
// unambiguous to a person reading the token too, since a key id never
// holds a ':'.
func CheckLabelPrefix(prefix string) error {
	if prefix == "" {
		return errors.New("label prefix is empty")
	}
	for i := range len(prefix) {
		c := prefix[i]
		if !isAlnum(c) && !strings.ContainsRune("._-:", rune(c)) {
			return fmt.Errorf("label prefix %q holds %q: allowed are A-Z, a-z, 0-9, '.', '_', '-' and ':'", prefix, c)
		}
	}
	if prefix[len(prefix)-1] != LabelDelimiter {
		return fmt.Errorf("label prefix %q does not end with %q", prefix, LabelDelimiter)
	}
	return nil
}

// ParseLabel is the one rule by which keyissuer recognises its key objects:
// an object labelled label belongs to the daemon configured with prefix if,
// and only if, label is exactly prefix followed by a well-formed key id
// ([ValidKeyID]); it returns that id. So the prefix "keyissuer:" never
// matches the objects of a neighbour configured "keyissuer:host-b:", nor
// anything a person or another tool put under the prefix. [Token.List]
// also requires CKA_ID to equal CKA_LABEL.
func ParseLabel(prefix, label string) (id string, ok bool) {
	id, ok = strings.CutPrefix(label, prefix)
	if !ok || !ValidKeyID(id) {
		return "", false
	}
	return id, true
}
