package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyissuer/keyissuer/server/admin"
	"github.com/keyissuer/keyissuer/server/audit"
)

func TestAuditVerify(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	l, err := audit.Open(path, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	l.Record(audit.Event{Type: audit.KeyIssued, UniqueID: "A", CustomerID: "2188"})
	l.Record(audit.Event{Type: audit.KeyDestroyed, UniqueID: "A", Reason: "consumed"})
	os.Rename(path, path+".1")
	l.Reopen()
	l.Record(audit.Event{Type: audit.KeyIssued, UniqueID: "B"})
	l.Close()

	var out bytes.Buffer
	ctx := context.Background()
	if err := run(ctx, "audit", []string{"verify", path + ".1", path}, nil, &out); err != nil {
		t.Fatalf("verify of a good trail: %v", err)
	}
	if !strings.Contains(out.String(), "ok, 2 lines") || !strings.Contains(out.String(), "ok, 2 lines, seq 3-4") {
		t.Errorf("output %q", out.String())
	}
	// The files out of order do not chain.
	if err := run(ctx, "audit", []string{"verify", path, path + ".1"}, nil, &out); err == nil {
		t.Error("verify accepted the files out of order")
	}

	// An edited last line is caught by the file after it, which chains
	// from it; an edited earlier line by the file itself.
	orig, _ := os.ReadFile(path + ".1")
	os.WriteFile(path+".1", bytes.Replace(orig, []byte(`"reason":"consumed"`), []byte(`"reason":"expired"`), 1), 0o600)
	if err := run(ctx, "audit", []string{"verify", path + ".1", path}, nil, &out); err == nil || !strings.Contains(err.Error(), "BROKEN") {
		t.Errorf("verify after editing the last line of the first file: %v, want BROKEN", err)
	}
	os.WriteFile(path+".1", bytes.Replace(orig, []byte(`"customer_id":"2188"`), []byte(`"customer_id":"2189"`), 1), 0o600)
	replayed := append(orig, orig[:bytes.IndexByte(orig, '\n')+1]...)
	os.WriteFile(path+".2", replayed, 0o600)
	for _, f := range []string{path + ".1", path + ".2"} {
		err := run(ctx, "audit", []string{"verify", f}, nil, &out)
		if err == nil || !strings.Contains(err.Error(), "BROKEN") {
			t.Errorf("verify of tampered %s: %v, want BROKEN", filepath.Base(f), err)
		}
	}
	if err := run(ctx, "audit", []string{"check"}, nil, &out); err == nil {
		t.Error("audit without verify did not fail")
	}
}

func TestStatus(t *testing.T) {
	st := admin.Status{Version: "v9", Token: admin.Token{Label: "dev", Ready: false, Paddings: map[string]string{"oaep-sha256": "raw"}},
		Pool: admin.Pool{Ready: 3, Target: 8}, Keys: admin.Keys{Outstanding: 2, OldestActiveIssuedAt: time.Now().Add(-time.Minute)},
		Records: admin.Records{Scope: "since start", Issued: 5}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != admin.StatusPath {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(st)
	}))
	defer srv.Close()
	var out bytes.Buffer
	if err := run(context.Background(), "status", []string{"-admin", srv.URL}, nil, &out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"DOWN", `label "dev"`, "3/8 ready", "2 outstanding", "oaep-sha256 (raw)", "records since start", "5 issued"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if err := run(context.Background(), "status", []string{"-admin", srv.URL, "-json"}, nil, &out); err != nil || !strings.Contains(out.String(), `"version": "v9"`) {
		t.Errorf("status -json: %v\n%s", err, out.String())
	}
}

func TestAuditVerifyCheckpoints(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.jsonl")
	var keys [2]*rsa.PrivateKey
	var pems [2]string
	for i := range keys {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
		keys[i], pems[i] = k, filepath.Join(dir, fmt.Sprintf("pub%d.pem", i))
		os.WriteFile(pems[i], pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600)
	}
	sign := func(msg []byte) ([]byte, error) {
		d := sha256.Sum256(msg)
		return rsa.SignPKCS1v15(nil, keys[0], crypto.SHA256, d[:])
	}
	l, err := audit.Open(path, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	l.Record(audit.Event{Type: audit.KeyIssued, UniqueID: "A"})
	if _, ok, err := l.Checkpoint(sign, audit.KeyID(&keys[0].PublicKey)); !ok || err != nil {
		t.Fatal(ok, err)
	}
	l.Record(audit.Event{Type: audit.KeyDestroyed, UniqueID: "A", Reason: "consumed"})
	l.Close()
	// A second trail whose checkpoint is in the log, then cut before it.
	cutPath := filepath.Join(dir, "cut.jsonl")
	lc, err := audit.Open(cutPath, audit.Options{})
	if err != nil {
		t.Fatal(err)
	}
	lc.Record(audit.Event{Type: audit.KeyIssued, UniqueID: "A"})
	lc.Record(audit.Event{Type: audit.KeyIssued, UniqueID: "B"})
	e, _, err := lc.Checkpoint(sign, audit.KeyID(&keys[0].PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	lc.Close()
	logPath := filepath.Join(dir, "keyissuerd.log")
	logLine, _ := json.Marshal(map[string]any{"msg": "audit checkpoint", "seq": e.CheckpointSeq, "head": e.CheckpointHead,
		"signature": e.Signature, "key_id": e.KeyID})
	os.WriteFile(logPath, append([]byte(`{"msg":"serving"}`+"\n"), append(logLine, '\n')...), 0o600)
	full, _ := os.ReadFile(cutPath)
	intact := filepath.Join(dir, "intact.jsonl")
	os.WriteFile(intact, full, 0o600)
	os.WriteFile(cutPath, full[:bytes.IndexByte(full, '\n')+1], 0o600)

	ctx := context.Background()
	for _, tt := range []struct {
		name    string
		args    []string
		want    string
		wantErr string
	}{
		{name: "with the key", args: []string{"verify", "-key", pems[0], path},
			want: "covered through seq 1 by 1 signed checkpoints; NOT COVERED: the 2 lines after it (seq 2-3"},
		{name: "without a key", args: []string{"verify", path}, want: "1 checkpoints, signatures NOT checked"},
		{name: "another key", args: []string{"verify", "-key", pems[1], path}, wantErr: "BROKEN: line 2: checkpoint signed by key"},
		{name: "against the log", args: []string{"verify", "-key", pems[0], "-log", logPath, intact}, want: "1 logged checkpoints match the trail"},
		{name: "cut, against the log", args: []string{"verify", "-key", pems[0], "-log", logPath, cutPath}, wantErr: "lines were cut off the end"},
		{name: "cut, without the log", args: []string{"verify", "-key", pems[0], cutPath}, want: "NOT COVERED: no signed checkpoint"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			err := run(ctx, "audit", tt.args, nil, &out)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !strings.Contains(out.String(), tt.want) {
				t.Errorf("output %q, %v; want %q", out.String(), err, tt.want)
			}
		})
	}
}
