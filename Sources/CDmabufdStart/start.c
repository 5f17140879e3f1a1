// dmabufd's first act, before main() and before any thread exists: open /proc/self/pagemap while
// privileged, then drop every capability for good but one: CAP_DAC_OVERRIDE, when the unit grants it,
// stays in the permitted set only (not effective, not inheritable, not ambient). The event-loop thread
// raises it into its own effective set for the single write that moves a charge helper into a client's
// cgroup (cgroup.procs of the target and of the common ancestor belong to root or to the client), and
// lowers it at once (Sources/CDmabufdCharge/charge.c). Helpers never get it: execve gives a process
// without file capabilities an empty permitted set when the ambient set is empty. Only the dmabufd
// executable links this target.
#include "CDmabufdStart.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <linux/capability.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int pagemap_fd = -1;
static int pagemap_errno = 0;
static int capabilities_errno = 0;

static int drop_capabilities(void) {
    // EINVAL: a kernel without ambient capabilities (before 4.3) has none to clear.
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL) return errno;
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    __u32 keep = 0;
    if (syscall(SYS_capget, &header, data) == 0) keep = data[0].permitted & (1u << CAP_DAC_OVERRIDE);
    memset(data, 0, sizeof data);
    data[0].permitted = keep;
    return syscall(SYS_capset, &header, data) == 0 ? 0 : errno;
}

__attribute__((constructor)) static void dmabufd_start(void) {
    // Charge helpers are this process's children and are placed by pid: an ignored SIGCHLD (or
    // SA_NOCLDWAIT) inherited from whoever started dmabufd would let an early-exiting helper be reaped
    // at once and its pid reused before the cgroup.procs write. The default keeps every helper a zombie
    // until dmabufd reaps it through its pidfd.
    struct sigaction child = { .sa_handler = SIG_DFL };
    sigemptyset(&child.sa_mask);
    sigaction(SIGCHLD, &child, NULL);
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pagemap_fd < 0) pagemap_errno = errno;
    capabilities_errno = drop_capabilities();
}

int CDmabufdStart_pagemap_fd(void) { return pagemap_fd; }
int CDmabufdStart_pagemap_errno(void) { return pagemap_errno; }
int CDmabufdStart_capabilities_errno(void) { return capabilities_errno; }
