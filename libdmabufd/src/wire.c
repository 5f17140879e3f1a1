/* The wire codec: docs/PROTOCOL.md, v1 and v2. Nothing here does I/O. The reader keeps a sticky error so
 * each decoder reads its fields straight down and checks once; every count is bounded by the list limit
 * and by the bytes left before anything is allocated, so a 64 KiB message can never ask for more than a
 * bounded amount of memory. */
#include "dmabufd_wire.h"

#include <errno.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* ---- arena ---------------------------------------------------------------------------------------- */

struct dbw_block {
    struct dbw_block *next;
    max_align_t data[];
};

static struct dbw_block *block_of(void *p) { return (struct dbw_block *)((char *)p - offsetof(struct dbw_block, data)); }

void *dbw_arena_new(size_t size) {
    if (size > (size_t)64 << 20) return NULL;
    struct dbw_block *b = calloc(1, sizeof *b + size);
    if (!b) return NULL;
    return b->data;
}

void *dbw_arena_alloc(void *root, size_t size) {
    struct dbw_block *r = block_of(root);
    void *p = dbw_arena_new(size);
    if (!p) return NULL;
    struct dbw_block *b = block_of(p);
    b->next = r->next;
    r->next = b;
    return p;
}

DMABUFD_API void dmabufd_free(void *object) {
    if (!object) return;
    struct dbw_block *b = block_of(object);
    while (b) {
        struct dbw_block *next = b->next;
        free(b);
        b = next;
    }
}

/* ---- UTF-8 ---------------------------------------------------------------------------------------- */

/* Strict UTF-8 as Swift's String(validating:) accepts it: no overlongs, no surrogates, <= U+10FFFF. */
bool dbw_valid_utf8(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t len;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c == 0xE0) { len = 3; lo = 0xA0; }
        else if (c == 0xED) { len = 3; hi = 0x9F; }
        else if (c >= 0xE1 && c <= 0xEF) len = 3;
        else if (c == 0xF0) { len = 4; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) len = 4;
        else if (c == 0xF4) { len = 4; hi = 0x8F; }
        else return false;
        if (n - i < len) return false;
        if (s[i + 1] < lo || s[i + 1] > hi) return false;
        for (size_t k = 2; k < len; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF) return false;
        i += len;
    }
    return true;
}

/* ---- writer --------------------------------------------------------------------------------------- */

typedef struct { uint8_t *p; size_t cap, n; int err; } wr;

static void put(wr *w, const void *src, size_t k) {
    if (w->err) return;
    if (w->cap - w->n < k || w->n + k > DMABUFD_MAX_MESSAGE) { w->err = -EMSGSIZE; return; }
    if (k) memcpy(w->p + w->n, src, k);
    w->n += k;
}
static void wle(wr *w, uint64_t v, int k) {
    uint8_t b[8];
    for (int i = 0; i < k; i++) b[i] = (uint8_t)(v >> (8 * i));
    put(w, b, (size_t)k);
}
static void w8(wr *w, uint8_t v) { wle(w, v, 1); }
static void w16(wr *w, uint16_t v) { wle(w, v, 2); }
static void w32(wr *w, uint32_t v) { wle(w, v, 4); }
static void w64(wr *w, uint64_t v) { wle(w, v, 8); }
static void wbool(wr *w, bool v) { w8(w, v ? 1 : 0); }
static void wstr(wr *w, const char *s) {
    if (!s) s = "";
    size_t k = strlen(s);
    if (k > DMABUFD_STRING_MAX || !dbw_valid_utf8((const uint8_t *)s, k)) {
        if (!w->err) w->err = -EINVAL;
        return;
    }
    w16(w, (uint16_t)k);
    put(w, s, k);
}
static void wcount(wr *w, uint32_t n) {
    if (n > DMABUFD_MAX_LIST && !w->err) w->err = -EINVAL;
    w32(w, n);
}

static void wheader(wr *w, uint16_t version, uint16_t type, uint32_t id, uint16_t fds) {
    w32(w, DBW_MAGIC); w16(w, version); w16(w, type); w32(w, id); w32(w, 0); w16(w, fds); w16(w, 0);
}

static int wfinish(wr *w) {
    if (w->err) return w->err;
    uint32_t len = (uint32_t)(w->n - DBW_HEADER_SIZE);
    for (int i = 0; i < 4; i++) w->p[12 + i] = (uint8_t)(len >> (8 * i));
    return (int)w->n;
}

/* ---- fd counts ------------------------------------------------------------------------------------ */

bool dbw_descriptor_range(uint16_t type, unsigned *min, unsigned *max) {
    unsigned lo = 0, hi = 0;
    switch (type) {
    case DBW_IMPORT: case DBW_ATTACH_FENCE: case DBW_BUFFER_REPLY: lo = hi = 1; break;
    case DBW_CREATE_UDMABUF_FROM_MEMFD: lo = 1; hi = DMABUFD_MAX_FDS; break; /* exactly 1 in v1 */
    case DBW_RELEASE_LEASE: case DBW_ACCESS_REPLY: hi = 1; break;
    case DBW_BUFFERS_REPLY: lo = 1; hi = DMABUFD_BATCH_MAX; break;
    case DBW_HELLO: case DBW_LIST_HEAPS: case DBW_ALLOCATE: case DBW_CREATE_UDMABUF: case DBW_SHARE: case DBW_FETCH:
    case DBW_RELEASE: case DBW_LIST: case DBW_STATS: case DBW_LAYOUT: case DBW_BEGIN_ACCESS: case DBW_REVOKE: case DBW_INFO:
    case DBW_ALLOCATE_BATCH: case DBW_RELEASE_QUIET:
    case DBW_HELLO_REPLY: case DBW_HEAPS_REPLY: case DBW_SHARE_REPLY: case DBW_OK_REPLY: case DBW_LIST_REPLY:
    case DBW_STATS_REPLY: case DBW_LAYOUT_REPLY: case DBW_ERROR_REPLY:
    case DMABUFD_EVENT_LEASE_REVOKED: case DMABUFD_EVENT_LEASE_ENDED: case DMABUFD_EVENT_BUFFER_FREED:
    case DMABUFD_EVENT_FENCE_SIGNALED: break;
    default: return false;
    }
    if (min) *min = lo;
    if (max) *max = hi;
    return true;
}

static bool v2_only(uint16_t type) {
    return type == DBW_ALLOCATE_BATCH || type == DBW_RELEASE_QUIET || type == DBW_BUFFERS_REPLY;
}

/* ---- requests ------------------------------------------------------------------------------------- */

static void enc_request_payload(wr *w, const dbw_request *r, uint16_t v, unsigned fds) {
    switch (r->type) {
    case DBW_HELLO: w16(w, r->minimum_version); w16(w, r->maximum_version); wstr(w, r->client); break;
    case DBW_LIST_HEAPS: case DBW_STATS: break;
    case DBW_ALLOCATE:
        w64(w, r->size); wstr(w, r->heap); wstr(w, r->tag);
        if (v == 1) {
            if (r->cpu_access > 3) w->err = w->err ? w->err : -EINVAL;
            w8(w, r->cpu_access);
        } else { w32(w, r->fd_flags); w64(w, r->heap_flags); }
        break;
    case DBW_ALLOCATE_BATCH:
        if (r->count < 1 || r->count > DMABUFD_BATCH_MAX) w->err = w->err ? w->err : -EINVAL;
        w16(w, r->count); w64(w, r->size); wstr(w, r->heap); wstr(w, r->tag); w32(w, r->fd_flags); w64(w, r->heap_flags);
        break;
    case DBW_CREATE_UDMABUF: w64(w, r->size); wstr(w, r->tag); wbool(w, r->huge_pages); break;
    case DBW_CREATE_UDMABUF_FROM_MEMFD:
        wcount(w, r->range_count);
        for (uint32_t i = 0; i < r->range_count && !w->err; i++) {
            w64(w, r->ranges[i].offset); w64(w, r->ranges[i].size);
            if (r->ranges[i].memfd >= fds || (v < 2 && r->ranges[i].memfd != 0)) w->err = w->err ? w->err : -EINVAL;
            if (v >= 2) w8(w, (uint8_t)r->ranges[i].memfd);
        }
        wstr(w, r->tag);
        if (v >= 2) w32(w, r->flags);
        break;
    case DBW_IMPORT: wstr(w, r->tag); break;
    case DBW_SHARE:
        w64(w, r->buffer); wbool(w, r->has_uid);
        if (r->has_uid) w32(w, r->uid);
        wbool(w, r->one_time_token);
        break;
    case DBW_FETCH: w64(w, r->buffer); w64(w, r->token); break;
    case DBW_RELEASE: case DBW_INFO: w64(w, r->buffer); break;
    case DBW_LIST: wbool(w, r->all); w64(w, r->after); break;
    case DBW_LAYOUT: w64(w, r->buffer); w64(w, r->first_page); w64(w, r->page_count); wbool(w, r->physical); break;
    case DBW_RELEASE_LEASE: w64(w, r->lease); break;
    case DBW_ATTACH_FENCE: case DBW_BEGIN_ACCESS:
        if (r->access != 1 && r->access != 2) w->err = w->err ? w->err : -EINVAL;
        w64(w, r->buffer); w64(w, r->first_page); w64(w, r->page_count); w8(w, r->access);
        break;
    case DBW_REVOKE: w64(w, r->buffer); w32(w, r->deadline_ms); break;
    case DBW_RELEASE_QUIET:
        if (r->buffer_count < 1) w->err = w->err ? w->err : -EINVAL;
        wcount(w, r->buffer_count);
        for (uint32_t i = 0; i < r->buffer_count && !w->err; i++) w64(w, r->buffers[i]);
        break;
    default: w->err = -EINVAL;
    }
}

int dbw_encode_request(const dbw_request *r, uint16_t version, uint32_t request_id, uint16_t fds, uint8_t *out, size_t cap) {
    unsigned lo, hi;
    if (version < DBW_VERSION_MIN || version > DBW_VERSION_MAX) return -EINVAL;
    if (r->type >= 0x4000 || !dbw_descriptor_range(r->type, &lo, &hi) || fds < lo || fds > hi) return -EINVAL;
    if (v2_only(r->type) && version < 2) return -EINVAL;
    if (r->type == DBW_CREATE_UDMABUF_FROM_MEMFD && version < 2 && fds != 1) return -EINVAL;
    wr w = { out, cap, 0, 0 };
    wheader(&w, r->type == DBW_HELLO ? 1 : version, r->type, request_id, fds);
    enc_request_payload(&w, r, version, fds);
    return wfinish(&w);
}

/* ---- reader --------------------------------------------------------------------------------------- */

typedef struct { const uint8_t *p; size_t n, off; int err; void *root; } rd;

static void fail(rd *r, int e) { if (!r->err) r->err = e; }
static size_t left(const rd *r) { return r->n - r->off; }
static uint64_t rle(rd *r, size_t k) {
    if (r->err) return 0;
    if (left(r) < k) { fail(r, -EBADMSG); return 0; }
    uint64_t v = 0;
    for (size_t i = 0; i < k; i++) v |= (uint64_t)r->p[r->off + i] << (8 * i);
    r->off += k;
    return v;
}
static uint8_t r8(rd *r) { return (uint8_t)rle(r, 1); }
static uint16_t r16(rd *r) { return (uint16_t)rle(r, 2); }
static uint32_t r32(rd *r) { return (uint32_t)rle(r, 4); }
static uint64_t r64(rd *r) { return rle(r, 8); }
static bool rbool(rd *r) {
    uint8_t v = r8(r);
    if (v > 1) fail(r, -EBADMSG);
    return v == 1;
}
static void rstr(rd *r, char out[256]) {
    out[0] = 0;
    size_t k = r16(r);
    if (r->err) return;
    if (k > DMABUFD_STRING_MAX || k > left(r)) { fail(r, -EBADMSG); return; }
    const uint8_t *s = r->p + r->off;
    if (!dbw_valid_utf8(s, k) || memchr(s, 0, k)) { fail(r, -EBADMSG); return; }
    memcpy(out, s, k);
    out[k] = 0;
    r->off += k;
}
/* A list's count, checked against the limit and the bytes left (each entry takes at least `min`). */
static uint32_t rcount(rd *r, size_t min) {
    uint32_t c = r32(r);
    if (r->err) return 0;
    if (c > DMABUFD_MAX_LIST || (uint64_t)c * min > left(r)) { fail(r, -EBADMSG); return 0; }
    return c;
}
static void *ralloc(rd *r, uint32_t count, size_t size) {
    if (r->err || count == 0) return NULL;
    void *p = dbw_arena_alloc(r->root, (size_t)count * size);
    if (!p) fail(r, -ENOMEM);
    return p;
}
static void *rroot(rd *r, size_t size) {
    r->root = dbw_arena_new(size);
    if (!r->root) fail(r, -ENOMEM);
    return r->root;
}

/* ---- responses ------------------------------------------------------------------------------------ */

static void dec_buffer(rd *r, dmabufd_buffer_info *b, uint16_t v) {
    b->id = r64(r); b->inode = r64(r); b->size = r64(r);
    rstr(r, b->heap); rstr(r, b->tag); rstr(r, b->name);
    b->owner_uid = r32(r); b->owner_pid = (int32_t)r32(r); b->generation = r32(r);
    b->external_references = r32(r); b->leases = r32(r);
    b->shared_with_count = rcount(r, 4);
    b->shared_with = ralloc(r, b->shared_with_count, sizeof(uint32_t));
    for (uint32_t i = 0; i < b->shared_with_count && !r->err; i++) b->shared_with[i] = r32(r);
    b->revoked = rbool(r); b->orphaned = rbool(r);
    if (v >= 2) { rstr(r, b->cgroup); b->memfd_owned_by_daemon = rbool(r); b->flags = r32(r); }
    if (r->err) b->shared_with_count = 0;
}

static void dec_heaps(rd *r, uint16_t v) {
    dmabufd_heaps *h = rroot(r, sizeof *h);
    if (!h) return;
    h->heap_count = rcount(r, v >= 2 ? 35 : 18);
    h->heaps = ralloc(r, h->heap_count, sizeof *h->heaps);
    for (uint32_t i = 0; i < h->heap_count && !r->err; i++) {
        dmabufd_heap *e = &h->heaps[i];
        rstr(r, e->name); rstr(r, e->device); rstr(r, e->kind); e->allocated_bytes = r64(r); e->buffers = r32(r);
        if (v >= 2) { e->total_bytes = r64(r); e->free_bytes = r64(r); e->charges_memcg = rbool(r); }
    }
    h->policy_count = rcount(r, 6);
    h->policies = ralloc(r, h->policy_count, sizeof *h->policies);
    for (uint32_t i = 0; i < h->policy_count && !r->err; i++) {
        dmabufd_policy *p = &h->policies[i];
        rstr(r, p->name);
        p->chain_count = rcount(r, 2);
        p->chain = ralloc(r, p->chain_count, sizeof *p->chain);
        for (uint32_t k = 0; k < p->chain_count && !r->err; k++) rstr(r, p->chain[k]);
    }
    if (v >= 2) h->mem_accounting = rbool(r);
}

static void dec_list(rd *r, uint16_t v, bool more) {
    dmabufd_buffer_list *l = rroot(r, sizeof *l);
    if (!l) return;
    l->count = rcount(r, v >= 2 ? 57 : 50);
    l->buffers = ralloc(r, l->count, sizeof *l->buffers);
    for (uint32_t i = 0; i < l->count && !r->err; i++) dec_buffer(r, &l->buffers[i], v);
    if (more) l->more = rbool(r);
}

static void dec_stats(rd *r, uint16_t v) {
    dmabufd_stats *s = rroot(r, sizeof *s);
    if (!s) return;
    s->heap_count = rcount(r, 18);
    s->heaps = ralloc(r, s->heap_count, sizeof *s->heaps);
    for (uint32_t i = 0; i < s->heap_count && !r->err; i++) {
        rstr(r, s->heaps[i].heap); s->heaps[i].bytes = r64(r); s->heaps[i].buffers = r32(r); s->heaps[i].failures = r32(r);
    }
    s->client_count = rcount(r, 32);
    s->clients = ralloc(r, s->client_count, sizeof *s->clients);
    for (uint32_t i = 0; i < s->client_count && !r->err; i++) {
        dmabufd_client_stats *c = &s->clients[i];
        c->uid = r32(r); c->bytes = r64(r); c->buffers = r32(r); c->quota_bytes = r64(r); c->quota_buffers = r32(r);
        c->refusals = r32(r);
    }
    s->failure_count = rcount(r, 6);
    s->failures = ralloc(r, s->failure_count, sizeof *s->failures);
    for (uint32_t i = 0; i < s->failure_count && !r->err; i++) { rstr(r, s->failures[i].errno_name); s->failures[i].count = r32(r); }
    s->connected_clients = r32(r); s->buffers = r32(r); s->bytes = r64(r); s->leases = r32(r); s->pending_fences = r32(r);
    s->oldest_pending_fence_ms = r64(r);
    if (v < 2) return;
    s->cgroup_count = rcount(r, 26);
    s->cgroups = ralloc(r, s->cgroup_count, sizeof *s->cgroups);
    for (uint32_t i = 0; i < s->cgroup_count && !r->err; i++) {
        dmabufd_cgroup_stats *c = &s->cgroups[i];
        rstr(r, c->cgroup); c->bytes = r64(r); c->buffers = r32(r); c->quota_bytes = r64(r); c->refusals = r32(r);
    }
}

static void dec_layout(rd *r, uint16_t v) {
    dmabufd_layout *l = rroot(r, sizeof *l);
    if (!l) return;
    l->buffer = r64(r); l->lease = r64(r); l->generation = r32(r); l->kind = r8(r);
    if (l->kind > 2) fail(r, -EBADMSG);
    l->page_size = r32(r); l->first_page = r64(r);
    l->run_count = rcount(r, 16);
    l->runs = ralloc(r, l->run_count, sizeof *l->runs);
    for (uint32_t i = 0; i < l->run_count && !r->err; i++) { l->runs[i].start = r64(r); l->runs[i].pages = r64(r); }
    if (v >= 2) l->flags = r32(r);
}

static int dec_header(rd *r, unsigned fds, uint16_t version, dbw_header *h) {
    if (r->n > DMABUFD_MAX_MESSAGE || r->n < DBW_HEADER_SIZE) return -EBADMSG;
    if (r32(r) != DBW_MAGIC) return -EBADMSG;
    h->version = r16(r);
    h->type = r16(r); h->request_id = r32(r); h->payload_length = r32(r); h->fd_count = r16(r);
    /* hello and its reply always carry 1: they are what negotiates. */
    if (h->type == DBW_HELLO || h->type == DBW_HELLO_REPLY) {
        if (h->version != 1) return -EBADMSG;
    } else if (version ? h->version != version : (h->version < DBW_VERSION_MIN || h->version > DBW_VERSION_MAX)) {
        return -EBADMSG;
    }
    (void)r16(r); /* reserved: written 0, not checked (as DmaBufWire) */
    if (h->payload_length != left(r) || h->fd_count != fds) return -EBADMSG;
    unsigned lo, hi;
    if (h->type < 0x4000 || !dbw_descriptor_range(h->type, &lo, &hi) || fds < lo || fds > hi) return -EBADMSG;
    if (v2_only(h->type) && h->version < 2) return -EBADMSG;
    return 0;
}

static void dec_payload(rd *r, dbw_response *o, unsigned fds) {
    uint16_t v = o->header.version;
    switch (o->header.type) {
    case DBW_HELLO_REPLY: {
        dmabufd_hello *h = &o->hello;
        h->version = r16(r); rstr(r, h->server); h->maximum_message_size = r32(r); h->maximum_descriptors = r16(r);
        h->page_size = r32(r); h->uid = r32(r); h->gid = r32(r); h->pid = (int32_t)r32(r);
        break;
    }
    case DBW_HEAPS_REPLY: dec_heaps(r, v); break;
    case DBW_BUFFER_REPLY: {
        dmabufd_buffer_info *b = rroot(r, sizeof *b);
        if (b) dec_buffer(r, b, v);
        break;
    }
    case DBW_SHARE_REPLY: o->has_token = rbool(r); if (o->has_token) o->token = r64(r); break;
    case DBW_OK_REPLY: break;
    case DBW_LIST_REPLY: dec_list(r, v, true); break;
    case DBW_BUFFERS_REPLY: {
        dec_list(r, v, false);
        dmabufd_buffer_list *l = r->root;
        if (!r->err && l->count != fds) fail(r, -EBADMSG);
        break;
    }
    case DBW_STATS_REPLY: dec_stats(r, v); break;
    case DBW_LAYOUT_REPLY: dec_layout(r, v); break;
    case DBW_ACCESS_REPLY:
        o->fences = r32(r);
        if (!r->err && (o->fences > 0) != (fds == 1)) fail(r, -EBADMSG);
        break;
    case DBW_ERROR_REPLY:
        o->error_errno = (int32_t)r32(r); o->error_code = r16(r);
        if (!r->err && (o->error_code < 1 || o->error_code > 12)) fail(r, -EBADMSG);
        rstr(r, o->error_message);
        break;
    case DMABUFD_EVENT_LEASE_REVOKED: o->event.lease = r64(r); o->event.buffer = r64(r); o->event.deadline_ms = r32(r); break;
    case DMABUFD_EVENT_LEASE_ENDED: o->event.lease = r64(r); o->event.buffer = r64(r); break;
    case DMABUFD_EVENT_BUFFER_FREED: case DMABUFD_EVENT_FENCE_SIGNALED: o->event.buffer = r64(r); break;
    default: fail(r, -EBADMSG);
    }
    o->event.type = o->header.type >= 0x4001 && o->header.type <= 0x4004 ? o->header.type : 0;
}

int dbw_decode_response(const uint8_t *bytes, size_t length, unsigned fds, uint16_t version, dbw_response *o) {
    memset(o, 0, sizeof *o);
    rd r = { bytes, length, 0, 0, NULL };
    int e = dec_header(&r, fds, version, &o->header);
    if (e) return e;
    dec_payload(&r, o, fds);
    if (!r.err && left(&r) != 0) fail(&r, -EBADMSG);
    if (r.err) {
        dmabufd_free(r.root);
        memset(o, 0, sizeof *o);
        return r.err;
    }
    o->object = r.root;
    return 0;
}

/* ---- response encoder (tests, fuzzer) ------------------------------------------------------------- */

static void enc_buffer(wr *w, const dmabufd_buffer_info *b, uint16_t v) {
    w64(w, b->id); w64(w, b->inode); w64(w, b->size); wstr(w, b->heap); wstr(w, b->tag); wstr(w, b->name);
    w32(w, b->owner_uid); w32(w, (uint32_t)b->owner_pid); w32(w, b->generation); w32(w, b->external_references);
    w32(w, b->leases); wcount(w, b->shared_with_count);
    for (uint32_t i = 0; i < b->shared_with_count && !w->err; i++) w32(w, b->shared_with[i]);
    wbool(w, b->revoked); wbool(w, b->orphaned);
    if (v >= 2) { wstr(w, b->cgroup); wbool(w, b->memfd_owned_by_daemon); w32(w, b->flags); }
}

static void enc_heaps(wr *w, const dmabufd_heaps *h, uint16_t v) {
    wcount(w, h->heap_count);
    for (uint32_t i = 0; i < h->heap_count && !w->err; i++) {
        const dmabufd_heap *e = &h->heaps[i];
        wstr(w, e->name); wstr(w, e->device); wstr(w, e->kind); w64(w, e->allocated_bytes); w32(w, e->buffers);
        if (v >= 2) { w64(w, e->total_bytes); w64(w, e->free_bytes); wbool(w, e->charges_memcg); }
    }
    wcount(w, h->policy_count);
    for (uint32_t i = 0; i < h->policy_count && !w->err; i++) {
        wstr(w, h->policies[i].name); wcount(w, h->policies[i].chain_count);
        for (uint32_t k = 0; k < h->policies[i].chain_count && !w->err; k++) wstr(w, h->policies[i].chain[k]);
    }
    if (v >= 2) wbool(w, h->mem_accounting);
}

static void enc_stats(wr *w, const dmabufd_stats *s, uint16_t v) {
    wcount(w, s->heap_count);
    for (uint32_t i = 0; i < s->heap_count && !w->err; i++) {
        wstr(w, s->heaps[i].heap); w64(w, s->heaps[i].bytes); w32(w, s->heaps[i].buffers); w32(w, s->heaps[i].failures);
    }
    wcount(w, s->client_count);
    for (uint32_t i = 0; i < s->client_count && !w->err; i++) {
        const dmabufd_client_stats *c = &s->clients[i];
        w32(w, c->uid); w64(w, c->bytes); w32(w, c->buffers); w64(w, c->quota_bytes); w32(w, c->quota_buffers); w32(w, c->refusals);
    }
    wcount(w, s->failure_count);
    for (uint32_t i = 0; i < s->failure_count && !w->err; i++) { wstr(w, s->failures[i].errno_name); w32(w, s->failures[i].count); }
    w32(w, s->connected_clients); w32(w, s->buffers); w64(w, s->bytes); w32(w, s->leases); w32(w, s->pending_fences);
    w64(w, s->oldest_pending_fence_ms);
    if (v < 2) return;
    wcount(w, s->cgroup_count);
    for (uint32_t i = 0; i < s->cgroup_count && !w->err; i++) {
        const dmabufd_cgroup_stats *c = &s->cgroups[i];
        wstr(w, c->cgroup); w64(w, c->bytes); w32(w, c->buffers); w64(w, c->quota_bytes); w32(w, c->refusals);
    }
}

static void enc_list(wr *w, const dmabufd_buffer_list *l, uint16_t v, bool more) {
    wcount(w, l->count);
    for (uint32_t i = 0; i < l->count && !w->err; i++) enc_buffer(w, &l->buffers[i], v);
    if (more) wbool(w, l->more);
}

static void enc_response_payload(wr *w, const dbw_response *o, uint16_t v) {
    const dmabufd_hello *h = &o->hello;
    switch (o->header.type) {
    case DBW_HELLO_REPLY:
        w16(w, h->version); wstr(w, h->server); w32(w, h->maximum_message_size); w16(w, h->maximum_descriptors);
        w32(w, h->page_size); w32(w, h->uid); w32(w, h->gid); w32(w, (uint32_t)h->pid);
        break;
    case DBW_HEAPS_REPLY: enc_heaps(w, o->object, v); break;
    case DBW_BUFFER_REPLY: enc_buffer(w, o->object, v); break;
    case DBW_SHARE_REPLY: wbool(w, o->has_token); if (o->has_token) w64(w, o->token); break;
    case DBW_OK_REPLY: break;
    case DBW_LIST_REPLY: enc_list(w, o->object, v, true); break;
    case DBW_BUFFERS_REPLY: enc_list(w, o->object, v, false); break;
    case DBW_STATS_REPLY: enc_stats(w, o->object, v); break;
    case DBW_LAYOUT_REPLY: {
        const dmabufd_layout *l = o->object;
        w64(w, l->buffer); w64(w, l->lease); w32(w, l->generation); w8(w, l->kind); w32(w, l->page_size); w64(w, l->first_page);
        wcount(w, l->run_count);
        for (uint32_t i = 0; i < l->run_count && !w->err; i++) { w64(w, l->runs[i].start); w64(w, l->runs[i].pages); }
        if (v >= 2) w32(w, l->flags);
        break;
    }
    case DBW_ACCESS_REPLY: w32(w, o->fences); break;
    case DBW_ERROR_REPLY: w32(w, (uint32_t)o->error_errno); w16(w, o->error_code); wstr(w, o->error_message); break;
    case DMABUFD_EVENT_LEASE_REVOKED: w64(w, o->event.lease); w64(w, o->event.buffer); w32(w, o->event.deadline_ms); break;
    case DMABUFD_EVENT_LEASE_ENDED: w64(w, o->event.lease); w64(w, o->event.buffer); break;
    case DMABUFD_EVENT_BUFFER_FREED: case DMABUFD_EVENT_FENCE_SIGNALED: w64(w, o->event.buffer); break;
    default: w->err = -EINVAL;
    }
}

int dbw_encode_response(const dbw_response *o, uint16_t version, uint8_t *out, size_t cap) {
    uint16_t t = o->header.type;
    bool needs_object = t == DBW_HEAPS_REPLY || t == DBW_BUFFER_REPLY || t == DBW_LIST_REPLY || t == DBW_BUFFERS_REPLY ||
                        t == DBW_STATS_REPLY || t == DBW_LAYOUT_REPLY;
    if (version < DBW_VERSION_MIN || version > DBW_VERSION_MAX || t < 0x4000 || !dbw_descriptor_range(t, NULL, NULL) ||
        (v2_only(t) && version < 2) || (needs_object && !o->object))
        return -EINVAL;
    bool event = t >= 0x4001 && t <= 0x4004;
    wr w = { out, cap, 0, 0 };
    wheader(&w, t == DBW_HELLO_REPLY ? 1 : version, t, event ? 0 : o->header.request_id, o->header.fd_count);
    enc_response_payload(&w, o, version);
    return wfinish(&w);
}
