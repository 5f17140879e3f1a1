/* libdmabufd: C client library for dmabufd, the dma-buf broker.
 *
 * The protocol is docs/PROTOCOL.md (v1 and v2); this library negotiates 1...2 and uses v2 when the
 * daemon offers it. It needs only libc: no Swift runtime, so it loads into any process.
 *
 * Conventions:
 *  - Every function returns a negative errno on failure (never sets errno as its result). The failing
 *    thread can then ask dmabufd_last_error()/dmabufd_last_message() for the errno and the daemon's
 *    text (what to do), and dmabufd_last_code() for the protocol's error code.
 *  - A dmabufd_conn is safe to use from many threads (one request at a time on the wire, replies matched
 *    by request id). It must not be used in a child after fork(): connect again there.
 *  - Objects returned through a `**out` parameter are one allocation each, freed with dmabufd_free().
 *  - Strings sent are at most 255 bytes of valid UTF-8 (else -EINVAL); strings received are checked the
 *    same way, and a string holding a NUL byte is refused as malformed (a C string cannot carry it).
 *  - Descriptors received are close-on-exec unless the call takes fd_flags without O_CLOEXEC.
 */
#ifndef DMABUFD_H
#define DMABUFD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(DMABUFD_HIDE_API)
/* libdmabufd-preload.so carries the library inside but exports only the interposed libc calls. */
#define DMABUFD_API __attribute__((visibility("hidden")))
#elif defined(__GNUC__)
#define DMABUFD_API __attribute__((visibility("default")))
#else
#define DMABUFD_API
#endif

#define DMABUFD_DEFAULT_SOCKET "/run/dmabufd/dmabufd.sock"
#define DMABUFD_SOCKET_ENV "DMABUFD_SOCKET"
#define DMABUFD_STRING_MAX 255
#define DMABUFD_MAX_MESSAGE 65536
#define DMABUFD_MAX_FDS 16
#define DMABUFD_MAX_LIST 4000
#define DMABUFD_BATCH_MAX 16

/* Protocol error codes (the `code` of an error reply). */
enum dmabufd_code {
    DMABUFD_CODE_NONE = 0,
    DMABUFD_CODE_MALFORMED = 1,
    DMABUFD_CODE_UNSUPPORTED_VERSION = 2,
    DMABUFD_CODE_NOT_FOUND = 3,
    DMABUFD_CODE_PERMISSION_DENIED = 4,
    DMABUFD_CODE_QUOTA_EXCEEDED = 5,
    DMABUFD_CODE_NO_HEAP = 6,
    DMABUFD_CODE_KERNEL = 7,
    DMABUFD_CODE_REVOKED = 8,
    DMABUFD_CODE_LIMIT = 9,
    DMABUFD_CODE_INVALID_ARGUMENT = 10,
    DMABUFD_CODE_INTERNAL = 11,
    DMABUFD_CODE_BUSY = 12,
};

/* Fence and access modes. The wire carries read or write; read-write is sent as write (as DmaBufWire does),
 * since a write already conflicts with every other access. */
enum dmabufd_access { DMABUFD_ACCESS_READ = 1, DMABUFD_ACCESS_WRITE = 2, DMABUFD_ACCESS_READ_WRITE = 3 };
enum dmabufd_run_kind { DMABUFD_RUNS_BUFFER_PAGES = 0, DMABUFD_RUNS_MEMFD_PAGES = 1, DMABUFD_RUNS_PHYSICAL = 2 };
enum dmabufd_event_type {
    DMABUFD_EVENT_LEASE_REVOKED = 0x4001,
    DMABUFD_EVENT_LEASE_ENDED = 0x4002,
    DMABUFD_EVENT_BUFFER_FREED = 0x4003,
    DMABUFD_EVENT_FENCE_SIGNALED = 0x4004,
};

typedef struct dmabufd_conn dmabufd_conn;

typedef struct dmabufd_hello {
    uint16_t version; /* the negotiated protocol version */
    char server[256];
    uint32_t maximum_message_size;
    uint16_t maximum_descriptors;
    uint32_t page_size;
    uint32_t uid, gid; /* this process as the daemon sees it */
    int32_t pid;
} dmabufd_hello;

typedef struct dmabufd_buffer_info {
    uint64_t id, inode, size;
    char heap[256], tag[256], name[256];
    uint32_t owner_uid;
    int32_t owner_pid;
    uint32_t generation, external_references, leases;
    uint32_t shared_with_count;
    uint32_t *shared_with;
    bool revoked, orphaned;
    char cgroup[256];           /* v2 only ("" on v1) */
    bool memfd_owned_by_daemon; /* v2 only */
    uint32_t flags;             /* v2 only: DMABUFD_CONTIGUOUS; unknown bits are kept, ignore them */
} dmabufd_buffer_info;

/* `flags` of dmabufd_buffer_info and dmabufd_layout (v2): the memory is one physically contiguous run, by
 * construction (a CMA heap's buffer) or measured (a physical layout of one run). No address is implied. */
#define DMABUFD_CONTIGUOUS 0x01u

typedef struct dmabufd_buffer_list {
    uint32_t count;
    dmabufd_buffer_info *buffers;
    bool more; /* list: ask again with after = the last id */
} dmabufd_buffer_list;

typedef struct dmabufd_heap {
    char name[256], device[256], kind[256];
    uint64_t allocated_bytes;
    uint32_t buffers;
    uint64_t total_bytes, free_bytes; /* v2; 0 = unknown */
    bool charges_memcg;               /* v2 */
} dmabufd_heap;

typedef struct dmabufd_policy {
    char name[256];
    uint32_t chain_count;
    char (*chain)[256];
} dmabufd_policy;

typedef struct dmabufd_heaps {
    uint32_t heap_count;
    dmabufd_heap *heaps;
    uint32_t policy_count;
    dmabufd_policy *policies;
    bool mem_accounting; /* v2 */
} dmabufd_heaps;

typedef struct dmabufd_heap_stats { char heap[256]; uint64_t bytes; uint32_t buffers, failures; } dmabufd_heap_stats;
typedef struct dmabufd_client_stats {
    uint32_t uid;
    uint64_t bytes;
    uint32_t buffers;
    uint64_t quota_bytes;
    uint32_t quota_buffers, refusals;
} dmabufd_client_stats;
typedef struct dmabufd_errno_count { char errno_name[256]; uint32_t count; } dmabufd_errno_count;
typedef struct dmabufd_cgroup_stats {
    char cgroup[256];
    uint64_t bytes;
    uint32_t buffers;
    uint64_t quota_bytes;
    uint32_t refusals;
} dmabufd_cgroup_stats;

typedef struct dmabufd_stats {
    uint32_t heap_count;
    dmabufd_heap_stats *heaps;
    uint32_t client_count;
    dmabufd_client_stats *clients;
    uint32_t failure_count;
    dmabufd_errno_count *failures;
    uint32_t connected_clients, buffers;
    uint64_t bytes;
    uint32_t leases, pending_fences;
    uint64_t oldest_pending_fence_ms;
    uint32_t cgroup_count; /* v2 */
    dmabufd_cgroup_stats *cgroups;
} dmabufd_stats;

typedef struct dmabufd_page_run { uint64_t start, pages; } dmabufd_page_run;

typedef struct dmabufd_layout {
    uint64_t buffer, lease;
    uint32_t generation;
    uint8_t kind; /* enum dmabufd_run_kind */
    uint32_t page_size;
    uint64_t first_page;
    uint32_t run_count;
    dmabufd_page_run *runs;
    uint32_t flags; /* v2 only: DMABUFD_CONTIGUOUS */
} dmabufd_layout;

/* memfd: which of dmabufd_udmabuf_from_memfds' memfds holds the range (dmabufd_udmabuf_from_memfd ignores it). */
typedef struct dmabufd_range { uint64_t offset, size; uint32_t memfd; } dmabufd_range;

typedef struct dmabufd_event {
    uint16_t type; /* enum dmabufd_event_type */
    uint64_t lease, buffer;
    uint32_t deadline_ms;
} dmabufd_event;

/* Connects to `path`, or $DMABUFD_SOCKET, or DMABUFD_DEFAULT_SOCKET when NULL, and says hello with
 * `client` (NULL: the program's name). */
DMABUFD_API int dmabufd_connect(const char *path, const char *client, dmabufd_conn **out);
DMABUFD_API void dmabufd_disconnect(dmabufd_conn *conn);
DMABUFD_API const dmabufd_hello *dmabufd_server(const dmabufd_conn *conn);
DMABUFD_API int dmabufd_version(const dmabufd_conn *conn);

/* Allocation from a heap or a policy. fd_flags: O_ACCMODE | O_CLOEXEC bits (as DMA_HEAP_IOCTL_ALLOC);
 * heap_flags must be 0. Returns the dma-buf fd. `info` may be NULL. (A v1 daemon always makes the file
 * O_RDWR; O_CLOEXEC is honoured with either version.) */
DMABUFD_API int dmabufd_allocate(dmabufd_conn *conn, uint64_t size, const char *heap, const char *tag, uint32_t fd_flags,
                                 uint64_t heap_flags, dmabufd_buffer_info **info);
/* All-or-nothing: `count` (1...16) buffers, fds[i] is buffer i. Returns count. Needs protocol v2. */
DMABUFD_API int dmabufd_allocate_batch(dmabufd_conn *conn, unsigned count, uint64_t size, const char *heap, const char *tag,
                                       uint32_t fd_flags, uint64_t heap_flags, int *fds, dmabufd_buffer_list **infos);
/* A udmabuf over a sealed memfd the daemon makes. */
DMABUFD_API int dmabufd_create_udmabuf(dmabufd_conn *conn, uint64_t size, const char *tag, bool huge_pages,
                                       dmabufd_buffer_info **info);
/* A udmabuf over the caller's memfd (F_SEAL_SHRINK, no write seal). flags: UDMABUF_FLAGS_CLOEXEC (1). */
DMABUFD_API int dmabufd_udmabuf_from_memfd(dmabufd_conn *conn, int memfd, const dmabufd_range *ranges, uint32_t count,
                                           const char *tag, uint32_t flags, dmabufd_buffer_info **info);
/* The same over 1...16 memfds, as UDMABUF_CREATE_LIST: ranges[i].memfd indexes memfds. More than one
 * memfd needs protocol v2 (else -EOPNOTSUPP). */
DMABUFD_API int dmabufd_udmabuf_from_memfds(dmabufd_conn *conn, const int *memfds, unsigned memfd_count,
                                            const dmabufd_range *ranges, uint32_t count, const char *tag, uint32_t flags,
                                            dmabufd_buffer_info **info);
/* Hands a dma-buf to the daemon for accounting. Returns 0; the caller keeps its fd. */
DMABUFD_API int dmabufd_import(dmabufd_conn *conn, int dmabuf_fd, const char *tag, dmabufd_buffer_info **info);
/* Grants `uid` (NULL: none) and/or mints a one-time token (written to *token, 0 when none). */
DMABUFD_API int dmabufd_share(dmabufd_conn *conn, uint64_t buffer, const uint32_t *uid, bool one_time_token, uint64_t *token);
/* Returns a new fd of a buffer shared with this uid (token 0) or by a one-time token. */
DMABUFD_API int dmabufd_fetch(dmabufd_conn *conn, uint64_t buffer, uint64_t token, dmabufd_buffer_info **info);
DMABUFD_API int dmabufd_release(dmabufd_conn *conn, uint64_t buffer);
/* Releases many without waiting for replies (v2; on v1 each is released in turn, errors ignored). */
DMABUFD_API int dmabufd_release_quiet(dmabufd_conn *conn, const uint64_t *buffers, uint32_t count);
DMABUFD_API int dmabufd_list(dmabufd_conn *conn, bool all, uint64_t after, dmabufd_buffer_list **out);
DMABUFD_API int dmabufd_info(dmabufd_conn *conn, uint64_t buffer, dmabufd_buffer_info **out);
DMABUFD_API int dmabufd_get_stats(dmabufd_conn *conn, dmabufd_stats **out);
DMABUFD_API int dmabufd_list_heaps(dmabufd_conn *conn, dmabufd_heaps **out);
/* page_count 0 = to the end. The reply's lease stays open until dmabufd_release_lease. */
DMABUFD_API int dmabufd_get_layout(dmabufd_conn *conn, uint64_t buffer, uint64_t first_page, uint64_t page_count, bool physical,
                               dmabufd_layout **out);
/* fence_fd: a sync_file the daemon waits for before ending the lease, or -1. Not closed by the call. */
DMABUFD_API int dmabufd_release_lease(dmabufd_conn *conn, uint64_t lease, int fence_fd);
DMABUFD_API int dmabufd_attach_fence(dmabufd_conn *conn, uint64_t buffer, uint64_t first_page, uint64_t page_count,
                                     int access, int fence_fd);
/* Returns the number of fences to wait for; *fence_fd is their merged sync_file, or -1 when 0. */
DMABUFD_API int dmabufd_begin_access(dmabufd_conn *conn, uint64_t buffer, uint64_t first_page, uint64_t page_count,
                                     int access, int *fence_fd);
DMABUFD_API int dmabufd_revoke(dmabufd_conn *conn, uint64_t buffer, uint32_t deadline_ms);

/* Events. dmabufd_event_fd() is readable (poll/epoll) when dmabufd_next_event() may have one; events that
 * arrive while a thread waits for a reply are queued (up to 256; older ones are dropped beyond that).
 * dmabufd_next_event returns 1 with *ev filled, 0 when none is waiting (wait false), or -errno. */
DMABUFD_API int dmabufd_event_fd(dmabufd_conn *conn);
DMABUFD_API int dmabufd_next_event(dmabufd_conn *conn, dmabufd_event *ev, bool wait);

/* The calling thread's last failure on `conn` (NULL: any connection): positive errno, 0 if none. */
DMABUFD_API int dmabufd_last_error(const dmabufd_conn *conn);
DMABUFD_API const char *dmabufd_last_message(const dmabufd_conn *conn);
DMABUFD_API int dmabufd_last_code(const dmabufd_conn *conn);

/* Frees an object returned through an `out` parameter (NULL is fine). */
DMABUFD_API void dmabufd_free(void *object);

#ifdef __cplusplus
}
#endif
#endif
