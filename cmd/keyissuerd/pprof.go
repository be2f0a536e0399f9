//go:build pprof

// With -tags pprof, keyissuerd serves Go's profiles on the loopback address
// in $KEYISSUERD_PPROF, for the benchmark (cmd/keyissuer-bench) and for
// whoever profiles the daemon by hand:
//
//	go build -tags pprof -o bin/keyissuerd-pprof ./cmd/keyissuerd
//	KEYISSUERD_PPROF=127.0.0.1:6060 bin/keyissuerd-pprof -config ...
//	go tool pprof http://127.0.0.1:6060/debug/pprof/profile?seconds=10
//
// Besides net/http/pprof's handlers it has POST /debug/cpu/start?hz=N and
// POST /debug/cpu/stop, which return a CPU profile of exactly the span
// between them, sampled at N Hz: the benchmark's runs last well under a
// second. (On Linux a thread's CPU-time timer fires at most once per kernel
// tick, so rates above CONFIG_HZ, often 250, give fewer samples than they
// claim.) Production builds have none of this.

package main

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime"
	rpprof "runtime/pprof"
	"strconv"
	"sync"
	"time"
)

func init() {
	addr := os.Getenv("KEYISSUERD_PPROF")
	if addr == "" {
		return
	}
	host, _, err := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		fmt.Fprintf(os.Stderr, "keyissuerd: KEYISSUERD_PPROF=%q is not a loopback host:port; profiles not served\n", addr)
		return
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "keyissuerd: KEYISSUERD_PPROF: %v\n", err)
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	var (
		mu  sync.Mutex
		buf *bytes.Buffer
	)
	mux.HandleFunc("POST /debug/cpu/start", func(w http.ResponseWriter, r *http.Request) {
		hz, err := strconv.Atoi(r.URL.Query().Get("hz"))
		if err != nil || hz < 1 || hz > 10000 {
			hz = 100
		}
		mu.Lock()
		defer mu.Unlock()
		if buf != nil {
			http.Error(w, "a profile is running", http.StatusConflict)
			return
		}
		// Setting the rate first is the known way to sample faster than
		// StartCPUProfile's 100 Hz; the runtime then warns on stderr
		// that the rate is already set.
		runtime.SetCPUProfileRate(hz)
		b := new(bytes.Buffer)
		if err := rpprof.StartCPUProfile(b); err != nil {
			runtime.SetCPUProfileRate(0)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		buf = b
	})
	mux.HandleFunc("POST /debug/cpu/stop", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if buf == nil {
			http.Error(w, "no profile is running", http.StatusConflict)
			return
		}
		rpprof.StopCPUProfile()
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(buf.Bytes())
		buf = nil
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	// A debug listener of a debug build: it lives as long as the process.
	go srv.Serve(ln)
}
