import DmaBufTestSupport
import CLibDmabufd
import DmaBufWire
import Testing

#if canImport(Glibc)
import Glibc
#endif

// libdmabufd's C codec against DmaBufWire, byte for byte, both ways, for every message type:
//  - requests: the C encoder's bytes equal Swift's, and Swift decodes them to the same request;
//  - responses: C encodes the same values to Swift's bytes (C encoder), and C decodes Swift's bytes and
//    re-encodes them unchanged (C decoder: a dropped or misread field would change the bytes).
// Values are random (seeded) and include the limits: 255-byte strings, multi-byte UTF-8, empty lists.

/// Memory handed to C structs for one comparison; freed at the end.
final class CArena {
    private var blocks: [UnsafeMutableRawPointer] = []
    func alloc<T>(_ count: Int, _ type: T.Type) -> UnsafeMutablePointer<T> {
        let raw = calloc(max(count, 1), MemoryLayout<T>.stride)!
        blocks.append(raw)
        return raw.bindMemory(to: T.self, capacity: max(count, 1))
    }
    func string(_ s: String) -> UnsafePointer<CChar> {
        let p = strdup(s)!
        blocks.append(UnsafeMutableRawPointer(p))
        return UnsafePointer(p)
    }
    deinit { blocks.forEach { free($0) } }
}

/// Writes `s` into a C `char[256]` (imported as a tuple).
func setField<T>(_ field: inout T, _ s: String) {
    withUnsafeMutableBytes(of: &field) { raw in
        let bytes = Array(s.utf8)
        precondition(bytes.count < raw.count)
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
}

// MARK: - random values

extension SplitMix64 {
    mutating func u64() -> UInt64 { Bool.random(using: &self) ? UInt64.random(in: 0...1000, using: &self) : next() }
    mutating func u32() -> UInt32 { UInt32(truncatingIfNeeded: u64()) }
    mutating func u16() -> UInt16 { UInt16(truncatingIfNeeded: u64()) }
    mutating func bool() -> Bool { Bool.random(using: &self) }
    mutating func string() -> String {
        switch Int.random(in: 0..<8, using: &self) {
        case 0: return ""
        case 1: return String(repeating: "x", count: 255)
        case 2: return String(repeating: "é", count: 127) + "a" // 255 bytes of two-byte characters
        default:
            let pool: [String] = ["a", "Z", "0", ":", "-", "_", "/", " ", "é", "ß", "€", "日本", "🙂", "\u{10FFFF}"]
            return (0..<Int.random(in: 1...12, using: &self)).map { _ in pool.randomElement(using: &self)! }.joined()
        }
    }
    mutating func count(_ max: Int = 4) -> Int { Int.random(in: 0...max, using: &self) }
}

func randomBuffer(_ g: inout SplitMix64, version: UInt16) -> BufferInfo {
    var b = BufferInfo(id: g.u64(), inode: g.u64(), size: g.u64(), heap: g.string(), tag: g.string(), name: g.string(),
                       ownerUID: g.u32(), ownerPID: Int32(bitPattern: g.u32()), generation: g.u32(), externalReferences: g.u32(),
                       leases: g.u32(), sharedWith: (0..<g.count()).map { _ in g.u32() }, revoked: g.bool(), orphaned: g.bool())
    if version >= 2 { b.cgroup = g.string(); b.memfdOwnedByDaemon = g.bool(); b.flags = g.bool() ? BufferFlags.contiguous : g.u32() }
    return b
}

/// Fence accesses are read or write on the wire (DmaBufWire sends readWrite as write, and so does the C API).
func randomRequests(_ g: inout SplitMix64, version: UInt16) -> [(Request, Int)] {
    let v2: [(Request, Int)] = version < 2 ? [] : [
        (.allocate(AllocateRequest(size: g.u64(), heap: g.string(), tag: g.string(), fdFlags: g.u32(), heapFlags: g.u64())), 0),
        (.allocateBatch(AllocateBatchRequest(count: UInt16.random(in: 1...16, using: &g), size: g.u64(), heap: g.string(),
                                             tag: g.string(), fdFlags: g.u32(), heapFlags: g.u64())), 0),
        (.releaseQuiet((0..<Int.random(in: 1...5, using: &g)).map { _ in g.u64() }), 0),
        {
            let fds = Int.random(in: 1...16, using: &g)
            return (.createUDmabufFromMemfd(UDmabufFromMemfdRequest(
                ranges: (0..<g.count()).map { _ in ByteRange(offset: g.u64(), size: g.u64(), memfd: UInt8.random(in: 0..<UInt8(fds), using: &g)) },
                tag: g.string(), flags: g.u32())), fds)
        }(),
    ]
    let v1: [(Request, Int)] = version >= 2 ? [] : [
        (.allocate(AllocateRequest(size: g.u64(), heap: g.string(), tag: g.string(),
                                   cpuAccess: UInt8.random(in: 0...3, using: &g))), 0),
        (.createUDmabufFromMemfd(UDmabufFromMemfdRequest(
            ranges: (0..<g.count()).map { _ in ByteRange(offset: g.u64(), size: g.u64()) }, tag: g.string())), 1),
    ]
    return v1 + v2 + [
        (.hello(Hello(minimumVersion: g.u16(), maximumVersion: g.u16(), client: g.string())), 0),
        (.listHeaps, 0),
        (.createUDmabuf(UDmabufRequest(size: g.u64(), tag: g.string(), hugePages: g.bool())), 0),
        (.importBuffer(tag: g.string()), 1),
        (.share(ShareRequest(buffer: g.u64(), uid: g.bool() ? g.u32() : nil, oneTimeToken: g.bool())), 0),
        (.fetch(FetchRequest(buffer: g.u64(), token: g.u64())), 0),
        (.release(g.u64()), 0),
        (.list(all: g.bool(), after: g.u64()), 0),
        (.stats, 0),
        (.layout(LayoutRequest(buffer: g.u64(), firstPage: g.u64(), pageCount: g.u64(), physical: g.bool())), 0),
        (.releaseLease(g.u64()), Int.random(in: 0...1, using: &g)),
        (.attachFence(FenceAttachRequest(buffer: g.u64(), firstPage: g.u64(), pageCount: g.u64(),
                                         access: [AccessMode.read, .write].randomElement(using: &g)!)), 1),
        (.beginAccess(FenceAttachRequest(buffer: g.u64(), firstPage: g.u64(), pageCount: g.u64(),
                                         access: [AccessMode.read, .write].randomElement(using: &g)!)), 0),
        (.revoke(RevokeRequest(buffer: g.u64(), deadlineMilliseconds: g.u32())), 0),
        (.info(g.u64()), 0),
    ]
}

func randomResponses(_ g: inout SplitMix64, version: UInt16) -> [(Response, Int)] {
    let fences = g.bool() ? g.u32() | 1 : 0
    let batch = Int.random(in: 1...16, using: &g)
    let v2: [(Response, Int)] = version < 2 ? [] : [(.buffers((0..<batch).map { _ in randomBuffer(&g, version: version) }), batch)]
    return v2 + [
        (.hello(HelloReply(version: g.u16(), server: g.string(), maximumMessageSize: g.u32(), maximumDescriptors: g.u16(),
                           pageSize: g.u32(), uid: g.u32(), gid: g.u32(), pid: Int32(bitPattern: g.u32()))), 0),
        (.heaps(HeapsReply(
            heaps: (0..<g.count()).map { _ in
                version < 2 ? HeapInfo(name: g.string(), device: g.string(), kind: g.string(), allocatedBytes: g.u64(), buffers: g.u32())
                    : HeapInfo(name: g.string(), device: g.string(), kind: g.string(), allocatedBytes: g.u64(), buffers: g.u32(),
                               totalBytes: g.u64(), freeBytes: g.u64(), chargesMemcg: g.bool())
            },
            policies: (0..<g.count()).map { _ in PolicyInfo(name: g.string(), chain: (0..<g.count()).map { _ in g.string() }) },
            memAccounting: version >= 2 && g.bool())), 0),
        (.buffer(randomBuffer(&g, version: version)), 1),
        (.share(ShareReply(token: g.bool() ? g.u64() : nil)), 0),
        (.ok, 0),
        (.list((0..<g.count()).map { _ in randomBuffer(&g, version: version) }, more: g.bool()), 0),
        (.stats(Stats(
            heaps: (0..<g.count()).map { _ in HeapStats(heap: g.string(), bytes: g.u64(), buffers: g.u32(), failures: g.u32()) },
            clients: (0..<g.count()).map { _ in
                ClientStats(uid: g.u32(), bytes: g.u64(), buffers: g.u32(), quotaBytes: g.u64(), quotaBuffers: g.u32(), refusals: g.u32())
            },
            failures: (0..<g.count()).map { _ in ErrnoCount(errno: g.string(), count: g.u32()) },
            connectedClients: g.u32(), buffers: g.u32(), bytes: g.u64(), leases: g.u32(), pendingFences: g.u32(),
            oldestPendingFenceMilliseconds: g.u64(),
            cgroups: version < 2 ? [] : (0..<g.count()).map { _ in
                CgroupStats(cgroup: g.string(), bytes: g.u64(), buffers: g.u32(), quotaBytes: g.u64(), refusals: g.u32())
            })), 0),
        (.layout(Layout(buffer: g.u64(), lease: g.u64(), generation: g.u32(), kind: RunKind.allCases.randomElement(using: &g)!,
                        pageSize: g.u32(), firstPage: g.u64(), runs: (0..<g.count()).map { _ in PageRun(start: g.u64(), pages: g.u64()) },
                        flags: version >= 2 ? g.u32() : 0)), 0),
        (.access(AccessReply(fences: fences)), fences > 0 ? 1 : 0),
        (.error(WireError(errno: Int32(bitPattern: g.u32()), code: WireError.Code(rawValue: UInt16.random(in: 1...12, using: &g))!,
                          message: g.string())), 0),
        (.leaseRevoked(lease: g.u64(), buffer: g.u64(), deadlineMilliseconds: g.u32()), 0),
        (.leaseEnded(lease: g.u64(), buffer: g.u64()), 0),
        (.bufferFreed(g.u64()), 0),
        (.fenceSignaled(g.u64()), 0),
    ]
}

// MARK: - Swift values as C structs

func cRequest(_ request: Request, _ a: CArena) -> dbw_request {
    var q = dbw_request()
    q.type = request.type.rawValue
    switch request {
    case .hello(let h): q.minimum_version = h.minimumVersion; q.maximum_version = h.maximumVersion; q.client = a.string(h.client)
    case .listHeaps, .stats: break
    case .allocate(let r):
        q.size = r.size; q.heap = a.string(r.heap); q.tag = a.string(r.tag); q.cpu_access = r.cpuAccess
        q.fd_flags = r.fdFlags; q.heap_flags = r.heapFlags
    case .allocateBatch(let r):
        q.count = r.count; q.size = r.size; q.heap = a.string(r.heap); q.tag = a.string(r.tag)
        q.fd_flags = r.fdFlags; q.heap_flags = r.heapFlags
    case .releaseQuiet(let ids):
        let p = a.alloc(ids.count, UInt64.self)
        for (i, id) in ids.enumerated() { p[i] = id }
        q.buffers = UnsafePointer(p); q.buffer_count = UInt32(ids.count)
    case .createUDmabuf(let r): q.size = r.size; q.tag = a.string(r.tag); q.huge_pages = r.hugePages
    case .createUDmabufFromMemfd(let r):
        let ranges = a.alloc(r.ranges.count, dmabufd_range.self)
        for (i, range) in r.ranges.enumerated() { ranges[i] = dmabufd_range(offset: range.offset, size: range.size, memfd: UInt32(range.memfd)) }
        q.ranges = UnsafePointer(ranges); q.range_count = UInt32(r.ranges.count); q.tag = a.string(r.tag); q.flags = r.flags
    case .importBuffer(let tag): q.tag = a.string(tag)
    case .share(let s): q.buffer = s.buffer; q.has_uid = s.uid != nil; q.uid = s.uid ?? 0; q.one_time_token = s.oneTimeToken
    case .fetch(let f): q.buffer = f.buffer; q.token = f.token
    case .release(let id), .info(let id): q.buffer = id
    case .list(let all, let after): q.all = all; q.after = after
    case .layout(let l): q.buffer = l.buffer; q.first_page = l.firstPage; q.page_count = l.pageCount; q.physical = l.physical
    case .releaseLease(let lease): q.lease = lease
    case .attachFence(let f), .beginAccess(let f):
        q.buffer = f.buffer; q.first_page = f.firstPage; q.page_count = f.pageCount; q.access = f.access.rawValue
    case .revoke(let r): q.buffer = r.buffer; q.deadline_ms = r.deadlineMilliseconds
    }
    return q
}

func cBuffer(_ b: BufferInfo, _ a: CArena) -> dmabufd_buffer_info {
    var c = dmabufd_buffer_info()
    c.id = b.id; c.inode = b.inode; c.size = b.size
    setField(&c.heap, b.heap); setField(&c.tag, b.tag); setField(&c.name, b.name)
    c.owner_uid = b.ownerUID; c.owner_pid = b.ownerPID; c.generation = b.generation
    c.external_references = b.externalReferences; c.leases = b.leases
    let shared = a.alloc(b.sharedWith.count, UInt32.self)
    for (i, uid) in b.sharedWith.enumerated() { shared[i] = uid }
    c.shared_with = shared; c.shared_with_count = UInt32(b.sharedWith.count)
    c.revoked = b.revoked; c.orphaned = b.orphaned
    setField(&c.cgroup, b.cgroup); c.memfd_owned_by_daemon = b.memfdOwnedByDaemon; c.flags = b.flags
    return c
}

func cBufferList(_ items: [BufferInfo], more: Bool, _ a: CArena) -> UnsafeMutablePointer<dmabufd_buffer_list> {
    let l = a.alloc(1, dmabufd_buffer_list.self)
    let buffers = a.alloc(items.count, dmabufd_buffer_info.self)
    for (i, b) in items.enumerated() { buffers[i] = cBuffer(b, a) }
    l.pointee = dmabufd_buffer_list(count: UInt32(items.count), buffers: buffers, more: more)
    return l
}

func cHeaps(_ h: HeapsReply, _ a: CArena) -> UnsafeMutableRawPointer {
    let out = a.alloc(1, dmabufd_heaps.self)
    let heaps = a.alloc(h.heaps.count, dmabufd_heap.self)
    for (i, e) in h.heaps.enumerated() {
        setField(&heaps[i].name, e.name); setField(&heaps[i].device, e.device); setField(&heaps[i].kind, e.kind)
        heaps[i].allocated_bytes = e.allocatedBytes; heaps[i].buffers = e.buffers
        heaps[i].total_bytes = e.totalBytes; heaps[i].free_bytes = e.freeBytes; heaps[i].charges_memcg = e.chargesMemcg
    }
    let policies = a.alloc(h.policies.count, dmabufd_policy.self)
    for (i, p) in h.policies.enumerated() {
        setField(&policies[i].name, p.name)
        let chain = a.alloc(p.chain.count, type(of: policies[i].name).self)
        for (k, s) in p.chain.enumerated() { setField(&chain[k], s) }
        policies[i].chain = chain; policies[i].chain_count = UInt32(p.chain.count)
    }
    out.pointee.heaps = heaps; out.pointee.heap_count = UInt32(h.heaps.count)
    out.pointee.policies = policies; out.pointee.policy_count = UInt32(h.policies.count)
    out.pointee.mem_accounting = h.memAccounting
    return UnsafeMutableRawPointer(out)
}

func cStats(_ s: Stats, _ a: CArena) -> UnsafeMutableRawPointer {
    let out = a.alloc(1, dmabufd_stats.self)
    let heaps = a.alloc(s.heaps.count, dmabufd_heap_stats.self)
    for (i, h) in s.heaps.enumerated() {
        setField(&heaps[i].heap, h.heap); heaps[i].bytes = h.bytes; heaps[i].buffers = h.buffers; heaps[i].failures = h.failures
    }
    let clients = a.alloc(s.clients.count, dmabufd_client_stats.self)
    for (i, c) in s.clients.enumerated() {
        clients[i] = dmabufd_client_stats(uid: c.uid, bytes: c.bytes, buffers: c.buffers, quota_bytes: c.quotaBytes,
                                          quota_buffers: c.quotaBuffers, refusals: c.refusals)
    }
    let failures = a.alloc(s.failures.count, dmabufd_errno_count.self)
    for (i, f) in s.failures.enumerated() { setField(&failures[i].errno_name, f.errno); failures[i].count = f.count }
    out.pointee.heaps = heaps; out.pointee.heap_count = UInt32(s.heaps.count)
    out.pointee.clients = clients; out.pointee.client_count = UInt32(s.clients.count)
    out.pointee.failures = failures; out.pointee.failure_count = UInt32(s.failures.count)
    out.pointee.connected_clients = s.connectedClients; out.pointee.buffers = s.buffers; out.pointee.bytes = s.bytes
    out.pointee.leases = s.leases; out.pointee.pending_fences = s.pendingFences
    out.pointee.oldest_pending_fence_ms = s.oldestPendingFenceMilliseconds
    let cgroups = a.alloc(s.cgroups.count, dmabufd_cgroup_stats.self)
    for (i, c) in s.cgroups.enumerated() {
        setField(&cgroups[i].cgroup, c.cgroup); cgroups[i].bytes = c.bytes; cgroups[i].buffers = c.buffers
        cgroups[i].quota_bytes = c.quotaBytes; cgroups[i].refusals = c.refusals
    }
    out.pointee.cgroups = cgroups; out.pointee.cgroup_count = UInt32(s.cgroups.count)
    return UnsafeMutableRawPointer(out)
}

func cResponse(_ response: Response, requestID: UInt32, descriptors: Int, _ a: CArena) -> dbw_response {
    var r = dbw_response()
    r.header.type = response.type.rawValue
    r.header.request_id = requestID
    r.header.fd_count = UInt16(descriptors)
    switch response {
    case .hello(let h):
        r.hello.version = h.version; setField(&r.hello.server, h.server); r.hello.maximum_message_size = h.maximumMessageSize
        r.hello.maximum_descriptors = h.maximumDescriptors; r.hello.page_size = h.pageSize
        r.hello.uid = h.uid; r.hello.gid = h.gid; r.hello.pid = h.pid
    case .heaps(let h): r.object = cHeaps(h, a)
    case .buffer(let b):
        let p = a.alloc(1, dmabufd_buffer_info.self)
        p.pointee = cBuffer(b, a)
        r.object = UnsafeMutableRawPointer(p)
    case .share(let s): r.has_token = s.token != nil; r.token = s.token ?? 0
    case .ok: break
    case .list(let items, let more): r.object = UnsafeMutableRawPointer(cBufferList(items, more: more, a))
    case .buffers(let items): r.object = UnsafeMutableRawPointer(cBufferList(items, more: false, a))
    case .stats(let s): r.object = cStats(s, a)
    case .layout(let l):
        let p = a.alloc(1, dmabufd_layout.self)
        let runs = a.alloc(l.runs.count, dmabufd_page_run.self)
        for (i, run) in l.runs.enumerated() { runs[i] = dmabufd_page_run(start: run.start, pages: run.pages) }
        p.pointee = dmabufd_layout(buffer: l.buffer, lease: l.lease, generation: l.generation, kind: l.kind.rawValue,
                                   page_size: l.pageSize, first_page: l.firstPage, run_count: UInt32(l.runs.count), runs: runs, flags: l.flags)
        r.object = UnsafeMutableRawPointer(p)
    case .access(let x): r.fences = x.fences
    case .error(let e): r.error_errno = e.errno; r.error_code = e.code.rawValue; setField(&r.error_message, e.message)
    case .leaseRevoked(let lease, let buffer, let deadline):
        r.event.lease = lease; r.event.buffer = buffer; r.event.deadline_ms = deadline
    case .leaseEnded(let lease, let buffer): r.event.lease = lease; r.event.buffer = buffer
    case .bufferFreed(let buffer), .fenceSignaled(let buffer): r.event.buffer = buffer
    }
    return r
}

// MARK: - tests

func cEncode(request q: dbw_request, requestID: UInt32, descriptors: Int, version: UInt16 = 1) -> [UInt8]? {
    var q = q
    var out = [UInt8](repeating: 0, count: 65_536)
    let n = out.withUnsafeMutableBufferPointer { dbw_encode_request(&q, version, requestID, UInt16(descriptors), $0.baseAddress, $0.count) }
    return n < 0 ? nil : Array(out[0..<Int(n)])
}

func cEncode(response r: dbw_response, version: UInt16 = 1) -> [UInt8]? {
    var r = r
    var out = [UInt8](repeating: 0, count: 65_536)
    let n = out.withUnsafeMutableBufferPointer { dbw_encode_response(&r, version, $0.baseAddress, $0.count) }
    return n < 0 ? nil : Array(out[0..<Int(n)])
}

/// C decodes `bytes` and encodes the result again.
func cReencode(_ bytes: [UInt8], descriptors: Int, version: UInt16 = 1) -> [UInt8]? {
    var r = dbw_response()
    let e = bytes.withUnsafeBufferPointer { dbw_decode_response($0.baseAddress, $0.count, UInt32(descriptors), version, &r) }
    guard e == 0 else { return nil }
    defer { dmabufd_free(r.object) }
    return cEncode(response: r, version: version)
}

@Suite("libdmabufd codec vs DmaBufWire") struct CLibWireTests {
    @Test("requests: C encodes every type to Swift's bytes, and Swift decodes them back", arguments: [UInt16(1), 2])
    func requests(version: UInt16) throws {
        var g = SplitMix64(seed: 0x1D3A + UInt64(version))
        var covered = Set<UInt16>()
        for round in 0..<300 {
            for (request, fds) in randomRequests(&g, version: version) {
                let a = CArena()
                let id = UInt32(truncatingIfNeeded: round &* 7919 + 1)
                let swift = WireMessage.encode(request, requestID: id, descriptors: fds, version: version)
                let c = cEncode(request: cRequest(request, a), requestID: id, descriptors: fds, version: version)
                #expect(c == swift, "v\(version) \(request)")
                let negotiated: UInt16? = request.type == .hello ? nil : version
                if let c { #expect((try? WireMessage.decodeRequest(c, descriptors: fds, version: negotiated).1) == request) }
                covered.insert(request.type.rawValue)
            }
        }
        #expect(covered.count == MessageType.allCases.filter { $0.rawValue < 0x4000 && $0.introducedIn <= version }.count)
    }

    @Test("responses: C encodes every type to Swift's bytes, and decodes Swift's bytes losslessly", arguments: [UInt16(1), 2])
    func responses(version: UInt16) throws {
        var g = SplitMix64(seed: 0xC11B + UInt64(version))
        var covered = Set<UInt16>()
        for round in 0..<300 {
            for (response, fds) in randomResponses(&g, version: version) {
                let a = CArena()
                let id = UInt32(truncatingIfNeeded: round &* 104_729 + 1)
                let swift = WireMessage.encode(response, requestID: id, descriptors: fds, version: version)
                let c = cEncode(response: cResponse(response, requestID: id, descriptors: fds, a), version: version)
                #expect(c == swift, "C encoder v\(version): \(response)")
                #expect(cReencode(swift, descriptors: fds, version: version) == swift, "C decoder v\(version): \(response)")
                covered.insert(response.type.rawValue)
            }
        }
        #expect(covered.count == MessageType.allCases.filter { $0.rawValue >= 0x4000 && $0.introducedIn <= version }.count)
    }

    @Test("what Swift's decoder refuses, C's decoder refuses: truncations and single-byte mutations", arguments: [UInt16(1), 2])
    func malformedAgree(version: UInt16) throws {
        var g = SplitMix64(seed: 0xBAD + UInt64(version))
        for _ in 0..<20 {
            for (response, fds) in randomResponses(&g, version: version) {
                let bytes = WireMessage.encode(response, requestID: 5, descriptors: fds, version: version)
                for cut in stride(from: 0, to: bytes.count, by: max(1, bytes.count / 16)) {
                    #expect(cReencode(Array(bytes[0..<cut]), descriptors: fds, version: version) == nil)
                }
                let negotiated: UInt16? = response.type == .helloReply ? nil : version
                for _ in 0..<8 {
                    var mutated = bytes
                    let at = Int.random(in: 0..<bytes.count, using: &g)
                    mutated[at] = UInt8.random(in: 0...255, using: &g)
                    let swiftOK = (try? WireMessage.decodeResponse(mutated, descriptors: fds, version: negotiated)) != nil
                    let cOK = cReencode(mutated, descriptors: fds, version: version) != nil
                    // C refuses strings holding NUL, which Swift accepts (documented in dmabufd.h).
                    if swiftOK && !cOK && mutated.contains(0) { continue }
                    #expect(swiftOK == cOK, "v\(version) byte \(at) of \(response): Swift \(swiftOK), C \(cOK)")
                }
            }
        }
    }
}
