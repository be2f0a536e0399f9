package hsm

import (
	"context"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Find builds a Key for the token objects of id, found by CKA_ID: a key
// that another process made on a token they share (token storage only),
// such as a neighbour in a cluster on one HSM partition. It fails with
// ErrKeyLost if the token, healthy, has no complete pair for id.
//
// A search that comes back empty is made again in a session opened for it:
// a module may refresh its view of objects made by other processes only
// when a session starts (SoftHSM's file store re-reads the token then), so
// a long-lived session must not be the last word on a neighbour's key.
func (t *Token) Find(ctx context.Context, id string) (*Key, error) {
	if t.cfg.Storage != StorageToken {
		return nil, errors.New("finding keys by id needs token storage")
	}
	k := &Key{ID: id, tokenStore: true}
	var found bool
	err := t.do(ctx, func(s *session) error {
		var err error
		if found, err = t.findPair(s, s.h, k); err != nil || found {
			return err
		}
		h, err := t.mod.ctx.OpenSession(uint(t.slot.Load()), pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return err
		}
		found, err = t.findPair(s, h, k)
		t.mod.ctx.CloseSession(h) // the handles outlive it: they are the token's
		return err
	})
	if err == nil && !found {
		if err = t.confirmGone(); err == nil {
			err = ErrKeyLost
		}
	}
	if err != nil {
		return nil, fmt.Errorf("failed to find key %s: %w", id, err)
	}
	return k, nil
}

// findPair looks up both halves of k.ID in session h, and reads the public
// half in s, the session of the call. It reports whether both were there:
// a pair a neighbour destroys meanwhile (its handle turns invalid) is not.
func (t *Token) findPair(s *session, h pkcs11.SessionHandle, k *Key) (bool, error) {
	in := &session{h: h}
	epoch := t.epoch.Load()
	priv, err := t.find(in, pkcs11.CKO_PRIVATE_KEY, k.ID)
	if err != nil {
		return false, err
	}
	pub, err := t.find(in, pkcs11.CKO_PUBLIC_KEY, k.ID)
	if err != nil {
		return false, err
	}
	if priv == 0 || pub == 0 {
		return false, nil
	}
	k.priv, k.pub, k.epoch = priv, pub, epoch
	err = t.readPublic(s, k)
	if isRV(err, pkcs11.CKR_OBJECT_HANDLE_INVALID) {
		return false, nil
	}
	return err == nil, err
}

// Rescan makes the module read the token's objects afresh, by the reset
// that recovery from an outage does: every session is closed and reopened,
// and keys find their handles again by CKA_ID. SoftHSM's file store, shared
// by processes, can leave one process's view of the token without an object
// another process made, for as long as no later write shows it the change;
// only a re-initialisation is sure to. It is costly (it waits for every
// session to be idle): call it only when an object must exist and Find did
// not see it. Rescans asked for while one runs share it.
func (t *Token) Rescan(ctx context.Context) error {
	if t.cfg.Storage != StorageToken {
		return errors.New("rescanning the token needs token storage")
	}
	asked := t.epoch.Load()
	t.rescanMu.Lock()
	defer t.rescanMu.Unlock()
	if t.epoch.Load() != asked {
		return nil // a reset since the caller asked: its view is fresh
	}
	if err := t.enter(ctx); err != nil {
		return err
	}
	defer t.inFlight.Done()
	if err := t.reset(ctx); err != nil {
		t.markDown(err)
		return fmt.Errorf("%w: failed to rescan the token: %w", ErrUnavailable, err)
	}
	t.cfg.Log.Info("token rescanned for an object another process made")
	return nil
}
