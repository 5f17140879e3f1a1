#define _GNU_SOURCE
#include "CDmaBuf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

// The uAPI layouts we rely on. A mismatch here means the headers changed under us: fail the build.
_Static_assert(sizeof(struct dma_heap_allocation_data) == 24, "dma_heap_allocation_data");
_Static_assert(sizeof(struct udmabuf_create) == 24, "udmabuf_create");
_Static_assert(sizeof(struct udmabuf_create_item) == 24, "udmabuf_create_item");
_Static_assert(sizeof(struct udmabuf_create_list) == 8, "udmabuf_create_list");
_Static_assert(sizeof(struct dma_buf_sync) == 8, "dma_buf_sync");
_Static_assert(sizeof(struct dma_buf_export_sync_file) == 8, "dma_buf_export_sync_file");
_Static_assert(sizeof(struct dma_buf_import_sync_file) == 8, "dma_buf_import_sync_file");
_Static_assert(sizeof(struct sync_merge_data) == 48, "sync_merge_data");
_Static_assert(sizeof(struct sync_fence_info) == 80, "sync_fence_info");
_Static_assert(sizeof(struct sync_file_info) == 56, "sync_file_info");
_Static_assert(sizeof(struct CDmaBuf_vgem_fence_attach) == 16, "drm_vgem_fence_attach");
_Static_assert(sizeof(struct CDmaBuf_vgem_fence_signal) == 8, "drm_vgem_fence_signal");
_Static_assert(sizeof(struct CDmaBuf_sw_sync_create_fence_data) == 40, "sw_sync_create_fence_data");
_Static_assert(offsetof(struct CDmaBuf_sw_sync_create_fence_data, fence) == 36, "sw_sync_create_fence_data.fence");

// uapi/drm/drm.h: DRM_IOCTL_BASE 'd', DRM_COMMAND_BASE 0x40; vgem: FENCE_ATTACH 0x1, FENCE_SIGNAL 0x2.
#define CDMABUF_DRM_COMMAND_BASE 0x40

const uint32_t CDmaBuf_VGEM_FENCE_WRITE = 0x1;

const unsigned long CDmaBuf_DMA_HEAP_IOCTL_ALLOC = DMA_HEAP_IOCTL_ALLOC;
const unsigned long CDmaBuf_UDMABUF_CREATE = UDMABUF_CREATE;
const unsigned long CDmaBuf_UDMABUF_CREATE_LIST = UDMABUF_CREATE_LIST;
const unsigned long CDmaBuf_DMA_BUF_IOCTL_SYNC = DMA_BUF_IOCTL_SYNC;
const unsigned long CDmaBuf_DMA_BUF_SET_NAME = DMA_BUF_SET_NAME;
const unsigned long CDmaBuf_DMA_BUF_IOCTL_EXPORT_SYNC_FILE = DMA_BUF_IOCTL_EXPORT_SYNC_FILE;
const unsigned long CDmaBuf_DMA_BUF_IOCTL_IMPORT_SYNC_FILE = DMA_BUF_IOCTL_IMPORT_SYNC_FILE;
const unsigned long CDmaBuf_SYNC_IOC_MERGE = SYNC_IOC_MERGE;
const unsigned long CDmaBuf_SYNC_IOC_FILE_INFO = SYNC_IOC_FILE_INFO;
const unsigned long CDmaBuf_DRM_IOCTL_VGEM_FENCE_ATTACH =
    _IOWR('d', CDMABUF_DRM_COMMAND_BASE + 0x1, struct CDmaBuf_vgem_fence_attach);
const unsigned long CDmaBuf_DRM_IOCTL_VGEM_FENCE_SIGNAL =
    _IOW('d', CDMABUF_DRM_COMMAND_BASE + 0x2, struct CDmaBuf_vgem_fence_signal);

// uapi/drm/drm.h and drm_mode.h layouts, for the two generic DRM requests the tests need.
struct CDmaBuf_drm_mode_create_dumb { uint32_t height, width, bpp, flags, handle, pitch; uint64_t size; };
struct CDmaBuf_drm_gem_close { uint32_t handle, pad; };
_Static_assert(sizeof(struct CDmaBuf_drm_mode_create_dumb) == 32, "drm_mode_create_dumb");
const unsigned long CDmaBuf_DRM_IOCTL_MODE_CREATE_DUMB = _IOWR('d', 0xB2, struct CDmaBuf_drm_mode_create_dumb);
const unsigned long CDmaBuf_DRM_IOCTL_GEM_CLOSE = _IOW('d', 0x09, struct CDmaBuf_drm_gem_close);
const unsigned long CDmaBuf_SW_SYNC_IOC_CREATE_FENCE = _IOWR('W', 0, struct CDmaBuf_sw_sync_create_fence_data);
const unsigned long CDmaBuf_SW_SYNC_IOC_INC = _IOW('W', 1, uint32_t);

const uint64_t CDmaBuf_DMA_BUF_SYNC_READ = DMA_BUF_SYNC_READ;
const uint64_t CDmaBuf_DMA_BUF_SYNC_WRITE = DMA_BUF_SYNC_WRITE;
const uint64_t CDmaBuf_DMA_BUF_SYNC_START = DMA_BUF_SYNC_START;
const uint64_t CDmaBuf_DMA_BUF_SYNC_END = DMA_BUF_SYNC_END;
const uint32_t CDmaBuf_DMA_BUF_NAME_LEN = DMA_BUF_NAME_LEN;
const unsigned int CDmaBuf_MFD_CLOEXEC = MFD_CLOEXEC;
const unsigned int CDmaBuf_MFD_ALLOW_SEALING = MFD_ALLOW_SEALING;
const unsigned int CDmaBuf_MFD_HUGETLB = MFD_HUGETLB;
const int CDmaBuf_F_ADD_SEALS = F_ADD_SEALS;
const int CDmaBuf_F_GET_SEALS = F_GET_SEALS;
const int CDmaBuf_F_SEAL_SEAL = F_SEAL_SEAL;
const int CDmaBuf_F_SEAL_SHRINK = F_SEAL_SHRINK;
const int CDmaBuf_F_SEAL_GROW = F_SEAL_GROW;
const int CDmaBuf_F_SEAL_WRITE = F_SEAL_WRITE;
#ifdef F_SEAL_FUTURE_WRITE
const int CDmaBuf_F_SEAL_FUTURE_WRITE = F_SEAL_FUTURE_WRITE;
#else
const int CDmaBuf_F_SEAL_FUTURE_WRITE = 0x0010;
#endif
// include/net/scm.h; not exported to userspace.
const int CDmaBuf_SCM_MAX_FD = 253;

int CDmaBuf_ioctl(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg);
}

int CDmaBuf_fcntl(int fd, int cmd, int arg) {
    return fcntl(fd, cmd, arg);
}

int CDmaBuf_udmabuf_create_list(int udmabuf_fd, uint32_t flags,
                                const struct udmabuf_create_item *items, uint32_t count) {
    size_t bytes = sizeof(struct udmabuf_create_list) + (size_t)count * sizeof(struct udmabuf_create_item);
    struct udmabuf_create_list *list = calloc(1, bytes);
    if (list == NULL) {
        errno = ENOMEM;
        return -1;
    }
    list->flags = flags;
    list->count = count;
    if (count > 0) {
        memcpy(list->list, items, (size_t)count * sizeof(struct udmabuf_create_item));
    }
    int fd = ioctl(udmabuf_fd, UDMABUF_CREATE_LIST, list);
    int saved = errno;
    free(list);
    errno = saved;
    return fd;
}

int CDmaBuf_sync_file_info(int fd, struct sync_file_info *info,
                           struct sync_fence_info *fences, uint32_t capacity) {
    memset(info, 0, sizeof(*info));
    info->num_fences = capacity;
    info->sync_fence_info = (uint64_t)(uintptr_t)fences;
    return ioctl(fd, SYNC_IOC_FILE_INFO, info);
}

int CDmaBuf_memfd_create(const char *name, unsigned int flags) {
    return memfd_create(name, flags);
}

ssize_t CDmaBuf_send_with_fds(int sock, const void *buf, size_t len, const int *fds, size_t nfds, int flags) {
    if (nfds > (size_t)CDmaBuf_SCM_MAX_FD) {
        errno = EINVAL;
        return -1;
    }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    // Aligned storage for the largest control message we ever send.
    union {
        char buf[CMSG_SPACE(sizeof(int) * 253)];
        struct cmsghdr align;
    } control;
    if (nfds > 0) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
    }
    return sendmsg(sock, &msg, flags | MSG_NOSIGNAL);
}

ssize_t CDmaBuf_recv_with_fds(int sock, void *buf, size_t len, int *fds, size_t *nfds,
                              size_t *surplus, int *msg_flags, int flags) {
    size_t capacity = *nfds;
    *nfds = 0;
    *surplus = 0;
    *msg_flags = 0;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union {
        char buf[CMSG_SPACE(sizeof(int) * 253)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof(control.buf),
    };
    ssize_t n = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
    if (n < 0) {
        return -1;
    }
    *msg_flags = msg.msg_flags;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) {
            continue;
        }
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *data = CMSG_DATA(cmsg);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof(int), sizeof(int));
            if (*nfds < capacity) {
                fds[(*nfds)++] = fd;
            } else {
                // More than the caller can own: never leak a descriptor into this process. The Swift
                // side passes room for SCM_MAX_FD, all the control buffer holds, so this does not
                // happen there (a close here could block on whatever the peer sent).
                close(fd);
                (*surplus)++;
            }
        }
    }
    return n;
}

int CDmaBuf_accept_cloexec(int sock) {
    return accept4(sock, NULL, NULL, SOCK_CLOEXEC);
}

int CDmaBuf_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        return -1;
    }
    *pid = cred.pid;
    *uid = cred.uid;
    *gid = cred.gid;
    return 0;
}

// Older libc headers lack these; the numbers are the kernel's ABI (asm-generic/socket.h, unistd.h).
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

int CDmaBuf_peer_pidfd(int sock) {
    int pidfd = -1;
    socklen_t len = sizeof(pidfd);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) != 0) {
        return -1;
    }
    if (len != sizeof(pidfd) || pidfd < 0) {
        errno = EINVAL;
        return -1;
    }
    return pidfd;  // the kernel makes it O_CLOEXEC
}

int CDmaBuf_pidfd_open(pid_t pid) {
    // pidfd_open has no O_CLOEXEC flag: its fds are always close-on-exec.
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

int CDmaBuf_pidfd_send_signal(int pidfd, int sig) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

struct cmsghdr *CDmaBuf_CMSG_FIRSTHDR(const struct msghdr *msg) {
    return CMSG_FIRSTHDR(msg);
}

struct cmsghdr *CDmaBuf_CMSG_NXTHDR(struct msghdr *msg, struct cmsghdr *cmsg) {
    return CMSG_NXTHDR(msg, cmsg);
}

unsigned char *CDmaBuf_CMSG_DATA(struct cmsghdr *cmsg) {
    return CMSG_DATA(cmsg);
}

size_t CDmaBuf_CMSG_SPACE(size_t length) {
    return CMSG_SPACE(length);
}

size_t CDmaBuf_CMSG_LEN(size_t length) {
    return CMSG_LEN(length);
}
