package main

import (
	"math"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// procCPU counts the CPU the process burns, and a thread at a positive
// nice value as niced. The thread spins until its own CPU time (getrusage
// of the thread) has grown by 20 ms, so no clock decides the outcome.
func TestProcCPU(t *testing.T) {
	if _, err := os.Stat("/proc/self/task"); err != nil {
		t.Skip("no /proc")
	}
	threadCPU := func() time.Duration {
		var ru unix.Rusage
		unix.Getrusage(unix.RUSAGE_THREAD, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	const burn = 20 * time.Millisecond
	niced, spun := make(chan struct{}), make(chan struct{})
	var before cpuUse
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), 5); err != nil {
			t.Errorf("setpriority: %v", err)
		}
		close(niced)
		<-spun // the sample before is taken
		for start := threadCPU(); threadCPU()-start < burn; {
		}
		spun <- struct{}{}
		select {} // keep the thread, so that its time stays counted
	}()
	<-niced
	before = cpuNow(os.Getpid())
	spun <- struct{}{}
	<-spun
	u := cpuNow(os.Getpid()).sub(before)
	if u.Bench < burn {
		t.Errorf("the process's CPU grew by %v while a thread burnt %v", u.Bench, burn)
	}
	if u.Niced < burn {
		t.Errorf("niced CPU grew by %v while a niced thread burnt %v", u.Niced, burn)
	}
	if _, _, err := procCPU(-1); err == nil {
		t.Error("procCPU of no process: no error")
	}
}

func TestClientCeiling(t *testing.T) {
	// 2,000 signatures/s on 2 cores is 1 ms of CPU each; a client that
	// costs 1 ms a request too halves it.
	if got := clientCeiling(2000, 1000, 2); math.Abs(got-1000) > 1e-9 {
		t.Errorf("clientCeiling = %v, want 1000", got)
	}
	if got := clientCeiling(2000, 0, 2); got != 2000 {
		t.Errorf("a free client: %v, want the ceiling itself", got)
	}
	if got := clientCeiling(0, 100, 2); got != 0 {
		t.Errorf("no ceiling: %v, want 0", got)
	}
}

func TestCPUNotes(t *testing.T) {
	k := summarize([]float64{1000})
	rw := row{KeyIssuer: &k}
	kis := cpuTally{Use: cpuUse{Bench: 200 * time.Millisecond, Daemon: 1200 * time.Millisecond, Niced: 100 * time.Millisecond}, Ops: 1000}
	sign := cpuTally{Use: cpuUse{Bench: 700 * time.Millisecond}, Ops: 1000}
	applyCPUNotes(&rw, 2000, kis, cpuTally{}, sign)
	if len(rw.Notes) != 1 || !strings.Contains(rw.Notes[0], "keyissuerd 1200 µs") || !strings.Contains(rw.Notes[0], "client 200 µs") {
		t.Fatalf("notes %q", rw.Notes)
	}
	rw = row{}
	decryptRTTNotes(&rw, []float64{500}, []float64{1000}, []float64{1000})
	if got := rw.Detail["floorWithRequest"].(summary).Median; got != 500 {
		t.Errorf("floor with one request: %v, want 500", got)
	}
	if got := rw.Detail["ofFloorWithRequest"].(summary).Median; got != 1 {
		t.Errorf("keyissuer of the floor with one request: %v, want 1", got)
	}
}
