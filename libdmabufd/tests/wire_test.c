/* C unit tests for libdmabufd: codec round trips (v1, v2), malformed inputs, and the connection against an
 * in-process fake daemon (handshake, fds, events queued while waiting, errors). Ends with
 * "clib: N passed, M failed". */
#include "dmabufd_wire.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int passed, failed;
#define CHECK(cond, ...)                                                           \
    do {                                                                           \
        if (cond) passed++;                                                        \
        else { failed++; printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } \
    } while (0)

static uint8_t buf[DMABUFD_MAX_MESSAGE], buf2[DMABUFD_MAX_MESSAGE];

/* ---- sample objects ---- */
static uint32_t shared[] = { 1000, 65534 };
static dmabufd_buffer_info sample_buffer(void) {
    dmabufd_buffer_info b = { .id = 7, .inode = 12345, .size = 1 << 20, .owner_uid = 1000, .owner_pid = -3, .generation = 2,
                              .external_references = 1, .leases = 3, .shared_with_count = 2, .shared_with = shared,
                              .revoked = true, .orphaned = false, .memfd_owned_by_daemon = true, .flags = DMABUFD_CONTIGUOUS };
    strcpy(b.heap, "system"); strcpy(b.tag, "cam\xc3\xa9ra"); strcpy(b.name, "1000:42:camera"); strcpy(b.cgroup, "/user.slice");
    return b;
}

/* Encodes `r`, decodes it, encodes the result again: both encodings must be identical. */
static void round_trip(const char *what, dbw_response *r, uint16_t v, unsigned fds) {
    r->header.fd_count = (uint16_t)fds;
    int n = dbw_encode_response(r, v, buf, sizeof buf);
    CHECK(n > 0, "%s v%u: encode %d", what, v, n);
    if (n <= 0) return;
    dbw_response d;
    int e = dbw_decode_response(buf, (size_t)n, fds, v, &d);
    CHECK(e == 0, "%s v%u: decode %d", what, v, e);
    if (e) return;
    int m = dbw_encode_response(&d, v, buf2, sizeof buf2);
    CHECK(m == n && memcmp(buf, buf2, (size_t)n) == 0, "%s v%u: re-encoding differs (%d vs %d)", what, v, m, n);
    /* Every cut short of the end is malformed, never a crash. */
    int bad = 0;
    for (int cut = 0; cut < n; cut++) {
        dbw_response t;
        if (dbw_decode_response(buf, (size_t)cut, fds, v, &t) != -EBADMSG) bad++;
    }
    CHECK(bad == 0, "%s v%u: %d truncations were not EBADMSG", what, v, bad);
    /* Trailing bytes are malformed. */
    uint8_t *longer = malloc((size_t)n + 1);
    memcpy(longer, buf, (size_t)n);
    longer[n] = 0;
    uint32_t len = (uint32_t)(n + 1 - DBW_HEADER_SIZE);
    memcpy(longer + 12, &len, 4);
    dbw_response t;
    CHECK(dbw_decode_response(longer, (size_t)n + 1, fds, v, &t) == -EBADMSG || r->header.type == DBW_OK_REPLY, "%s v%u: trailing byte accepted", what, v);
    free(longer);
    dmabufd_free(d.object);
}

static void test_round_trips(void) {
    for (uint16_t v = 1; v <= 2; v++) {
        dbw_response r = { .header = { .type = DBW_HELLO_REPLY, .request_id = 9 } };
        r.hello = (dmabufd_hello){ .version = v, .maximum_message_size = 65536, .maximum_descriptors = 16, .page_size = 4096,
                                   .uid = 1000, .gid = 100, .pid = 77 };
        strcpy(r.hello.server, "dmabufd 1.0");
        round_trip("hello", &r, v, 0);

        dmabufd_buffer_info b = sample_buffer();
        r = (dbw_response){ .header = { .type = DBW_BUFFER_REPLY, .request_id = 3 }, .object = &b };
        round_trip("buffer", &r, v, 1);

        dmabufd_buffer_info two[2] = { sample_buffer(), sample_buffer() };
        two[1].id = 8; two[1].shared_with_count = 0;
        dmabufd_buffer_list l = { .count = 2, .buffers = two, .more = true };
        r = (dbw_response){ .header = { .type = DBW_LIST_REPLY, .request_id = 3 }, .object = &l };
        round_trip("list", &r, v, 0);
        if (v == 2) {
            r.header.type = DBW_BUFFERS_REPLY;
            round_trip("buffers", &r, v, 2);
            dbw_response t;
            int n = dbw_encode_response(&r, 2, buf, sizeof buf);
            CHECK(dbw_decode_response(buf, (size_t)n, 1, 2, &t) == -EBADMSG, "buffers with a wrong fd count accepted");
        }

        char chain[2][256] = { "cma", "system" };
        dmabufd_heap heaps[2] = { { .allocated_bytes = 4096, .buffers = 1, .total_bytes = 1 << 30, .free_bytes = 5, .charges_memcg = true } };
        strcpy(heaps[0].name, "system"); strcpy(heaps[0].device, "/dev/dma_heap/system"); strcpy(heaps[0].kind, "system");
        strcpy(heaps[1].name, "udmabuf"); strcpy(heaps[1].device, "/dev/udmabuf"); strcpy(heaps[1].kind, "udmabuf");
        dmabufd_policy pol = { .chain_count = 2, .chain = chain };
        strcpy(pol.name, "any");
        dmabufd_heaps h = { .heap_count = 2, .heaps = heaps, .policy_count = 1, .policies = &pol, .mem_accounting = true };
        r = (dbw_response){ .header = { .type = DBW_HEAPS_REPLY, .request_id = 4 }, .object = &h };
        round_trip("heaps", &r, v, 0);

        dmabufd_heap_stats hs = { .bytes = 8192, .buffers = 2, .failures = 1 };
        strcpy(hs.heap, "system");
        dmabufd_client_stats cs = { .uid = 1000, .bytes = 8192, .buffers = 2, .quota_bytes = 1 << 30, .quota_buffers = 100, .refusals = 4 };
        dmabufd_errno_count ec = { .count = 3 };
        strcpy(ec.errno_name, "ENOMEM");
        dmabufd_cgroup_stats cg = { .bytes = 1, .buffers = 1, .quota_bytes = 0, .refusals = 0 };
        strcpy(cg.cgroup, "...long/path");
        dmabufd_stats s = { .heap_count = 1, .heaps = &hs, .client_count = 1, .clients = &cs, .failure_count = 1, .failures = &ec,
                            .connected_clients = 2, .buffers = 2, .bytes = 8192, .leases = 1, .pending_fences = 0,
                            .oldest_pending_fence_ms = 12, .cgroup_count = 1, .cgroups = &cg };
        r = (dbw_response){ .header = { .type = DBW_STATS_REPLY, .request_id = 5 }, .object = &s };
        round_trip("stats", &r, v, 0);

        dmabufd_page_run runs[2] = { { 0, 3 }, { 10, 1 } };
        dmabufd_layout lay = { .buffer = 7, .lease = 9, .generation = 1, .kind = 1, .page_size = 4096, .first_page = 0, .run_count = 2, .runs = runs,
                               .flags = v >= 2 ? DMABUFD_CONTIGUOUS : 0 };
        r = (dbw_response){ .header = { .type = DBW_LAYOUT_REPLY, .request_id = 6 }, .object = &lay };
        round_trip("layout", &r, v, 0);
        if (v == 2) { /* v2 ends with flags u32: 4 bytes more than v1, and decoded */
            int n1 = dbw_encode_response(&r, 1, buf, sizeof buf), n2 = dbw_encode_response(&r, 2, buf, sizeof buf);
            dbw_response t;
            CHECK(n2 == n1 + 4 && dbw_decode_response(buf, (size_t)n2, 0, 2, &t) == 0 && ((dmabufd_layout *)t.object)->flags == DMABUFD_CONTIGUOUS,
                  "layout v2 flags not carried (%d vs %d)", n2, n1);
            if (n2 == n1 + 4) dmabufd_free(t.object);
        }

        r = (dbw_response){ .header = { .type = DBW_SHARE_REPLY, .request_id = 6 }, .has_token = true, .token = 0xdeadbeefcafe };
        round_trip("share", &r, v, 0);
        r = (dbw_response){ .header = { .type = DBW_OK_REPLY, .request_id = 6 } };
        round_trip("ok", &r, v, 0);
        r = (dbw_response){ .header = { .type = DBW_ACCESS_REPLY, .request_id = 6 }, .fences = 2 };
        round_trip("access", &r, v, 1);
        r.fences = 0;
        round_trip("access-none", &r, v, 0);
        r = (dbw_response){ .header = { .type = DBW_ERROR_REPLY, .request_id = 6 }, .error_errno = EDQUOT, .error_code = 5 };
        strcpy(r.error_message, "quota exceeded: release buffers or raise quota");
        round_trip("error", &r, v, 0);
        r = (dbw_response){ .header = { .type = DMABUFD_EVENT_LEASE_REVOKED }, .event = { .lease = 1, .buffer = 2, .deadline_ms = 500 } };
        round_trip("lease_revoked", &r, v, 0);
        r.header.type = DMABUFD_EVENT_LEASE_ENDED; round_trip("lease_ended", &r, v, 0);
        r.header.type = DMABUFD_EVENT_BUFFER_FREED; round_trip("buffer_freed", &r, v, 0);
        r.header.type = DMABUFD_EVENT_FENCE_SIGNALED; round_trip("fence_signaled", &r, v, 0);
    }
}

/* A hand-built `ok` reply to mutate. */
static size_t ok_bytes(uint8_t *b, uint16_t v, uint16_t type, uint32_t len, uint16_t fds) {
    uint32_t magic = DBW_MAGIC, id = 1;
    memcpy(b, &magic, 4); memcpy(b + 4, &v, 2); memcpy(b + 6, &type, 2); memcpy(b + 8, &id, 4); memcpy(b + 12, &len, 4);
    memcpy(b + 16, &fds, 2); memset(b + 18, 0, 2);
    return DBW_HEADER_SIZE;
}

static void test_malformed(void) {
    dbw_response r;
    uint8_t b[64];
    size_t n = ok_bytes(b, 1, DBW_OK_REPLY, 0, 0);
    CHECK(dbw_decode_response(b, n, 0, 1, &r) == 0, "ok reply refused");
    CHECK(dbw_decode_response(b, n, 0, 2, &r) == -EBADMSG, "header version 1 accepted on a v2 connection");
    CHECK(dbw_decode_response(b, n, 1, 1, &r) == -EBADMSG, "fd count mismatch accepted");
    b[0] ^= 1;
    CHECK(dbw_decode_response(b, n, 0, 1, &r) == -EBADMSG, "bad magic accepted");
    n = ok_bytes(b, 3, DBW_OK_REPLY, 0, 0);
    CHECK(dbw_decode_response(b, n, 0, 0, &r) == -EBADMSG, "version 3 accepted");
    n = ok_bytes(b, 1, 0x8004, 0, 0);
    CHECK(dbw_decode_response(b, n, 0, 1, &r) == -EBADMSG, "unknown type accepted");
    n = ok_bytes(b, 1, DBW_ALLOCATE, 0, 0);
    CHECK(dbw_decode_response(b, n, 0, 1, &r) == -EBADMSG, "request type accepted as a reply");
    n = ok_bytes(b, 1, DBW_BUFFERS_REPLY, 4, 1);
    memset(b + n, 0, 4);
    CHECK(dbw_decode_response(b, n + 4, 1, 1, &r) == -EBADMSG, "v2-only reply accepted on v1");
    n = ok_bytes(b, 1, DBW_OK_REPLY, 5, 0);
    CHECK(dbw_decode_response(b, n, 0, 1, &r) == -EBADMSG, "length disagreeing with what arrived accepted");
    /* share reply with a bool of 2 */
    n = ok_bytes(b, 1, DBW_SHARE_REPLY, 1, 0);
    b[n] = 2;
    CHECK(dbw_decode_response(b, n + 1, 0, 1, &r) == -EBADMSG, "bool 2 accepted");
    /* access: fences without an fd */
    n = ok_bytes(b, 1, DBW_ACCESS_REPLY, 4, 0);
    b[n] = 1; b[n + 1] = b[n + 2] = b[n + 3] = 0;
    CHECK(dbw_decode_response(b, n + 4, 0, 1, &r) == -EBADMSG, "access fences=1 without fd accepted");
    /* error: code 13, and code 0 */
    for (uint16_t code = 0; code <= 13; code += 13) {
        n = ok_bytes(b, 1, DBW_ERROR_REPLY, 8, 0);
        memset(b + n, 0, 8);
        memcpy(b + n + 4, &code, 2);
        CHECK(dbw_decode_response(b, n + 8, 0, 1, &r) == -EBADMSG, "error code %u accepted", code);
    }
    /* strings: bad UTF-8, NUL, over 255 */
    const char *bad[] = { "\xc0\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80", "a\0b", "\xe2\x82" };
    size_t badlen[] = { 2, 3, 4, 3, 2 };
    for (int i = 0; i < 5; i++) {
        n = ok_bytes(b, 1, DBW_ERROR_REPLY, (uint32_t)(8 + badlen[i]), 0);
        memset(b + n, 0, 8);
        b[n + 4] = 1;
        uint16_t sl = (uint16_t)badlen[i];
        memcpy(b + n + 6, &sl, 2);
        memcpy(b + n + 8, bad[i], badlen[i]);
        CHECK(dbw_decode_response(b, n + 8 + badlen[i], 0, 1, &r) == -EBADMSG, "bad string %d accepted", i);
    }
    static uint8_t big[DMABUFD_MAX_MESSAGE + 8];
    n = ok_bytes(big, 1, DBW_ERROR_REPLY, 8 + 256, 0);
    memset(big + n, 'a', 8 + 256);
    big[n + 4] = 1; big[n + 5] = 0;
    uint16_t sl = 256;
    memcpy(big + n + 6, &sl, 2);
    CHECK(dbw_decode_response(big, n + 8 + 256, 0, 1, &r) == -EBADMSG, "256-byte string accepted");
    /* a list count over 4000, and one larger than the bytes left */
    n = ok_bytes(big, 1, DBW_LAYOUT_REPLY, 33 + 4, 0);
    memset(big + n, 0, 37);
    uint32_t count = 4001;
    memcpy(big + n + 33, &count, 4);
    CHECK(dbw_decode_response(big, n + 37, 0, 1, &r) == -EBADMSG, "list of 4001 accepted");
    count = 2;
    memcpy(big + n + 33, &count, 4);
    CHECK(dbw_decode_response(big, n + 37, 0, 1, &r) == -EBADMSG, "list longer than the message accepted");
    /* layout kind 3 */
    count = 0;
    memcpy(big + n + 33, &count, 4);
    CHECK(dbw_decode_response(big, n + 37, 0, 1, &r) == 0, "empty layout refused");
    dmabufd_free(r.object);
    big[n + 20] = 3;
    CHECK(dbw_decode_response(big, n + 37, 0, 1, &r) == -EBADMSG, "layout kind 3 accepted");
    /* oversize */
    CHECK(dbw_decode_response(big, DMABUFD_MAX_MESSAGE + 1, 0, 1, &r) == -EBADMSG, "oversize accepted");
}

static void test_requests(void) {
    /* allocate v1 and v2, byte for byte against the layout in PROTOCOL.md */
    dbw_request q = { .type = DBW_ALLOCATE, .size = 4096, .heap = "system", .tag = "t", .cpu_access = 3, .fd_flags = 02000002 };
    int n = dbw_encode_request(&q, 1, 5, 0, buf, sizeof buf);
    static const uint8_t v1[] = { 0x44, 0x4d, 0x42, 0x46, 1, 0, 3, 0, 5, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0,
                                  0, 0x10, 0, 0, 0, 0, 0, 0, 6, 0, 's', 'y', 's', 't', 'e', 'm', 1, 0, 't', 3 };
    CHECK(n == (int)sizeof v1 && memcmp(buf, v1, sizeof v1) == 0, "allocate v1 bytes differ (%d)", n);
    n = dbw_encode_request(&q, 2, 5, 0, buf, sizeof buf);
    CHECK(n == 20 + 8 + 8 + 3 + 4 + 8 && buf[4] == 2 && buf[39] == 2 && buf[41] == 0x08, "allocate v2 bytes differ (%d)", n);
    q.tag = "\xff";
    CHECK(dbw_encode_request(&q, 2, 5, 0, buf, sizeof buf) == -EINVAL, "invalid UTF-8 tag encoded");
    char longtag[300];
    memset(longtag, 'x', 299); longtag[299] = 0;
    q.tag = longtag;
    CHECK(dbw_encode_request(&q, 2, 5, 0, buf, sizeof buf) == -EINVAL, "299-byte tag encoded");
    dbw_request rq = { .type = DBW_RELEASE_QUIET, .buffers = (uint64_t[]){ 1, 2 }, .buffer_count = 2 };
    CHECK(dbw_encode_request(&rq, 1, 5, 0, buf, sizeof buf) == -EINVAL, "release_quiet encoded for v1");
    CHECK(dbw_encode_request(&rq, 2, 5, 0, buf, sizeof buf) == 20 + 4 + 16, "release_quiet v2 size");
    dbw_request imp = { .type = DBW_IMPORT, .tag = "x" };
    CHECK(dbw_encode_request(&imp, 1, 5, 0, buf, sizeof buf) == -EINVAL, "import without its fd encoded");
    /* create_udmabuf_from_memfd: v2 ranges carry a memfd index (u8) into the message's 1...16 fds */
    dmabufd_range mr[2] = { { .offset = 0, .size = 4096, .memfd = 0 }, { .offset = 8192, .size = 4096, .memfd = 2 } };
    dbw_request um = { .type = DBW_CREATE_UDMABUF_FROM_MEMFD, .ranges = mr, .range_count = 2, .tag = "", .flags = 1 };
    CHECK(dbw_encode_request(&um, 2, 5, 3, buf, sizeof buf) == 20 + 4 + 2 * 17 + 2 + 4 && buf[20 + 4 + 16] == 0 && buf[20 + 4 + 33] == 2,
          "udmabuf over 3 memfds v2 bytes differ");
    CHECK(dbw_encode_request(&um, 2, 5, 2, buf, sizeof buf) == -EINVAL, "memfd index 2 of 2 fds encoded");
    CHECK(dbw_encode_request(&um, 1, 5, 3, buf, sizeof buf) == -EINVAL, "v1 udmabuf with 3 fds encoded");
    mr[1].memfd = 0;
    CHECK(dbw_encode_request(&um, 1, 5, 1, buf, sizeof buf) == 20 + 4 + 2 * 16 + 2, "v1 udmabuf from one memfd size");
    dbw_request fe = { .type = DBW_BEGIN_ACCESS, .access = 3 };
    CHECK(dbw_encode_request(&fe, 1, 5, 0, buf, sizeof buf) == -EINVAL, "access 3 encoded");
}

/* ---- the connection against a fake daemon ---- */

static char sock_path[108];
static int fake_memfd;
static uint16_t fake_version = 2; /* what the fake daemon negotiates */
static int fake_last_fds;          /* descriptors the last request carried */

static int fake_recv(int s, dbw_header *h, uint8_t *payload) {
    uint8_t b[DMABUFD_MAX_MESSAGE];
    char ctl[CMSG_SPACE(sizeof(int) * 16)];
    struct iovec iov = { b, sizeof b };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl };
    ssize_t n = recvmsg(s, &m, MSG_CMSG_CLOEXEC);
    if (n < DBW_HEADER_SIZE) return -1;
    memcpy(&h->version, b + 4, 2); memcpy(&h->type, b + 6, 2); memcpy(&h->request_id, b + 8, 4);
    memcpy(payload, b + 20, (size_t)n - 20);
    fake_last_fds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof fd, sizeof fd);
            close(fd);
        }
        fake_last_fds += count;
    }
    return (int)n - 20;
}

static void fake_send(int s, dbw_response *r, uint16_t v, int fd) {
    uint8_t b[4096];
    r->header.fd_count = fd >= 0 ? 1 : 0;
    int n = dbw_encode_response(r, v, b, sizeof b);
    char ctl[CMSG_SPACE(sizeof(int))];
    struct iovec iov = { b, (size_t)n };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (fd >= 0) {
        m.msg_control = ctl; m.msg_controllen = sizeof ctl;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET; c->cmsg_type = SCM_RIGHTS; c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    sendmsg(s, &m, 0);
}

/* Answers hello with v2, then: allocate -> an event, then a buffer with a memfd; anything else -> EDQUOT. */
static void *fake_daemon(void *arg) {
    int ls = *(int *)arg;
    int s = accept(ls, NULL, NULL);
    dbw_header h;
    static uint8_t p[DMABUFD_MAX_MESSAGE];
    while (fake_recv(s, &h, p) >= 0) {
        dbw_response r = { .header = { .request_id = h.request_id } };
        if (h.type == DBW_HELLO) {
            r.header.type = DBW_HELLO_REPLY;
            r.hello = (dmabufd_hello){ .version = fake_version, .maximum_message_size = 65536, .maximum_descriptors = 16, .page_size = 4096 };
            strcpy(r.hello.server, "fake");
            fake_send(s, &r, 1, -1);
        } else if (h.type == DBW_ALLOCATE && h.version == fake_version) {
            /* v1 payload: size, heap, tag, cpu_access (read-write, 3); v2: size, heap, tag, fd_flags, heap_flags */
            bool v1_ok = fake_version == 1 && p[8 + 2 + 6 + 2 + 1] == 3;
            dbw_response ev = { .header = { .type = DMABUFD_EVENT_BUFFER_FREED }, .event = { .buffer = fake_version == 1 && !v1_ok ? 0 : 99 } };
            fake_send(s, &ev, fake_version, -1);
            dmabufd_buffer_info b = sample_buffer();
            r.header.type = DBW_BUFFER_REPLY;
            r.object = &b;
            fake_send(s, &r, fake_version, fake_memfd);
        } else {
            r.header.type = DBW_ERROR_REPLY;
            r.error_errno = EDQUOT; r.error_code = 5;
            strcpy(r.error_message, "over quota");
            fake_send(s, &r, fake_version, -1);
        }
    }
    close(s);
    return NULL;
}

static void *hammer(void *arg) {
    dmabufd_conn *c = arg;
    long wrong = 0;
    for (int i = 0; i < 50; i++) {
        int fd = dmabufd_allocate(c, 4096, "system", "t", O_RDWR | O_CLOEXEC, 0, NULL);
        if (fd < 0) wrong++; else close(fd);
        if (dmabufd_release(c, 1) != -EDQUOT || dmabufd_last_error(c) != EDQUOT) wrong++;
    }
    return (void *)wrong;
}

static void test_connection(void) {
    snprintf(sock_path, sizeof sock_path, "/tmp/clib-test-%d.sock", getpid());
    unlink(sock_path);
    int ls = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strcpy(a.sun_path, sock_path);
    bind(ls, (struct sockaddr *)&a, sizeof a);
    listen(ls, 1);
    fake_memfd = memfd_create("fake", MFD_CLOEXEC);
    pthread_t t;
    pthread_create(&t, NULL, fake_daemon, &ls);
    setenv(DMABUFD_SOCKET_ENV, sock_path, 1);
    dmabufd_conn *c = NULL;
    int e = dmabufd_connect(NULL, "wire-test", &c);
    CHECK(e == 0 && c && dmabufd_version(c) == 2, "connect: %d %s", e, dmabufd_last_message(NULL));
    if (!c) return;
    CHECK(dmabufd_allocate(c, 4096, "system", "t", 0x40, 0, NULL) == -EINVAL, "fd_flags 0x40 accepted");
    CHECK(dmabufd_allocate(c, 4096, "system", "t", O_RDWR, 1, NULL) == -EINVAL, "heap_flags 1 accepted");
    dmabufd_buffer_info *info = NULL;
    int fd = dmabufd_allocate(c, 4096, "system", "t", O_RDWR, 0, &info);
    CHECK(fd >= 0 && info && info->id == 7 && info->shared_with_count == 2 && strcmp(info->cgroup, "/user.slice") == 0,
          "allocate: %d", fd);
    CHECK(fd >= 0 && fcntl(fd, F_GETFD) == 0, "fd is close-on-exec without O_CLOEXEC");
    dmabufd_free(info);
    if (fd >= 0) close(fd);
    fd = dmabufd_allocate(c, 4096, "system", "t", O_RDWR | O_CLOEXEC, 0, NULL);
    CHECK(fd >= 0 && fcntl(fd, F_GETFD) == FD_CLOEXEC, "fd is not close-on-exec with O_CLOEXEC");
    if (fd >= 0) close(fd);
    dmabufd_event ev;
    CHECK(dmabufd_next_event(c, &ev, false) == 1 && ev.type == DMABUFD_EVENT_BUFFER_FREED && ev.buffer == 99, "queued event lost");
    CHECK(dmabufd_next_event(c, &ev, false) == 1, "second queued event lost");
    CHECK(dmabufd_next_event(c, &ev, false) == 0, "phantom event");
    int efd = dmabufd_event_fd(c);
    CHECK(efd >= 0, "event fd %d", efd);
    CHECK(dmabufd_release(c, 1) == -EDQUOT && dmabufd_last_error(c) == EDQUOT && dmabufd_last_code(c) == 5 &&
              strcmp(dmabufd_last_message(c), "over quota") == 0, "error reply not surfaced");
    /* Many threads on one connection: every request gets its own reply (ids match), each with its fd. */
    pthread_t th[4];
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, hammer, c);
    long wrong = 0;
    for (int i = 0; i < 4; i++) { void *r; pthread_join(th[i], &r); wrong += (long)r; }
    CHECK(wrong == 0, "%ld of 400 threaded requests went wrong", wrong);
    CHECK(dmabufd_next_event(c, &ev, false) == 1 && ev.buffer == 99, "events queued by threads lost");
    /* udmabuf over several memfds: every memfd travels once; a bad index never leaves the library. */
    int m3[3] = { fake_memfd, fake_memfd, fake_memfd };
    dmabufd_range r3[2] = { { .offset = 0, .size = 4096, .memfd = 2 }, { .offset = 0, .size = 4096, .memfd = 0 } };
    CHECK(dmabufd_udmabuf_from_memfds(c, m3, 3, r3, 2, "t", 0, NULL) == -EDQUOT && fake_last_fds == 3, "3 memfds sent as %d fds", fake_last_fds);
    r3[0].memfd = 3;
    CHECK(dmabufd_udmabuf_from_memfds(c, m3, 3, r3, 2, "t", 0, NULL) == -EINVAL, "memfd index 3 of 3 sent");
    CHECK(dmabufd_udmabuf_from_memfd(c, fake_memfd, r3, 2, "t", 0, NULL) == -EDQUOT && fake_last_fds == 1, "one memfd ignores the index");
    dmabufd_disconnect(c);
    pthread_join(t, NULL);

    /* A v1 daemon: the library speaks v1 to it (allocate carries cpu_access), release_quiet becomes
     * releases, allocate_batch is refused locally. */
    fake_version = 1;
    pthread_create(&t, NULL, fake_daemon, &ls);
    CHECK(dmabufd_connect(NULL, "wire-test-v1", &c) == 0 && dmabufd_version(c) == 1, "v1 connect");
    fd = dmabufd_allocate(c, 4096, "system", "t", O_RDWR, 0, NULL);
    CHECK(fd >= 0, "v1 allocate: %d", fd);
    if (fd >= 0) close(fd);
    CHECK(dmabufd_next_event(c, &ev, false) == 1 && ev.buffer == 99, "v1 allocate payload (cpu_access 3)");
    int fds[2];
    CHECK(dmabufd_allocate_batch(c, 2, 4096, "system", "t", O_RDWR, 0, fds, NULL) == -EOPNOTSUPP, "v1 allocate_batch refused locally");
    uint64_t ids[2] = { 1, 2 };
    CHECK(dmabufd_release_quiet(c, ids, 2) == 0, "v1 release_quiet as releases");
    int m2[2] = { fake_memfd, fake_memfd };
    dmabufd_range r2[2] = { { .offset = 0, .size = 4096, .memfd = 0 }, { .offset = 0, .size = 4096, .memfd = 1 } };
    CHECK(dmabufd_udmabuf_from_memfds(c, m2, 2, r2, 2, "t", 0, NULL) == -EOPNOTSUPP, "v1: several memfds refused locally");
    CHECK(dmabufd_release(c, 1) == -EDQUOT, "v1 connection still in step after release_quiet");
    dmabufd_disconnect(c);
    pthread_join(t, NULL);
    close(ls);
    unlink(sock_path);
    CHECK(dmabufd_connect("/nonexistent/sock", NULL, &c) == -ENOENT, "connect to a missing socket");
}

int main(void) {
    test_round_trips();
    test_malformed();
    test_requests();
    test_connection();
    printf("clib: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
