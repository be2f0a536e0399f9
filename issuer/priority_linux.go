package issuer

import "golang.org/x/sys/unix"

// generatorNice is the nice value of key generation threads: their share
// of a busy CPU is about a tenth of a request thread's (weights 110 and
// 1024 in Linux's scheduler).
const generatorNice = 10

// lowerThreadPriority lowers the scheduling priority of the calling
// thread, which the caller has locked. On Linux, setpriority on a thread id
// applies to that thread alone. Raising one's nice value needs no
// privilege; should it fail all the same, generation runs at the normal
// priority.
func lowerThreadPriority() {
	unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), generatorNice)
}
