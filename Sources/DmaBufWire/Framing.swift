@_exported import DmaBufTypes

/// Encodes and decodes whole messages: header, payload, and the fd count each type requires.
public enum WireMessage {
    // MARK: Header

    static func encodeHeader(_ header: Header, into writer: inout WireWriter) {
        writer.u32(WireLimits.magic)
        writer.u16(header.version)
        writer.u16(header.type)
        writer.u32(header.requestID)
        writer.u32(header.payloadLength)
        writer.u16(header.descriptorCount)
        writer.u16(0)
    }

    /// Decodes and checks the header: magic, version, size limit, and that the payload length matches.
    /// - Parameter version: the negotiated version, which the header must carry; nil before negotiation,
    ///   when any version this side speaks is accepted (hello always carries ``WireLimits/baseVersion``).
    public static func decodeHeader(_ bytes: [UInt8], descriptors: Int, version negotiated: UInt16? = nil) throws(WireDecodingError) -> (Header, WireReader) {
        guard bytes.count <= WireLimits.maximumMessageSize else { throw .oversize(bytes.count) }
        var reader = WireReader(bytes)
        let magic = try reader.u32("magic")
        guard magic == WireLimits.magic else { throw .badMagic(magic) }
        let version = try reader.u16("version")
        guard WireLimits.supportedVersions.contains(version) else { throw .unsupportedVersion(version) }
        if let negotiated, version != negotiated { throw .versionMismatch(negotiated: negotiated, header: version) }
        let type = try reader.u16("type")
        let requestID = try reader.u32("request_id")
        let length = try reader.u32("payload_length")
        let fdCount = try reader.u16("fd_count")
        _ = try reader.u16("reserved")
        guard Int(length) == reader.remaining else { throw .lengthMismatch(declared: Int(length), actual: reader.remaining) }
        guard Int(fdCount) == descriptors else {
            throw .wrongDescriptorCount(type: "header", expected: Int(fdCount)...Int(fdCount), actual: descriptors)
        }
        return (Header(version: version, type: type, requestID: requestID, payloadLength: length, descriptorCount: fdCount), reader)
    }

    /// Header plus payload. Hello and its reply always carry ``WireLimits/baseVersion``: they negotiate.
    static func frame(type: MessageType, requestID: UInt32, descriptors: Int, version: UInt16,
                      _ payload: (inout WireWriter) -> Void) -> [UInt8] {
        var body = WireWriter()
        payload(&body)
        var writer = WireWriter()
        let headerVersion = type == .hello || type == .helloReply ? WireLimits.baseVersion : version
        encodeHeader(
            Header(version: headerVersion, type: type.rawValue, requestID: requestID, payloadLength: UInt32(body.bytes.count),
                   descriptorCount: UInt16(descriptors)),
            into: &writer)
        return writer.bytes + body.bytes
    }

    /// The type of a decoded header, if this side knows it at the header's version and it travels this way
    /// (`requests`: client to daemon). Hello and its reply must carry ``WireLimits/baseVersion``.
    static func messageType(_ header: Header, requests: Bool) throws(WireDecodingError) -> MessageType {
        guard let type = MessageType(rawValue: header.type), (type.rawValue < 0x4000) == requests,
              header.version >= type.introducedIn else { throw .unknownType(header.type) }
        if (type == .hello || type == .helloReply) && header.version != WireLimits.baseVersion {
            throw .versionMismatch(negotiated: WireLimits.baseVersion, header: header.version)
        }
        return type
    }

    // MARK: Requests

    /// The fds a request of `type` must carry.
    public static func descriptorRange(of type: MessageType) -> ClosedRange<Int> {
        switch type {
        case .importBuffer, .attachFence: 1...1
        case .createUDmabufFromMemfd: 1...WireLimits.maximumDescriptors  // exactly 1 in v1 (checked when decoding)
        case .releaseLease: 0...1
        case .bufferReply: 1...1
        case .accessReply: 0...1
        case .buffersReply: 1...WireLimits.maximumBatchCount
        default: 0...0
        }
    }

    /// Encodes `request` with id `requestID` in the negotiated `version`; `descriptors` is how many fds go
    /// along with it. Fields the version lacks are not sent (v1: `fd_flags`, `heap_flags`, udmabuf `flags`;
    /// v2: `cpu_access`); v2-only messages are the caller's to avoid on v1 (the peer refuses them as unknown).
    public static func encode(_ request: Request, requestID: UInt32, descriptors: Int = 0,
                              version: UInt16 = WireLimits.baseVersion) -> [UInt8] {
        frame(type: request.type, requestID: requestID, descriptors: descriptors, version: version) { w in
            switch request {
            case .hello(let h):
                w.u16(h.minimumVersion); w.u16(h.maximumVersion); w.string(h.client)
            case .listHeaps, .stats:
                break
            case .allocate(let a):
                w.u64(a.size); w.string(a.heap); w.string(a.tag)
                if version >= 2 { w.u32(a.fdFlags); w.u64(a.heapFlags) } else { w.u8(a.cpuAccess) }
            case .allocateBatch(let a):
                w.u16(a.count); w.u64(a.size); w.string(a.heap); w.string(a.tag); w.u32(a.fdFlags); w.u64(a.heapFlags)
            case .releaseQuiet(let ids):
                w.array(ids) { w, id in w.u64(id) }
            case .createUDmabuf(let u):
                w.u64(u.size); w.string(u.tag); w.bool(u.hugePages)
            case .createUDmabufFromMemfd(let u):
                w.array(u.ranges) { w, r in
                    w.u64(r.offset); w.u64(r.size)
                    if version >= 2 { w.u8(r.memfd) }
                }
                w.string(u.tag)
                if version >= 2 { w.u32(u.flags) }
            case .importBuffer(let tag):
                w.string(tag)
            case .share(let s):
                w.u64(s.buffer); w.optional(s.uid) { w, uid in w.u32(uid) }; w.bool(s.oneTimeToken)
            case .fetch(let f):
                w.u64(f.buffer); w.u64(f.token)
            case .release(let id), .info(let id):
                w.u64(id)
            case .list(let all, let after):
                w.bool(all); w.u64(after)
            case .layout(let l):
                w.u64(l.buffer); w.u64(l.firstPage); w.u64(l.pageCount); w.bool(l.physical)
            case .releaseLease(let lease):
                w.u64(lease)
            case .attachFence(let f), .beginAccess(let f):
                w.u64(f.buffer); w.u64(f.firstPage); w.u64(f.pageCount); w.u8(f.access.writes ? AccessMode.write.rawValue : AccessMode.read.rawValue)
            case .revoke(let r):
                w.u64(r.buffer); w.u32(r.deadlineMilliseconds)
            }
        }
    }

    /// Decodes a request, checking its fd count. Throws for anything malformed; never traps.
    /// - Parameter version: the negotiated version (the header must carry it), or nil before negotiation.
    public static func decodeRequest(_ bytes: [UInt8], descriptors: Int, version: UInt16? = nil) throws(WireDecodingError) -> (Header, Request) {
        var (header, r) = try decodeHeader(bytes, descriptors: descriptors, version: version)
        let type = try messageType(header, requests: true)
        let expected = descriptorRange(of: type)
        guard expected.contains(descriptors) else {
            throw .wrongDescriptorCount(type: "\(type)", expected: expected, actual: descriptors)
        }
        let request: Request
        if let allocation = try decodeAllocation(type, &r, version: header.version, descriptors: descriptors) { request = allocation } else { request = try decodeOther(type, &r) }
        try r.finish()
        header.type = type.rawValue
        return (header, request)
    }

    /// The requests that make buffers or drop them, whose payloads differ between versions; nil for others.
    static func decodeAllocation(_ type: MessageType, _ r: inout WireReader, version: UInt16, descriptors: Int) throws(WireDecodingError) -> Request? {
        switch type {
        case .allocate:
            let size = try r.u64("size"), heap = try r.string("heap"), tag = try r.string("tag")
            guard version >= 2 else {
                let cpuAccess = try r.u8("cpu_access")
                guard cpuAccess <= 3 else { throw .invalidValue(field: "cpu_access", value: UInt64(cpuAccess)) }
                return .allocate(AllocateRequest(size: size, heap: heap, tag: tag, cpuAccess: cpuAccess))
            }
            return .allocate(AllocateRequest(size: size, heap: heap, tag: tag, fdFlags: try r.u32("fd_flags"), heapFlags: try r.u64("heap_flags")))
        case .allocateBatch:
            let count = try r.u16("count")
            guard (1...WireLimits.maximumBatchCount).contains(Int(count)) else {
                throw count == 0 ? .invalidValue(field: "count", value: 0)
                    : .limitExceeded(field: "count", value: Int(count), limit: WireLimits.maximumBatchCount)
            }
            return .allocateBatch(AllocateBatchRequest(count: count, size: try r.u64("size"), heap: try r.string("heap"), tag: try r.string("tag"),
                                                       fdFlags: try r.u32("fd_flags"), heapFlags: try r.u64("heap_flags")))
        case .createUDmabufFromMemfd:
            return .createUDmabufFromMemfd(try decodeMemfdRanges(&r, version: version, descriptors: descriptors))
        case .releaseQuiet:
            let ids = try r.array("buffers", limit: WireLimits.maximumListEntries, minimumElementSize: 8) { (r: inout WireReader) throws(WireDecodingError) in
                try r.u64("buffer")
            }
            guard !ids.isEmpty else { throw .invalidValue(field: "buffers", value: 0) }
            return .releaseQuiet(ids)
        default:
            return nil
        }
    }

    /// v1: one memfd. v2: up to 16, and every range's `memfd` index must name one of them.
    static func decodeMemfdRanges(_ r: inout WireReader, version: UInt16, descriptors: Int) throws(WireDecodingError) -> UDmabufFromMemfdRequest {
        guard version >= 2 || descriptors == 1 else {
            throw .wrongDescriptorCount(type: "createUDmabufFromMemfd", expected: 1...1, actual: descriptors)
        }
        let ranges = try r.array("ranges", limit: WireLimits.maximumListEntries, minimumElementSize: version >= 2 ? 17 : 16) {
            (r: inout WireReader) throws(WireDecodingError) in
            var range = ByteRange(offset: try r.u64("offset"), size: try r.u64("size"))
            if version >= 2 {
                range.memfd = try r.u8("memfd")
                guard Int(range.memfd) < descriptors else { throw .invalidValue(field: "memfd", value: UInt64(range.memfd)) }
            }
            return range
        }
        let tag = try r.string("tag")
        return UDmabufFromMemfdRequest(ranges: ranges, tag: tag, flags: try version >= 2 ? r.u32("flags") : 0)
    }

    /// The requests whose payloads are the same in every version.
    static func decodeOther(_ type: MessageType, _ r: inout WireReader) throws(WireDecodingError) -> Request {
        switch type {
        case .hello:
            return .hello(Hello(minimumVersion: try r.u16("minimum_version"), maximumVersion: try r.u16("maximum_version"),
                                client: try r.string("client")))
        case .listHeaps: return .listHeaps
        case .stats: return .stats
        case .createUDmabuf:
            return .createUDmabuf(UDmabufRequest(size: try r.u64("size"), tag: try r.string("tag"), hugePages: try r.bool("huge_pages")))
        case .importBuffer: return .importBuffer(tag: try r.string("tag"))
        case .share:
            let buffer = try r.u64("buffer")
            let uid = try r.optional("uid") { (r: inout WireReader) throws(WireDecodingError) in try r.u32("uid") }
            return .share(ShareRequest(buffer: buffer, uid: uid, oneTimeToken: try r.bool("one_time_token")))
        case .fetch: return .fetch(FetchRequest(buffer: try r.u64("buffer"), token: try r.u64("token")))
        case .release: return .release(try r.u64("buffer"))
        case .info: return .info(try r.u64("buffer"))
        case .list: return .list(all: try r.bool("all"), after: try r.u64("after"))
        case .layout:
            return .layout(LayoutRequest(buffer: try r.u64("buffer"), firstPage: try r.u64("first_page"),
                                         pageCount: try r.u64("page_count"), physical: try r.bool("physical")))
        case .releaseLease: return .releaseLease(try r.u64("lease"))
        case .attachFence, .beginAccess:
            let f = FenceAttachRequest(buffer: try r.u64("buffer"), firstPage: try r.u64("first_page"), pageCount: try r.u64("page_count"),
                                       access: try r.fenceAccess())
            return type == .attachFence ? .attachFence(f) : .beginAccess(f)
        case .revoke: return .revoke(RevokeRequest(buffer: try r.u64("buffer"), deadlineMilliseconds: try r.u32("deadline_ms")))
        default: throw .unknownType(type.rawValue)
        }
    }

    // MARK: Responses

    /// Encodes a reply to `requestID` (0 for events) in the negotiated `version`: v2-only fields are sent
    /// only in v2, so a v1 client never sees one.
    public static func encode(_ response: Response, requestID: UInt32, descriptors: Int = 0,
                              version: UInt16 = WireLimits.baseVersion) -> [UInt8] {
        frame(type: response.type, requestID: response.isEvent ? 0 : requestID, descriptors: descriptors, version: version) { w in
            switch response {
            case .hello(let h):
                w.u16(h.version); w.string(h.server); w.u32(h.maximumMessageSize); w.u16(h.maximumDescriptors)
                w.u32(h.pageSize); w.u32(h.uid); w.u32(h.gid); w.i32(h.pid)
            case .heaps(let h):
                encodeHeaps(h, &w, version: version)
            case .buffer(let b):
                encodeBuffer(b, &w, version: version)
            case .buffers(let items):
                w.array(items) { w, b in encodeBuffer(b, &w, version: version) }
            case .share(let s):
                w.optional(s.token) { w, t in w.u64(t) }
            case .ok:
                break
            case .list(let items, let more):
                w.array(items) { w, b in encodeBuffer(b, &w, version: version) }
                w.bool(more)
            case .stats(let s):
                encodeStats(s, &w, version: version)
            case .layout(let l):
                w.u64(l.buffer); w.u64(l.lease); w.u32(l.generation); w.u8(l.kind.rawValue); w.u32(l.pageSize); w.u64(l.firstPage)
                w.array(l.runs) { w, run in w.u64(run.start); w.u64(run.pages) }
                if version >= 2 { w.u32(l.flags) }
            case .access(let a):
                w.u32(a.fences)
            case .error(let e):
                w.i32(e.errno); w.u16(e.code.rawValue); w.string(e.message)
            case .leaseRevoked(let lease, let buffer, let deadline):
                w.u64(lease); w.u64(buffer); w.u32(deadline)
            case .leaseEnded(let lease, let buffer):
                w.u64(lease); w.u64(buffer)
            case .bufferFreed(let buffer), .fenceSignaled(let buffer):
                w.u64(buffer)
            }
        }
    }

    static func encodeHeaps(_ h: HeapsReply, _ w: inout WireWriter, version: UInt16) {
        w.array(h.heaps) { w, i in
            w.string(i.name); w.string(i.device); w.string(i.kind); w.u64(i.allocatedBytes); w.u32(i.buffers)
            if version >= 2 { w.u64(i.totalBytes); w.u64(i.freeBytes); w.bool(i.chargesMemcg) }
        }
        w.array(h.policies) { w, p in w.string(p.name); w.array(p.chain) { w, s in w.string(s) } }
        if version >= 2 { w.bool(h.memAccounting) }
    }

    static func encodeStats(_ s: Stats, _ w: inout WireWriter, version: UInt16) {
        w.array(s.heaps) { w, h in w.string(h.heap); w.u64(h.bytes); w.u32(h.buffers); w.u32(h.failures) }
        w.array(s.clients) { w, c in
            w.u32(c.uid); w.u64(c.bytes); w.u32(c.buffers); w.u64(c.quotaBytes); w.u32(c.quotaBuffers); w.u32(c.refusals)
        }
        w.array(s.failures) { w, f in w.string(f.errno); w.u32(f.count) }
        w.u32(s.connectedClients); w.u32(s.buffers); w.u64(s.bytes); w.u32(s.leases); w.u32(s.pendingFences)
        w.u64(s.oldestPendingFenceMilliseconds)
        if version >= 2 {
            w.array(s.cgroups) { w, c in w.string(c.cgroup); w.u64(c.bytes); w.u32(c.buffers); w.u64(c.quotaBytes); w.u32(c.refusals) }
        }
    }

    /// The bytes `b` takes in a reply of `version`, so a sender can fill a page without going over the size limit.
    public static func encodedSize(of b: BufferInfo, version: UInt16 = WireLimits.baseVersion) -> Int {
        var w = WireWriter()
        encodeBuffer(b, &w, version: version)
        return w.bytes.count
    }

    static func encodeBuffer(_ b: BufferInfo, _ w: inout WireWriter, version: UInt16) {
        w.u64(b.id); w.u64(b.inode); w.u64(b.size); w.string(b.heap); w.string(b.tag); w.string(b.name)
        w.u32(b.ownerUID); w.i32(b.ownerPID); w.u32(b.generation); w.u32(b.externalReferences); w.u32(b.leases)
        w.array(b.sharedWith) { w, uid in w.u32(uid) }
        w.bool(b.revoked); w.bool(b.orphaned)
        if version >= 2 { w.string(b.cgroup); w.bool(b.memfdOwnedByDaemon); w.u32(b.flags) }
    }

    /// The fewest bytes one encoded buffer_info takes in `version`.
    static func minimumBufferSize(_ version: UInt16) -> Int { version >= 2 ? 57 : 50 }

    static func decodeBuffer(_ r: inout WireReader, version: UInt16) throws(WireDecodingError) -> BufferInfo {
        var info = BufferInfo(
            id: try r.u64("id"), inode: try r.u64("inode"), size: try r.u64("size"), heap: try r.string("heap"),
            tag: try r.string("tag"), name: try r.string("name"), ownerUID: try r.u32("owner_uid"), ownerPID: try r.i32("owner_pid"),
            generation: try r.u32("generation"), externalReferences: try r.u32("external_references"), leases: try r.u32("leases"),
            sharedWith: try r.array("shared_with", limit: WireLimits.maximumListEntries, minimumElementSize: 4) {
                (r: inout WireReader) throws(WireDecodingError) in try r.u32("uid")
            },
            revoked: try r.bool("revoked"), orphaned: try r.bool("orphaned"))
        if version >= 2 {
            info.cgroup = try r.string("cgroup")
            info.memfdOwnedByDaemon = try r.bool("memfd_owned_by_daemon")
            info.flags = try r.u32("flags")
        }
        return info
    }

    static func decodeBuffers(_ r: inout WireReader, version: UInt16) throws(WireDecodingError) -> [BufferInfo] {
        try r.array("buffers", limit: WireLimits.maximumListEntries, minimumElementSize: minimumBufferSize(version)) {
            (r: inout WireReader) throws(WireDecodingError) in try decodeBuffer(&r, version: version)
        }
    }

    /// Decodes a reply or event, checking its fd count.
    /// - Parameter version: the negotiated version (the header must carry it), or nil before negotiation.
    public static func decodeResponse(_ bytes: [UInt8], descriptors: Int, version: UInt16? = nil) throws(WireDecodingError) -> (Header, Response) {
        let (header, reader) = try decodeHeader(bytes, descriptors: descriptors, version: version)
        var r = reader
        let type = try messageType(header, requests: false)
        let expected = descriptorRange(of: type)
        guard expected.contains(descriptors) else {
            throw .wrongDescriptorCount(type: "\(type)", expected: expected, actual: descriptors)
        }
        let response: Response
        if let report = try decodeReport(type, &r, version: header.version) {
            response = report
        } else {
            response = try decodeReply(type, &r, descriptors: descriptors, version: header.version)
        }
        try r.finish()
        return (header, response)
    }

    /// The replies that describe the daemon's state (heaps, stats), whose payloads grew in v2; nil for others.
    static func decodeReport(_ type: MessageType, _ r: inout WireReader, version: UInt16) throws(WireDecodingError) -> Response? {
        let list = WireLimits.maximumListEntries
        switch type {
        case .heapsReply:
            let heaps = try r.array("heaps", limit: list, minimumElementSize: version >= 2 ? 35 : 18) { (r: inout WireReader) throws(WireDecodingError) in
                var heap = HeapInfo(name: try r.string("name"), device: try r.string("device"), kind: try r.string("kind"),
                                    allocatedBytes: try r.u64("allocated_bytes"), buffers: try r.u32("buffers"))
                if version >= 2 {
                    heap.totalBytes = try r.u64("total_bytes"); heap.freeBytes = try r.u64("free_bytes")
                    heap.chargesMemcg = try r.bool("charges_memcg")
                }
                return heap
            }
            let policies = try r.array("policies", limit: list, minimumElementSize: 6) { (r: inout WireReader) throws(WireDecodingError) in
                PolicyInfo(name: try r.string("name"), chain: try r.array("chain", limit: list, minimumElementSize: 2) {
                    (r: inout WireReader) throws(WireDecodingError) in try r.string("heap")
                })
            }
            var reply = HeapsReply(heaps: heaps, policies: policies)
            if version >= 2 { reply.memAccounting = try r.bool("mem_accounting") }
            return .heaps(reply)
        case .statsReply:
            return .stats(try decodeStats(&r, version: version))
        default:
            return nil
        }
    }

    static func decodeStats(_ r: inout WireReader, version: UInt16) throws(WireDecodingError) -> Stats {
        let list = WireLimits.maximumListEntries
        let heaps = try r.array("heaps", limit: list, minimumElementSize: 18) { (r: inout WireReader) throws(WireDecodingError) in
            HeapStats(heap: try r.string("heap"), bytes: try r.u64("bytes"), buffers: try r.u32("buffers"), failures: try r.u32("failures"))
        }
        let clients = try r.array("clients", limit: list, minimumElementSize: 32) { (r: inout WireReader) throws(WireDecodingError) in
            ClientStats(uid: try r.u32("uid"), bytes: try r.u64("bytes"), buffers: try r.u32("buffers"),
                        quotaBytes: try r.u64("quota_bytes"), quotaBuffers: try r.u32("quota_buffers"), refusals: try r.u32("refusals"))
        }
        let failures = try r.array("failures", limit: list, minimumElementSize: 6) { (r: inout WireReader) throws(WireDecodingError) in
            ErrnoCount(errno: try r.string("errno"), count: try r.u32("count"))
        }
        var stats = Stats(
            heaps: heaps, clients: clients, failures: failures, connectedClients: try r.u32("connected_clients"),
            buffers: try r.u32("buffers"), bytes: try r.u64("bytes"), leases: try r.u32("leases"),
            pendingFences: try r.u32("pending_fences"), oldestPendingFenceMilliseconds: try r.u64("oldest_pending_fence_ms"))
        if version >= 2 {
            stats.cgroups = try r.array("cgroups", limit: list, minimumElementSize: 26) { (r: inout WireReader) throws(WireDecodingError) in
                CgroupStats(cgroup: try r.string("cgroup"), bytes: try r.u64("bytes"), buffers: try r.u32("buffers"),
                            quotaBytes: try r.u64("quota_bytes"), refusals: try r.u32("refusals"))
            }
        }
        return stats
    }

    /// Every other reply and event.
    static func decodeReply(_ type: MessageType, _ r: inout WireReader, descriptors: Int, version: UInt16) throws(WireDecodingError) -> Response {
        switch type {
        case .helloReply:
            return .hello(HelloReply(
                version: try r.u16("version"), server: try r.string("server"), maximumMessageSize: try r.u32("maximum_message_size"),
                maximumDescriptors: try r.u16("maximum_descriptors"), pageSize: try r.u32("page_size"), uid: try r.u32("uid"),
                gid: try r.u32("gid"), pid: try r.i32("pid")))
        case .bufferReply: return .buffer(try decodeBuffer(&r, version: version))
        case .buffersReply:
            let items = try decodeBuffers(&r, version: version)
            guard items.count == descriptors else {
                throw .wrongDescriptorCount(type: "buffersReply", expected: items.count...items.count, actual: descriptors)
            }
            return .buffers(items)
        case .shareReply:
            return .share(ShareReply(token: try r.optional("token") { (r: inout WireReader) throws(WireDecodingError) in try r.u64("token") }))
        case .okReply: return .ok
        case .listReply: return .list(try decodeBuffers(&r, version: version), more: try r.bool("more"))
        case .layoutReply: return .layout(try decodeLayout(&r, version: version))
        case .accessReply:
            let fences = try r.u32("fences")
            guard (fences > 0) == (descriptors == 1) else {
                throw .wrongDescriptorCount(type: "accessReply", expected: fences > 0 ? 1...1 : 0...0, actual: descriptors)
            }
            return .access(AccessReply(fences: fences))
        case .errorReply:
            let errno = try r.i32("errno")
            let raw = try r.u16("code")
            guard let code = WireError.Code(rawValue: raw) else { throw .invalidValue(field: "code", value: UInt64(raw)) }
            return .error(WireError(errno: errno, code: code, message: try r.string("message")))
        case .leaseRevokedEvent:
            return .leaseRevoked(lease: try r.u64("lease"), buffer: try r.u64("buffer"), deadlineMilliseconds: try r.u32("deadline_ms"))
        case .leaseEndedEvent: return .leaseEnded(lease: try r.u64("lease"), buffer: try r.u64("buffer"))
        case .bufferFreedEvent: return .bufferFreed(try r.u64("buffer"))
        case .fenceSignaledEvent: return .fenceSignaled(try r.u64("buffer"))
        default: throw .unknownType(type.rawValue)
        }
    }

    static func decodeLayout(_ r: inout WireReader, version: UInt16) throws(WireDecodingError) -> Layout {
        let buffer = try r.u64("buffer"), lease = try r.u64("lease"), generation = try r.u32("generation")
        let kind = try r.enumeration("kind", as: RunKind.self)
        let pageSize = try r.u32("page_size"), firstPage = try r.u64("first_page")
        let runs = try r.array("runs", limit: WireLimits.maximumListEntries, minimumElementSize: 16) { (r: inout WireReader) throws(WireDecodingError) in
            PageRun(start: try r.u64("start"), pages: try r.u64("pages"))
        }
        return Layout(buffer: buffer, lease: lease, generation: generation, kind: kind, pageSize: pageSize, firstPage: firstPage, runs: runs,
                      flags: try version >= 2 ? r.u32("flags") : 0)
    }
}

extension Request {
    public var type: MessageType {
        switch self {
        case .hello: .hello
        case .listHeaps: .listHeaps
        case .allocate: .allocate
        case .createUDmabuf: .createUDmabuf
        case .createUDmabufFromMemfd: .createUDmabufFromMemfd
        case .importBuffer: .importBuffer
        case .share: .share
        case .fetch: .fetch
        case .release: .release
        case .list: .list
        case .stats: .stats
        case .layout: .layout
        case .releaseLease: .releaseLease
        case .attachFence: .attachFence
        case .beginAccess: .beginAccess
        case .revoke: .revoke
        case .info: .info
        case .allocateBatch: .allocateBatch
        case .releaseQuiet: .releaseQuiet
        }
    }
}

extension Response {
    public var type: MessageType {
        switch self {
        case .hello: .helloReply
        case .heaps: .heapsReply
        case .buffer: .bufferReply
        case .share: .shareReply
        case .ok: .okReply
        case .list: .listReply
        case .stats: .statsReply
        case .layout: .layoutReply
        case .access: .accessReply
        case .buffers: .buffersReply
        case .error: .errorReply
        case .leaseRevoked: .leaseRevokedEvent
        case .leaseEnded: .leaseEndedEvent
        case .bufferFreed: .bufferFreedEvent
        case .fenceSignaled: .fenceSignaledEvent
        }
    }
}

extension MessageType {
    /// The first protocol version that has this message.
    public var introducedIn: UInt16 {
        switch self {
        case .allocateBatch, .releaseQuiet, .buffersReply: 2
        default: 1
        }
    }
}
