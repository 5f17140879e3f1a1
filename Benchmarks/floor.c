// floor: the raw kernel floor for dmabufd's benchmarks (scripts/bench).
//
// Measures, with no daemon in the way, what the daemon's operations cost the kernel: a dma-heap
// allocation, a udmabuf made from a fresh memfd, a pagemap read, an SCM_RIGHTS round trip of an fd to a
// forked child (the fd goes over, an ack comes back), a one-process alloc/free loop, and the wake-up of a
// thread blocked in poll() on a vgem fence's sync_file when the fence is signalled.
//
//   floor serve    read commands on stdin, answer one number per line on stdout (the bench driver
//                  interleaves these with the same operations through dmabufd, round by round)
//   floor all      run every measurement once and print a small report
//
// Commands (serve):
//   alloc SIZE N          median ns of DMA_HEAP_IOCTL_ALLOC of SIZE bytes on /dev/dma_heap/system
//   rt N                  median ns of one SCM_RIGHTS round trip (dma-buf fd over, 1-byte ack back)
//   udmabuf SIZE N        median ns of memfd_create + ftruncate + F_SEAL_SHRINK + UDMABUF_CREATE
//   pagemap SIZE N        median ns of mmap + touch + pread(/proc/self/pagemap) + munmap of a SIZE-byte memfd
//   allocfree SIZE MS     alloc+close pairs per second, one process, for MS milliseconds
//   fence N               median ns from VGEM_FENCE_SIGNAL to a poll()ing thread waking
//
// The broker floor: a minimal C broker (a forked child, one epoll loop, no bookkeeping) doing the same
// syscalls per request as dmabufd, to show what any broker of this shape costs in the same boot:
//   cbroker N             median ns of one allocate round trip: the client sends a 32-byte request, the
//                         broker epoll_waits, recvmsgs, DMA_HEAP_IOCTL_ALLOCs 4 KiB, DMA_BUF_SET_NAMEs,
//                         fstats and sendmsgs a 64-byte reply with the fd (keeping its own); the client
//                         then closes its fd and sends a release (no reply: the broker reads the
//                         buffer's fdinfo and closes it)
//   cbrokerp2 CLIENTS MS  alloc+release pairs per second through that broker, CLIENTS threads with one
//                         connection each, for MS milliseconds
//   cbrokerfence N        median ns from VGEM_FENCE_SIGNAL to a client thread receiving a message that a
//                         broker thread sent when epoll said the fence's sync_file was readable
//
// Build: cc -O2 -Wall -o floor floor.c $(pkg-config --cflags --libs libdrm) -lpthread
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <linux/dma-buf.h>
#include <linux/dma-heap.h>
#include <linux/udmabuf.h>
#include <xf86drm.h>

// uapi/drm/vgem_drm.h (not shipped by Debian's libdrm-dev; the ABI is stable).
struct vgem_fence_attach { uint32_t handle, flags, out_fence, pad; };
struct vgem_fence_signal { uint32_t fence, flags; };
#define VGEM_FENCE_WRITE 0x1
#define IOCTL_VGEM_FENCE_ATTACH _IOWR('d', 0x40 + 0x1, struct vgem_fence_attach)
#define IOCTL_VGEM_FENCE_SIGNAL _IOW('d', 0x40 + 0x2, struct vgem_fence_signal)

static void die(const char *what) {
    fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

// MARK: - dma-heap

static int heap_fd = -1;

static int heap_alloc(uint64_t size) {
    struct dma_heap_allocation_data data = { .len = size, .fd_flags = O_RDWR | O_CLOEXEC };
    if (ioctl(heap_fd, DMA_HEAP_IOCTL_ALLOC, &data) != 0) die("DMA_HEAP_IOCTL_ALLOC");
    return (int)data.fd;
}

static int compare_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

// The median of n samples (sorts them). Medians, not means: a guest under TCG on a busy host stalls for
// milliseconds now and then, and one stall would dominate a mean.
static double median_ns(uint64_t *samples, int n) {
    qsort(samples, (size_t)n, sizeof *samples, compare_u64);
    return n % 2 ? (double)samples[n / 2] : ((double)samples[n / 2 - 1] + (double)samples[n / 2]) / 2;
}

static double bench_alloc(uint64_t size, int n) {
    uint64_t samples[n];
    for (int i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        int fd = heap_alloc(size);
        samples[i] = now_ns() - t0;
        close(fd);
    }
    return median_ns(samples, n);
}

static double bench_allocfree(uint64_t size, int ms) {
    uint64_t start = now_ns(), end = start + (uint64_t)ms * 1000000u, ops = 0, t;
    do {
        close(heap_alloc(size));
        ops++;
    } while ((t = now_ns()) < end);
    return (double)ops * 1e9 / (double)(t - start);
}

// MARK: - SCM_RIGHTS round trip

static int rt_socket = -1;

// Sends `len` bytes with `fd` attached (SCM_RIGHTS); sendmsg's result.
static ssize_t send_fd(int sock, const void *data, size_t len, int fd, int flags) {
    char control[CMSG_SPACE(sizeof(int))];
    memset(control, 0, sizeof control);
    struct iovec iov = { (void *)data, len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(sock, &msg, flags);
}
static pid_t rt_child = -1;

static void rt_start(void) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
    rt_child = fork();
    if (rt_child < 0) die("fork");
    if (rt_child == 0) {
        close(sv[0]);
        for (;;) {
            char byte;
            char control[CMSG_SPACE(sizeof(int))];
            struct iovec iov = { &byte, 1 };
            struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
            ssize_t got = recvmsg(sv[1], &msg, MSG_CMSG_CLOEXEC);
            if (got <= 0) _exit(0);
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            if (c && c->cmsg_type == SCM_RIGHTS) {
                int fd;
                memcpy(&fd, CMSG_DATA(c), sizeof fd);
                close(fd);
            }
            if (send(sv[1], "k", 1, MSG_NOSIGNAL) != 1) _exit(0);
        }
    }
    close(sv[1]);
    rt_socket = sv[0];
}

static double bench_rt(int n) {
    int fd = heap_alloc(4096);
    uint64_t samples[n];
    for (int i = 0; i < n; i++) {
        char byte = 'b', ack;
        uint64_t t0 = now_ns();
        if (send_fd(rt_socket, &byte, 1, fd, MSG_NOSIGNAL) != 1) die("sendmsg");
        if (recv(rt_socket, &ack, 1, 0) != 1) die("recv ack");
        samples[i] = now_ns() - t0;
    }
    close(fd);
    return median_ns(samples, n);
}

// MARK: - udmabuf and pagemap

static int udmabuf_fd = -1;

static int sealed_memfd(uint64_t size) {
    int memfd = memfd_create("floor", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0) die("memfd_create");
    if (ftruncate(memfd, (off_t)size) != 0) die("ftruncate");
    if (fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) die("F_ADD_SEALS");
    return memfd;
}

static double bench_udmabuf(uint64_t size, int n) {
    uint64_t samples[n];
    for (int i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        int memfd = sealed_memfd(size);
        struct udmabuf_create create = { .memfd = (uint32_t)memfd, .flags = UDMABUF_FLAGS_CLOEXEC, .offset = 0, .size = size };
        int fd = ioctl(udmabuf_fd, UDMABUF_CREATE, &create);
        if (fd < 0) die("UDMABUF_CREATE");
        samples[i] = now_ns() - t0;
        close(fd);
        close(memfd);
    }
    return median_ns(samples, n);
}

static double bench_pagemap(uint64_t size, int n) {
    long page = sysconf(_SC_PAGESIZE);
    size_t pages = size / (size_t)page;
    uint64_t *entries = malloc(pages * 8);
    int memfd = sealed_memfd(size);
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pagemap < 0) die("open /proc/self/pagemap");
    uint64_t samples[n];
    for (int i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        unsigned char *p = mmap(NULL, size, PROT_READ, MAP_SHARED | MAP_NORESERVE, memfd, 0);
        if (p == MAP_FAILED) die("mmap");
        volatile unsigned char sink = 0;
        for (size_t off = 0; off < size; off += (size_t)page) sink += p[off];
        (void)sink;
        size_t want = pages * 8;
        if (pread(pagemap, entries, want, (off_t)((uintptr_t)p / (uintptr_t)page * 8)) != (ssize_t)want) die("pread pagemap");
        munmap(p, size);
        samples[i] = now_ns() - t0;
        if (!(entries[0] >> 63)) { errno = ENODATA; die("pagemap: page not present"); }
    }
    close(pagemap);
    close(memfd);
    free(entries);
    return median_ns(samples, n);
}

// MARK: - vgem fence wake-up

static int vgem_fd = -1;

static int open_vgem(void) {
    char path[64];
    for (int i = 0; i < 16; i++) {
        snprintf(path, sizeof path, "/dev/dri/card%d", i);
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0) continue;
        drmVersionPtr v = drmGetVersion(fd);
        int is_vgem = v && strcmp(v->name, "vgem") == 0;
        if (v) drmFreeVersion(v);
        if (is_vgem) return fd;
        close(fd);
    }
    errno = ENODEV;
    die("no vgem device (modprobe vgem)");
    return -1;
}

// A 64x64 vgem buffer, exported as a dma-buf (returned; its GEM handle in *handle).
static int vgem_buffer(uint32_t *handle) {
    if (vgem_fd < 0) vgem_fd = open_vgem();
    struct drm_mode_create_dumb dumb = { .width = 64, .height = 64, .bpp = 32 };
    if (drmIoctl(vgem_fd, DRM_IOCTL_MODE_CREATE_DUMB, &dumb) != 0) die("DRM_IOCTL_MODE_CREATE_DUMB");
    int buffer;
    if (drmPrimeHandleToFD(vgem_fd, dumb.handle, DRM_CLOEXEC | DRM_RDWR, &buffer) != 0) die("PRIME export");
    *handle = dumb.handle;
    return buffer;
}

// Attaches an unsignalled write fence to the buffer; returns its sync_file (the fence id in *fence).
static int vgem_fence(uint32_t handle, int buffer, uint32_t *fence) {
    struct vgem_fence_attach attach = { .handle = handle, .flags = VGEM_FENCE_WRITE };
    if (drmIoctl(vgem_fd, IOCTL_VGEM_FENCE_ATTACH, &attach) != 0) die("VGEM_FENCE_ATTACH");
    struct dma_buf_export_sync_file export = { .flags = DMA_BUF_SYNC_WRITE, .fd = -1 };
    if (ioctl(buffer, DMA_BUF_IOCTL_EXPORT_SYNC_FILE, &export) != 0) die("EXPORT_SYNC_FILE");
    *fence = attach.out_fence;
    return export.fd;
}

static void vgem_close(uint32_t handle, int buffer) {
    close(buffer);
    struct drm_gem_close gem_close = { .handle = handle };
    drmIoctl(vgem_fd, DRM_IOCTL_GEM_CLOSE, &gem_close);
}

struct waiter { int fd; uint64_t woke; };

static void *wait_fence(void *arg) {
    struct waiter *w = arg;
    struct pollfd p = { .fd = w->fd, .events = POLLIN };
    while (poll(&p, 1, 10000) < 0 && errno == EINTR) {}
    w->woke = now_ns();
    return NULL;
}

static double bench_fence(int n) {
    uint32_t handle;
    int buffer = vgem_buffer(&handle);
    uint64_t *samples = calloc((size_t)n, sizeof *samples);
    for (int i = 0; i < n; i++) {
        uint32_t out_fence;
        struct dma_buf_export_sync_file export = { .fd = vgem_fence(handle, buffer, &out_fence) };
        struct waiter w = { .fd = export.fd };
        pthread_t thread;
        if (pthread_create(&thread, NULL, wait_fence, &w) != 0) die("pthread_create");
        usleep(20000);  // let the waiter block in poll()
        struct vgem_fence_signal signal = { .fence = out_fence };
        uint64_t t0 = now_ns();
        if (drmIoctl(vgem_fd, IOCTL_VGEM_FENCE_SIGNAL, &signal) != 0) die("VGEM_FENCE_SIGNAL");
        pthread_join(thread, NULL);
        samples[i] = w.woke - t0;
        close(export.fd);
    }
    double median = median_ns(samples, n);
    free(samples);
    vgem_close(handle, buffer);
    return median;
}

// MARK: - the broker floor

#include <sys/epoll.h>
#include <sys/stat.h>

#define CB_MAX_CLIENTS 128

static int cb_fdinfo_dir = -1;

static void cb_reply_fd(int sock, int fd) {
    char reply[64] = { 'B' };
    memcpy(reply + 8, &fd, sizeof fd);
    if (send_fd(sock, reply, sizeof reply, fd, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) _exit(0);
}

// One request: 'A' allocates and replies with the fd; 'R' + fd number releases (fdinfo read, close).
static void cb_serve_one(int sock) {
    char request[64];
    ssize_t got = recv(sock, request, sizeof request, MSG_DONTWAIT);
    if (got == 0) _exit(0);
    if (got < 1) return;
    if (request[0] == 'A') {
        int fd = heap_alloc(4096);
        char name[] = "0:1:floor";
        ioctl(fd, DMA_BUF_SET_NAME, name);
        struct stat st;
        fstat(fd, &st);
        cb_reply_fd(sock, fd);
    } else if (request[0] == 'R') {
        int fd;
        memcpy(&fd, request + 8, sizeof fd);
        char path[16], text[4096];
        snprintf(path, sizeof path, "%d", fd);
        int info = openat(cb_fdinfo_dir, path, O_RDONLY | O_CLOEXEC);
        if (info >= 0) {
            if (read(info, text, sizeof text) < 0) {}
            close(info);
        }
        close(fd);
    }
}

static pid_t cb_start(int *clients, int n) {
    int server[CB_MAX_CLIENTS];
    for (int i = 0; i < n; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
        clients[i] = sv[0];
        server[i] = sv[1];
    }
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        for (int i = 0; i < n; i++) close(clients[i]);
        cb_fdinfo_dir = open("/proc/self/fdinfo", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        int ep = epoll_create1(EPOLL_CLOEXEC);
        for (int i = 0; i < n; i++) {
            struct epoll_event e = { .events = EPOLLIN, .data.fd = server[i] };
            epoll_ctl(ep, EPOLL_CTL_ADD, server[i], &e);
        }
        struct epoll_event events[64];
        for (;;) {
            int ready = epoll_wait(ep, events, 64, -1);
            for (int i = 0; i < ready; i++) cb_serve_one(events[i].data.fd);
        }
    }
    for (int i = 0; i < n; i++) close(server[i]);
    return child;
}

static void cb_stop(int *clients, int n, pid_t child) {
    for (int i = 0; i < n; i++) close(clients[i]);
    waitpid(child, NULL, 0);
}

// One alloc round trip; returns the fd received (the broker's number for it in *remote).
static int cb_alloc(int sock, int *remote) {
    char request[32] = { 'A' }, reply[64];
    if (send(sock, request, sizeof request, MSG_NOSIGNAL) != sizeof request) die("cbroker send");
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { reply, sizeof reply };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
    if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) <= 0) die("cbroker recvmsg");
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    int fd = -1;
    if (c && c->cmsg_type == SCM_RIGHTS) memcpy(&fd, CMSG_DATA(c), sizeof fd);
    memcpy(remote, reply + 8, sizeof *remote);
    return fd;
}

static void cb_release(int sock, int fd, int remote) {
    close(fd);
    char request[32] = { 'R' };
    memcpy(request + 8, &remote, sizeof remote);
    if (send(sock, request, sizeof request, MSG_NOSIGNAL) != sizeof request) die("cbroker send release");
}

static double bench_cbroker(int n) {
    int sock;
    pid_t child = cb_start(&sock, 1);
    uint64_t samples[n];
    for (int i = 0; i < n; i++) {
        int remote;
        uint64_t t0 = now_ns();
        int fd = cb_alloc(sock, &remote);
        samples[i] = now_ns() - t0;
        cb_release(sock, fd, remote);
    }
    cb_stop(&sock, 1, child);
    return median_ns(samples, n);
}

struct cb_client { int sock; uint64_t end; uint64_t ops; };

static void *cb_client_loop(void *arg) {
    struct cb_client *c = arg;
    while (now_ns() < c->end) {
        int remote;
        int fd = cb_alloc(c->sock, &remote);
        cb_release(c->sock, fd, remote);
        c->ops++;
    }
    return NULL;
}

static double bench_cbroker_p2(int clients, int ms) {
    if (clients < 1 || clients > CB_MAX_CLIENTS) { errno = EINVAL; die("cbrokerp2 clients"); }
    int socks[CB_MAX_CLIENTS];
    pid_t child = cb_start(socks, clients);
    struct cb_client state[CB_MAX_CLIENTS];
    pthread_t threads[CB_MAX_CLIENTS];
    uint64_t start = now_ns();
    for (int i = 0; i < clients; i++) {
        state[i] = (struct cb_client){ .sock = socks[i], .end = start + (uint64_t)ms * 1000000u };
        if (pthread_create(&threads[i], NULL, cb_client_loop, &state[i]) != 0) die("pthread_create");
    }
    uint64_t ops = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(threads[i], NULL);
        ops += state[i].ops;
    }
    double rate = (double)ops * 1e9 / (double)(now_ns() - start);
    cb_stop(socks, clients, child);
    return rate;
}

struct cb_fence { int sync_file; int sock; };

static void *cb_fence_broker(void *arg) {
    struct cb_fence *f = arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = { .events = EPOLLIN, .data.fd = f->sync_file };
    epoll_ctl(ep, EPOLL_CTL_ADD, f->sync_file, &e);
    while (epoll_wait(ep, &e, 1, 10000) < 0 && errno == EINTR) {}
    epoll_ctl(ep, EPOLL_CTL_DEL, f->sync_file, NULL);
    char event[24] = { 'E' };
    if (send(f->sock, event, sizeof event, MSG_NOSIGNAL) < 0) {}
    close(ep);
    return NULL;
}

struct cb_holder { int sock; uint64_t woke; };

static void *cb_fence_holder(void *arg) {
    struct cb_holder *h = arg;
    char event[64];
    if (recv(h->sock, event, sizeof event, 0) <= 0) die("cbrokerfence recv");
    h->woke = now_ns();
    return NULL;
}

static double bench_cbroker_fence(int n) {
    uint32_t handle;
    int buffer = vgem_buffer(&handle);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
    uint64_t *samples = calloc((size_t)n, sizeof *samples);
    for (int i = 0; i < n; i++) {
        uint32_t out_fence;
        struct dma_buf_export_sync_file export = { .fd = vgem_fence(handle, buffer, &out_fence) };
        struct cb_fence f = { .sync_file = export.fd, .sock = sv[0] };
        struct cb_holder h = { .sock = sv[1] };
        pthread_t broker, holder;
        if (pthread_create(&holder, NULL, cb_fence_holder, &h) != 0) die("pthread_create");
        if (pthread_create(&broker, NULL, cb_fence_broker, &f) != 0) die("pthread_create");
        usleep(20000);  // both blocked: the broker in epoll_wait, the holder in recv
        struct vgem_fence_signal signal = { .fence = out_fence };
        uint64_t t0 = now_ns();
        if (drmIoctl(vgem_fd, IOCTL_VGEM_FENCE_SIGNAL, &signal) != 0) die("VGEM_FENCE_SIGNAL");
        pthread_join(holder, NULL);
        pthread_join(broker, NULL);
        samples[i] = h.woke - t0;
        close(export.fd);
    }
    double median = median_ns(samples, n);
    free(samples);
    close(sv[0]);
    close(sv[1]);
    vgem_close(handle, buffer);
    return median;
}

// MARK: - main

static void open_devices(void) {
    heap_fd = open("/dev/dma_heap/system", O_RDONLY | O_CLOEXEC);
    if (heap_fd < 0) die("open /dev/dma_heap/system");
    udmabuf_fd = open("/dev/udmabuf", O_RDWR | O_CLOEXEC);
    if (udmabuf_fd < 0) die("open /dev/udmabuf");
    rt_start();
}

static int serve(void) {
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char command[32];
        unsigned long long a = 0, b = 0;
        int fields = sscanf(line, "%31s %llu %llu", command, &a, &b);
        double result;
        if (fields >= 3 && strcmp(command, "alloc") == 0) result = bench_alloc(a, (int)b);
        else if (fields >= 2 && strcmp(command, "rt") == 0) result = bench_rt((int)a);
        else if (fields >= 3 && strcmp(command, "udmabuf") == 0) result = bench_udmabuf(a, (int)b);
        else if (fields >= 3 && strcmp(command, "pagemap") == 0) result = bench_pagemap(a, (int)b);
        else if (fields >= 3 && strcmp(command, "allocfree") == 0) result = bench_allocfree(a, (int)b);
        else if (fields >= 2 && strcmp(command, "fence") == 0) result = bench_fence((int)a);
        else if (fields >= 2 && strcmp(command, "cbroker") == 0) result = bench_cbroker((int)a);
        else if (fields >= 3 && strcmp(command, "cbrokerp2") == 0) result = bench_cbroker_p2((int)a, (int)b);
        else if (fields >= 2 && strcmp(command, "cbrokerfence") == 0) result = bench_cbroker_fence((int)a);
        else if (fields >= 1 && strcmp(command, "quit") == 0) break;
        else { fprintf(stderr, "floor: unknown command: %s", line); result = -1; }
        printf("%.0f\n", result);
        fflush(stdout);
    }
    return 0;
}

static int all(void) {
    printf("raw kernel floor (median ns per op unless noted)\n");
    printf("  alloc 4 KiB        %12.0f\n", bench_alloc(4096, 200));
    printf("  alloc 1 MiB        %12.0f\n", bench_alloc(1 << 20, 50));
    printf("  alloc 16 MiB       %12.0f\n", bench_alloc(16 << 20, 10));
    printf("  fd round trip      %12.0f\n", bench_rt(200));
    printf("  udmabuf 1 MiB      %12.0f\n", bench_udmabuf(1 << 20, 50));
    printf("  pagemap 1 MiB      %12.0f\n", bench_pagemap(1 << 20, 50));
    printf("  alloc/free 4 KiB   %12.0f ops/s\n", bench_allocfree(4096, 1000));
    printf("  fence wake         %12.0f (median)\n", bench_fence(20));
    printf("  C broker alloc RT  %12.0f\n", bench_cbroker(200));
    printf("  C broker 64 clients %11.0f ops/s\n", bench_cbroker_p2(64, 1000));
    printf("  C broker fence     %12.0f (median)\n", bench_cbroker_fence(20));
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || (strcmp(argv[1], "serve") != 0 && strcmp(argv[1], "all") != 0)) {
        fprintf(stderr, "usage: floor serve | floor all\n");
        return 2;
    }
    open_devices();
    int rc = strcmp(argv[1], "serve") == 0 ? serve() : all();
    close(rt_socket);
    waitpid(rt_child, NULL, 0);
    return rc;
}
