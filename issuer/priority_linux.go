package issuer

import "golang.org/x/sys/unix"

// generatorNice is the nice value of key generation threads: their share
// of a busy CPU is about a tenth of a request thread's (weights 110 and
// 1024 in Linux's scheduler) where SCHED_IDLE is refused.
const generatorNice = 10

// lowerThreadPriority lowers the scheduling priority of the calling
// thread, which the caller has locked. On Linux, setpriority on a thread id
// applies to that thread alone. Raising one's nice value needs no
// privilege; should it fail all the same, generation runs at the normal
// priority.
//
// Then the thread moves to SCHED_IDLE (sched_setattr on the calling
// thread, which needs no privilege either): nice 10 still took a quarter
// of the CPU of a daemon busy answering applies on 2 cores (BENCHMARKS.md,
// row 2), as a thread that always wants the CPU keeps getting its share
// against request threads that sleep between calls; a SCHED_IDLE thread
// runs only when no normal thread wants the CPU (its weight is 3, and a
// waking request thread preempts it at once). It keeps its nice value, so
// that should the policy be refused, nice 10 still holds.
func lowerThreadPriority() {
	unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), generatorNice)
	unix.SchedSetAttr(0, &unix.SchedAttr{Policy: unix.SCHED_IDLE, Nice: generatorNice}, 0)
}
