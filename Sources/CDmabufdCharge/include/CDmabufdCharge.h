// CDmabufdCharge: the daemon's side of the charge helpers (Sources/dmabufd-charge): spawn one without
// forking the multithreaded Swift process, watch and reap it through a pidfd, and raise CAP_DAC_OVERRIDE
// on the calling thread only around the write that moves it into a client's cgroup. Every function
// returns -1 (or a negative errno where documented) with errno set on failure.
#ifndef CDMABUFDCHARGE_H
#define CDMABUFDCHARGE_H

#include <sys/types.h>

/// posix_spawn(path) with `socket` as its fd 3 and nothing else open, default signal dispositions and an
/// empty signal mask; argv[1] is this process's pid (the helper exits if its parent is not that pid).
/// On success stores the child's pid and a pidfd (O_CLOEXEC) and returns 0; else returns an errno.
int CDmabufdCharge_spawn(const char *path, int socket, pid_t *pid, int *pidfd);

/// pidfd_send_signal(SIGKILL): 0 or an errno (ESRCH once it is gone and reaped).
int CDmabufdCharge_kill(int pidfd);

/// waitid(P_PIDFD, WEXITED | WNOHANG): 1 when reaped now, 0 when still running, -errno on failure.
int CDmabufdCharge_reap(int pidfd);

/// Writes `text` (a pid) to the file at `path` (cgroup.procs), with CAP_DAC_OVERRIDE raised in this
/// thread's effective set for just that write when it is in the permitted set. 0 or an errno.
int CDmabufdCharge_write_procs(const char *path, const char *text);

#endif
