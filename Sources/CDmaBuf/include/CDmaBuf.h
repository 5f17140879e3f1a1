// CDmaBuf: the C shim under dmabufd's Swift kernel layer.
//
// Swift cannot call variadic C functions (ioctl, fcntl), cannot see function-like macros (_IOWR, CMSG_*),
// and cannot build structs that end in a flexible array member. This shim does exactly those three things
// and nothing else: every symbol is prefixed CDmaBuf_, ioctl request numbers are exported as constants, and
// every function returns -1 with errno set on failure so that the Swift side reads errno immediately.
#ifndef CDMABUF_H
#define CDMABUF_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <linux/dma-buf.h>
#include <linux/dma-heap.h>
#include <linux/sync_file.h>
#include <linux/udmabuf.h>

#ifdef __cplusplus
extern "C" {
#endif

// MARK: - vgem (uapi/drm/vgem_drm.h is not shipped by Debian's libdrm-dev; the ABI is stable)

struct CDmaBuf_vgem_fence_attach {
    uint32_t handle;
    uint32_t flags;     // CDmaBuf_VGEM_FENCE_WRITE
    uint32_t out_fence;
    uint32_t pad;
};

struct CDmaBuf_vgem_fence_signal {
    uint32_t fence;
    uint32_t flags;
};

/// VGEM_FENCE_WRITE: the attached fence is exclusive (a write).
extern const uint32_t CDmaBuf_VGEM_FENCE_WRITE;

// MARK: - sw_sync (drivers/dma-buf/sw_sync.c: its uAPI lives in the driver, not in an installed header)

/// `struct sw_sync_create_fence_data`: a fence on the timeline that signals when the timeline reaches `value`.
struct CDmaBuf_sw_sync_create_fence_data {
    uint32_t value;
    char name[32];
    int32_t fence;      // out: the new sync_file's fd
};

// MARK: - ioctl request numbers

extern const unsigned long CDmaBuf_DMA_HEAP_IOCTL_ALLOC;
extern const unsigned long CDmaBuf_UDMABUF_CREATE;
extern const unsigned long CDmaBuf_UDMABUF_CREATE_LIST;
extern const unsigned long CDmaBuf_DMA_BUF_IOCTL_SYNC;
extern const unsigned long CDmaBuf_DMA_BUF_SET_NAME;
extern const unsigned long CDmaBuf_DMA_BUF_IOCTL_EXPORT_SYNC_FILE;
extern const unsigned long CDmaBuf_DMA_BUF_IOCTL_IMPORT_SYNC_FILE;
extern const unsigned long CDmaBuf_SYNC_IOC_MERGE;
extern const unsigned long CDmaBuf_SYNC_IOC_FILE_INFO;
extern const unsigned long CDmaBuf_DRM_IOCTL_VGEM_FENCE_ATTACH;
extern const unsigned long CDmaBuf_DRM_IOCTL_VGEM_FENCE_SIGNAL;
extern const unsigned long CDmaBuf_DRM_IOCTL_MODE_CREATE_DUMB;
extern const unsigned long CDmaBuf_DRM_IOCTL_GEM_CLOSE;
/// SW_SYNC_IOC_CREATE_FENCE: _IOWR('W', 0, struct sw_sync_create_fence_data).
extern const unsigned long CDmaBuf_SW_SYNC_IOC_CREATE_FENCE;
/// SW_SYNC_IOC_INC: _IOW('W', 1, __u32): advances the timeline by that many steps.
extern const unsigned long CDmaBuf_SW_SYNC_IOC_INC;

// MARK: - constants Swift cannot import (macros built from expressions)

extern const uint64_t CDmaBuf_DMA_BUF_SYNC_READ;
extern const uint64_t CDmaBuf_DMA_BUF_SYNC_WRITE;
extern const uint64_t CDmaBuf_DMA_BUF_SYNC_START;
extern const uint64_t CDmaBuf_DMA_BUF_SYNC_END;
extern const uint32_t CDmaBuf_DMA_BUF_NAME_LEN;
extern const unsigned int CDmaBuf_MFD_CLOEXEC;
extern const unsigned int CDmaBuf_MFD_ALLOW_SEALING;
extern const unsigned int CDmaBuf_MFD_HUGETLB;
extern const int CDmaBuf_F_ADD_SEALS;
extern const int CDmaBuf_F_GET_SEALS;
extern const int CDmaBuf_F_SEAL_SEAL;
extern const int CDmaBuf_F_SEAL_SHRINK;
extern const int CDmaBuf_F_SEAL_GROW;
extern const int CDmaBuf_F_SEAL_WRITE;
extern const int CDmaBuf_F_SEAL_FUTURE_WRITE;
/// SCM_MAX_FD: the most fds the kernel passes in one SCM_RIGHTS message.
extern const int CDmaBuf_SCM_MAX_FD;

// MARK: - ioctl / fcntl

/// ioctl(fd, request, arg) for requests whose argument is a pointer. Returns -1 and sets errno on failure.
int CDmaBuf_ioctl(int fd, unsigned long request, void *arg);

/// fcntl(fd, cmd, arg) for commands with an int argument (F_ADD_SEALS, F_GETFD, F_SETFL, ...).
int CDmaBuf_fcntl(int fd, int cmd, int arg);

/// UDMABUF_CREATE_LIST: builds `struct udmabuf_create_list` with its flexible `list[]` from `items`.
/// Returns the new dma-buf fd (the caller closes it) or -1 with errno set (ENOMEM if the list cannot be built).
int CDmaBuf_udmabuf_create_list(int udmabuf_fd, uint32_t flags,
                                const struct udmabuf_create_item *items, uint32_t count);

/// SYNC_IOC_FILE_INFO with the per-fence array. Call with `fences == NULL, capacity == 0` to learn
/// `info->num_fences`, then again with room for that many. Returns 0 or -1 with errno set.
int CDmaBuf_sync_file_info(int fd, struct sync_file_info *info,
                           struct sync_fence_info *fences, uint32_t capacity);

/// memfd_create(2). Returns the fd (the caller closes it) or -1 with errno set.
int CDmaBuf_memfd_create(const char *name, unsigned int flags);

// MARK: - sockets

/// sendmsg(2) of `len` bytes with `nfds` descriptors in one SCM_RIGHTS message (MSG_NOSIGNAL is added).
/// The descriptors stay owned by the caller. Returns bytes sent or -1 with errno set (EINVAL if nfds > SCM_MAX_FD).
ssize_t CDmaBuf_send_with_fds(int sock, const void *buf, size_t len, const int *fds, size_t nfds, int flags);

/// recvmsg(2) into `buf` with MSG_CMSG_CLOEXEC, collecting every SCM_RIGHTS descriptor.
/// Up to `*nfds` (in: capacity) descriptors are stored in `fds` and become the caller's to close; any surplus
/// descriptors are closed here and counted in `*surplus`. `*msg_flags` receives msghdr.msg_flags so the
/// caller sees MSG_TRUNC / MSG_CTRUNC. Returns bytes received (0 at EOF) or -1 with errno set.
ssize_t CDmaBuf_recv_with_fds(int sock, void *buf, size_t len, int *fds, size_t *nfds,
                              size_t *surplus, int *msg_flags, int flags);

/// accept4(sock, NULL, NULL, SOCK_CLOEXEC). Returns the connection (the caller closes it) or -1 with errno set.
int CDmaBuf_accept_cloexec(int sock);

/// getsockopt(SO_PEERCRED). Returns 0 or -1 with errno set.
int CDmaBuf_peer_credentials(int sock, pid_t *pid, uid_t *uid, gid_t *gid);

// MARK: - pidfds (client identity that a reused pid cannot fake)

/// getsockopt(SO_PEERPIDFD) (Linux 6.5): a pidfd of the process that connected, close-on-exec. Returns the
/// pidfd (the caller closes it) or -1 with errno set (ENOPROTOOPT before 6.5).
int CDmaBuf_peer_pidfd(int sock);

/// pidfd_open(pid, 0) (Linux 5.3), close-on-exec. Returns the pidfd or -1 with errno set (ESRCH: no such
/// process; ENOSYS before 5.3).
int CDmaBuf_pidfd_open(pid_t pid);

/// pidfd_send_signal(pidfd, sig, NULL, 0) (Linux 5.1). Signal 0 only checks: 0 or EPERM for a live process,
/// ESRCH once it has exited. Returns 0 or -1 with errno set.
int CDmaBuf_pidfd_send_signal(int pidfd, int sig);

// CMSG_* are macros; these are their function forms for code that walks control messages itself.
struct cmsghdr *CDmaBuf_CMSG_FIRSTHDR(const struct msghdr *msg);
struct cmsghdr *CDmaBuf_CMSG_NXTHDR(struct msghdr *msg, struct cmsghdr *cmsg);
unsigned char *CDmaBuf_CMSG_DATA(struct cmsghdr *cmsg);
size_t CDmaBuf_CMSG_SPACE(size_t length);
size_t CDmaBuf_CMSG_LEN(size_t length);

#ifdef __cplusplus
}
#endif

#endif
