/* libdmabufd-preload.so: serves /dev/dma_heap/<name> and /dev/udmabuf through dmabufd for programs that
 * may not open them, so unmodified programs using the kernel uAPI get real dma-bufs.
 *
 * How: when the real open of such a node fails with EACCES/EPERM and dmabufd answers, the program gets an
 * O_PATH fd of the node (the "proxy"): fstat matches the device, and dup, fork, exec and close behave as
 * on any fd. An ioctl the kernel refuses with EBADF on an O_PATH fd whose char device sysfs names as a
 * heap or udmabuf is served here with the kernel's rules (drivers/dma-buf/dma-heap.c, udmabuf.c of 6.12
 * and 7.3), re-implemented: dispatch by number, _IOC_SIZE copy-in/out with zero fill, the same checks in
 * the same order and the same errno. Refusals only the broker makes (quota, size bound, headroom) become
 * ENOMEM, printed once per reason to stderr when $DMABUFD_DEBUG is set.
 *
 * Not covered (documented): static binaries and setuid/setgid programs (the loader ignores LD_PRELOAD),
 * raw syscalls, read/write/poll on the proxy, F_GETFL on the proxy (shows O_PATH), and a CREATE_LIST over
 * more than 16 different memfds (ENOMEM: one message carries at most 16 fds). */
#include "dmabufd_wire.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/dma-heap.h>
#include <linux/magic.h>
#include <linux/udmabuf.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define PAGE 4096ull

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* ---- the real calls ------------------------------------------------------------------------------- */

#define REAL(name, type)                                                      \
    static type real_##name(void) {                                           \
        static type fn;                                                       \
        if (!fn) fn = (type)dlsym(RTLD_NEXT, #name);                          \
        return fn;                                                            \
    }
typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*ioctl_fn)(int, unsigned long, ...);
typedef int (*close_fn)(int);
typedef int (*dup_fn)(int);
typedef int (*dup2_fn)(int, int);
typedef int (*dup3_fn)(int, int, int);
typedef int (*fcntl_fn)(int, int, ...);
typedef int (*close_range_fn)(unsigned, unsigned, int);
REAL(open, open_fn)
REAL(openat, openat_fn)
REAL(ioctl, ioctl_fn)
REAL(close, close_fn)
REAL(dup, dup_fn)
REAL(dup2, dup2_fn)
REAL(dup3, dup3_fn)
REAL(fcntl, fcntl_fn)
REAL(close_range, close_range_fn)

/* The library code inside this object calls these (see the Makefile's -D), never the wrappers below. */
int dbp_real_close(int fd) { return real_close()(fd); }
int dbp_real_fcntl(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    return real_fcntl()(fd, cmd, arg);
}

/* ---- the broker connection: one per process, made again after fork -------------------------------- */

static pthread_mutex_t conn_lock = PTHREAD_MUTEX_INITIALIZER;
static dmabufd_conn *conn;
static int conn_sock = -1; /* its socket, so close/dup2 in the program cannot take it */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void after_fork_child(void) {
    /* The socket is the parent's conversation; drop it (the struct is leaked: no malloc after fork). */
    if (conn_sock >= 0) real_close()(conn_sock);
    conn = NULL;
    conn_sock = -1;
    pthread_mutex_init(&conn_lock, NULL);
}
static void install_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

static const char *program_name(void) {
    extern char *program_invocation_short_name;
    return program_invocation_short_name ? program_invocation_short_name : "program";
}

/* The program's name in the safe tag set: [A-Za-z0-9._-], at most 32 bytes. */
static void program_tag(char out[40]) {
    const char *n = program_name();
    size_t k = 0;
    for (; n[k] && k < 32; k++) {
        char ch = n[k];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
        out[k] = ok ? ch : '_';
    }
    if (k == 0) out[k++] = 'p';
    out[k] = 0;
}

static dmabufd_conn *broker(void) {
    pthread_once(&atfork_once, install_atfork);
    pthread_mutex_lock(&conn_lock);
    if (conn && dmabufd_version(conn) > 0) {
        dmabufd_conn *c = conn;
        pthread_mutex_unlock(&conn_lock);
        return c;
    }
    char name[64] = "dmabufd-run:";
    program_tag(name + strlen(name));
    dmabufd_conn *c = NULL;
    if (dmabufd_connect(NULL, name, &c) == 0) {
        /* Out of the low numbers programs pick for dup2. */
        int fd = dbw_conn_socket(c);
        int high = real_fcntl()(fd, F_DUPFD_CLOEXEC, 512);
        if (high >= 0) { dbw_conn_set_socket(c, high); real_close()(fd); }
        conn = c;
        conn_sock = dbw_conn_socket(c);
    }
    pthread_mutex_unlock(&conn_lock);
    return c;
}

/* A connection that failed is replaced on the next call. */
static void drop_broken(dmabufd_conn *c) {
    pthread_mutex_lock(&conn_lock);
    if (conn == c) {
        real_close()(conn_sock);
        conn = NULL;
        conn_sock = -1;
    }
    pthread_mutex_unlock(&conn_lock);
}

static bool debug(void) { const char *d = getenv("DMABUFD_DEBUG"); return d && *d && strcmp(d, "0") != 0; }

/* The daemon's refusal as the kernel would report it. */
static int kernel_errno(dmabufd_conn *c, int err) {
    int code = dmabufd_last_code(c);
    if (code == DMABUFD_CODE_KERNEL || code == DMABUFD_CODE_INVALID_ARGUMENT) return err;
    static unsigned logged; /* one line per code */
    unsigned bit = code >= 0 && code < 31 ? 1u << code : 1u << 31;
    if (debug() && !(__atomic_fetch_or(&logged, bit, __ATOMIC_RELAXED) & bit))
        fprintf(stderr, "dmabufd-run: %s: dmabufd refused (%s, code %d): %s; the program sees ENOMEM\n", program_name(),
                strerror(err), code, dmabufd_last_message(c));
    if (err == ENOTCONN || err == ECONNRESET || err == EPIPE || code == DMABUFD_CODE_MALFORMED) drop_broken(c);
    return ENOMEM;
}

/* ---- recognising the device and the proxy --------------------------------------------------------- */

enum node { NODE_NONE, NODE_HEAP, NODE_UDMABUF };

/* The kernel's own name for a char device (sysfs uevent DEVNAME), never the path the program used. */
static enum node node_kind(dev_t rdev, char heap[256]) {
    char path[96], buf[512];
    snprintf(path, sizeof path, "/sys/dev/char/%u:%u/uevent", major(rdev), minor(rdev));
    int fd = real_open()(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NODE_NONE;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    real_close()(fd);
    if (n <= 0) return NODE_NONE;
    buf[n] = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        if (strcmp(line, "DEVNAME=udmabuf") == 0) return NODE_UDMABUF;
        if (strncmp(line, "DEVNAME=dma_heap/", 17) == 0 && strlen(line + 17) > 0 && strlen(line + 17) < 256) {
            strcpy(heap, line + 17);
            return NODE_HEAP;
        }
    }
    return NODE_NONE;
}

/* A proxy is an O_PATH fd of a heap or udmabuf node. */
static enum node proxy_kind(int fd, char heap[256]) {
    int fl = real_fcntl()(fd, F_GETFL);
    if (fl < 0 || !(fl & O_PATH)) return NODE_NONE;
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISCHR(st.st_mode)) return NODE_NONE;
    return node_kind(st.st_rdev, heap);
}

/* After the real open failed with EACCES/EPERM: the proxy, or -1 (the caller reports the real error). */
static int open_proxy(int dirfd, const char *path, int flags) {
    int fd = real_openat()(dirfd, path, O_PATH | (flags & O_CLOEXEC));
    if (fd < 0) return -1;
    char heap[256];
    if (proxy_kind(fd, heap) == NODE_NONE || !broker()) {
        real_close()(fd);
        return -1;
    }
    return fd;
}

static int do_open(int dirfd, const char *path, int flags, mode_t mode, bool at) {
    int fd = at ? real_openat()(dirfd, path, flags, mode) : real_open()(path, flags, mode);
    if (fd >= 0 || (errno != EACCES && errno != EPERM) || (flags & (O_CREAT | O_PATH | O_DIRECTORY))) return fd;
    int saved = errno;
    int proxy = open_proxy(at ? dirfd : AT_FDCWD, path, flags);
    if (proxy >= 0) return proxy;
    errno = saved;
    return -1;
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

EXPORT int open(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return do_open(AT_FDCWD, path, flags, m, false);
}
EXPORT int open64(const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return do_open(AT_FDCWD, path, flags | O_LARGEFILE, m, false);
}
EXPORT int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return do_open(dirfd, path, flags, m, true);
}
EXPORT int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap; va_start(ap, flags); mode_t m = mode_arg(flags, ap); va_end(ap);
    return do_open(dirfd, path, flags | O_LARGEFILE, m, true);
}
/* The fortify variants never carry a mode (glibc calls them only without O_CREAT). */
EXPORT int __open_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags, 0, false); }
EXPORT int __open64_2(const char *path, int flags) { return do_open(AT_FDCWD, path, flags | O_LARGEFILE, 0, false); }
EXPORT int __openat_2(int dirfd, const char *path, int flags) { return do_open(dirfd, path, flags, 0, true); }
EXPORT int __openat64_2(int dirfd, const char *path, int flags) { return do_open(dirfd, path, flags | O_LARGEFILE, 0, true); }

/* ---- user memory, with the kernel's EFAULT instead of a crash --------------------------------------- */

static int copy_in(void *dst, const void *src, size_t n) {
    if (n == 0) return 0;
    struct iovec local = { dst, n }, remote = { (void *)src, n };
    return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)n ? 0 : EFAULT;
}
static int copy_out(void *dst, const void *src, size_t n) {
    if (n == 0) return 0;
    struct iovec local = { (void *)src, n }, remote = { dst, n };
    return process_vm_writev(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)n ? 0 : EFAULT;
}

/* ---- DMA_HEAP_IOCTL_ALLOC ------------------------------------------------------------------------- */

static int heap_allocate(const char *heap, struct dma_heap_allocation_data *d) {
    if (d->fd) return EINVAL;
    if (d->fd_flags & ~(uint32_t)DMA_HEAP_VALID_FD_FLAGS) return EINVAL;
    if (d->heap_flags & ~(uint64_t)DMA_HEAP_VALID_HEAP_FLAGS) return EINVAL;
    uint64_t len = (d->len + PAGE - 1) & ~(PAGE - 1); /* PAGE_ALIGN; wraps to 0 near 2^64 like the kernel's */
    if (len == 0) return EINVAL;
    dmabufd_conn *c = broker();
    if (!c) return ENOMEM;
    char tag[40];
    program_tag(tag);
    dmabufd_buffer_info *info = NULL;
    int fd = dmabufd_allocate(c, len, heap, tag, d->fd_flags, d->heap_flags, &info);
    if (fd < 0) return kernel_errno(c, -fd);
    /* The program's fd is the buffer's life, as with the kernel: the broker keeps only the accounting. */
    if (dmabufd_version(c) >= 2) dmabufd_release_quiet(c, &info->id, 1);
    else dmabufd_release(c, info->id);
    dmabufd_free(info);
    d->fd = (uint32_t)fd;
    return 0;
}

/* The kernel's dma_heap_ioctl: dispatch on _IOC_NR, copy _IOC_SIZE in/out by the direction bits both
 * commands share, zero-fill up to the kernel's struct. */
static int heap_ioctl(const char *heap, unsigned long ucmd, void *arg) {
    const unsigned kcmd = DMA_HEAP_IOCTL_ALLOC;
    if (_IOC_NR(ucmd) >= 1) return EINVAL;
    size_t drv = _IOC_SIZE(kcmd), out = _IOC_SIZE(ucmd), in = out;
    if (!(ucmd & kcmd & IOC_IN)) in = 0;
    if (!(ucmd & kcmd & IOC_OUT)) out = 0;
    size_t k = in > out ? in : out;
    if (drv > k) k = drv;
    unsigned char *data = calloc(1, k);
    if (!data) return ENOMEM;
    int e = copy_in(data, arg, in);
    if (!e) {
        struct dma_heap_allocation_data d;
        memcpy(&d, data, sizeof d);
        e = heap_allocate(heap, &d);
        if (!e) memcpy(data, &d, sizeof d);
        if (!e && copy_out(arg, data, out)) e = EFAULT;
    }
    free(data);
    return e;
}

/* ---- UDMABUF_CREATE / UDMABUF_CREATE_LIST --------------------------------------------------------- */

static long module_param(const char *name, long fallback) {
    char path[96], buf[32];
    snprintf(path, sizeof path, "/sys/module/udmabuf/parameters/%s", name);
    int fd = real_open()(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fallback;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    real_close()(fd);
    if (n <= 0) return fallback;
    buf[n] = 0;
    return strtol(buf, NULL, 10);
}

/* udmabuf's check of one memfd: EBADFD when it is no shmem/hugetlbfs file, EINVAL for its seals. */
static int check_memfd(int memfd, struct stat *st) {
    int fl = real_fcntl()(memfd, F_GETFL);
    struct statfs sf;
    if (fl < 0 || (fl & O_PATH) || fstat(memfd, st) < 0 || fstatfs(memfd, &sf) < 0) return EBADFD;
    if (!S_ISREG(st->st_mode) || ((unsigned long)sf.f_type != TMPFS_MAGIC && (unsigned long)sf.f_type != (unsigned long)HUGETLBFS_MAGIC)) return EBADFD;
    int seals = real_fcntl()(memfd, F_GET_SEALS);
    if (seals < 0) return EBADFD;
    if (!(seals & F_SEAL_SHRINK) || (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))) return EINVAL;
    return 0;
}

/* The index of the memfd `st` among those the request carries so far (one fd per file), adding `fd` when new;
 * -1 past DMABUFD_MAX_FDS different memfds, the most one message carries. */
static int memfd_index(int fd, const struct stat *st, int fds[DMABUFD_MAX_FDS], struct stat seen[DMABUFD_MAX_FDS], unsigned *n) {
    for (unsigned k = 0; k < *n; k++)
        if (seen[k].st_dev == st->st_dev && seen[k].st_ino == st->st_ino) return (int)k;
    if (*n == DMABUFD_MAX_FDS) return -1;
    fds[*n] = fd;
    seen[*n] = *st;
    return (int)(*n)++;
}

/* Each entry's memfd checked as the kernel does, and its range mapped to an index into the memfds sent.
 * Returns 0 or an errno. */
static int udmabuf_ranges(const struct udmabuf_create_item *items, uint32_t count, dmabufd_range *ranges, int fds[DMABUFD_MAX_FDS],
                          unsigned *n) {
    struct stat seen[DMABUFD_MAX_FDS];
    for (uint32_t i = 0; i < count; i++) {
        struct stat st;
        int e = check_memfd((int)items[i].memfd, &st);
        /* memfd_pin_folios refuses pages past the end of the file. */
        if (!e && (items[i].offset > (uint64_t)st.st_size || items[i].size > (uint64_t)st.st_size - items[i].offset)) e = EINVAL;
        if (e) return e;
        int k = memfd_index((int)items[i].memfd, &st, fds, seen, n);
        if (k < 0) {
            if (debug())
                fprintf(stderr, "dmabufd-run: %s: UDMABUF_CREATE_LIST over more than %d different memfds is not served; the program sees ENOMEM\n",
                        program_name(), DMABUFD_MAX_FDS);
            return ENOMEM;
        }
        ranges[i] = (dmabufd_range){ .offset = items[i].offset, .size = items[i].size, .memfd = (uint32_t)k };
    }
    return 0;
}

/* udmabuf_create: the same checks in the same order, then the broker makes it from the memfds (each entry
 * names its own, as with the kernel). Returns the fd, or -errno. */
static int udmabuf_create(uint32_t flags, const struct udmabuf_create_item *items, uint32_t count) {
    uint64_t pglimit = ((uint64_t)module_param("size_limit_mb", 64) * 1024 * 1024) / PAGE, pages = 0;
    for (uint32_t i = 0; i < count; i++) {
        if ((items[i].offset | items[i].size) & (PAGE - 1)) return -EINVAL;
        pages += items[i].size / PAGE;
        if (pages > pglimit) return -EINVAL;
    }
    if (pages == 0) return -EINVAL;
    dmabufd_range *ranges = calloc(count, sizeof *ranges);
    if (!ranges) return -ENOMEM;
    int fds[DMABUFD_MAX_FDS];
    unsigned n = 0;
    int e = udmabuf_ranges(items, count, ranges, fds, &n);
    dmabufd_conn *c = e ? NULL : broker();
    if (e || !c) { free(ranges); return -(e ? e : ENOMEM); }
    char tag[40];
    program_tag(tag);
    dmabufd_buffer_info *info = NULL;
    int fd = dmabufd_udmabuf_from_memfds(c, fds, n, ranges, count, tag, flags & UDMABUF_FLAGS_CLOEXEC, &info);
    free(ranges);
    if (fd < 0) return -kernel_errno(c, -fd);
    if (dmabufd_version(c) >= 2) dmabufd_release_quiet(c, &info->id, 1);
    else dmabufd_release(c, info->id);
    dmabufd_free(info);
    return fd;
}

static int udmabuf_ioctl(unsigned long cmd, void *arg) {
    if (cmd == UDMABUF_CREATE) {
        struct udmabuf_create cr;
        if (copy_in(&cr, arg, sizeof cr)) return -EFAULT;
        struct udmabuf_create_item item = { .memfd = cr.memfd, .offset = cr.offset, .size = cr.size };
        return udmabuf_create(cr.flags, &item, 1);
    }
    if (cmd == UDMABUF_CREATE_LIST) {
        struct udmabuf_create_list head;
        if (copy_in(&head, arg, sizeof head)) return -EFAULT;
        long limit = module_param("list_limit", 1024);
        if (head.count > (uint64_t)(limit < 0 ? 0 : limit)) return -EINVAL;
        struct udmabuf_create_item *items = calloc(head.count ? head.count : 1, sizeof *items);
        if (!items) return -ENOMEM;
        int r = copy_in(items, (char *)arg + sizeof head, (size_t)head.count * sizeof *items) ? -EFAULT
                                                                                          : udmabuf_create(head.flags, items, head.count);
        free(items);
        return r;
    }
    return -ENOTTY;
}

/* ---- ioctl ---------------------------------------------------------------------------------------- */

/* The VFS answers these before any driver does; on the O_PATH proxy the kernel would say EBADF. */
static bool vfs_ioctl(int fd, unsigned long cmd, void *arg, int *result) {
    int on;
    switch (cmd) {
    case FIOCLEX: *result = real_fcntl()(fd, F_SETFD, FD_CLOEXEC); return true;
    case FIONCLEX: *result = real_fcntl()(fd, F_SETFD, 0); return true;
    case FIONBIO:
        *result = copy_in(&on, arg, sizeof on) ? (errno = EFAULT, -1) : 0;
        return true;
    case FIOASYNC: /* the heap and udmabuf nodes have no fasync */
        if (copy_in(&on, arg, sizeof on)) { errno = EFAULT; *result = -1; }
        else if (on) { errno = ENOTTY; *result = -1; }
        else *result = 0;
        return true;
    case FIOQSIZE: errno = ENOTTY; *result = -1; return true;
    default: return false;
    }
}

EXPORT int ioctl(int fd, unsigned long cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    int r = real_ioctl()(fd, cmd, arg);
    if (r >= 0 || errno != EBADF) return r;
    char heap[256];
    enum node kind = proxy_kind(fd, heap);
    if (kind == NODE_NONE) { errno = EBADF; return -1; }
    if (vfs_ioctl(fd, cmd, arg, &r)) return r;
    if (kind == NODE_HEAP) {
        int e = heap_ioctl(heap, cmd, arg);
        if (e) { errno = e; return -1; }
        return 0;
    }
    r = udmabuf_ioctl(cmd, arg);
    if (r < 0) { errno = -r; return -1; }
    return r;
}

/* ---- keeping the broker socket out of the program's way ------------------------------------------- */

static bool is_ours(int fd) { return fd >= 0 && fd == conn_sock; }

/* Moves the broker socket before the program takes its number. */
static void move_ours(void) {
    pthread_mutex_lock(&conn_lock);
    int high = conn_sock >= 0 ? real_fcntl()(conn_sock, F_DUPFD_CLOEXEC, conn_sock + 1) : -1;
    if (high >= 0) {
        dbw_conn_set_socket(conn, high);
        conn_sock = high; /* the old number is closed by the program's own dup2/dup3 */
    }
    pthread_mutex_unlock(&conn_lock);
}

EXPORT int close(int fd) {
    if (is_ours(fd)) { errno = EBADF; return -1; } /* the program never had this fd */
    return real_close()(fd);
}
EXPORT int dup(int fd) {
    if (is_ours(fd)) { errno = EBADF; return -1; }
    return real_dup()(fd);
}
EXPORT int dup2(int fd, int target) {
    if (is_ours(fd)) { errno = EBADF; return -1; }
    if (is_ours(target) && fd != target) move_ours();
    return real_dup2()(fd, target);
}
EXPORT int dup3(int fd, int target, int flags) {
    if (is_ours(fd)) { errno = EBADF; return -1; }
    if (is_ours(target) && fd != target) move_ours();
    return real_dup3()(fd, target, flags);
}

static int do_fcntl(int fd, int cmd, long arg) {
    if (is_ours(fd)) { errno = EBADF; return -1; }
    int r = real_fcntl()(fd, cmd, arg);
    /* O_PATH refuses F_SETFL; on the device it only toggles flags the heap and udmabuf ignore. */
    if (r < 0 && errno == EBADF && cmd == F_SETFL) {
        char heap[256];
        if (proxy_kind(fd, heap) != NODE_NONE) return 0;
        errno = EBADF;
    }
    return r;
}
EXPORT int fcntl(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); long arg = va_arg(ap, long); va_end(ap);
    return do_fcntl(fd, cmd, arg);
}
EXPORT int fcntl64(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); long arg = va_arg(ap, long); va_end(ap);
    return do_fcntl(fd, cmd, arg);
}

EXPORT int close_range(unsigned first, unsigned last, int flags) {
    int ours = conn_sock;
    if (ours < 0 || (unsigned)ours < first || (unsigned)ours > last || (flags & CLOSE_RANGE_CLOEXEC))
        return real_close_range()(first, last, flags);
    int r = 0;
    if ((unsigned)ours > first) r = real_close_range()(first, (unsigned)ours - 1, flags);
    if (r == 0 && (unsigned)ours < last) r = real_close_range()((unsigned)ours + 1, last, flags);
    return r;
}
