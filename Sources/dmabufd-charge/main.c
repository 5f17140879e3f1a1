// dmabufd-charge: allocates dma-bufs for dmabufd from inside a client's memory cgroup, so that the kernel
// charges the client and not the daemon (docs/DESIGN.md, "Charging the client's cgroup").
//
// dmabufd spawns one per client cgroup with posix_spawn and then writes its pid into that cgroup's
// cgroup.procs. The kernel charges heap pages (7.0+ with dma_heap.mem_accounting=1) and shmem pages
// (memfd, every kernel) to the memory cgroup of the task that allocates or faults them in: this process.
// It holds no capability (dmabufd keeps none in its ambient or inheritable sets, and a helper of a dmabufd
// run as root drops every one it starts with, its bounding set included), has no_new_privs, is not
// dumpable, dies with the daemon, and has nothing open but its socket (fd 3) between requests: every request brings the
// device fd it needs. Plain C, no Swift runtime: it starts in about a millisecond and costs ~100 KiB.
//
// Wire format (SOCK_SEQPACKET, one request or reply per datagram, host byte order; the two ends are the
// same build on the same machine). A request is a `struct request`, followed for OP_UDMABUF_MEMFD by
// `count` `struct range`s; its SCM_RIGHTS carry the device fd (a heap device or /dev/udmabuf) and, for
// OP_UDMABUF_MEMFD, the client's memfds after it (1 to MAX_MEMFDS; each range names one by index). A reply is a `struct reply` whose SCM_RIGHTS carry, on
// success, the dma-buf fd and, for OP_UDMABUF_OWN, the memfd this process made after it. `error` is 0 or
// a positive errno. The daemon trusts nothing in a reply: this process lives in a cgroup the client
// controls (it can be frozen, killed or starved of pids), so dmabufd checks the sequence number, the
// fd count and kinds, and the buffer's size, and times out.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/dma-heap.h>
#include <linux/udmabuf.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { OP_HEAP = 1, OP_UDMABUF_OWN = 2, OP_UDMABUF_MEMFD = 3 };
enum { FLAG_HUGE_PAGES = 1 };
enum { MAX_RANGES = 1024, MAX_MEMFDS = 16, MAX_IN_FDS = 1 + MAX_MEMFDS, SOCKET_FD = 3 };

struct request {          // 40 bytes
    uint32_t op;          // OP_*
    uint32_t sequence;    // echoed in the reply
    uint64_t size;        // OP_HEAP: bytes; OP_UDMABUF_OWN: the memfd's size, already rounded by the daemon
    uint32_t fd_flags;    // OP_HEAP: dma_heap_allocation_data.fd_flags
    uint32_t flags;       // OP_UDMABUF_OWN: FLAG_HUGE_PAGES
    uint64_t heap_flags;  // OP_HEAP: dma_heap_allocation_data.heap_flags
    uint32_t count;       // OP_UDMABUF_MEMFD: struct ranges that follow
    uint32_t reserved;
};

struct range {            // 24 bytes
    uint64_t offset;
    uint64_t size;
    uint32_t memfd;       // index among the request's memfds (the fds after the device fd)
    uint32_t reserved;
};
_Static_assert(sizeof(struct range) == 24, "struct range is 24 bytes on the wire");

struct reply {            // 16 bytes
    uint32_t sequence;
    int32_t error;        // 0 or errno
    uint64_t size;        // OP_UDMABUF_OWN: the memfd's size; else 0
};

static int heap_alloc(int device, const struct request *r, int *out) {
    struct dma_heap_allocation_data data = { .len = r->size, .fd_flags = r->fd_flags, .heap_flags = r->heap_flags };
    if (ioctl(device, DMA_HEAP_IOCTL_ALLOC, &data) != 0) return errno;
    out[0] = (int)data.fd;
    return 0;
}

// UDMABUF_CREATE_LIST over `ranges`, each in memfds[range.memfd] (indices checked by the caller).
static int create_list(int device, const int *memfds, const struct range *ranges, uint32_t count, int *out) {
    size_t bytes = sizeof(struct udmabuf_create_list) + (size_t)count * sizeof(struct udmabuf_create_item);
    struct udmabuf_create_list *list = calloc(1, bytes);
    if (!list) return ENOMEM;
    list->flags = UDMABUF_FLAGS_CLOEXEC;
    list->count = count;
    for (uint32_t i = 0; i < count; i++) {
        list->list[i] = (struct udmabuf_create_item){ .memfd = (uint32_t)memfds[ranges[i].memfd], .offset = ranges[i].offset, .size = ranges[i].size };
    }
    int fd;
    do fd = ioctl(device, UDMABUF_CREATE_LIST, list); while (fd < 0 && errno == EINTR);
    int error = fd < 0 ? errno : 0;
    free(list);
    if (fd >= 0) out[0] = fd;
    return error;
}

// A sealed memfd of this process's own (so its pages are charged here when UDMABUF_CREATE pins them).
static int udmabuf_own(int device, const struct request *r, int *out) {
    unsigned flags = MFD_CLOEXEC | MFD_ALLOW_SEALING | ((r->flags & FLAG_HUGE_PAGES) ? MFD_HUGETLB : 0);
    int memfd = memfd_create("dmabufd", flags);
    if (memfd < 0) return errno;
    int error = 0;
    if (r->size > INT64_MAX || ftruncate(memfd, (off_t)r->size) != 0 || fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
        error = r->size > INT64_MAX ? EOVERFLOW : errno;
    } else {
        struct range whole = { 0, r->size, 0, 0 };
        error = create_list(device, &memfd, &whole, 1, out);
    }
    if (error) close(memfd); else out[1] = memfd;
    return error;
}

static void send_reply(uint32_t sequence, int error, uint64_t size, const int *fds, int count) {
    struct reply reply = { .sequence = sequence, .error = error, .size = size };
    struct iovec iov = { &reply, sizeof reply };
    union { char buffer[CMSG_SPACE(2 * sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (count > 0) {
        msg.msg_control = control.buffer;
        msg.msg_controllen = CMSG_SPACE((size_t)count * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN((size_t)count * sizeof(int));
        memcpy(CMSG_DATA(c), fds, (size_t)count * sizeof(int));
    }
    // A daemon that stopped reading is gone or will time us out: nothing to do but drop the reply.
    (void)sendmsg(SOCKET_FD, &msg, MSG_NOSIGNAL);
}

// Serves one request; the received fds and the made fds are closed after the reply.
static void serve(const unsigned char *bytes, size_t length, const int *in, int in_count) {
    struct request r;
    if (length < sizeof r) { send_reply(0, EBADMSG, 0, NULL, 0); return; }
    memcpy(&r, bytes, sizeof r);
    int out[2] = { -1, -1 }, out_count = 0, error;
    uint64_t size = 0;
    if (in_count < 1) {
        error = EBADF;
    } else if (r.op == OP_HEAP && in_count == 1 && length == sizeof r) {
        error = heap_alloc(in[0], &r, out);
        out_count = 1;
    } else if (r.op == OP_UDMABUF_OWN && in_count == 1 && length == sizeof r) {
        error = udmabuf_own(in[0], &r, out);
        out_count = 2;
        size = r.size;
    } else if (r.op == OP_UDMABUF_MEMFD && in_count >= 2 && r.count >= 1 && r.count <= MAX_RANGES
               && length == sizeof r + (size_t)r.count * sizeof(struct range)) {
        static struct range ranges[MAX_RANGES];
        memcpy(ranges, bytes + sizeof r, (size_t)r.count * sizeof(struct range));
        error = 0;
        for (uint32_t i = 0; i < r.count; i++) if (ranges[i].memfd >= (uint32_t)(in_count - 1)) error = EBADF;
        if (!error) error = create_list(in[0], in + 1, ranges, r.count, out);
        out_count = 1;
    } else {
        error = EBADMSG;
    }
    send_reply(r.sequence, error, size, out, error ? 0 : out_count);
    for (int i = 0; i < 2; i++) if (out[i] >= 0) close(out[i]);
}

// Under the unit dmabufd runs as its own user and this process starts with no capability. A dmabufd run
// as root (by hand, or another unit) would exec it with all of them: drop the bounding set while
// CAP_SETPCAP is still there, then every set. Nothing here needs a capability: the devices come with each
// request and the cgroup move is the daemon's write. Returns 0 or -1 with errno.
static int drop_capabilities(void) {
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capget, &header, data) != 0) return -1;
    // Nothing held (the unit's case): nothing to drop (the ambient set is a subset of permitted), and no
    // capset, which a stricter seccomp filter or an LSM may refuse. The bounding set cannot be lowered
    // without CAP_SETPCAP, and no_new_privs (set next) keeps an exec from using it.
    int held = 0;
    for (int i = 0; i < _LINUX_CAPABILITY_U32S_3; i++) held |= (data[i].permitted | data[i].effective | data[i].inheritable) != 0;
    if (!held) return 0;
    if (data[CAP_TO_INDEX(CAP_SETPCAP)].effective & CAP_TO_MASK(CAP_SETPCAP)) {
        for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
            if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) return -1;
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) return -1;
    memset(data, 0, sizeof data);
    return (int)syscall(SYS_capset, &header, data);
}

int main(int argc, char **argv) {
    // Dies with the daemon; a daemon that died before this line is noticed through the changed parent.
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) return 1;
    if (argc < 2 || getppid() != (pid_t)strtol(argv[1], NULL, 10)) return 1;
    if (drop_capabilities() != 0) return 1;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return 1;
    // Not dumpable: no core of a process that handled clients' memfds, and no ptrace or /proc/PID/mem
    // from a process of the same uid without CAP_SYS_PTRACE.
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) return 1;
    // posix_spawn closed everything above the socket already (closefrom); this covers 0-2 too.
    if (close_range(0, SOCKET_FD - 1, 0) != 0 || close_range(SOCKET_FD + 1, ~0U, 0) != 0) return 1;
    static unsigned char bytes[sizeof(struct request) + MAX_RANGES * sizeof(struct range) + 1];
    for (;;) {
        union { char buffer[CMSG_SPACE((MAX_IN_FDS + 1) * sizeof(int))]; struct cmsghdr align; } control;
        struct iovec iov = { bytes, sizeof bytes };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer, .msg_controllen = sizeof control.buffer };
        ssize_t n = recvmsg(SOCKET_FD, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;  // the daemon closed its end
        int in[MAX_IN_FDS], in_count = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + (size_t)i * sizeof(int), sizeof fd);
                if (in_count < MAX_IN_FDS) in[in_count++] = fd; else close(fd);
            }
        }
        int truncated = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
        if (truncated) {
            struct request r;
            memcpy(&r, bytes, sizeof r);
            send_reply(r.sequence, EBADMSG, 0, NULL, 0);
        } else {
            serve(bytes, (size_t)n, in, in_count);
        }
        for (int i = 0; i < in_count; i++) close(in[i]);
    }
}
