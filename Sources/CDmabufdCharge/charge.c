#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "CDmabufdCharge.h"

#include <errno.h>
#include <stdlib.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

extern char **environ;

int CDmabufdCharge_spawn(const char *path, int socket, pid_t *pid, int *pidfd) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    sigset_t all, none;
    sigfillset(&all);
    sigemptyset(&none);
    int error = posix_spawn_file_actions_init(&actions);
    if (error) return error;
    if ((error = posix_spawnattr_init(&attributes))) {
        posix_spawn_file_actions_destroy(&actions);
        return error;
    }
    // fd 3 is the socket (dup2 onto itself would keep FD_CLOEXEC: glibc clears it for that case too);
    // every other descriptor of the daemon (clients' buffers among them) is closed before exec.
    if (!(error = posix_spawn_file_actions_adddup2(&actions, socket, 3))
        && !(error = posix_spawn_file_actions_addclosefrom_np(&actions, 4))
        && !(error = posix_spawnattr_setsigdefault(&attributes, &all))
        && !(error = posix_spawnattr_setsigmask(&attributes, &none))
        && !(error = posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))) {
        char parent[16];
        snprintf(parent, sizeof parent, "%d", (int)getpid());
        char *const argv[] = { (char *)"dmabufd-charge", parent, NULL };
        char *const envp[] = { NULL };
        error = posix_spawn(pid, path, &actions, &attributes, argv, envp);
    }
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    if (error) return error;
    int fd = (int)syscall(SYS_pidfd_open, *pid, 0);
    if (fd < 0) {
        error = errno;
        kill(*pid, SIGKILL);  // not yet reaped: the pid is still ours
        siginfo_t info;
        waitid(P_PID, (id_t)*pid, &info, WEXITED);
        return error;
    }
    *pidfd = fd;
    return 0;
}

int CDmabufdCharge_kill(int pidfd) {
    return syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0) == 0 ? 0 : errno;
}

int CDmabufdCharge_reap(int pidfd) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid((idtype_t)P_PIDFD, (id_t)pidfd, &info, WEXITED | WNOHANG) != 0) return -errno;
    return info.si_pid != 0 ? 1 : 0;
}

static int set_effective_dac(int raise) {
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    if (syscall(SYS_capget, &header, data) != 0) return 0;
    unsigned bit = 1u << CAP_DAC_OVERRIDE;  // CAP_DAC_OVERRIDE is 1: in the first word
    if (!(data[0].permitted & bit)) return 0;
    data[0].effective = raise ? (data[0].effective | bit) : (data[0].effective & ~bit);
    return syscall(SYS_capset, &header, data) == 0;
}

int CDmabufdCharge_write_procs(const char *path, const char *text) {
    int raised = set_effective_dac(1);
    int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
    int error = fd < 0 ? errno : 0;
    if (fd >= 0) {
        ssize_t n = write(fd, text, strlen(text));
        if (n < 0) error = errno; else if ((size_t)n != strlen(text)) error = EIO;
        close(fd);
    }
    // Never run on with CAP_DAC_OVERRIDE effective: a drop that fails is fatal (systemd restarts us).
    if (raised && !set_effective_dac(0)) abort();
    return error;
}
