package audit

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
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
	// Checkpoints are the file's checkpoint lines, in order, each found to
	// name the right hash for its line; their signatures are checked by
	// [VerifyCheckpoints].
	Checkpoints []Checkpoint
}

// Checkpoint is a checkpoint line as Verify found it.
type Checkpoint struct {
	Line      int    // 1-based line number of the checkpoint in the input
	Seq       uint64 // the line it covers
	Head      string // that line's hash
	Signature []byte
	KeyID     string
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
	// The hashes of the last lines, by seq, for the checkpoints to name.
	var recent [MaxCheckpointLag + 1]string
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
		if ln.Type == AuditCheckpoint {
			cp, err := checkpointOf(ln, n, &c, recent[:])
			if err != nil {
				return c, &VerifyError{Line: n, Reason: err.Error()}
			}
			c.Checkpoints = append(c.Checkpoints, cp)
		}
		c.Lines++
		c.LastSeq, c.Head = ln.Seq, hashLine(b)
		recent[c.LastSeq%uint64(len(recent))] = c.Head
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

// checkpointOf checks that a checkpoint line names a line of this input
// before it, at most MaxCheckpointLag back, and that line's hash.
func checkpointOf(ln line, n int, c *Chain, recent []string) (Checkpoint, error) {
	cp := Checkpoint{Line: n, Seq: ln.CheckpointSeq, Head: ln.CheckpointHead, KeyID: ln.KeyID}
	sig, err := base64.StdEncoding.DecodeString(ln.Signature)
	switch {
	case err != nil || len(sig) == 0:
		return cp, fmt.Errorf("checkpoint: the signature is not base64")
	case !hexHash.MatchString(cp.Head):
		return cp, fmt.Errorf("checkpoint: checkpoint_head is not a SHA-256 in lowercase hex")
	case c.Lines == 0 || cp.Seq < c.FirstSeq || cp.Seq > c.LastSeq:
		return cp, fmt.Errorf("checkpoint: it covers seq %d, which is not a line before it in this input (seq %d-%d); verify rotated files together, oldest first", cp.Seq, c.FirstSeq, c.LastSeq)
	case c.LastSeq-cp.Seq >= uint64(len(recent)):
		return cp, fmt.Errorf("checkpoint: it covers seq %d, more than %d lines before it", cp.Seq, MaxCheckpointLag)
	case recent[cp.Seq%uint64(len(recent))] != cp.Head:
		return cp, fmt.Errorf("checkpoint: line seq %d does not have the hash it names: a line was changed", cp.Seq)
	}
	cp.Signature = sig
	return cp, nil
}

// Coverage is how far signed checkpoints cover a trail.
type Coverage struct {
	Checkpoints int    // valid checkpoints
	Through     uint64 // the last line a valid checkpoint covers; 0: none
	// Uncovered counts the lines after Through: they could be cut off
	// without a trace in the file.
	Uncovered uint64
}

// CheckpointError is a checkpoint whose signature does not verify.
type CheckpointError struct {
	Line   int
	Reason string
}

func (e *CheckpointError) Error() string { return fmt.Sprintf("line %d: %s", e.Line, e.Reason) }

// KeyID is the key_id of checkpoints signed by pub: the SHA-256 of its DER
// SubjectPublicKeyInfo, in hex.
func KeyID(pub *rsa.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// VerifyCheckpoints checks the signature of every checkpoint Verify found
// in c with pub and says how far they cover the trail. A checkpoint that
// does not verify (forged, or signed by another key) is a
// *CheckpointError.
func VerifyCheckpoints(c Chain, pub *rsa.PublicKey) (Coverage, error) {
	cov := Coverage{Uncovered: uint64(c.Lines)}
	id := KeyID(pub)
	for _, cp := range c.Checkpoints {
		if cp.KeyID != id {
			return cov, &CheckpointError{Line: cp.Line, Reason: fmt.Sprintf("checkpoint signed by key %s, not by the key given (%s)", cp.KeyID, id)}
		}
		d := sha256.Sum256(CheckpointMessage(cp.Seq, cp.Head))
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], cp.Signature); err != nil {
			return cov, &CheckpointError{Line: cp.Line, Reason: "the checkpoint's signature does not verify"}
		}
		cov.Checkpoints++
		cov.Through = cp.Seq
	}
	if cov.Checkpoints > 0 {
		cov.Uncovered = c.LastSeq - cov.Through
	}
	return cov, nil
}

// Logged is a copy of a checkpoint kept outside the trail: the daemon's
// "audit checkpoint" log lines.
type Logged struct {
	Seq       uint64
	Head      string
	Signature string // standard base64
	KeyID     string
}

// CompareLogged reads a trail (its files oldest first, as one stream) and
// checks it against checkpoints logged elsewhere: the line each names must
// be in the trail with the hash it names. A logged checkpoint past the
// trail's end means lines were cut off the end; one whose line has another
// hash, that the trail was cut and continued, or rewritten. Checkpoints of
// lines before the trail's first (older files, not given) are skipped and
// counted. With pub, each logged checkpoint's signature must verify.
func CompareLogged(r io.Reader, logged []Logged, pub *rsa.PublicKey) (checked, skipped int, err error) {
	want := map[uint64][]Logged{}
	for _, l := range logged {
		if pub != nil {
			sig, _ := base64.StdEncoding.DecodeString(l.Signature)
			d := sha256.Sum256(CheckpointMessage(l.Seq, l.Head))
			if rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig) != nil {
				return 0, 0, fmt.Errorf("the logged checkpoint of seq %d does not verify with the key given", l.Seq)
			}
		}
		want[l.Seq] = append(want[l.Seq], l)
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), maxLine)
	var first, last uint64
	for sc.Scan() {
		var ln struct {
			Seq uint64 `json:"seq"`
		}
		if json.Unmarshal(sc.Bytes(), &ln) != nil {
			continue // Verify reports it
		}
		if first == 0 {
			first = ln.Seq
		}
		last = ln.Seq
		ls, ok := want[ln.Seq]
		if !ok {
			continue
		}
		h := hashLine(sc.Bytes())
		for _, l := range ls {
			if l.Head != h {
				return checked, skipped, fmt.Errorf("line seq %d does not have the hash of the logged checkpoint (%s): the trail was cut and continued, or rewritten", l.Seq, l.Head)
			}
			checked++
		}
		delete(want, ln.Seq)
	}
	if err := sc.Err(); err != nil {
		return checked, skipped, err
	}
	for seq := range want {
		switch {
		case seq > last:
			return checked, skipped, fmt.Errorf("the log has a checkpoint of seq %d, past the trail's end at seq %d: lines were cut off the end", seq, last)
		case seq < first:
			skipped += len(want[seq])
		default:
			return checked, skipped, fmt.Errorf("the log has a checkpoint of seq %d, which the trail lacks", seq)
		}
	}
	return checked, skipped, nil
}
