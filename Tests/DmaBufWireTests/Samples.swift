import DmaBufWire

/// One sample message: the value, a file-name-safe label, the fds that travel with it, and the protocol
/// version it is encoded in (v2 samples carry `-v2` in their labels).
struct Sample<Message: Sendable & Equatable>: Sendable, CustomStringConvertible {
    var label: String
    var message: Message
    var descriptors: Int
    var version: UInt16 = 1
    var description: String { label }
}

/// At least one value of every `Request` case, with the fd count its type requires. Strings include
/// multi-byte UTF-8, empty strings and the 255-byte maximum so the round trips exercise every length path.
let requestSamples: [Sample<Request>] = [
    Sample(label: "hello", message: .hello(Hello(client: "dmabufctl/1.0 ✓")), descriptors: 0),
    Sample(label: "hello-versions", message: .hello(Hello(minimumVersion: 0, maximumVersion: .max, client: "")), descriptors: 0),
    Sample(label: "list-heaps", message: .listHeaps, descriptors: 0),
    Sample(label: "allocate", message: .allocate(AllocateRequest(size: 1 << 20, heap: "system", tag: "frame-0", cpuAccess: 1)),
           descriptors: 0),
    Sample(label: "allocate-max-tag", message: .allocate(AllocateRequest(size: .max, heap: "any", tag: String(repeating: "é", count: 127) + "x",
                                                                        cpuAccess: 0)), descriptors: 0),
    Sample(label: "create-udmabuf", message: .createUDmabuf(UDmabufRequest(size: 2 << 20, tag: "huge", hugePages: true)), descriptors: 0),
    Sample(label: "create-udmabuf-from-memfd",
           message: .createUDmabufFromMemfd(UDmabufFromMemfdRequest(
               ranges: [ByteRange(offset: 0, size: 4096), ByteRange(offset: 8192, size: 1 << 21)], tag: "memfd")), descriptors: 1),
    Sample(label: "create-udmabuf-from-memfd-empty",
           message: .createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [], tag: "")), descriptors: 1),
    Sample(label: "import", message: .importBuffer(tag: "imported"), descriptors: 1),
    Sample(label: "share-uid", message: .share(ShareRequest(buffer: 7, uid: 1000, oneTimeToken: false)), descriptors: 0),
    Sample(label: "share-token", message: .share(ShareRequest(buffer: 8, uid: nil, oneTimeToken: true)), descriptors: 0),
    Sample(label: "fetch", message: .fetch(FetchRequest(buffer: 7, token: 0xDEAD_BEEF_0000_0001)), descriptors: 0),
    Sample(label: "release", message: .release(42), descriptors: 0),
    Sample(label: "list", message: .list(all: true), descriptors: 0),
    Sample(label: "list-own", message: .list(all: false, after: 77), descriptors: 0),
    Sample(label: "stats", message: .stats, descriptors: 0),
    Sample(label: "layout", message: .layout(LayoutRequest(buffer: 3, firstPage: 16, pageCount: 32, physical: true)), descriptors: 0),
    Sample(label: "release-lease", message: .releaseLease(9), descriptors: 0),
    Sample(label: "release-lease-fence", message: .releaseLease(10), descriptors: 1),
    Sample(label: "attach-fence", message: .attachFence(FenceAttachRequest(buffer: 3, firstPage: 1, pageCount: 2, access: .write)),
           descriptors: 1),
    Sample(label: "begin-access", message: .beginAccess(AccessRequest(buffer: 3, access: .read)), descriptors: 0),
    Sample(label: "revoke", message: .revoke(RevokeRequest(buffer: 3, deadlineMilliseconds: 250)), descriptors: 0),
    Sample(label: "info", message: .info(.max), descriptors: 0),
    // Protocol v2: the changed payloads, the new messages, and one unchanged message in a v2 header.
    Sample(label: "hello-v2", message: .hello(Hello(minimumVersion: 1, maximumVersion: 2, client: "dmabufctl")), descriptors: 0, version: 2),
    Sample(label: "allocate-v2", message: .allocate(AllocateRequest(size: 1 << 20, heap: "system", tag: "frame-0",
                                                                   fdFlags: FDFlags.readOnly, heapFlags: 0)), descriptors: 0, version: 2),
    Sample(label: "allocate-v2-bad-flags", message: .allocate(AllocateRequest(size: 4096, heap: "any", tag: "",
                                                                             fdFlags: .max, heapFlags: .max)), descriptors: 0, version: 2),
    Sample(label: "create-udmabuf-from-memfd-v2",
           message: .createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 4096, size: 4096)], tag: "m",
                                                                    flags: UDmabufFlags.closeOnExec)), descriptors: 1, version: 2),
    Sample(label: "create-udmabuf-from-memfds-v2",
           message: .createUDmabufFromMemfd(UDmabufFromMemfdRequest(
               ranges: [ByteRange(offset: 0, size: 4096, memfd: 1), ByteRange(offset: 4096, size: 8192), ByteRange(offset: 0, size: 4096, memfd: 1)],
               tag: "list")), descriptors: 2, version: 2),
    Sample(label: "allocate-batch-v2", message: .allocateBatch(AllocateBatchRequest(count: 16, size: 4096, heap: "system", tag: "pool",
                                                                                   fdFlags: FDFlags.default)), descriptors: 0, version: 2),
    Sample(label: "allocate-batch-one-v2", message: .allocateBatch(AllocateBatchRequest(count: 1, size: .max, heap: "", tag: "é",
                                                                                       fdFlags: 0, heapFlags: 1)), descriptors: 0, version: 2),
    Sample(label: "release-quiet-v2", message: .releaseQuiet([1, 2, .max]), descriptors: 0, version: 2),
    Sample(label: "release-v2", message: .release(42), descriptors: 0, version: 2),
]

let sampleBuffer = BufferInfo(
    id: 5, inode: 123_456, size: 1 << 20, heap: "system", tag: "frame", name: "1000:4242:frame", ownerUID: 1000, ownerPID: 4242,
    generation: 2, externalReferences: 1, leases: 3, sharedWith: [1001, 1002], revoked: false, orphaned: true)

let sampleBufferV2: BufferInfo = {
    var b = sampleBuffer
    b.cgroup = "/user.slice/user-1000.slice/session-2.scope"
    b.memfdOwnedByDaemon = true
    b.flags = BufferFlags.contiguous
    return b
}()

let sampleStatsV2: Stats = {
    var s = sampleStats
    s.cgroups = [CgroupStats(cgroup: "/user.slice", bytes: 1 << 20, buffers: 2, quotaBytes: 1 << 32, refusals: 1),
                 CgroupStats(cgroup: "", bytes: 0, buffers: 0)]
    return s
}()

let sampleStats = Stats(
    heaps: [HeapStats(heap: "system", bytes: 1 << 30, buffers: 12, failures: 1)],
    clients: [ClientStats(uid: 1000, bytes: 1 << 20, buffers: 2, quotaBytes: 1 << 32, quotaBuffers: 64, refusals: 0),
              ClientStats(uid: 0, bytes: 0, buffers: 0, quotaBytes: 0, quotaBuffers: 0, refusals: 7)],
    failures: [ErrnoCount(errno: "ENOMEM", count: 3)],
    connectedClients: 4, buffers: 14, bytes: (1 << 30) + (1 << 20), leases: 5, pendingFences: 1, oldestPendingFenceMilliseconds: 17)

/// At least one value of every `Response` case, with the fd count its type requires.
let responseSamples: [Sample<Response>] = [
    Sample(label: "hello-reply", message: .hello(HelloReply(version: 1, server: "dmabufd 0.1", maximumMessageSize: 65_536,
                                                            maximumDescriptors: 16, pageSize: 4096, uid: 1000, gid: 1000, pid: -1)),
           descriptors: 0),
    Sample(label: "heaps-reply", message: .heaps(HeapsReply(
        heaps: [HeapInfo(name: "system", device: "/dev/dma_heap/system", kind: "system", allocatedBytes: 4096, buffers: 1),
                HeapInfo(name: "udmabuf", device: "/dev/udmabuf", kind: "udmabuf")],
        policies: [PolicyInfo(name: "any", chain: ["cma", "system"]), PolicyInfo(name: "none", chain: [])])), descriptors: 0),
    Sample(label: "heaps-reply-empty", message: .heaps(HeapsReply(heaps: [], policies: [])), descriptors: 0),
    Sample(label: "buffer-reply", message: .buffer(sampleBuffer), descriptors: 1),
    Sample(label: "share-reply-token", message: .share(ShareReply(token: 0x0123_4567_89AB_CDEF)), descriptors: 0),
    Sample(label: "share-reply", message: .share(ShareReply(token: nil)), descriptors: 0),
    Sample(label: "ok-reply", message: .ok, descriptors: 0),
    Sample(label: "list-reply", message: .list([sampleBuffer, BufferInfo(
        id: 6, inode: 1, size: 4096, heap: "udmabuf", tag: "", name: "", ownerUID: 0, ownerPID: 1, generation: 0,
        externalReferences: 0, leases: 0, sharedWith: [], revoked: true, orphaned: false)]), descriptors: 0),
    Sample(label: "list-reply-empty", message: .list([]), descriptors: 0),
    Sample(label: "list-reply-more", message: .list([sampleBuffer], more: true), descriptors: 0),
    Sample(label: "stats-reply", message: .stats(sampleStats), descriptors: 0),
    Sample(label: "layout-reply", message: .layout(Layout(
        buffer: 5, lease: 77, generation: 2, kind: .memfdPages, pageSize: 4096, firstPage: 0,
        runs: [PageRun(start: 0, pages: 16), PageRun(start: 1024, pages: .max)])), descriptors: 0),
    Sample(label: "layout-reply-physical", message: .layout(Layout(
        buffer: 5, lease: 78, generation: 2, kind: .physical, pageSize: 4096, firstPage: 8, runs: [])), descriptors: 0),
    Sample(label: "access-reply-fence", message: .access(AccessReply(fences: 2)), descriptors: 1),
    Sample(label: "access-reply", message: .access(AccessReply(fences: 0)), descriptors: 0),
    Sample(label: "error-reply", message: .error(WireError(errno: 12, code: .quotaExceeded, message: "quota of 64 buffers reached")),
           descriptors: 0),
    Sample(label: "lease-revoked-event", message: .leaseRevoked(lease: 77, buffer: 5, deadlineMilliseconds: 1000), descriptors: 0),
    Sample(label: "lease-ended-event", message: .leaseEnded(lease: 77, buffer: 5), descriptors: 0),
    Sample(label: "buffer-freed-event", message: .bufferFreed(5), descriptors: 0),
    Sample(label: "fence-signaled-event", message: .fenceSignaled(5), descriptors: 0),
    // Protocol v2.
    Sample(label: "hello-reply-v2", message: .hello(HelloReply(version: 2, server: "dmabufd", maximumMessageSize: 65_536,
                                                               maximumDescriptors: 16, pageSize: 4096, uid: 0, gid: 0, pid: 1)),
           descriptors: 0, version: 2),
    Sample(label: "heaps-reply-v2", message: .heaps(HeapsReply(
        heaps: [HeapInfo(name: "cma", device: "linux,cma", kind: "cma", allocatedBytes: 4096, buffers: 1,
                         totalBytes: 64 << 20, freeBytes: 60 << 20, chargesMemcg: false),
                HeapInfo(name: "udmabuf", device: "/dev/udmabuf", kind: "udmabuf", chargesMemcg: true)],
        policies: [PolicyInfo(name: "any", chain: ["cma", "system"])], memAccounting: true)), descriptors: 0, version: 2),
    Sample(label: "buffer-reply-v2", message: .buffer(sampleBufferV2), descriptors: 1, version: 2),
    Sample(label: "buffers-reply-v2", message: .buffers([sampleBufferV2, sampleBuffer]), descriptors: 2, version: 2),
    Sample(label: "list-reply-v2", message: .list([sampleBufferV2], more: true), descriptors: 0, version: 2),
    Sample(label: "layout-reply-contiguous-v2", message: .layout(Layout(
        buffer: 5, lease: 79, generation: 1, kind: .bufferPages, pageSize: 4096, firstPage: 0, runs: [PageRun(start: 0, pages: 4096)],
        flags: BufferFlags.contiguous)), descriptors: 0, version: 2),
    Sample(label: "stats-reply-v2", message: .stats(sampleStatsV2), descriptors: 0, version: 2),
    Sample(label: "error-reply-v2", message: .error(WireError(errno: 22, code: .invalidArgument, message: "fd_flags 0x40 (EINVAL)")),
           descriptors: 0, version: 2),
    Sample(label: "lease-ended-event-v2", message: .leaseEnded(lease: 1, buffer: 2), descriptors: 0, version: 2),
]

/// The encoding of each sample, as the tests and the fuzz corpus use them.
func encoded(_ sample: Sample<Request>, requestID: UInt32 = 0x0102_0304) -> [UInt8] {
    WireMessage.encode(sample.message, requestID: requestID, descriptors: sample.descriptors, version: sample.version)
}

func encoded(_ sample: Sample<Response>, requestID: UInt32 = 0x0102_0304) -> [UInt8] {
    WireMessage.encode(sample.message, requestID: requestID, descriptors: sample.descriptors, version: sample.version)
}

/// The version a sample's header carries: hello and its reply always go out as v1.
func headerVersion<M>(_ sample: Sample<M>, type: MessageType) -> UInt16 {
    type == .hello || type == .helloReply ? WireLimits.baseVersion : sample.version
}

/// Byte offsets of the header fields, as the protocol lays them out.
enum HeaderOffset {
    static let magic = 0, version = 4, type = 6, requestID = 8, payloadLength = 12, descriptorCount = 16, reserved = 18
}

extension Array where Element == UInt8 {
    func u16(at offset: Int) -> UInt16 { UInt16(self[offset]) | UInt16(self[offset + 1]) << 8 }
    func u32(at offset: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(self[offset + $1]) << (8 * $1) } }

    mutating func setU16(_ v: UInt16, at offset: Int) {
        self[offset] = UInt8(truncatingIfNeeded: v); self[offset + 1] = UInt8(truncatingIfNeeded: v >> 8)
    }

    mutating func setU32(_ v: UInt32, at offset: Int) {
        for i in 0..<4 { self[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }

    /// The payload after the 20-byte header.
    var payload: [UInt8] { Array(self[WireLimits.headerSize...]) }

    /// A copy whose header length field is made to agree with however many payload bytes follow.
    var withFixedLength: [UInt8] {
        var copy = self
        copy.setU32(UInt32(count - WireLimits.headerSize), at: HeaderOffset.payloadLength)
        return copy
    }
}

/// Builds a message from a header and a raw payload, for malformed payloads the encoder cannot produce.
func frame(type: MessageType, requestID: UInt32 = 1, descriptors: Int = 0, version: UInt16 = WireLimits.baseVersion,
           payload: [UInt8]) -> [UInt8] {
    var w = WireWriter()
    w.u32(WireLimits.magic); w.u16(version); w.u16(type.rawValue); w.u32(requestID)
    w.u32(UInt32(payload.count)); w.u16(UInt16(descriptors)); w.u16(0)
    return w.bytes + payload
}

func payload(_ build: (inout WireWriter) -> Void) -> [UInt8] {
    var w = WireWriter()
    build(&w)
    return w.bytes
}

/// The error a decode threw, or nil when it succeeded.
func requestError(_ bytes: [UInt8], descriptors: Int = 0, version: UInt16? = nil) -> WireDecodingError? {
    do { _ = try WireMessage.decodeRequest(bytes, descriptors: descriptors, version: version); return nil } catch { return error }
}

func responseError(_ bytes: [UInt8], descriptors: Int = 0, version: UInt16? = nil) -> WireDecodingError? {
    do { _ = try WireMessage.decodeResponse(bytes, descriptors: descriptors, version: version); return nil } catch { return error }
}
