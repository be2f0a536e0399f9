package audit

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
)

// Chain is what Verify found: the trail's first and last lines.
type Chain struct {
	Lines    int
	FirstSeq uint64
	// Start is the first line's prev: [Genesis] for a new trail, else the
	// head of the file before it (rotation).
	Start   string
	LastSeq uint64
	Head    string // hash of the last line
}

// VerifyError says where and why a trail is broken.
type VerifyError struct {
	Line   int // 1-based line number in the input
	Reason string
}

func (e *VerifyError) Error() string { return fmt.Sprintf("line %d: %s", e.Line, e.Reason) }

// maxLine bounds a line; the daemon writes lines well under 4 KiB.
const maxLine = 64 << 10

var hexHash = regexp.MustCompile(`^[0-9a-f]{64}$`)

// Verify reads a trail and checks that every line is a well-formed event
// and that the sequence numbers and the hash chain run unbroken. After
// a rotation, pass the files oldest first as one stream (io.MultiReader),
// or each alone and compare one's Head with the next one's Start. A broken
// trail returns a *VerifyError.
func Verify(r io.Reader) (Chain, error) {
	var c Chain
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), maxLine)
	n := 0
	for sc.Scan() {
		n++
		b := sc.Bytes()
		ln, err := parseLine(b)
		if err != nil {
			return c, &VerifyError{Line: n, Reason: err.Error()}
		}
		if c.Lines == 0 {
			c.FirstSeq, c.Start = ln.Seq, ln.Prev
		} else {
			if ln.Seq != c.LastSeq+1 {
				return c, &VerifyError{Line: n, Reason: fmt.Sprintf("seq %d follows %d: lines are missing or out of order", ln.Seq, c.LastSeq)}
			}
			if ln.Prev != c.Head {
				return c, &VerifyError{Line: n, Reason: fmt.Sprintf("prev does not match the hash of line %d: a line was edited, inserted or removed", n-1)}
			}
		}
		c.Lines++
		c.LastSeq, c.Head = ln.Seq, hashLine(b)
	}
	if err := sc.Err(); err != nil {
		return c, &VerifyError{Line: n + 1, Reason: err.Error()}
	}
	if c.Lines == 0 {
		return c, &VerifyError{Line: 0, Reason: "no audit lines"}
	}
	return c, nil
}

func parseLine(b []byte) (line, error) {
	var ln line
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ln); err != nil {
		return ln, fmt.Errorf("not an audit line: %v", err)
	}
	if dec.More() {
		return ln, fmt.Errorf("not an audit line: trailing data")
	}
	switch {
	case ln.Seq == 0:
		return ln, fmt.Errorf("seq is missing or zero")
	case ln.Time.IsZero():
		return ln, fmt.Errorf("time is missing")
	case ln.Type == "":
		return ln, fmt.Errorf("event is missing")
	case !hexHash.MatchString(ln.Prev):
		return ln, fmt.Errorf("prev is not a SHA-256 in lowercase hex")
	}
	return ln, nil
}
