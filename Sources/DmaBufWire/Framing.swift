import DmaBuf

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
    public static func decodeHeader(_ bytes: [UInt8], descriptors: Int) throws(WireDecodingError) -> (Header, WireReader) {
        guard bytes.count <= WireLimits.maximumMessageSize else { throw .oversize(bytes.count) }
        var reader = WireReader(bytes)
        let magic = try reader.u32("magic")
        guard magic == WireLimits.magic else { throw .badMagic(magic) }
        let version = try reader.u16("version")
        guard WireLimits.supportedVersions.contains(version) else { throw .unsupportedVersion(version) }
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

    static func frame(type: MessageType, requestID: UInt32, descriptors: Int, _ payload: (inout WireWriter) -> Void) -> [UInt8] {
        var body = WireWriter()
        payload(&body)
        var writer = WireWriter()
        encodeHeader(
            Header(type: type.rawValue, requestID: requestID, payloadLength: UInt32(body.bytes.count), descriptorCount: UInt16(descriptors)),
            into: &writer)
        return writer.bytes + body.bytes
    }

    // MARK: Requests

    /// The fds a request of `type` must carry.
    public static func descriptorRange(of type: MessageType) -> ClosedRange<Int> {
        switch type {
        case .createUDmabufFromMemfd, .importBuffer, .attachFence: 1...1
        case .releaseLease: 0...1
        case .bufferReply: 1...1
        case .accessReply: 0...1
        default: 0...0
        }
    }

    /// Encodes `request` with id `requestID`; `descriptors` is how many fds go along with it.
    public static func encode(_ request: Request, requestID: UInt32, descriptors: Int = 0) -> [UInt8] {
        frame(type: request.type, requestID: requestID, descriptors: descriptors) { w in
            switch request {
            case .hello(let h):
                w.u16(h.minimumVersion); w.u16(h.maximumVersion); w.string(h.client)
            case .listHeaps, .stats:
                break
            case .allocate(let a):
                w.u64(a.size); w.string(a.heap); w.string(a.tag); w.u8(a.cpuAccess.rawValue)
            case .createUDmabuf(let u):
                w.u64(u.size); w.string(u.tag); w.bool(u.hugePages)
            case .createUDmabufFromMemfd(let u):
                w.array(u.ranges) { w, r in w.u64(r.offset); w.u64(r.size) }
                w.string(u.tag)
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
                w.u64(f.buffer); w.u64(f.firstPage); w.u64(f.pageCount); w.u8(f.access.rawValue)
            case .revoke(let r):
                w.u64(r.buffer); w.u32(r.deadlineMilliseconds)
            }
        }
    }

    /// Decodes a request, checking its fd count. Throws for anything malformed; never traps.
    public static func decodeRequest(_ bytes: [UInt8], descriptors: Int) throws(WireDecodingError) -> (Header, Request) {
        var (header, r) = try decodeHeader(bytes, descriptors: descriptors)
        guard let type = MessageType(rawValue: header.type), type.rawValue < 0x4000 else { throw .unknownType(header.type) }
        let expected = descriptorRange(of: type)
        guard expected.contains(descriptors) else {
            throw .wrongDescriptorCount(type: "\(type)", expected: expected, actual: descriptors)
        }
        let request: Request
        switch type {
        case .hello:
            request = .hello(Hello(minimumVersion: try r.u16("minimum_version"), maximumVersion: try r.u16("maximum_version"),
                                   client: try r.string("client")))
        case .listHeaps: request = .listHeaps
        case .stats: request = .stats
        case .allocate:
            request = .allocate(AllocateRequest(size: try r.u64("size"), heap: try r.string("heap"), tag: try r.string("tag"),
                                                cpuAccess: try r.enumeration("cpu_access", as: CPUAccessHint.self)))
        case .createUDmabuf:
            request = .createUDmabuf(UDmabufRequest(size: try r.u64("size"), tag: try r.string("tag"), hugePages: try r.bool("huge_pages")))
        case .createUDmabufFromMemfd:
            let ranges = try r.array("ranges", limit: WireLimits.maximumListEntries, minimumElementSize: 16) { (r: inout WireReader) throws(WireDecodingError) in
                ByteRange(offset: try r.u64("offset"), size: try r.u64("size"))
            }
            request = .createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: ranges, tag: try r.string("tag")))
        case .importBuffer: request = .importBuffer(tag: try r.string("tag"))
        case .share:
            let buffer = try r.u64("buffer")
            let uid = try r.optional("uid") { (r: inout WireReader) throws(WireDecodingError) in try r.u32("uid") }
            request = .share(ShareRequest(buffer: buffer, uid: uid, oneTimeToken: try r.bool("one_time_token")))
        case .fetch: request = .fetch(FetchRequest(buffer: try r.u64("buffer"), token: try r.u64("token")))
        case .release: request = .release(try r.u64("buffer"))
        case .info: request = .info(try r.u64("buffer"))
        case .list: request = .list(all: try r.bool("all"), after: try r.u64("after"))
        case .layout:
            request = .layout(LayoutRequest(buffer: try r.u64("buffer"), firstPage: try r.u64("first_page"),
                                            pageCount: try r.u64("page_count"), physical: try r.bool("physical")))
        case .releaseLease: request = .releaseLease(try r.u64("lease"))
        case .attachFence, .beginAccess:
            let f = FenceAttachRequest(buffer: try r.u64("buffer"), firstPage: try r.u64("first_page"), pageCount: try r.u64("page_count"),
                                       access: try r.enumeration("access", as: AccessMode.self))
            request = type == .attachFence ? .attachFence(f) : .beginAccess(f)
        case .revoke: request = .revoke(RevokeRequest(buffer: try r.u64("buffer"), deadlineMilliseconds: try r.u32("deadline_ms")))
        default: throw .unknownType(header.type)
        }
        try r.finish()
        header.type = type.rawValue
        return (header, request)
    }

    // MARK: Responses

    /// Encodes a reply to `requestID` (0 for events).
    public static func encode(_ response: Response, requestID: UInt32, descriptors: Int = 0) -> [UInt8] {
        frame(type: response.type, requestID: response.isEvent ? 0 : requestID, descriptors: descriptors) { w in
            switch response {
            case .hello(let h):
                w.u16(h.version); w.string(h.server); w.u32(h.maximumMessageSize); w.u16(h.maximumDescriptors)
                w.u32(h.pageSize); w.u32(h.uid); w.u32(h.gid); w.i32(h.pid)
            case .heaps(let h):
                w.array(h.heaps) { w, i in
                    w.string(i.name); w.string(i.device); w.string(i.kind); w.u64(i.allocatedBytes); w.u32(i.buffers)
                }
                w.array(h.policies) { w, p in w.string(p.name); w.array(p.chain) { w, s in w.string(s) } }
            case .buffer(let b):
                encodeBuffer(b, &w)
            case .share(let s):
                w.optional(s.token) { w, t in w.u64(t) }
            case .ok:
                break
            case .list(let items, let more):
                w.array(items) { w, b in encodeBuffer(b, &w) }
                w.bool(more)
            case .stats(let s):
                w.array(s.heaps) { w, h in w.string(h.heap); w.u64(h.bytes); w.u32(h.buffers); w.u32(h.failures) }
                w.array(s.clients) { w, c in
                    w.u32(c.uid); w.u64(c.bytes); w.u32(c.buffers); w.u64(c.quotaBytes); w.u32(c.quotaBuffers); w.u32(c.refusals)
                }
                w.array(s.failures) { w, f in w.string(f.errno); w.u32(f.count) }
                w.u32(s.connectedClients); w.u32(s.buffers); w.u64(s.bytes); w.u32(s.leases); w.u32(s.pendingFences)
                w.u64(s.oldestPendingFenceMilliseconds)
            case .layout(let l):
                w.u64(l.buffer); w.u64(l.lease); w.u32(l.generation); w.u8(l.kind.rawValue); w.u32(l.pageSize); w.u64(l.firstPage)
                w.array(l.runs) { w, run in w.u64(run.start); w.u64(run.pages) }
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

    /// The bytes `b` takes in a reply, so a sender can fill a page without going over the size limit.
    public static func encodedSize(of b: BufferInfo) -> Int {
        var w = WireWriter()
        encodeBuffer(b, &w)
        return w.bytes.count
    }

    static func encodeBuffer(_ b: BufferInfo, _ w: inout WireWriter) {
        w.u64(b.id); w.u64(b.inode); w.u64(b.size); w.string(b.heap); w.string(b.tag); w.string(b.name)
        w.u32(b.ownerUID); w.i32(b.ownerPID); w.u32(b.generation); w.u32(b.externalReferences); w.u32(b.leases)
        w.array(b.sharedWith) { w, uid in w.u32(uid) }
        w.bool(b.revoked); w.bool(b.orphaned)
    }

    static func decodeBuffer(_ r: inout WireReader) throws(WireDecodingError) -> BufferInfo {
        BufferInfo(
            id: try r.u64("id"), inode: try r.u64("inode"), size: try r.u64("size"), heap: try r.string("heap"),
            tag: try r.string("tag"), name: try r.string("name"), ownerUID: try r.u32("owner_uid"), ownerPID: try r.i32("owner_pid"),
            generation: try r.u32("generation"), externalReferences: try r.u32("external_references"), leases: try r.u32("leases"),
            sharedWith: try r.array("shared_with", limit: WireLimits.maximumListEntries, minimumElementSize: 4) {
                (r: inout WireReader) throws(WireDecodingError) in try r.u32("uid")
            },
            revoked: try r.bool("revoked"), orphaned: try r.bool("orphaned"))
    }

    /// Decodes a reply or event, checking its fd count.
    public static func decodeResponse(_ bytes: [UInt8], descriptors: Int) throws(WireDecodingError) -> (Header, Response) {
        let (header, reader) = try decodeHeader(bytes, descriptors: descriptors)
        var r = reader
        guard let type = MessageType(rawValue: header.type), type.rawValue >= 0x4000 else { throw .unknownType(header.type) }
        let expected = descriptorRange(of: type)
        guard expected.contains(descriptors) else {
            throw .wrongDescriptorCount(type: "\(type)", expected: expected, actual: descriptors)
        }
        let list = WireLimits.maximumListEntries
        let response: Response
        switch type {
        case .helloReply:
            response = .hello(HelloReply(
                version: try r.u16("version"), server: try r.string("server"), maximumMessageSize: try r.u32("maximum_message_size"),
                maximumDescriptors: try r.u16("maximum_descriptors"), pageSize: try r.u32("page_size"), uid: try r.u32("uid"),
                gid: try r.u32("gid"), pid: try r.i32("pid")))
        case .heapsReply:
            let heaps = try r.array("heaps", limit: list, minimumElementSize: 18) { (r: inout WireReader) throws(WireDecodingError) in
                HeapInfo(name: try r.string("name"), device: try r.string("device"), kind: try r.string("kind"),
                         allocatedBytes: try r.u64("allocated_bytes"), buffers: try r.u32("buffers"))
            }
            let policies = try r.array("policies", limit: list, minimumElementSize: 6) { (r: inout WireReader) throws(WireDecodingError) in
                PolicyInfo(name: try r.string("name"), chain: try r.array("chain", limit: list, minimumElementSize: 2) {
                    (r: inout WireReader) throws(WireDecodingError) in try r.string("heap")
                })
            }
            response = .heaps(HeapsReply(heaps: heaps, policies: policies))
        case .bufferReply: response = .buffer(try decodeBuffer(&r))
        case .shareReply:
            response = .share(ShareReply(token: try r.optional("token") { (r: inout WireReader) throws(WireDecodingError) in try r.u64("token") }))
        case .okReply: response = .ok
        case .listReply:
            let items = try r.array("buffers", limit: list, minimumElementSize: 50) { (r: inout WireReader) throws(WireDecodingError) in
                try decodeBuffer(&r)
            }
            response = .list(items, more: try r.bool("more"))
        case .statsReply:
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
            response = .stats(Stats(
                heaps: heaps, clients: clients, failures: failures, connectedClients: try r.u32("connected_clients"),
                buffers: try r.u32("buffers"), bytes: try r.u64("bytes"), leases: try r.u32("leases"),
                pendingFences: try r.u32("pending_fences"), oldestPendingFenceMilliseconds: try r.u64("oldest_pending_fence_ms")))
        case .layoutReply:
            let buffer = try r.u64("buffer"), lease = try r.u64("lease"), generation = try r.u32("generation")
            let kind = try r.enumeration("kind", as: RunKind.self)
            let pageSize = try r.u32("page_size"), firstPage = try r.u64("first_page")
            let runs = try r.array("runs", limit: list, minimumElementSize: 16) { (r: inout WireReader) throws(WireDecodingError) in
                PageRun(start: try r.u64("start"), pages: try r.u64("pages"))
            }
            response = .layout(Layout(buffer: buffer, lease: lease, generation: generation, kind: kind, pageSize: pageSize,
                                      firstPage: firstPage, runs: runs))
        case .accessReply:
            let fences = try r.u32("fences")
            guard (fences > 0) == (descriptors == 1) else {
                throw .wrongDescriptorCount(type: "accessReply", expected: fences > 0 ? 1...1 : 0...0, actual: descriptors)
            }
            response = .access(AccessReply(fences: fences))
        case .errorReply:
            let errno = try r.i32("errno")
            let raw = try r.u16("code")
            guard let code = WireError.Code(rawValue: raw) else { throw .invalidValue(field: "code", value: UInt64(raw)) }
            response = .error(WireError(errno: errno, code: code, message: try r.string("message")))
        case .leaseRevokedEvent:
            response = .leaseRevoked(lease: try r.u64("lease"), buffer: try r.u64("buffer"), deadlineMilliseconds: try r.u32("deadline_ms"))
        case .leaseEndedEvent: response = .leaseEnded(lease: try r.u64("lease"), buffer: try r.u64("buffer"))
        case .bufferFreedEvent: response = .bufferFreed(try r.u64("buffer"))
        case .fenceSignaledEvent: response = .fenceSignaled(try r.u64("buffer"))
        default: throw .unknownType(header.type)
        }
        try r.finish()
        return (header, response)
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
        case .error: .errorReply
        case .leaseRevoked: .leaseRevokedEvent
        case .leaseEnded: .leaseEndedEvent
        case .bufferFreed: .bufferFreedEvent
        case .fenceSignaled: .fenceSignaledEvent
        }
    }
}
