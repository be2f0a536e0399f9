package hsm

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// Half-made key objects
//
// A token that makes an object in steps can be stopped between them. SoftHSM
// 2.6's file object store does, in C_GenerateKeyPair (as in C_CreateObject
// and C_CopyObject): it creates the object's file with no attribute at all,
// writes CKA_KEY_TYPE, then CKA_CLASS, then each default attribute (an empty
// CKA_LABEL and CKA_ID, CKA_TOKEN false, an empty CKA_MODULUS...), one file
// write each, and only then, in one write, the caller's template, CKA_LABEL
// and CKA_ID among it, and after that the key material. A process killed
// before the template is written leaves a token object that PKCS#11 lists
// and that carries no mark of its owner:
//
//   - an object without a class (C_GetAttributeValue answers
//     CKR_ATTRIBUTE_VALUE_INVALID for every attribute), or
//   - a public or private RSA key object with an empty CKA_LABEL, an empty
//     CKA_ID and no modulus.
//
// A third shape is a finished key that lost its mark: SoftHSM 2.6.1's
// C_GetAttributeValue writes the defaults of the attributes it did not
// find back into an object's file, from its own copy of the file. When
// another process reads a key that a generation is making, after the
// defaults and before the template, its write-back can land after the
// template and wipe it; the key material is written after that. What is
// left is
//
//   - a public or private RSA key object with an empty CKA_LABEL and an
//     empty CKA_ID, and a modulus (RELIABILITY.md, bug 6).
//
// (A kill inside one of those writes can also leave an empty file, which
// SoftHSM takes for no object at all: PKCS#11 cannot see it, nor remove it.
// See OPERATIONS.md.) Nothing keyissuer does can mark such an object: every
// way into a token object, C_CopyObject from a session object included,
// passes through the empty file. Reconciliation goes by label, so without
// this sweep they would stay in the token for good.
//
// keyissuer never makes an unlabelled object, and nobody can use one of
// these as its own: an object without a class is nothing, and a key without
// label and id cannot be found by its owner. So the sweep never takes a key
// with a label or an id, keyissuer's or another application's. What it must
// not take is an object still being made, by this process or by another (a
// neighbour keyissuerd in cluster mode, another application). Hence:
//
//   - Only with [Config.SweepHalfMade], which states that the token (the
//     partition) is keyissuer's alone; without it half-made objects are
//     counted and reported, never destroyed, as keyissuer never destroys
//     what it cannot prove is its own.
//   - An object is destroyed only when it was half-made, under the same
//     handle, at two looks at least [Config.HalfMadeGrace] apart (default a
//     minute; SoftHSM makes an object in milliseconds), which covers every
//     other process's generation in progress.
//   - And only when every generation of this process that was in flight
//     during the first look has finished before the second: this process's
//     own generations are known, whatever the grace. SoftHSM never gives
//     a handle to two objects in one process, so an object seen at the
//     first look is not one a later generation made.
//
// The sweep looks with C_FindObjects alone, which compares attributes
// without writing them: reading the attributes of every object, as it once
// did, made the sweep itself a cause of the third shape on a token that
// other processes make keys in. The key shapes are what a search for an
// RSA key with an empty label and an empty id finds; an object without a
// class is one that no search by class finds, and its missing class is
// read (no write-back without a class) only when it is due to go, after a
// grace in which no generation stays classless.

// HalfMadeSweep is what one look for half-made key objects found.
type HalfMadeSweep struct {
	Found     int // half-made objects seen in this look
	Destroyed int // of them, destroyed
	// Waiting are the half-made objects left for a later look (not yet
	// seen long enough, or a generation of this process that may be
	// making them is still running); NextDue is how long until the first
	// of them may go. Without Config.SweepHalfMade, Waiting is Found and
	// NextDue 0: nothing is ever destroyed.
	Waiting int
	NextDue time.Duration
}

// halfMade is the state of the looks for half-made objects and the
// bookkeeping of this process's own generations in flight.
type halfMade struct {
	mu       sync.Mutex
	seen     map[pkcs11.ObjectHandle]sighting
	inFlight map[uint64]struct{} // sequence numbers of generations running
	next     uint64              // the next generation's sequence number
	last     time.Time           // the last look that Check made
}

// sighting is the first look that found an object half-made.
type sighting struct {
	at    time.Time
	epoch uint64 // handles are good in one module epoch only
	// mark: every generation of this process that ran during the look
	// has a sequence number below mark.
	mark uint64
}

// beginGeneration notes a generation of this process in flight; call the
// returned function when it is over.
func (h *halfMade) beginGeneration() (end func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.inFlight == nil {
		h.inFlight = map[uint64]struct{}{}
	}
	seq := h.next
	h.next++
	h.inFlight[seq] = struct{}{}
	return func() {
		h.mu.Lock()
		delete(h.inFlight, seq)
		h.mu.Unlock()
	}
}

// oldestInFlight is the sequence number of the oldest generation running,
// or MaxUint64 if none is.
func (h *halfMade) oldestInFlightLocked() uint64 {
	oldest := uint64(math.MaxUint64)
	for seq := range h.inFlight {
		oldest = min(oldest, seq)
	}
	return oldest
}

// SweepHalfMade looks once for half-made key objects (see the comment at
// the top of halfmade.go) and, with Config.SweepHalfMade, destroys those
// that an earlier look found half-made under the same handle at least
// Config.HalfMadeGrace ago, once no generation of this process that was
// running at that look still runs. Objects with a label, an id, a modulus,
// or a class other than public or private key are never touched. It
// searches every object of the token, so it is slow with many objects:
// reconciliation calls it, and [Token.Check] at most every half grace.
func (t *Token) SweepHalfMade(ctx context.Context) (HalfMadeSweep, error) {
	h := &t.half
	// The generations that may be making what this look finds: every one
	// running before the search ends. Those that finished before it began
	// left nothing half-made.
	h.mu.Lock()
	oldest := h.oldestInFlightLocked()
	h.mu.Unlock()

	var found, classless []pkcs11.ObjectHandle
	err := t.do(ctx, func(s *session) error {
		var err error
		found, classless, err = t.findHalfMade(s)
		return err
	})
	if err == nil && len(found) == 0 {
		err = t.confirmGone() // an empty answer is believed from a healthy token only
	}
	if err != nil {
		return HalfMadeSweep{}, fmt.Errorf("failed to look for half-made key objects: %w", err)
	}

	now := time.Now()
	epoch := t.epoch.Load()
	h.mu.Lock()
	mark := h.next
	var due []pkcs11.ObjectHandle
	res := HalfMadeSweep{Found: len(found)}
	seen := make(map[pkcs11.ObjectHandle]sighting, len(found))
	for _, o := range found {
		sg, ok := h.seen[o]
		if !ok || sg.epoch != epoch {
			sg = sighting{at: now, epoch: epoch, mark: mark}
		}
		seen[o] = sg
		wait := sg.at.Add(t.cfg.HalfMadeGrace).Sub(now)
		if t.cfg.SweepHalfMade && wait <= 0 && oldest >= sg.mark {
			due = append(due, o)
			continue
		}
		res.Waiting++
		if t.cfg.SweepHalfMade && (res.NextDue == 0 || max(wait, time.Nanosecond) < res.NextDue) {
			res.NextDue = max(wait, time.Nanosecond)
		}
	}
	h.seen = seen // an object no longer half-made is forgotten
	h.mu.Unlock()

	var errs []error
	for _, o := range due {
		if slices.Contains(classless, o) {
			ok, err := t.stillClassless(ctx, o)
			if err != nil {
				errs = append(errs, err)
				res.Waiting++
				continue
			}
			if !ok {
				res.Found-- // a class after all: not half-made
				continue
			}
		}
		if err := t.destroyHalfMade(ctx, o); err != nil {
			errs = append(errs, err)
			continue
		}
		res.Destroyed++
		h.mu.Lock()
		delete(h.seen, o)
		h.mu.Unlock()
	}
	if res.Found > 0 {
		t.cfg.Log.Warn("half-made key objects in the token (no class, or a key with no label and no id: a generation cut short, or a key whose mark SoftHSM wiped)",
			"found", res.Found, "destroyed", res.Destroyed, "waiting", res.Waiting, "sweep", t.cfg.SweepHalfMade)
	}
	return res, errors.Join(errs...)
}

// sweepHalfMadeDue is Check's part: a look at most every half grace, and
// only with Config.SweepHalfMade.
func (t *Token) sweepHalfMadeDue(ctx context.Context) error {
	if !t.cfg.SweepHalfMade {
		return nil
	}
	t.half.mu.Lock()
	due := time.Since(t.half.last) >= t.cfg.HalfMadeGrace/2
	if due {
		t.half.last = time.Now()
	}
	t.half.mu.Unlock()
	if !due {
		return nil
	}
	_, err := t.SweepHalfMade(ctx)
	return err
}

// keyClasses are the classes of key objects, the private first: the
// order List reports them in, and so reconciliation destroys them in, as
// Destroy does.
var keyClasses = []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY}

// standardClasses are PKCS#11's object classes: an object that no search
// for one of them finds has no class, or a vendor's (see stillClassless).
var standardClasses = []uint{
	pkcs11.CKO_DATA, pkcs11.CKO_CERTIFICATE, pkcs11.CKO_PUBLIC_KEY, pkcs11.CKO_PRIVATE_KEY,
	pkcs11.CKO_SECRET_KEY, pkcs11.CKO_HW_FEATURE, pkcs11.CKO_DOMAIN_PARAMETERS,
	pkcs11.CKO_MECHANISM, pkcs11.CKO_OTP_KEY,
}

// findHalfMade finds, by searches alone, the objects that look half-made
// now: RSA keys with an empty label and an empty id, and objects that no
// search by class finds, which it also returns apart. It reads no
// attribute (see the top of the file).
func (t *Token) findHalfMade(s *session) (found, classless []pkcs11.ObjectHandle, err error) {
	for _, class := range keyClasses {
		hs, err := t.findAll(s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, []byte{}),
			pkcs11.NewAttribute(pkcs11.CKA_ID, []byte{}),
		})
		if err != nil {
			return nil, nil, err
		}
		found = append(found, hs...)
	}
	all, err := t.findAll(s, nil)
	if err != nil {
		return nil, nil, err
	}
	classed := make(map[pkcs11.ObjectHandle]bool, len(all))
	for _, class := range standardClasses {
		hs, err := t.findAll(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)})
		if err != nil {
			return nil, nil, err
		}
		for _, h := range hs {
			classed[h] = true
		}
	}
	for _, h := range all {
		if !classed[h] {
			classless = append(classless, h)
		}
	}
	return append(found, classless...), classless, nil
}

// stillClassless reports whether o, which no search by class found, has
// no class indeed, rather than a vendor's class or one written since. Its
// class is read only now, when it is due to go: it has been classless for
// a grace, so no generation is still making it (a read of an object being
// made is what damages it, see the top of the file).
func (t *Token) stillClassless(ctx context.Context, o pkcs11.ObjectHandle) (bool, error) {
	var ok bool
	err := t.do(ctx, func(s *session) error {
		_, err := t.attribute(s, o, pkcs11.CKA_CLASS)
		switch {
		case isRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_VALUE_INVALID):
			ok = true
		case err != nil:
			return skipGone(err)
		}
		return nil
	})
	return ok, err
}

// attribute reads one attribute of o.
func (t *Token) attribute(s *session, o pkcs11.ObjectHandle, typ uint) ([]byte, error) {
	attrs, err := t.mod.ctx.GetAttributeValue(s.h, o, []*pkcs11.Attribute{pkcs11.NewAttribute(typ, nil)})
	if err = t.after(OpGetAttributeValue, "", err); err != nil {
		return nil, err
	}
	return attrs[0].Value, nil
}

// skipGone makes an object destroyed or rewritten since the search no
// error: it is not half-made now.
func skipGone(err error) error {
	if isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_BUFFER_TOO_SMALL) {
		return nil
	}
	return err
}

// destroyHalfMade destroys one half-made object; gone already is fine,
// from a healthy token.
func (t *Token) destroyHalfMade(ctx context.Context, o pkcs11.ObjectHandle) error {
	return t.DestroyObject(ctx, Object{ID: "without a label (half-made)", handle: o})
}
