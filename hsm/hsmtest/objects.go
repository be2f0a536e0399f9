package hsmtest

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// Object is one object of a token, as a session of the test's own sees it.
type Object struct {
	Class uint   // CKA_CLASS: pkcs11.CKO_PRIVATE_KEY, CKO_PUBLIC_KEY, CKO_DATA...
	Label string // CKA_LABEL
	ID    string // CKA_ID, as bytes; "" if the class has none
}

// Classless is the Class of an object that has none: see [HalfMadeClassless].
const Classless = ^uint(0)

// String names the object for a test's failure message.
func (o Object) String() string {
	return fmt.Sprintf("%s label %q id %q", className(o.Class), o.Label, o.ID)
}

func className(c uint) string {
	switch c {
	case pkcs11.CKO_DATA:
		return "data object"
	case pkcs11.CKO_CERTIFICATE:
		return "certificate"
	case pkcs11.CKO_PUBLIC_KEY:
		return "public key"
	case pkcs11.CKO_PRIVATE_KEY:
		return "private key"
	case pkcs11.CKO_SECRET_KEY:
		return "secret key"
	case Classless:
		return "object without a class"
	}
	return fmt.Sprintf("object of class %#x", c)
}

// Objects lists every object of tok that a logged-in session sees: all
// classes, any label. It goes to the token through PKCS#11 directly, with a
// handle and a session of its own, not through package hsm, so that a test
// counts what is really in the token independently of the code under test
// (hsm.List sees only key objects under a label prefix). It sees the token
// objects and this process's session objects; other processes' session
// objects are invisible to it, as PKCS#11 says.
//
// It initialises the module if nobody in the process has and finalises it
// again; while an hsm.Token of this process has it initialised, it leaves
// it so. Do not call it while another goroutine opens the module.
func Objects(t testing.TB, tok Token) []Object {
	t.Helper()
	objs, err := objects(tok)
	if err != nil {
		t.Fatalf("hsmtest: counting the objects of token %q: %v", tok.Label, err)
	}
	return objs
}

func objects(tok Token) ([]Object, error) {
	var objs []Object
	err := inSession(tok, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		hs, err := settled(p, s)
		if err != nil {
			return err
		}
		for _, h := range hs {
			o, ok, err := readObject(p, s, h)
			if err != nil {
				return err
			}
			if ok {
				objs = append(objs, o)
			}
		}
		return nil
	})
	return objs, err
}

// settled finds every object, but returns a key that may be being made
// only once it is not: reading a SoftHSM 2.6.1 object that another process
// is making can wipe its label and id (RELIABILITY.md, bugs 6 and 11). A
// generated key whose CKA_LOCAL is true is finished (SoftHSM writes it with
// the key material); any other object is returned if it is still in view
// 100 ms after the first search, as hsm.List does.
func settled(p *pkcs11.Ctx, s pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
	first := time.Now()
	all, err := find(p, s, nil)
	if err != nil {
		return nil, err
	}
	local, err := find(p, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LOCAL, true)})
	if err != nil {
		return nil, err
	}
	var out, pending []pkcs11.ObjectHandle
	for _, h := range all {
		if slices.Contains(local, h) {
			out = append(out, h)
		} else {
			pending = append(pending, h)
		}
	}
	if len(pending) == 0 {
		return out, nil
	}
	time.Sleep(time.Until(first.Add(100 * time.Millisecond)))
	again, err := find(p, s, nil)
	if err != nil {
		return nil, err
	}
	for _, h := range pending {
		if slices.Contains(again, h) {
			out = append(out, h)
		}
	}
	return out, nil
}

// Count counts the objects of tok of each of classes, as [Objects] sees
// them, through C_FindObjects alone: it reads no object's attributes. On
// SoftHSM 2.6.1, C_GetAttributeValue on an object that another process is
// still writing writes default values for the attributes it did not find
// back over it (RELIABILITY.md, "Bugs the suite found"), which damages a
// key that a daemon is making; a search compares attributes without
// writing. So while a daemon makes keys in the token, count with Count,
// not Objects. An object whose creator has not yet written its class is
// not counted.
func Count(t testing.TB, tok Token, classes ...uint) map[uint]int {
	t.Helper()
	n := map[uint]int{}
	err := inSession(tok, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		for _, c := range classes {
			hs, err := find(p, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, c)})
			if err != nil {
				return err
			}
			n[c] = len(hs)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("hsmtest: counting the objects of token %q: %v", tok.Label, err)
	}
	return n
}

// inSession runs fn in a logged-in read-only session of its own on tok,
// initialising the module as Objects says.
func inSession(tok Token, fn func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error) error {
	p := pkcs11.New(tok.Module)
	if p == nil {
		return fmt.Errorf("failed to load PKCS#11 module %s", tok.Module)
	}
	defer p.Destroy()
	err := p.Initialize()
	if err == nil {
		defer p.Finalize()
	} else if !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return fmt.Errorf("C_Initialize: %w", err)
	}
	slot, err := slotLabelled(p, tok.Label)
	if err != nil {
		return err
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return fmt.Errorf("C_OpenSession: %w", err)
	}
	defer p.CloseSession(s)
	// Login state is per application: an hsm.Token of this process may
	// have logged in already.
	if err := p.Login(s, pkcs11.CKU_USER, tok.PIN); err != nil &&
		!errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)) {
		return fmt.Errorf("C_Login: %w", err)
	}
	return fn(p, s)
}

// find returns the handles of the objects that match tmpl (nil: all).
func find(p *pkcs11.Ctx, s pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := p.FindObjectsInit(s, tmpl); err != nil {
		return nil, fmt.Errorf("C_FindObjectsInit: %w", err)
	}
	var hs []pkcs11.ObjectHandle
	for {
		batch, _, err := p.FindObjects(s, 100)
		if err != nil {
			p.FindObjectsFinal(s)
			return nil, fmt.Errorf("C_FindObjects: %w", err)
		}
		if len(batch) == 0 {
			break
		}
		hs = append(hs, batch...)
	}
	if err := p.FindObjectsFinal(s); err != nil {
		return nil, fmt.Errorf("C_FindObjectsFinal: %w", err)
	}
	return hs, nil
}

// readObject reads an object's class, label and id. An object destroyed
// since the search is skipped. SoftHSM reads an attribute in two calls, its
// length and then its value; an object another process writes meanwhile
// can grow in between (CKR_BUFFER_TOO_SMALL): the read is tried again.
func readObject(p *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle) (Object, bool, error) {
	var o Object
	class, err := p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil)})
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID)) {
		return o, false, nil
	}
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_VALUE_INVALID)) {
		// SoftHSM's answer for an object whose file has no attribute
		// yet: one a kill cut short right after creating it. It is an
		// object all the same, and counted.
		o.Class = Classless
		return o, true, nil
	}
	if err != nil {
		return o, false, fmt.Errorf("reading CKA_CLASS: %w", err)
	}
	o.Class = attrUint(class[0].Value)
	for _, a := range []struct {
		typ uint
		to  *string
	}{{pkcs11.CKA_LABEL, &o.Label}, {pkcs11.CKA_ID, &o.ID}} {
		var attrs []*pkcs11.Attribute
		for try := range 5 {
			if try > 0 {
				time.Sleep(10 * time.Millisecond)
			}
			attrs, err = p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(a.typ, nil)})
			if !errors.Is(err, pkcs11.Error(pkcs11.CKR_BUFFER_TOO_SMALL)) {
				break
			}
		}
		switch {
		case errors.Is(err, pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID)):
			return o, false, nil
		case errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_TYPE_INVALID)):
			// The class has no such attribute (CKA_ID of a data object).
		case err != nil:
			return o, false, fmt.Errorf("reading attribute %#x of a %s: %w", a.typ, className(o.Class), err)
		default:
			*a.to = string(attrs[0].Value)
		}
	}
	return o, true, nil
}

// attrUint decodes a CK_ULONG attribute in the host's byte order.
func attrUint(b []byte) uint {
	var v uint
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint(b[i])
	}
	return v
}

// Added returns the objects of after that are not in before, counting
// equal objects (same class, label and id) as a multiset.
func Added(before, after []Object) []Object {
	left := map[Object]int{}
	for _, o := range before {
		left[o]++
	}
	var added []Object
	for _, o := range after {
		if left[o] > 0 {
			left[o]--
			continue
		}
		added = append(added, o)
	}
	slices.SortFunc(added, func(a, b Object) int {
		return strings.Compare(a.String(), b.String())
	})
	return added
}

// slotLabelled returns the slot of p whose token is labelled label.
func slotLabelled(p *pkcs11.Ctx, label string) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("C_GetSlotList: %w", err)
	}
	for _, s := range slots {
		if ti, err := p.GetTokenInfo(s); err == nil && strings.TrimSpace(ti.Label) == label {
			return s, nil
		}
	}
	return 0, fmt.Errorf("no token labelled %q", label)
}
