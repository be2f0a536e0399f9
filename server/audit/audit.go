// Package audit writes keyissuer's audit trail: an append-only file of JSON
// lines, one per security event (a key issued, a decrypt attempted, a key
// destroyed, a request refused, a configuration reloaded, a token fault).
//
// Every line carries a sequence number and the SHA-256 of the line before
// it, so [Verify] finds any line that was edited, inserted or removed, but
// not lines cut off the end: a file cut short, and continued by a restart,
// is a valid chain. Against that, the daemon writes signed checkpoints
// ([Log.Checkpoint], an [AuditCheckpoint] line: the sequence number and
// hash of a line, signed with the token's response-signing key) at
// start-up, periodically and at shutdown, and logs a copy of each;
// [VerifyCheckpoints] says how far a file is covered. Lines after the last
// checkpoint can still be cut unseen, as can a tail with checkpoints in it,
// unless the logged copies (or the head anchored elsewhere: GET /v1/status
// on the admin listener) are compared with the file.
//
// A line never holds a secret: events are typed, with fields for
// identifiers, outcomes and reasons only; no PIN, salt, password,
// ciphertext or key material has a field to go in.
package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// Event types. They are the audit file's vocabulary: add, never rename.
const (
	DaemonStarted      = "daemon.started"       // Detail: version; Token: label/serial
	DaemonStopped      = "daemon.stopped"       // Count: pooled keys destroyed
	AuditReopened      = "audit.reopened"       // SIGHUP: the file was reopened (log rotation)
	KeyIssued          = "key.issued"           // UniqueID, CustomerID, ClientID, Remote
	KeyDecrypt         = "key.decrypt"          // UniqueID, PeerUID/PID, Outcome
	KeyDestroyed       = "key.destroyed"        // UniqueID, Reason
	KeyDestroyFailed   = "key.destroy_failed"   // UniqueID, Detail; retried by the reaper
	KeyExpired         = "key.expired"          // UniqueID: its time to live ran out
	KeyLost            = "key.lost"             // UniqueID: the token lost it
	Reconciled         = "store.reconciled"     // Counts
	RequestRefused     = "request.refused"      // API, Code, Remote or PeerUID/PID
	RefusalSummary     = "request.refusals"     // Counts by reason over Detail's interval; Offenders
	ConfigReloaded     = "config.reloaded"      // Detail: what changed
	ConfigReloadFailed = "config.reload_failed" // Detail: why; the old config stays
	TokenDown          = "token.down"           // Detail: the fault
	TokenUp            = "token.up"             // the token answers again
	AuditCheckpoint    = "audit.checkpoint"     // CheckpointSeq, CheckpointHead, Signature, KeyID
)

// Event is one security event. Set Type and the fields that apply.
type Event struct {
	Type       string         `json:"event"`
	UniqueID   string         `json:"unique_id,omitempty"`
	CustomerID string         `json:"customer_id,omitempty"`
	ClientID   string         `json:"client_id,omitempty"` // a client that proved who it is
	API        string         `json:"api,omitempty"`       // apply, decrypt, ...
	Remote     string         `json:"remote,omitempty"`    // TCP peer of the public API
	Peer       *Peer          `json:"peer,omitempty"`      // Unix-socket peer, when known
	Outcome    string         `json:"outcome,omitempty"`
	Code       string         `json:"code,omitempty"` // wire result code of a refusal
	Reason     string         `json:"reason,omitempty"`
	Token      string         `json:"token,omitempty"`
	Count      *int           `json:"count,omitempty"`
	Counts     map[string]int `json:"counts,omitempty"`
	Detail     string         `json:"detail,omitempty"` // never a secret
	Offenders  []Offender     `json:"offenders,omitempty"`

	// A checkpoint: the line of sequence CheckpointSeq has the hash
	// CheckpointHead, signed (standard base64 of RSASSA-PKCS1-v1_5 SHA-256
	// over [CheckpointMessage]) by the key whose SubjectPublicKeyInfo has
	// the SHA-256 KeyID (hex).
	CheckpointSeq  uint64 `json:"checkpoint_seq,omitempty"`
	CheckpointHead string `json:"checkpoint_head,omitempty"`
	Signature      string `json:"signature,omitempty"`
	KeyID          string `json:"key_id,omitempty"`
}

// CheckpointMessage is what a checkpoint signs: line seq of the trail has
// hash head.
func CheckpointMessage(seq uint64, head string) []byte {
	return fmt.Appendf(nil, "keyissuer audit checkpoint\nseq %d\nhead %s\n", seq, head)
}

// Offender is a source of refused requests in a [RefusalSummary].
type Offender struct {
	Remote             string `json:"remote"` // the address, without the port
	ClientIDUnverified string `json:"client_id_unverified,omitempty"`
	Count              int    `json:"count"`
}

// Peer is the process at the other end of the decrypt socket.
type Peer struct {
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
	PID int32  `json:"pid"`
}

// line is an Event as written: sequence and time first, the chain last.
type line struct {
	Seq  uint64    `json:"seq"`
	Time time.Time `json:"time"`
	Event
	Prev string `json:"prev"`
}

// Genesis is the prev of the first line of a new trail.
var Genesis = hex.EncodeToString(make([]byte, sha256.Size))

// Sync says when the file is fsync'd.
type Sync string

const (
	// SyncAlways: Record returns once its line is on disk. Concurrent
	// records share an fsync.
	SyncAlways Sync = "always"
	// SyncInterval: a background fsync every interval; a crash loses at
	// most that much.
	SyncInterval Sync = "interval"
	// SyncNever leaves it to the operating system.
	SyncNever Sync = "never"
)

// ErrClosed is returned by Record on a closed Log.
var ErrClosed = errors.New("audit log closed")

// Options tune a Log.
type Options struct {
	Sync     Sync          // default SyncAlways
	Interval time.Duration // for SyncInterval; default 1s
	Now      func() time.Time
}

// Log is an open audit file. It is safe for concurrent use.
type Log struct {
	path string
	opts Options

	// syncMu orders fsyncs (and a reopen) after mu's writes.
	syncMu   sync.Mutex
	mu       sync.Mutex
	f        *os.File
	seq      uint64 // last sequence number written
	head     string // hash of the last line written
	lastType string // event of the last line written
	gen      uint64 // files opened: Reopen adds one
	closed   bool

	written atomic.Uint64 // seq of the last line written to f
	synced  atomic.Uint64 // seq of the last line known on disk
	stop    chan struct{}
	done    chan struct{}
}

// Open opens or creates the trail at path (mode 0600, its directory 0700)
// and continues the chain from its last line.
func Open(path string, opts Options) (*Log, error) {
	if opts.Sync == "" {
		opts.Sync = SyncAlways
	}
	if opts.Interval <= 0 {
		opts.Interval = time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	l := &Log{path: path, opts: opts, head: Genesis}
	f, err := l.openFile()
	if err != nil {
		return nil, err
	}
	if err := l.resume(f); err != nil {
		f.Close()
		return nil, err
	}
	l.f = f
	l.written.Store(l.seq)
	l.synced.Store(l.seq)
	if opts.Sync == SyncInterval {
		l.stop, l.done = make(chan struct{}), make(chan struct{})
		go l.syncLoop()
	}
	return l, nil
}

func (l *Log) openFile() (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(l.path), 0o700); err != nil {
		return nil, fmt.Errorf("failed to create audit directory: %w", err)
	}
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("failed to open audit file: %w", err)
	}
	return f, nil
}

// tailSize bounds how much of an existing file is read to find its last
// line; lines are far shorter.
const tailSize = 64 << 10

// resume reads the last line of f to continue its chain. A torn last line
// (no newline: a crash mid-write) is closed with a newline and left for
// Verify to report; the chain continues from the last whole line.
func (l *Log) resume(f *os.File) error {
	r, err := os.Open(l.path)
	if err != nil {
		return fmt.Errorf("failed to read audit file: %w", err)
	}
	defer r.Close()
	fi, err := r.Stat()
	if err != nil {
		return fmt.Errorf("failed to read audit file: %w", err)
	}
	if fi.Size() == 0 {
		return nil
	}
	off := max(fi.Size()-tailSize, 0)
	buf := make([]byte, fi.Size()-off)
	if _, err := r.ReadAt(buf, off); err != nil && err != io.EOF {
		return fmt.Errorf("failed to read audit file: %w", err)
	}
	if buf[len(buf)-1] != '\n' {
		if _, err := f.Write([]byte("\n")); err != nil {
			return fmt.Errorf("failed to close a torn audit line: %w", err)
		}
		i := bytes.LastIndexByte(buf, '\n')
		if i < 0 {
			return nil // one torn line and nothing else
		}
		buf = buf[:i+1]
	}
	buf = buf[:len(buf)-1]
	last := buf[bytes.LastIndexByte(buf, '\n')+1:]
	var ln line
	if err := json.Unmarshal(last, &ln); err != nil {
		return fmt.Errorf("audit file %s: its last line is not an audit line; move the file aside to start a new trail", l.path)
	}
	l.seq = ln.Seq
	l.head = hashLine(last)
	l.lastType = ln.Type
	return nil
}

func hashLine(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Record appends e, chained to the line before. With SyncAlways it returns
// once the line is on disk.
func (l *Log) Record(e Event) error {
	seq, err := l.write(e)
	if err != nil {
		return err
	}
	if l.opts.Sync == SyncAlways {
		return l.syncTo(seq)
	}
	return nil
}

// Append is Record without the wait for the disk, for a line that a Record
// of the same request follows at once: that Record's fsync covers this line
// too, so a request that writes two lines pays for one fsync. (A decrypt
// writes key.destroyed, then key.decrypt.)
func (l *Log) Append(e Event) error {
	_, err := l.write(e)
	return err
}

// write appends e to the file and returns its sequence number.
func (l *Log) write(e Event) (uint64, error) { return l.writeIf(e, nil) }

// writeIf is write if cond, called with l.mu held, is nil or true; else it
// writes nothing and returns 0.
func (l *Log) writeIf(e Event, cond func() bool) (uint64, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return 0, ErrClosed
	}
	if cond != nil && !cond() {
		l.mu.Unlock()
		return 0, nil
	}
	ln := line{Seq: l.seq + 1, Time: l.opts.Now().UTC(), Event: e, Prev: l.head}
	b, err := json.Marshal(ln)
	if err != nil {
		l.mu.Unlock()
		return 0, fmt.Errorf("failed to encode audit event %s: %w", e.Type, err)
	}
	if _, err := l.f.Write(append(b, '\n')); err != nil {
		l.mu.Unlock()
		return 0, fmt.Errorf("failed to write audit event %s: %w", e.Type, err)
	}
	l.seq, l.head, l.lastType = ln.Seq, hashLine(b), e.Type
	l.written.Store(ln.Seq)
	l.mu.Unlock()
	return ln.Seq, nil
}

// syncTo returns once line seq is on disk. The first caller in fsyncs for
// everyone written so far; the others find their line covered.
func (l *Log) syncTo(seq uint64) error {
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	if l.synced.Load() >= seq {
		return nil
	}
	target := l.written.Load()
	l.mu.Lock()
	f := l.f
	l.mu.Unlock()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("failed to sync audit file: %w", err)
	}
	l.synced.Store(target)
	return nil
}

func (l *Log) syncLoop() {
	defer close(l.done)
	t := time.NewTicker(l.opts.Interval)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			l.syncTo(l.written.Load())
		}
	}
}

// MaxCheckpointLag bounds how many lines may come between a checkpoint and
// the line it covers, in the same file: [Verify] looks that far back.
const MaxCheckpointLag = 1024

// Checkpoint signs the current head with sign and appends it as an
// [AuditCheckpoint] line, with keyID. It writes nothing, and returns ok
// false, when the trail is empty or its last line is a checkpoint already.
// The signature is made without holding up other writers; if the file was
// reopened meanwhile, or MaxCheckpointLag lines were written, it signs
// again.
func (l *Log) Checkpoint(sign func(msg []byte) ([]byte, error), keyID string) (e Event, ok bool, err error) {
	for range 3 {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return Event{}, false, ErrClosed
		}
		if l.lastType == AuditCheckpoint || l.seq == 0 {
			l.mu.Unlock()
			return Event{}, false, nil
		}
		seq, head, gen := l.seq, l.head, l.gen
		l.mu.Unlock()
		sig, err := sign(CheckpointMessage(seq, head))
		if err != nil {
			return Event{}, false, fmt.Errorf("failed to sign an audit checkpoint: %w", err)
		}
		e = Event{Type: AuditCheckpoint, CheckpointSeq: seq, CheckpointHead: head,
			Signature: base64.StdEncoding.EncodeToString(sig), KeyID: keyID}
		n, err := l.writeIf(e, func() bool { return l.gen == gen && l.seq-seq < MaxCheckpointLag })
		if err != nil {
			return Event{}, false, err
		}
		if n == 0 {
			continue
		}
		if l.opts.Sync == SyncAlways {
			return e, true, l.syncTo(n)
		}
		return e, true, nil
	}
	return Event{}, false, errors.New("failed to write an audit checkpoint: the trail moved on three times while it was signed")
}

// Head is the sequence number and hash of the last line written: the value
// to anchor elsewhere.
func (l *Log) Head() (seq uint64, hash string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq, l.head
}

// Path is the file's path.
func (l *Log) Path() string { return l.path }

// Reopen closes the file and opens the path again, for log rotation: after
// the file was renamed, a new one is created there. The chain goes on
// across the two files; the new file's first line is an [AuditReopened]
// event.
func (l *Log) Reopen() error {
	l.syncMu.Lock()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.syncMu.Unlock()
		return ErrClosed
	}
	f, err := l.openFile()
	if err == nil {
		l.f.Sync()
		l.f.Close()
		l.f = f
		l.gen++
		l.synced.Store(l.written.Load())
	}
	l.mu.Unlock()
	l.syncMu.Unlock()
	if err != nil {
		return err
	}
	return l.Record(Event{Type: AuditReopened})
}

// Close syncs and closes the file.
func (l *Log) Close() error {
	if l.stop != nil {
		close(l.stop)
		<-l.done
		l.stop = nil
	}
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	err := l.f.Sync()
	return errors.Join(err, l.f.Close())
}
