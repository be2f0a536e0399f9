package issuer

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// niceOfThread runs fn on a thread of its own, locked for the rest of the
// goroutine's life, and returns that thread's nice value afterwards.
func niceOfThread(fn func(), hold <-chan struct{}) <-chan int {
	out := make(chan int, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		fn()
		p, _ := unix.Getpriority(unix.PRIO_PROCESS, unix.Gettid())
		out <- 20 - p // getpriority returns 20 - nice
		<-hold
	}()
	return out
}

func TestLowerThreadPriority(t *testing.T) {
	hold := make(chan struct{})
	defer close(hold)
	// The base is a fresh thread's, not the process's: the main thread
	// (tid = pid) may have run an earlier test's generator, which locked it
	// and lowered it, and Go never lets a locked main thread go.
	base := 20 - <-niceOfThread(func() {}, hold)
	if 20-base >= generatorNice {
		// Nothing to lower. CI runs make test at nice 0: there it must run.
		msg := fmt.Sprintf("the test runs at nice %d already, at or below the generators' %d", 20-base, generatorNice)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; CI runs make test at nice 0")
		}
		t.Skip(msg)
	}
	lowered := <-niceOfThread(lowerThreadPriority, hold)
	// Both goroutines hold their threads, so this one runs on another.
	other := <-niceOfThread(func() {}, hold)
	if lowered != generatorNice {
		t.Errorf("generator thread: nice %d, want %d", lowered, generatorNice)
	}
	if other != 20-base {
		t.Errorf("another thread: nice %d, want it untouched at %d", other, 20-base)
	}
}
