#ifndef CDMABUFD_START_H
#define CDMABUFD_START_H

/// What dmabufd's start-up constructor did (start.c). It runs before main(), while the process has
/// one thread, because capabilities are per thread: dropped later, threads the runtime had already
/// started would keep them.
///
/// The descriptor of /proc/self/pagemap opened while the process still had its capabilities (the
/// kernel shows PFNs to an opener with CAP_SYS_ADMIN), or -1 with the open's errno in
/// CDmabufdStart_pagemap_errno(). Owned by the process; never closed.
int CDmabufdStart_pagemap_fd(void);
int CDmabufdStart_pagemap_errno(void);
/// 0 when every capability (effective, permitted, inheritable, ambient) was dropped, else the errno.
int CDmabufdStart_capabilities_errno(void);

#endif
