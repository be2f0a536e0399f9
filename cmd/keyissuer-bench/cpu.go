package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The benchmark's load generator and the processes it measures share the
// machine's cores, so a client that costs CPU takes it from the side it
// measures. The raw token baselines run in the benchmark's own process with
// no client at all; keyissuer's side pays for its HTTP client, the answer's
// signature check and JSON. cpuMeter measures who used the CPU during a
// run, so that the report can say what the client's share was and what the
// ceiling would be if the client cost nothing.

// cpuUse is the CPU time processes used over a run.
type cpuUse struct {
	Bench time.Duration // the benchmark's own process: the load generator (and, for raw baselines, the token calls)
	// Daemon is the measured process (keyissuerd or the bare handler);
	// Niced is the part of it on threads with a positive nice value:
	// keyissuerd's key generators.
	Daemon, Niced time.Duration
}

func (u cpuUse) sub(v cpuUse) cpuUse {
	return cpuUse{Bench: u.Bench - v.Bench, Daemon: u.Daemon - v.Daemon, Niced: u.Niced - v.Niced}
}

// procCPU returns the CPU time pid has used, from its process CPU clock
// (clock_gettime of the clock clock_getcpuclockid would give, exact to the
// nanosecond), and the part of it on threads whose nice value is positive,
// summed from /proc/<pid>/task/*/schedstat: a running thread's figure there
// lags by up to a scheduler tick, so the niced part is approximate. Threads
// that have exited are not counted in the niced part; Go keeps its threads.
func procCPU(pid int) (all, niced time.Duration, err error) {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	if err != nil || len(tasks) == 0 {
		return 0, 0, fmt.Errorf("no threads of process %d: %v", pid, err)
	}
	var summed time.Duration
	defer func() {
		var ts unix.Timespec
		if unix.ClockGettime(processClock(pid), &ts) == nil {
			all = time.Duration(ts.Nano())
		} else {
			all = summed
		}
	}()
	for _, t := range tasks {
		ss, err := os.ReadFile(filepath.Join(t, "schedstat"))
		if err != nil {
			continue // the thread exited meanwhile
		}
		f := strings.Fields(string(ss))
		if len(f) == 0 {
			continue
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		summed += time.Duration(ns)
		if threadNiced(filepath.Join(t, "stat")) {
			niced += time.Duration(ns)
		}
	}
	return all, niced, nil
}

// processClock is the CPU clock of process pid, as glibc's
// clock_getcpuclockid makes it: CPUCLOCK_SCHED (2) of the whole process.
func processClock(pid int) int32 { return int32(^pid<<3 | 2) }

// threadNiced says whether the thread's nice value (the 19th field of its
// stat file) is positive.
func threadNiced(path string) bool {
	st, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(st), ')')
	if i < 0 {
		return false
	}
	f := strings.Fields(string(st[i+1:])) // from field 3, the state
	if len(f) < 17 {
		return false
	}
	nice, err := strconv.Atoi(f[16])
	return err == nil && nice > 0
}

// cpuNow samples the benchmark's CPU and, if pid > 0, the process pid's.
func cpuNow(pid int) cpuUse {
	var u cpuUse
	u.Bench, _, _ = procCPU(os.Getpid())
	if pid > 0 {
		u.Daemon, u.Niced, _ = procCPU(pid)
	}
	return u
}

// metered runs fn and returns the CPU the benchmark and pid used meanwhile.
func metered(pid int, fn func()) cpuUse {
	before := cpuNow(pid)
	fn()
	return cpuNow(pid).sub(before)
}

// cpuTally adds up the CPU of a side's runs and the ops they made.
type cpuTally struct {
	Use cpuUse
	Ops int
}

func (t *cpuTally) add(u cpuUse, ops int) {
	t.Use.Bench += u.Bench
	t.Use.Daemon += u.Daemon
	t.Use.Niced += u.Niced
	t.Ops += ops
}

// per returns the CPU per op of each part, in microseconds.
func (t cpuTally) per() (bench, daemon, niced float64) {
	if t.Ops == 0 {
		return 0, 0, 0
	}
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) / float64(t.Ops) }
	return us(t.Use.Bench), us(t.Use.Daemon), us(t.Use.Niced)
}

// cpuDetail is the JSON of a side's CPU per op, in microseconds.
func (t cpuTally) detail() map[string]float64 {
	b, d, n := t.per()
	return map[string]float64{"benchUsPerOp": b, "daemonUsPerOp": d, "nicedUsPerOp": n, "ops": float64(t.Ops)}
}

// clientCeiling is what a CPU-bound ceiling of rate ops/s on ncpu cores
// becomes when every op also costs clientUs of CPU on the same cores:
// what the token's signing ceiling allows a keyissuer that cost nothing
// but its signatures, measured through this benchmark's client.
func clientCeiling(rate, clientUs float64, ncpu int) float64 {
	if rate <= 0 || ncpu <= 0 {
		return 0
	}
	return 1 / (1/rate + clientUs/1e6/float64(ncpu))
}

// applyCPUNotes adds row 2's CPU accounting: who used the cores during
// keyissuer's runs, the bare handler's (the client's cost alone) and the
// raw C_Sign's (the signature's cost alone), and the ceiling with the
// client's cost charged to it.
func applyCPUNotes(rw *row, ceiling float64, kis, bare, sign cpuTally) {
	kb, kd, kn := kis.per()
	bb, _, _ := bare.per()
	sb, _, _ := sign.per()
	if kis.Ops == 0 || sign.Ops == 0 {
		return
	}
	ncpu := runtime.NumCPU()
	share := 0.0
	if kis.Use.Bench+kis.Use.Daemon > 0 {
		share = float64(kis.Use.Bench) / float64(kis.Use.Bench+kis.Use.Daemon)
	}
	withClient := clientCeiling(ceiling, kb, ncpu)
	if rw.Detail == nil {
		rw.Detail = map[string]any{}
	}
	rw.Detail["cpu"] = map[string]any{"keyissuer": kis.detail(), "bare": bare.detail(), "sign": sign.detail(),
		"benchShare": share, "ceilingWithClient": withClient}
	if rw.KeyIssuer != nil && withClient > 0 {
		rw.Detail["ofCeilingWithClient"] = rw.KeyIssuer.Median / withClient
	}
	rw.Notes = append(rw.Notes, fmt.Sprintf("CPU per apply: keyissuerd %.0f µs (of which key generation, at nice 10, %.0f µs), the benchmark's client %.0f µs "+
		"(%.0f%% of the CPU used in keyissuer's runs; %.0f µs against the bare handler); raw C_Sign %.0f µs a signature. "+
		"With the client's CPU charged to the ceiling on %d cores it is %.0f/s, and keyissuer reached %.0f%% of that",
		kd, kn, kb, 100*share, bb, sb, ncpu, withClient, 100*rw.KeyIssuer.Median/withClient))
}

// decryptCPUNotes adds row 3's CPU accounting: the client's and
// keyissuerd's CPU per decrypt, against the durable floor's (which has no
// client: its CPU is the token's and the fdatasync's).
func decryptCPUNotes(rw *row, kis, floor cpuTally) {
	if kis.Ops == 0 || floor.Ops == 0 {
		return
	}
	kb, kd, kn := kis.per()
	fb, _, _ := floor.per()
	if rw.Detail == nil {
		rw.Detail = map[string]any{}
	}
	rw.Detail["cpu"] = map[string]any{"keyissuer": kis.detail(), "floor": floor.detail()}
	rw.Notes = append(rw.Notes, fmt.Sprintf("CPU per decrypt: keyissuerd %.0f µs (key generation %.0f µs), the benchmark's client %.0f µs; the durable floor %.0f µs",
		kd, kn, kb, fb))
}

// decryptRTTNotes adds row 3's client path: the floors make no request,
// keyissuer's decrypts each make one over the socket. rtt is the rate of
// no-op requests (health) over the same client and socket at the same
// concurrency, run by run; the durable floor with one such request added
// to each of its ops is what a keyissuer that cost nothing but the floor
// could do as this benchmark measures it.
func decryptRTTNotes(rw *row, kis, floor, rtt []float64) {
	if len(rtt) == 0 || len(rtt) != len(floor) {
		return
	}
	withRTT := make([]float64, len(floor))
	for i := range floor {
		if floor[i] > 0 && rtt[i] > 0 {
			withRTT[i] = 1 / (1/floor[i] + 1/rtt[i])
		}
	}
	r, f := summarize(rtt), summarize(withRTT)
	of := summarize(ratios(kis, withRTT))
	if rw.Detail == nil {
		rw.Detail = map[string]any{}
	}
	rw.Detail["noopPerSec"], rw.Detail["floorWithRequest"], rw.Detail["ofFloorWithRequest"] = r, f, of
	rw.Notes = append(rw.Notes, fmt.Sprintf("client path: no-op requests (health) over the same socket and client ran at %s; "+
		"the durable floor with one such request per op would run at %s, and keyissuer reached %s of that",
		spreadText(r, perSecText), spreadText(f, perSecText), spreadText(of, pctText)))
}
