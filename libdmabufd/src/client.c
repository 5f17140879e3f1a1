/* The connection: handshake, one request at a time under a per-connection mutex, replies matched by
 * request id, events queued while a thread waits for its reply. Descriptors are received with
 * MSG_CMSG_CLOEXEC; any a message was not supposed to carry are closed at once. */
#include "dmabufd_wire.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define QUEUE_MAX 256

struct dmabufd_conn {
    pthread_mutex_t lock;
    int sock;
    bool broken; /* a malformed or lost peer: every later call fails with ENOTCONN */
    uint32_t next_id;
    dmabufd_hello hello;
    dmabufd_event queue[QUEUE_MAX];
    unsigned qhead, qlen;
    int epfd, evfd; /* made by the first dmabufd_event_fd */
    uint32_t quiet_ids[64]; /* recent release_quiet ids: a reply to one (there should be none) is dropped */
    unsigned quiet_next;
    uint8_t in[DMABUFD_MAX_MESSAGE + 1];
    uint8_t out[DMABUFD_MAX_MESSAGE];
};

/* ---- per-thread errors ---------------------------------------------------------------------------- */

static _Thread_local struct {
    const dmabufd_conn *conn;
    int err, code;
    char message[320];
} last;

static int failure(const dmabufd_conn *c, int err, int code, const char *fmt, ...) {
    last.conn = c;
    last.err = err;
    last.code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last.message, sizeof last.message, fmt, ap);
    va_end(ap);
    return -err;
}

static int succeed(const dmabufd_conn *c, int result) {
    if (last.conn == c) { last.err = 0; last.code = 0; last.message[0] = 0; }
    return result;
}

DMABUFD_API int dmabufd_last_error(const dmabufd_conn *c) { return (!c || last.conn == c) ? last.err : 0; }
DMABUFD_API int dmabufd_last_code(const dmabufd_conn *c) { return (!c || last.conn == c) ? last.code : 0; }
DMABUFD_API const char *dmabufd_last_message(const dmabufd_conn *c) { return (!c || last.conn == c) ? last.message : ""; }

/* ---- socket I/O ----------------------------------------------------------------------------------- */

static void close_fds(const int *fds, unsigned n) {
    for (unsigned i = 0; i < n; i++)
        if (fds[i] >= 0) close(fds[i]);
}

static int send_msg(int sock, const uint8_t *bytes, size_t len, const int *fds, unsigned nfds) {
    struct iovec iov = { (void *)bytes, len };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * DMABUFD_MAX_FDS)]; } ctl;
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds) {
        memset(&ctl, 0, sizeof ctl);
        m.msg_control = ctl.buf;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(h), fds, sizeof(int) * nfds);
    }
    ssize_t n;
    do n = sendmsg(sock, &m, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    return (size_t)n == len ? 0 : -EMSGSIZE;
}

/* Receives one packet. Every fd that arrived is in fds[0..*nfds) (at most 16 kept; the rest closed). */
static ssize_t recv_msg(dmabufd_conn *c, int *fds, unsigned *nfds, int flags) {
    struct iovec iov = { c->in, sizeof c->in };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * DMABUFD_MAX_FDS)]; } ctl;
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf };
    ssize_t n;
    *nfds = 0;
    do n = recvmsg(c->sock, &m, MSG_CMSG_CLOEXEC | flags);
    while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof fd);
            if (*nfds < DMABUFD_MAX_FDS) fds[(*nfds)++] = fd;
            else close(fd);
        }
    }
    if (n == 0) return -ECONNRESET;
    if (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) { close_fds(fds, *nfds); *nfds = 0; return -EBADMSG; }
    return n;
}

static void queue_event(dmabufd_conn *c, const dmabufd_event *ev) {
    if (c->qlen == QUEUE_MAX) { c->qhead = (c->qhead + 1) % QUEUE_MAX; c->qlen--; }
    c->queue[(c->qhead + c->qlen) % QUEUE_MAX] = *ev;
    c->qlen++;
    if (c->evfd >= 0) { uint64_t one = 1; (void)!write(c->evfd, &one, sizeof one); }
}

static bool is_event(uint16_t type) { return type >= DMABUFD_EVENT_LEASE_REVOKED && type <= DMABUFD_EVENT_FENCE_SIGNALED; }

/* Receives and decodes one message; on any failure the connection is marked broken. */
static int receive(dmabufd_conn *c, dbw_response *r, int *fds, unsigned *nfds, int flags) {
    ssize_t n = recv_msg(c, fds, nfds, flags);
    if (n == -EAGAIN || n == -EWOULDBLOCK) return -EAGAIN;
    if (n < 0) {
        c->broken = true;
        return failure(c, (int)-n, 0, "dmabufd connection lost: %s", strerror((int)-n));
    }
    int e = dbw_decode_response(c->in, (size_t)n, *nfds, c->hello.version, r);
    if (e) {
        close_fds(fds, *nfds);
        c->broken = true;
        return failure(c, -e, DMABUFD_CODE_MALFORMED, "dmabufd sent a malformed message; the connection is closed");
    }
    return 0;
}

static bool was_quiet(const dmabufd_conn *c, uint32_t id) {
    for (unsigned i = 0; i < 64; i++)
        if (id != 0 && c->quiet_ids[i] == id) return true;
    return false;
}

/* Sends `q` with `in_fds`, waits for the reply with the same id. Returns 0 with *r and out_fds set. */
static int transact_locked(dmabufd_conn *c, const dbw_request *q, const int *in_fds, unsigned n_in, dbw_response *r,
                           int *out_fds, unsigned *n_out) {
    if (c->broken) return failure(c, ENOTCONN, 0, "the dmabufd connection was closed after an earlier failure; connect again");
    uint32_t id = c->next_id++;
    if (c->next_id == 0) c->next_id = 1;
    int len = dbw_encode_request(q, c->hello.version ? c->hello.version : 1, id, (uint16_t)n_in, c->out, sizeof c->out);
    if (len < 0) return failure(c, -len, 0, "request cannot be encoded (a string over 255 bytes or not UTF-8, or a bad value)");
    int e = send_msg(c->sock, c->out, (size_t)len, in_fds, n_in);
    if (e) {
        c->broken = true;
        return failure(c, -e, 0, "sending to dmabufd failed: %s", strerror(-e));
    }
    for (;;) {
        if ((e = receive(c, r, out_fds, n_out, 0))) return e;
        if (r->header.request_id == 0 && is_event(r->header.type)) {
            queue_event(c, &r->event);
            close_fds(out_fds, *n_out);
            continue;
        }
        if (r->header.request_id != id && was_quiet(c, r->header.request_id)) {
            close_fds(out_fds, *n_out);
            dmabufd_free(r->object);
            continue;
        }
        if (r->header.request_id != id) {
            close_fds(out_fds, *n_out);
            dmabufd_free(r->object);
            c->broken = true;
            return failure(c, EBADMSG, DMABUFD_CODE_MALFORMED, "dmabufd answered request %u instead of %u", r->header.request_id, id);
        }
        return 0;
    }
}

/* A request whose reply must be `expect` (or an error). */
static int transact(dmabufd_conn *c, const dbw_request *q, const int *in_fds, unsigned n_in, uint16_t expect,
                    dbw_response *r, int *out_fds, unsigned *n_out) {
    unsigned dummy_n;
    int dummy_fds[DMABUFD_MAX_FDS];
    if (!out_fds) { out_fds = dummy_fds; n_out = &dummy_n; }
    if (!c) return failure(c, EINVAL, 0, "no connection");
    pthread_mutex_lock(&c->lock);
    int e = transact_locked(c, q, in_fds, n_in, r, out_fds, n_out);
    pthread_mutex_unlock(&c->lock);
    if (e) return e;
    if (out_fds == dummy_fds) close_fds(dummy_fds, dummy_n);
    if (r->header.type == DBW_ERROR_REPLY) {
        if (out_fds != dummy_fds) close_fds(out_fds, *n_out);
        int err = r->error_errno > 0 && r->error_errno < 4096 ? r->error_errno : EIO;
        return failure(c, err, r->error_code, "%s", r->error_message);
    }
    if (r->header.type != expect) {
        if (out_fds != dummy_fds) close_fds(out_fds, *n_out);
        dmabufd_free(r->object);
        return failure(c, EBADMSG, DMABUFD_CODE_MALFORMED, "dmabufd answered with message type 0x%x, expected 0x%x",
                       r->header.type, expect);
    }
    return 0;
}

/* ---- connect -------------------------------------------------------------------------------------- */

static const char *default_client(void) {
    extern char *program_invocation_short_name;
    const char *n = program_invocation_short_name;
    if (!n || strlen(n) > DMABUFD_STRING_MAX || !dbw_valid_utf8((const uint8_t *)n, strlen(n))) return "libdmabufd";
    return n;
}

static int handshake(dmabufd_conn *c, const char *client) {
    dbw_request q = { .type = DBW_HELLO, .minimum_version = DBW_VERSION_MIN, .maximum_version = DBW_VERSION_MAX,
                      .client = client ? client : default_client() };
    dbw_response r;
    int e = transact(c, &q, NULL, 0, DBW_HELLO_REPLY, &r, NULL, NULL);
    if (e) return e;
    if (r.hello.version < DBW_VERSION_MIN || r.hello.version > DBW_VERSION_MAX)
        return failure(c, EPROTONOSUPPORT, DMABUFD_CODE_UNSUPPORTED_VERSION, "dmabufd chose protocol version %u; this library speaks 1...2",
                       r.hello.version);
    c->hello = r.hello;
    return 0;
}

DMABUFD_API int dmabufd_connect(const char *path, const char *client, dmabufd_conn **out) {
    if (!out) return failure(NULL, EINVAL, 0, "out is NULL");
    *out = NULL;
    if (!path || !*path) path = getenv(DMABUFD_SOCKET_ENV);
    if (!path || !*path) path = DMABUFD_DEFAULT_SOCKET;
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof a.sun_path) return failure(NULL, ENAMETOOLONG, 0, "socket path %s is too long", path);
    strcpy(a.sun_path, path);
    dmabufd_conn *c = calloc(1, sizeof *c);
    if (!c) return failure(NULL, ENOMEM, 0, "out of memory");
    c->epfd = c->evfd = -1;
    c->next_id = 1;
    pthread_mutex_init(&c->lock, NULL);
    c->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c->sock < 0 || connect(c->sock, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        dmabufd_disconnect(c);
        return failure(NULL, e, 0, "cannot connect to dmabufd at %s: %s (is dmabufd running? set $%s to its socket)", path,
                       strerror(e), DMABUFD_SOCKET_ENV);
    }
    int e = handshake(c, client);
    if (e) {
        int code = last.code;
        char msg[sizeof last.message];
        memcpy(msg, last.message, sizeof msg);
        dmabufd_disconnect(c);
        return failure(NULL, -e, code, "%s", msg);
    }
    *out = c;
    return succeed(NULL, 0);
}

DMABUFD_API void dmabufd_disconnect(dmabufd_conn *c) {
    if (!c) return;
    if (c->sock >= 0) close(c->sock);
    if (c->epfd >= 0) close(c->epfd);
    if (c->evfd >= 0) close(c->evfd);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

int dbw_conn_socket(const dmabufd_conn *c) { return c ? c->sock : -1; }
void dbw_conn_set_socket(dmabufd_conn *c, int fd) {
    pthread_mutex_lock(&c->lock);
    c->sock = fd;
    pthread_mutex_unlock(&c->lock);
}

DMABUFD_API const dmabufd_hello *dmabufd_server(const dmabufd_conn *c) { return c ? &c->hello : NULL; }
DMABUFD_API int dmabufd_version(const dmabufd_conn *c) { return c ? c->hello.version : -EINVAL; }

/* ---- requests ------------------------------------------------------------------------------------- */

static void hand_out(void *object, void **out) {
    if (out) *out = object;
    else dmabufd_free(object);
}

/* A request answered by one buffer and its fd: returns the fd, CLOEXEC only when `cloexec`. */
static int buffer_request(dmabufd_conn *c, const dbw_request *q, const int *in_fds, unsigned n_in, bool cloexec,
                          dmabufd_buffer_info **info) {
    if (info) *info = NULL;
    dbw_response r;
    int fds[DMABUFD_MAX_FDS];
    unsigned n = 0;
    int e = transact(c, q, in_fds, n_in, DBW_BUFFER_REPLY, &r, fds, &n);
    if (e) return e;
    if (!cloexec) fcntl(fds[0], F_SETFD, 0);
    hand_out(r.object, (void **)info);
    return succeed(c, fds[0]);
}

static int check_alloc_flags(dmabufd_conn *c, uint32_t fd_flags, uint64_t heap_flags) {
    if (fd_flags & ~(uint32_t)(O_ACCMODE | O_CLOEXEC))
        return failure(c, EINVAL, DMABUFD_CODE_INVALID_ARGUMENT, "fd_flags 0x%x has bits beyond O_ACCMODE|O_CLOEXEC", fd_flags);
    if (heap_flags)
        return failure(c, EINVAL, DMABUFD_CODE_INVALID_ARGUMENT, "heap_flags must be 0 (no heap flags are defined)");
    return 0;
}

DMABUFD_API int dmabufd_allocate(dmabufd_conn *c, uint64_t size, const char *heap, const char *tag, uint32_t fd_flags,
                                 uint64_t heap_flags, dmabufd_buffer_info **info) {
    int e = check_alloc_flags(c, fd_flags, heap_flags);
    if (e) return e;
    dbw_request q = { .type = DBW_ALLOCATE, .size = size, .heap = heap ? heap : "any", .tag = tag, .cpu_access = 3,
                      .fd_flags = fd_flags, .heap_flags = heap_flags };
    return buffer_request(c, &q, NULL, 0, fd_flags & O_CLOEXEC, info);
}

DMABUFD_API int dmabufd_allocate_batch(dmabufd_conn *c, unsigned count, uint64_t size, const char *heap, const char *tag,
                                       uint32_t fd_flags, uint64_t heap_flags, int *fds, dmabufd_buffer_list **infos) {
    if (infos) *infos = NULL;
    int e = check_alloc_flags(c, fd_flags, heap_flags);
    if (e) return e;
    if (count < 1 || count > DMABUFD_BATCH_MAX || !fds) return failure(c, EINVAL, 0, "count must be 1...16 and fds non-NULL");
    if (!c || c->hello.version < 2) return failure(c, EOPNOTSUPP, 0, "allocate_batch needs protocol v2; this dmabufd speaks v1");
    dbw_request q = { .type = DBW_ALLOCATE_BATCH, .count = (uint16_t)count, .size = size, .heap = heap ? heap : "any",
                      .tag = tag, .fd_flags = fd_flags, .heap_flags = heap_flags };
    dbw_response r;
    int got[DMABUFD_MAX_FDS];
    unsigned n = 0;
    if ((e = transact(c, &q, NULL, 0, DBW_BUFFERS_REPLY, &r, got, &n))) return e;
    if (n != count) {
        close_fds(got, n);
        dmabufd_free(r.object);
        return failure(c, EBADMSG, DMABUFD_CODE_MALFORMED, "dmabufd returned %u buffers for %u", n, count);
    }
    for (unsigned i = 0; i < n; i++) {
        if (!(fd_flags & O_CLOEXEC)) fcntl(got[i], F_SETFD, 0);
        fds[i] = got[i];
    }
    hand_out(r.object, (void **)infos);
    return succeed(c, (int)n);
}

DMABUFD_API int dmabufd_create_udmabuf(dmabufd_conn *c, uint64_t size, const char *tag, bool huge_pages, dmabufd_buffer_info **info) {
    dbw_request q = { .type = DBW_CREATE_UDMABUF, .size = size, .tag = tag, .huge_pages = huge_pages };
    return buffer_request(c, &q, NULL, 0, true, info);
}

DMABUFD_API int dmabufd_udmabuf_from_memfd(dmabufd_conn *c, int memfd, const dmabufd_range *ranges, uint32_t count,
                                           const char *tag, uint32_t flags, dmabufd_buffer_info **info) {
    if (count > DMABUFD_MAX_LIST || (count && !ranges)) return failure(c, EINVAL, 0, "at most 4000 ranges");
    /* One memfd: every range is in it, whatever a caller that predates the memfd field left there. */
    dmabufd_range *copy = calloc(count ? count : 1, sizeof *copy);
    if (!copy) return failure(c, ENOMEM, 0, "out of memory");
    for (uint32_t i = 0; i < count; i++) copy[i] = (dmabufd_range){ .offset = ranges[i].offset, .size = ranges[i].size };
    int r = dmabufd_udmabuf_from_memfds(c, &memfd, 1, copy, count, tag, flags, info);
    free(copy);
    return r;
}

DMABUFD_API int dmabufd_udmabuf_from_memfds(dmabufd_conn *c, const int *memfds, unsigned memfd_count, const dmabufd_range *ranges,
                                            uint32_t count, const char *tag, uint32_t flags, dmabufd_buffer_info **info) {
    if (flags & ~1u) return failure(c, EINVAL, DMABUFD_CODE_INVALID_ARGUMENT, "udmabuf flags 0x%x: only UDMABUF_FLAGS_CLOEXEC (1)", flags);
    if (count > DMABUFD_MAX_LIST || (count && !ranges)) return failure(c, EINVAL, 0, "at most 4000 ranges");
    if (memfd_count < 1 || memfd_count > DMABUFD_MAX_FDS || !memfds)
        return failure(c, EINVAL, 0, "1...%d memfds, not %u", DMABUFD_MAX_FDS, memfd_count);
    for (uint32_t i = 0; i < count; i++)
        if (ranges[i].memfd >= memfd_count) return failure(c, EINVAL, 0, "range %u names memfd %u of %u", i, ranges[i].memfd, memfd_count);
    if (memfd_count > 1 && dmabufd_version(c) < 2)
        return failure(c, EOPNOTSUPP, 0, "a udmabuf over several memfds needs protocol v2: update dmabufd");
    dbw_request q = { .type = DBW_CREATE_UDMABUF_FROM_MEMFD, .ranges = ranges, .range_count = count, .tag = tag, .flags = flags };
    return buffer_request(c, &q, memfds, memfd_count, flags & 1u, info);
}

DMABUFD_API int dmabufd_import(dmabufd_conn *c, int fd, const char *tag, dmabufd_buffer_info **info) {
    dbw_request q = { .type = DBW_IMPORT, .tag = tag };
    int got = buffer_request(c, &q, &fd, 1, true, info);
    if (got < 0) return got;
    close(got); /* the reply carries the buffer back; the caller already holds it */
    return 0;
}

DMABUFD_API int dmabufd_fetch(dmabufd_conn *c, uint64_t buffer, uint64_t token, dmabufd_buffer_info **info) {
    dbw_request q = { .type = DBW_FETCH, .buffer = buffer, .token = token };
    return buffer_request(c, &q, NULL, 0, true, info);
}

DMABUFD_API int dmabufd_info(dmabufd_conn *c, uint64_t buffer, dmabufd_buffer_info **out) {
    dbw_request q = { .type = DBW_INFO, .buffer = buffer };
    int fd = buffer_request(c, &q, NULL, 0, true, out);
    if (fd < 0) return fd;
    close(fd);
    return 0;
}

DMABUFD_API int dmabufd_share(dmabufd_conn *c, uint64_t buffer, const uint32_t *uid, bool one_time_token, uint64_t *token) {
    dbw_request q = { .type = DBW_SHARE, .buffer = buffer, .has_uid = uid != NULL, .uid = uid ? *uid : 0,
                      .one_time_token = one_time_token };
    dbw_response r;
    int e = transact(c, &q, NULL, 0, DBW_SHARE_REPLY, &r, NULL, NULL);
    if (e) return e;
    if (token) *token = r.has_token ? r.token : 0;
    return succeed(c, 0);
}

/* A request answered by `ok`. */
static int ok_request(dmabufd_conn *c, const dbw_request *q, const int *fds, unsigned n) {
    dbw_response r;
    int e = transact(c, q, fds, n, DBW_OK_REPLY, &r, NULL, NULL);
    return e ? e : succeed(c, 0);
}

DMABUFD_API int dmabufd_release(dmabufd_conn *c, uint64_t buffer) {
    dbw_request q = { .type = DBW_RELEASE, .buffer = buffer };
    return ok_request(c, &q, NULL, 0);
}

DMABUFD_API int dmabufd_release_quiet(dmabufd_conn *c, const uint64_t *buffers, uint32_t count) {
    if (!c || (count && !buffers)) return failure(c, EINVAL, 0, "no connection or no buffers");
    if (c->hello.version < 2) {
        for (uint32_t i = 0; i < count; i++) (void)dmabufd_release(c, buffers[i]);
        return succeed(c, 0);
    }
    int e = 0;
    pthread_mutex_lock(&c->lock);
    for (uint32_t at = 0; at < count && !e; at += DMABUFD_MAX_LIST) {
        uint32_t n = count - at < DMABUFD_MAX_LIST ? count - at : DMABUFD_MAX_LIST;
        dbw_request q = { .type = DBW_RELEASE_QUIET, .buffers = buffers + at, .buffer_count = n };
        uint32_t id = c->next_id++;
        if (c->next_id == 0) c->next_id = 1;
        c->quiet_ids[c->quiet_next++ % 64] = id;
        int len = dbw_encode_request(&q, c->hello.version, id, 0, c->out, sizeof c->out);
        if (c->broken) e = failure(c, ENOTCONN, 0, "the dmabufd connection was closed; connect again");
        else if (len < 0) e = failure(c, -len, 0, "release_quiet cannot be encoded");
        else if ((e = send_msg(c->sock, c->out, (size_t)len, NULL, 0))) {
            c->broken = true;
            e = failure(c, -e, 0, "sending to dmabufd failed: %s", strerror(-e));
        }
    }
    pthread_mutex_unlock(&c->lock);
    return e ? e : succeed(c, 0);
}

DMABUFD_API int dmabufd_revoke(dmabufd_conn *c, uint64_t buffer, uint32_t deadline_ms) {
    dbw_request q = { .type = DBW_REVOKE, .buffer = buffer, .deadline_ms = deadline_ms };
    return ok_request(c, &q, NULL, 0);
}

DMABUFD_API int dmabufd_release_lease(dmabufd_conn *c, uint64_t lease, int fence_fd) {
    dbw_request q = { .type = DBW_RELEASE_LEASE, .lease = lease };
    return ok_request(c, &q, &fence_fd, fence_fd >= 0 ? 1 : 0);
}

static uint8_t wire_access(int access) { return access == DMABUFD_ACCESS_READ_WRITE ? DMABUFD_ACCESS_WRITE : (uint8_t)access; }

DMABUFD_API int dmabufd_attach_fence(dmabufd_conn *c, uint64_t buffer, uint64_t first_page, uint64_t page_count, int access,
                                     int fence_fd) {
    if (fence_fd < 0) return failure(c, EBADF, 0, "attach_fence needs a sync_file fd");
    dbw_request q = { .type = DBW_ATTACH_FENCE, .buffer = buffer, .first_page = first_page, .page_count = page_count,
                      .access = wire_access(access) };
    return ok_request(c, &q, &fence_fd, 1);
}

DMABUFD_API int dmabufd_begin_access(dmabufd_conn *c, uint64_t buffer, uint64_t first_page, uint64_t page_count, int access,
                                     int *fence_fd) {
    if (fence_fd) *fence_fd = -1;
    dbw_request q = { .type = DBW_BEGIN_ACCESS, .buffer = buffer, .first_page = first_page, .page_count = page_count,
                      .access = wire_access(access) };
    dbw_response r;
    int fds[DMABUFD_MAX_FDS];
    unsigned n = 0;
    int e = transact(c, &q, NULL, 0, DBW_ACCESS_REPLY, &r, fds, &n);
    if (e) return e;
    if (n == 1) {
        if (fence_fd) *fence_fd = fds[0];
        else close(fds[0]);
    }
    return succeed(c, (int)(r.fences > INT32_MAX ? INT32_MAX : r.fences));
}

/* A request answered by one decoded object. */
static int object_request(dmabufd_conn *c, const dbw_request *q, uint16_t expect, void **out) {
    if (out) *out = NULL;
    dbw_response r;
    int e = transact(c, q, NULL, 0, expect, &r, NULL, NULL);
    if (e) return e;
    hand_out(r.object, out);
    return succeed(c, 0);
}

DMABUFD_API int dmabufd_list(dmabufd_conn *c, bool all, uint64_t after, dmabufd_buffer_list **out) {
    dbw_request q = { .type = DBW_LIST, .all = all, .after = after };
    return object_request(c, &q, DBW_LIST_REPLY, (void **)out);
}

DMABUFD_API int dmabufd_get_stats(dmabufd_conn *c, dmabufd_stats **out) {
    dbw_request q = { .type = DBW_STATS };
    return object_request(c, &q, DBW_STATS_REPLY, (void **)out);
}

DMABUFD_API int dmabufd_list_heaps(dmabufd_conn *c, dmabufd_heaps **out) {
    dbw_request q = { .type = DBW_LIST_HEAPS };
    return object_request(c, &q, DBW_HEAPS_REPLY, (void **)out);
}

DMABUFD_API int dmabufd_get_layout(dmabufd_conn *c, uint64_t buffer, uint64_t first_page, uint64_t page_count, bool physical,
                                   dmabufd_layout **out) {
    dbw_request q = { .type = DBW_LAYOUT, .buffer = buffer, .first_page = first_page, .page_count = page_count, .physical = physical };
    return object_request(c, &q, DBW_LAYOUT_REPLY, (void **)out);
}

/* ---- events --------------------------------------------------------------------------------------- */

DMABUFD_API int dmabufd_event_fd(dmabufd_conn *c) {
    if (!c) return failure(c, EINVAL, 0, "no connection");
    pthread_mutex_lock(&c->lock);
    int e = 0;
    if (c->epfd < 0) {
        int ep = epoll_create1(EPOLL_CLOEXEC), ev = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        struct epoll_event a = { .events = EPOLLIN, .data.fd = c->sock }, b = { .events = EPOLLIN, .data.fd = ev };
        if (ep < 0 || ev < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, c->sock, &a) < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, ev, &b) < 0) {
            e = errno;
            if (ep >= 0) close(ep);
            if (ev >= 0) close(ev);
        } else {
            c->epfd = ep;
            c->evfd = ev;
            if (c->qlen) { uint64_t one = 1; (void)!write(ev, &one, sizeof one); }
        }
    }
    int fd = c->epfd;
    pthread_mutex_unlock(&c->lock);
    return e ? failure(c, e, 0, "cannot make the event fd: %s", strerror(e)) : fd;
}

/* Under the lock: a queued event, or one read without blocking. 1, 0 (none) or -errno. */
static int take_event(dmabufd_conn *c, dmabufd_event *ev) {
    if (c->qlen) {
        *ev = c->queue[c->qhead];
        c->qhead = (c->qhead + 1) % QUEUE_MAX;
        if (--c->qlen == 0 && c->evfd >= 0) { uint64_t v; (void)!read(c->evfd, &v, sizeof v); }
        return 1;
    }
    if (c->broken) return failure(c, ENOTCONN, 0, "the dmabufd connection was closed; connect again");
    dbw_response r;
    int fds[DMABUFD_MAX_FDS];
    unsigned n = 0;
    int e = receive(c, &r, fds, &n, MSG_DONTWAIT);
    if (e == -EAGAIN) return 0;
    if (e) return e;
    close_fds(fds, n);
    if (r.header.request_id != 0 || !is_event(r.header.type)) {
        dmabufd_free(r.object);
        c->broken = true;
        return failure(c, EBADMSG, DMABUFD_CODE_MALFORMED, "dmabufd sent a reply nobody asked for");
    }
    *ev = r.event;
    return 1;
}

DMABUFD_API int dmabufd_next_event(dmabufd_conn *c, dmabufd_event *ev, bool wait) {
    if (!c || !ev) return failure(c, EINVAL, 0, "no connection or no event");
    for (;;) {
        pthread_mutex_lock(&c->lock);
        int got = take_event(c, ev);
        pthread_mutex_unlock(&c->lock);
        if (got != 0 || !wait) return got < 0 ? got : succeed(c, got);
        /* Wait without the lock, so other threads' requests go on; they queue what they read. */
        /* The timeout bounds how late an event another thread queued meanwhile is seen. */
        struct pollfd p = { c->sock, POLLIN, 0 };
        if (poll(&p, 1, 100) < 0 && errno != EINTR) return failure(c, errno, 0, "poll: %s", strerror(errno));
    }
}
