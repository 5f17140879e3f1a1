/* libdmabufd's wire codec (internal, not installed): docs/PROTOCOL.md v1 and v2 in C.
 * Hidden in the shared library; visible to the tests and the SwiftPM target that compares it with
 * DmaBufWire. The decoder checks every length and count against the bytes left and the limits before
 * it allocates, and fails with -EBADMSG on anything malformed. */
#ifndef DMABUFD_WIRE_H
#define DMABUFD_WIRE_H

#include "dmabufd.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DBW_MAGIC 0x46424D44u
#define DBW_HEADER_SIZE 20
#define DBW_VERSION_MIN 1
#define DBW_VERSION_MAX 2

enum dbw_type {
    DBW_HELLO = 0x0001, DBW_LIST_HEAPS = 0x0002, DBW_ALLOCATE = 0x0003, DBW_CREATE_UDMABUF = 0x0004,
    DBW_CREATE_UDMABUF_FROM_MEMFD = 0x0005, DBW_IMPORT = 0x0006, DBW_SHARE = 0x0007, DBW_FETCH = 0x0008,
    DBW_RELEASE = 0x0009, DBW_LIST = 0x000A, DBW_STATS = 0x000B, DBW_LAYOUT = 0x000C, DBW_RELEASE_LEASE = 0x000D,
    DBW_ATTACH_FENCE = 0x000E, DBW_BEGIN_ACCESS = 0x000F, DBW_REVOKE = 0x0010, DBW_INFO = 0x0011,
    DBW_ALLOCATE_BATCH = 0x0012, DBW_RELEASE_QUIET = 0x0013,
    DBW_HELLO_REPLY = 0x8001, DBW_HEAPS_REPLY = 0x8002, DBW_BUFFER_REPLY = 0x8003, DBW_SHARE_REPLY = 0x8007,
    DBW_OK_REPLY = 0x8009, DBW_LIST_REPLY = 0x800A, DBW_STATS_REPLY = 0x800B, DBW_LAYOUT_REPLY = 0x800C,
    DBW_ACCESS_REPLY = 0x800F, DBW_BUFFERS_REPLY = 0x8012, DBW_ERROR_REPLY = 0xFFFF,
};

typedef struct dbw_header {
    uint16_t version, type;
    uint32_t request_id, payload_length;
    uint16_t fd_count;
} dbw_header;

/* A request: `type` says which fields count (the rest are ignored). */
typedef struct dbw_request {
    uint16_t type;
    uint16_t minimum_version, maximum_version;
    const char *client;
    uint64_t size;
    const char *heap, *tag;
    uint8_t cpu_access;   /* allocate v1 */
    uint32_t fd_flags;    /* allocate(_batch) v2 */
    uint64_t heap_flags;  /* allocate(_batch) v2 */
    uint16_t count;       /* allocate_batch */
    bool huge_pages;      /* create_udmabuf */
    const dmabufd_range *ranges;
    uint32_t range_count; /* create_udmabuf_from_memfd */
    uint32_t flags;       /* create_udmabuf_from_memfd v2 */
    uint64_t buffer;
    bool has_uid;
    uint32_t uid;
    bool one_time_token;
    uint64_t token;
    bool all;
    uint64_t after;
    uint64_t first_page, page_count;
    bool physical;
    uint64_t lease;
    uint8_t access;
    uint32_t deadline_ms;
    const uint64_t *buffers;
    uint32_t buffer_count; /* release_quiet */
} dbw_request;

/* A reply or event. `object` (heaps, buffer, list, stats, layout) is one dmabufd_free-able allocation. */
typedef struct dbw_response {
    dbw_header header;
    void *object;
    dmabufd_hello hello;
    bool has_token;
    uint64_t token;
    uint32_t fences;
    int32_t error_errno;
    uint16_t error_code;
    char error_message[256];
    dmabufd_event event;
} dbw_response;

/* Encodes into out[cap] (cap >= 65536 is always enough). Returns the length or -EINVAL (a string over
 * 255 bytes or not UTF-8, a list over its limit, an unknown type or version) / -EMSGSIZE. */
int dbw_encode_request(const dbw_request *r, uint16_t version, uint32_t request_id, uint16_t fds, uint8_t *out, size_t cap);
/* version: the negotiated version the header must carry, or 0 to accept 1...2 (before the handshake).
 * Returns 0 or -EBADMSG; on success free r->object with dmabufd_free. */
int dbw_decode_response(const uint8_t *bytes, size_t length, unsigned fds, uint16_t version, dbw_response *r);
/* Encodes a response (tests and the fuzzer's round trip). */
int dbw_encode_response(const dbw_response *r, uint16_t version, uint8_t *out, size_t cap);
/* fd count a type must carry: min/max. Returns false for unknown types. */
bool dbw_descriptor_range(uint16_t type, unsigned *min, unsigned *max);
bool dbw_valid_utf8(const uint8_t *s, size_t n);

/* Allocation used by decoded objects: a root, and blocks chained to it; dmabufd_free frees all. */
void *dbw_arena_new(size_t size);
void *dbw_arena_alloc(void *root, size_t size);

/* For the preload, which must keep its socket out of the program's way (client.c). */
int dbw_conn_socket(const dmabufd_conn *conn);
void dbw_conn_set_socket(dmabufd_conn *conn, int fd);

#ifdef __cplusplus
}
#endif
#endif
