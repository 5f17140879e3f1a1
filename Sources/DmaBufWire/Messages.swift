import DmaBufTypes

/// The protocol's fixed numbers. `docs/PROTOCOL.md` is the contract; these must match it.
public enum WireLimits {
    /// "DMBF" read as a little-endian u32.
    public static let magic: UInt32 = 0x4642_4D44
    /// The version this build speaks best.
    public static let currentVersion: UInt16 = 2
    /// Every version this build speaks.
    public static let supportedVersions: ClosedRange<UInt16> = 1...2
    /// The version hello and its reply always carry in the header, and every message before negotiation.
    public static let baseVersion: UInt16 = 1
    /// Header bytes before the payload.
    public static let headerSize = 20
    /// The largest message, header included. Larger ones are refused and the peer disconnected.
    public static let maximumMessageSize = 65_536
    /// The most fds one message may carry.
    public static let maximumDescriptors = 16
    /// The longest string field, in UTF-8 bytes.
    public static let maximumStringLength = 255
    /// The most entries in any list field (runs, buffers, heaps, ranges).
    public static let maximumListEntries = 4_000
    /// v2 `allocate_batch`: the most buffers one request may ask for (each comes back as one fd).
    public static let maximumBatchCount = 16
}

/// The `fd_flags` of v2 `allocate`/`allocate_batch`: the kernel's DMA_HEAP_VALID_FD_FLAGS.
public enum FDFlags {
    public static let readOnly: UInt32 = 0
    public static let writeOnly: UInt32 = 1
    public static let readWrite: UInt32 = 2
    /// O_ACCMODE.
    public static let accessModeMask: UInt32 = 3
    /// O_CLOEXEC.
    public static let closeOnExec: UInt32 = 0o2_000_000
    /// Every bit a client may set; any other is refused with EINVAL.
    public static let valid: UInt32 = accessModeMask | closeOnExec
    /// What v1 allocations use, and the default: read-write, close-on-exec.
    public static let `default`: UInt32 = readWrite | closeOnExec
}

/// The `flags` of v2 `create_udmabuf_from_memfd`: the kernel's udmabuf flags.
public enum UDmabufFlags {
    /// UDMABUF_FLAGS_CLOEXEC.
    public static let closeOnExec: UInt32 = 0x01
    /// Every bit a client may set; any other is refused with EINVAL.
    public static let valid: UInt32 = closeOnExec
}

/// The `type` field of a message header.
public enum MessageType: UInt16, Sendable, CaseIterable {
    // Requests (client → daemon).
    case hello = 0x0001
    case listHeaps = 0x0002
    case allocate = 0x0003
    case createUDmabuf = 0x0004
    case createUDmabufFromMemfd = 0x0005
    case importBuffer = 0x0006
    case share = 0x0007
    case fetch = 0x0008
    case release = 0x0009
    case list = 0x000A
    case stats = 0x000B
    case layout = 0x000C
    case releaseLease = 0x000D
    case attachFence = 0x000E
    case beginAccess = 0x000F
    case revoke = 0x0010
    case info = 0x0011
    /// v2 only.
    case allocateBatch = 0x0012
    /// v2 only. Never answered.
    case releaseQuiet = 0x0013

    // Replies (daemon → client): the request's type with the high bit set.
    case helloReply = 0x8001
    case heapsReply = 0x8002
    case bufferReply = 0x8003
    case shareReply = 0x8007
    case okReply = 0x8009
    case listReply = 0x800A
    case statsReply = 0x800B
    case layoutReply = 0x800C
    case accessReply = 0x800F
    /// v2 only: the reply to `allocate_batch`.
    case buffersReply = 0x8012
    case errorReply = 0xFFFF

    // Events (daemon → client, request id 0).
    case leaseRevokedEvent = 0x4001
    case leaseEndedEvent = 0x4002
    case bufferFreedEvent = 0x4003
    case fenceSignaledEvent = 0x4004
}

public typealias BufferID = UInt64
public typealias LeaseID = UInt64

/// A byte range of a memfd.
public struct ByteRange: Sendable, Hashable, Codable {
    public var offset: UInt64
    public var size: UInt64
    /// v2: which of the message's fds holds the range (0 = the first), as `UDMABUF_CREATE_LIST` names a
    /// memfd per entry. Always 0 in v1, which carries one memfd.
    public var memfd: UInt8
    public init(offset: UInt64, size: UInt64, memfd: UInt8 = 0) { self.offset = offset; self.size = size; self.memfd = memfd }
}

/// v2 `flags` of `buffer_info` and of the `layout` reply.
public enum BufferFlags {
    /// The memory is one physically contiguous run: by construction for a buffer from a CMA heap
    /// (`cma_alloc` hands out one run), or measured for a physical layout of one run. No address is implied.
    public static let contiguous: UInt32 = 0x01
}

/// What a layout's run numbers count.
public enum RunKind: UInt8, Sendable, Codable, CaseIterable {
    /// Pages of the buffer itself (0 = its first page): all an unauthorised peer learns.
    case bufferPages = 0
    /// Page indices in the memfd behind a udmabuf.
    case memfdPages = 1
    /// Physical page frame numbers (PFNs). Only for peers the config authorises.
    case physical = 2
}

// MARK: - Payloads

public struct Hello: Sendable, Equatable {
    public var minimumVersion: UInt16
    public var maximumVersion: UInt16
    public var client: String
    public init(minimumVersion: UInt16 = WireLimits.supportedVersions.lowerBound,
                maximumVersion: UInt16 = WireLimits.supportedVersions.upperBound, client: String) {
        self.minimumVersion = minimumVersion
        self.maximumVersion = maximumVersion
        self.client = client
    }
}

public struct HelloReply: Sendable, Equatable, Codable {
    public var version: UInt16
    public var server: String
    public var maximumMessageSize: UInt32
    public var maximumDescriptors: UInt16
    public var pageSize: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    public init(version: UInt16, server: String, maximumMessageSize: UInt32, maximumDescriptors: UInt16, pageSize: UInt32,
                uid: UInt32, gid: UInt32, pid: Int32) {
        self.version = version; self.server = server; self.maximumMessageSize = maximumMessageSize
        self.maximumDescriptors = maximumDescriptors; self.pageSize = pageSize; self.uid = uid; self.gid = gid; self.pid = pid
    }
}

public struct HeapInfo: Sendable, Equatable, Codable {
    /// The logical name clients use (`system`, `cma`, `udmabuf`).
    public var name: String
    /// The real kernel name or device (`linux,cma`, `/dev/udmabuf`).
    public var device: String
    /// `system`, `system-uncached`, `cma`, `udmabuf`, or `other`.
    public var kind: String
    /// Bytes currently allocated from it through dmabufd.
    public var allocatedBytes: UInt64
    /// Buffers currently allocated from it through dmabufd.
    public var buffers: UInt32
    /// v2: the heap's size in bytes; 0 = unknown (CMA heaps report CmaTotal or their region's size).
    public var totalBytes: UInt64
    /// v2: the heap's free bytes; 0 = unknown (CMA heaps report CmaFree or their region's free pages).
    public var freeBytes: UInt64
    /// v2: this kernel charges this heap's allocations to the allocating memory cgroup.
    public var chargesMemcg: Bool
    public init(name: String, device: String, kind: String, allocatedBytes: UInt64 = 0, buffers: UInt32 = 0,
                totalBytes: UInt64 = 0, freeBytes: UInt64 = 0, chargesMemcg: Bool = false) {
        self.name = name; self.device = device; self.kind = kind; self.allocatedBytes = allocatedBytes; self.buffers = buffers
        self.totalBytes = totalBytes; self.freeBytes = freeBytes; self.chargesMemcg = chargesMemcg
    }
}

public struct PolicyInfo: Sendable, Equatable, Codable {
    public var name: String
    public var chain: [String]
    public init(name: String, chain: [String]) { self.name = name; self.chain = chain }
}

public struct HeapsReply: Sendable, Equatable, Codable {
    public var heaps: [HeapInfo]
    public var policies: [PolicyInfo]
    /// v2: `/sys/module/dma_heap/parameters/mem_accounting` reads Y.
    public var memAccounting: Bool
    public init(heaps: [HeapInfo], policies: [PolicyInfo], memAccounting: Bool = false) {
        self.heaps = heaps; self.policies = policies; self.memAccounting = memAccounting
    }
}

public struct AllocateRequest: Sendable, Equatable {
    public var size: UInt64
    /// A heap's logical name or a policy name (`any`).
    public var heap: String
    public var tag: String
    /// v1 only: `cpu_access` (0 none, 1 read, 2 write, 3 read-write), checked by the decoder and ignored by
    /// the daemon: access is the fd's mode (`fdFlags`). Not sent in v2.
    public var cpuAccess: UInt8
    /// v2: the new fd's flags, a subset of ``FDFlags/valid``; v1 allocations get ``FDFlags/default``.
    public var fdFlags: UInt32
    /// v2: dma-heap heap flags; the kernel defines none, so anything but 0 is refused.
    public var heapFlags: UInt64
    public init(size: UInt64, heap: String, tag: String, cpuAccess: UInt8 = 3,
                fdFlags: UInt32 = FDFlags.default, heapFlags: UInt64 = 0) {
        self.size = size; self.heap = heap; self.tag = tag; self.cpuAccess = cpuAccess
        self.fdFlags = fdFlags; self.heapFlags = heapFlags
    }
}

/// v2 `allocate_batch`: `count` buffers of `size` bytes each, all or nothing.
public struct AllocateBatchRequest: Sendable, Equatable {
    /// 1...``WireLimits/maximumBatchCount``; the decoder refuses anything else as malformed.
    public var count: UInt16
    public var size: UInt64
    public var heap: String
    public var tag: String
    public var fdFlags: UInt32
    public var heapFlags: UInt64
    public init(count: UInt16, size: UInt64, heap: String, tag: String, fdFlags: UInt32 = FDFlags.default, heapFlags: UInt64 = 0) {
        self.count = count; self.size = size; self.heap = heap; self.tag = tag; self.fdFlags = fdFlags; self.heapFlags = heapFlags
    }
}

public struct UDmabufRequest: Sendable, Equatable {
    public var size: UInt64
    public var tag: String
    /// Back the memfd with huge pages (MFD_HUGETLB).
    public var hugePages: Bool
    public init(size: UInt64, tag: String, hugePages: Bool = false) { self.size = size; self.tag = tag; self.hugePages = hugePages }
}

public struct UDmabufFromMemfdRequest: Sendable, Equatable {
    public var ranges: [ByteRange]
    public var tag: String
    /// v2: udmabuf flags, a subset of ``UDmabufFlags/valid``; 0 in v1.
    public var flags: UInt32
    public init(ranges: [ByteRange], tag: String, flags: UInt32 = 0) { self.ranges = ranges; self.tag = tag; self.flags = flags }
}

public struct ShareRequest: Sendable, Equatable {
    public var buffer: BufferID
    /// Grant this uid the right to fetch the buffer.
    public var uid: UInt32?
    /// Also (or instead) mint a one-time token anyone may redeem once.
    public var oneTimeToken: Bool
    public init(buffer: BufferID, uid: UInt32? = nil, oneTimeToken: Bool = false) {
        self.buffer = buffer; self.uid = uid; self.oneTimeToken = oneTimeToken
    }
}

public struct ShareReply: Sendable, Equatable, Codable {
    public var token: UInt64?
    public init(token: UInt64?) { self.token = token }
}

public struct FetchRequest: Sendable, Equatable {
    public var buffer: BufferID
    /// A one-time token from ``ShareReply``; 0 when fetching by uid grant.
    public var token: UInt64
    public init(buffer: BufferID, token: UInt64 = 0) { self.buffer = buffer; self.token = token }
}

public struct BufferInfo: Sendable, Equatable, Codable {
    public var id: BufferID
    public var inode: UInt64
    public var size: UInt64
    /// The logical heap (`system`, `udmabuf`, `import`).
    public var heap: String
    public var tag: String
    /// The kernel-visible name, `uid:pid:tag` cut to the kernel's limit.
    public var name: String
    public var ownerUID: UInt32
    public var ownerPID: Int32
    /// Bumped when the buffer is revoked; a revoked generation is never published again.
    public var generation: UInt32
    /// File references outside the daemon (its fdinfo `count` less its own one).
    public var externalReferences: UInt32
    public var leases: UInt32
    public var sharedWith: [UInt32]
    public var revoked: Bool
    /// True once the owner disconnected: kept only for leases, fences or references.
    public var orphaned: Bool
    /// v2: the owner's cgroup v2 path as read at connect; over 255 bytes it is shortened from the left and
    /// starts with "...". Empty in v1 and when unknown.
    public var cgroup: String
    /// v2: the memfd behind this udmabuf never left dmabufd (false for heap buffers and client memfds).
    public var memfdOwnedByDaemon: Bool
    /// v2: ``BufferFlags`` bits; receivers ignore bits they do not know. 0 in v1.
    public var flags: UInt32
    public init(id: BufferID, inode: UInt64, size: UInt64, heap: String, tag: String, name: String, ownerUID: UInt32,
                ownerPID: Int32, generation: UInt32, externalReferences: UInt32, leases: UInt32, sharedWith: [UInt32],
                revoked: Bool, orphaned: Bool, cgroup: String = "", memfdOwnedByDaemon: Bool = false, flags: UInt32 = 0) {
        self.id = id; self.inode = inode; self.size = size; self.heap = heap; self.tag = tag; self.name = name
        self.ownerUID = ownerUID; self.ownerPID = ownerPID; self.generation = generation
        self.externalReferences = externalReferences; self.leases = leases; self.sharedWith = sharedWith
        self.revoked = revoked; self.orphaned = orphaned; self.cgroup = cgroup; self.memfdOwnedByDaemon = memfdOwnedByDaemon
        self.flags = flags
    }

    /// v2: physically contiguous by construction (a CMA heap's buffer).
    public var isContiguous: Bool { flags & BufferFlags.contiguous != 0 }
}

public struct HeapStats: Sendable, Equatable, Codable {
    public var heap: String
    public var bytes: UInt64
    public var buffers: UInt32
    public var failures: UInt32
    public init(heap: String, bytes: UInt64, buffers: UInt32, failures: UInt32) {
        self.heap = heap; self.bytes = bytes; self.buffers = buffers; self.failures = failures
    }
}

public struct ClientStats: Sendable, Equatable, Codable {
    public var uid: UInt32
    public var bytes: UInt64
    public var buffers: UInt32
    public var quotaBytes: UInt64
    public var quotaBuffers: UInt32
    public var refusals: UInt32
    public init(uid: UInt32, bytes: UInt64, buffers: UInt32, quotaBytes: UInt64, quotaBuffers: UInt32, refusals: UInt32) {
        self.uid = uid; self.bytes = bytes; self.buffers = buffers; self.quotaBytes = quotaBytes
        self.quotaBuffers = quotaBuffers; self.refusals = refusals
    }
}

/// v2: usage per owner cgroup (the cgroup v2 path read at connect).
public struct CgroupStats: Sendable, Equatable, Codable {
    public var cgroup: String
    public var bytes: UInt64
    public var buffers: UInt32
    /// 0 = no quota.
    public var quotaBytes: UInt64
    public var refusals: UInt32
    public init(cgroup: String, bytes: UInt64, buffers: UInt32, quotaBytes: UInt64 = 0, refusals: UInt32 = 0) {
        self.cgroup = cgroup; self.bytes = bytes; self.buffers = buffers; self.quotaBytes = quotaBytes; self.refusals = refusals
    }
}

public struct ErrnoCount: Sendable, Equatable, Codable {
    public var errno: String
    public var count: UInt32
    public init(errno: String, count: UInt32) { self.errno = errno; self.count = count }
}

public struct Stats: Sendable, Equatable, Codable {
    public var heaps: [HeapStats]
    public var clients: [ClientStats]
    public var failures: [ErrnoCount]
    public var connectedClients: UInt32
    public var buffers: UInt32
    public var bytes: UInt64
    public var leases: UInt32
    public var pendingFences: UInt32
    /// Milliseconds the oldest unsignalled fence has waited; 0 when none.
    public var oldestPendingFenceMilliseconds: UInt64
    /// v2: usage per owner cgroup (for a non-root caller, only its own uid's buffers). Empty in v1.
    public var cgroups: [CgroupStats]
    public init(heaps: [HeapStats], clients: [ClientStats], failures: [ErrnoCount], connectedClients: UInt32,
                buffers: UInt32, bytes: UInt64, leases: UInt32, pendingFences: UInt32, oldestPendingFenceMilliseconds: UInt64,
                cgroups: [CgroupStats] = []) {
        self.heaps = heaps; self.clients = clients; self.failures = failures; self.connectedClients = connectedClients
        self.buffers = buffers; self.bytes = bytes; self.leases = leases; self.pendingFences = pendingFences
        self.oldestPendingFenceMilliseconds = oldestPendingFenceMilliseconds; self.cgroups = cgroups
    }
}

public struct LayoutRequest: Sendable, Equatable {
    public var buffer: BufferID
    public var firstPage: UInt64
    /// 0 means to the end of the buffer.
    public var pageCount: UInt64
    /// Ask for physical PFNs; refused (EPERM) for peers the config does not authorise.
    public var physical: Bool
    public init(buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, physical: Bool = false) {
        self.buffer = buffer; self.firstPage = firstPage; self.pageCount = pageCount; self.physical = physical
    }
}

public struct Layout: Sendable, Equatable, Codable {
    public var buffer: BufferID
    public var lease: LeaseID
    public var generation: UInt32
    public var kind: RunKind
    public var pageSize: UInt32
    public var firstPage: UInt64
    public var runs: [PageRun]
    /// v2: ``BufferFlags`` bits for the published pages; receivers ignore bits they do not know. 0 in v1.
    public var flags: UInt32
    public init(buffer: BufferID, lease: LeaseID, generation: UInt32, kind: RunKind, pageSize: UInt32, firstPage: UInt64, runs: [PageRun],
                flags: UInt32 = 0) {
        self.buffer = buffer; self.lease = lease; self.generation = generation; self.kind = kind
        self.pageSize = pageSize; self.firstPage = firstPage; self.runs = runs; self.flags = flags
    }

    /// v2: the published pages are one physically contiguous run (the runs themselves count what `kind` says).
    public var isContiguous: Bool { flags & BufferFlags.contiguous != 0 }
}

public struct FenceAttachRequest: Sendable, Equatable {
    public var buffer: BufferID
    public var firstPage: UInt64
    /// 0 means to the end of the buffer (the whole buffer when firstPage is 0).
    public var pageCount: UInt64
    public var access: AccessMode
    public init(buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, access: AccessMode) {
        self.buffer = buffer; self.firstPage = firstPage; self.pageCount = pageCount; self.access = access
    }
}

public typealias AccessRequest = FenceAttachRequest

public struct AccessReply: Sendable, Equatable, Codable {
    /// How many fences the returned sync_file merges; 0 means nothing to wait for (and no fd comes).
    public var fences: UInt32
    public init(fences: UInt32) { self.fences = fences }
}

public struct RevokeRequest: Sendable, Equatable {
    public var buffer: BufferID
    /// How long holders get to release before their leases are ended for them; 0 uses the configured default.
    public var deadlineMilliseconds: UInt32
    public init(buffer: BufferID, deadlineMilliseconds: UInt32 = 0) { self.buffer = buffer; self.deadlineMilliseconds = deadlineMilliseconds }
}

/// A refusal: the errno that best names it, a machine-readable code, and text that says what to do.
public struct WireError: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    public enum Code: UInt16, Sendable, Codable {
        case malformed = 1, unsupportedVersion = 2, notFound = 3, permissionDenied = 4, quotaExceeded = 5,
             noHeap = 6, kernel = 7, revoked = 8, limit = 9, invalidArgument = 10, `internal` = 11, busy = 12
    }
    public var errno: Int32
    public var code: Code
    public var message: String
    public init(errno: Int32, code: Code, message: String) { self.errno = errno; self.code = code; self.message = message }
    public var description: String { message }

    /// The one way to word a refusal: `cause (ENAME); fix`, with the errno's C name rendered here so no
    /// caller spells it by hand (and none can get it wrong).
    public static func refusal(_ errno: Int32, code: Code, cause: String, fix: String? = nil) -> WireError {
        var message = "\(cause) (\(ErrnoNames.name(errno)))"
        if let fix, !fix.isEmpty { message += "; \(fix)" }
        return WireError(errno: errno, code: code, message: message)
    }

    /// ``refusal(_:code:cause:fix:)`` for any errno type (SystemPackage's `Errno`, say).
    public static func refusal<E: RawRepresentable>(_ errno: E, code: Code, cause: String, fix: String? = nil) -> WireError
        where E.RawValue == Int32 {
        refusal(errno.rawValue, code: code, cause: cause, fix: fix)
    }

    /// The errno's C name (`EDQUOT`).
    public var errnoName: String { ErrnoNames.name(errno) }
}

// MARK: - Messages

/// Everything a client can ask.
public enum Request: Sendable, Equatable {
    case hello(Hello)
    case listHeaps
    case allocate(AllocateRequest)
    case createUDmabuf(UDmabufRequest)
    /// Carries one fd, the client's memfd; in v2 1...16 memfds, each range naming its own by index.
    case createUDmabufFromMemfd(UDmabufFromMemfdRequest)
    /// Carries one fd: the dma-buf to import. The string is the tag.
    case importBuffer(tag: String)
    case share(ShareRequest)
    case fetch(FetchRequest)
    case release(BufferID)
    /// Buffers with ids greater than `after`, as many as fit one reply (see `Response.list`'s `more`).
    case list(all: Bool, after: BufferID = 0)
    case stats
    case layout(LayoutRequest)
    /// Carries zero or one fd: a sync_file that signals when the holder's last access completes.
    case releaseLease(LeaseID)
    /// Carries one fd: the sync_file to attach.
    case attachFence(FenceAttachRequest)
    case beginAccess(AccessRequest)
    case revoke(RevokeRequest)
    case info(BufferID)
    /// v2: `count` buffers in one request; answered by ``Response/buffers(_:)`` with one fd per buffer.
    case allocateBatch(AllocateBatchRequest)
    /// v2: releases each buffer like ``release(_:)``, with no reply at all (not even an error).
    /// 1...``WireLimits/maximumListEntries`` ids.
    case releaseQuiet([BufferID])
}

/// Everything the daemon can answer with, or tell unprompted.
public enum Response: Sendable, Equatable {
    case hello(HelloReply)
    case heaps(HeapsReply)
    /// Carries one fd: the buffer.
    case buffer(BufferInfo)
    case share(ShareReply)
    case ok
    /// A page of buffers in id order; `more` when others follow (ask again with `after` = the last id).
    case list([BufferInfo], more: Bool = false)
    case stats(Stats)
    case layout(Layout)
    /// Carries one fd (the merged sync_file) when `fences > 0`.
    case access(AccessReply)
    /// v2: the reply to `allocate_batch`; carries one fd per buffer, fd i being buffer i.
    case buffers([BufferInfo])
    case error(WireError)
    case leaseRevoked(lease: LeaseID, buffer: BufferID, deadlineMilliseconds: UInt32)
    case leaseEnded(lease: LeaseID, buffer: BufferID)
    case bufferFreed(BufferID)
    case fenceSignaled(BufferID)

    /// True for messages the daemon sends unprompted (request id 0).
    public var isEvent: Bool {
        switch self {
        case .leaseRevoked, .leaseEnded, .bufferFreed, .fenceSignaled: true
        default: false
        }
    }
}

/// A message's fixed header.
public struct Header: Sendable, Equatable {
    public var version: UInt16
    public var type: UInt16
    public var requestID: UInt32
    public var payloadLength: UInt32
    public var descriptorCount: UInt16

    public init(version: UInt16 = WireLimits.currentVersion, type: UInt16, requestID: UInt32, payloadLength: UInt32, descriptorCount: UInt16) {
        self.version = version; self.type = type; self.requestID = requestID
        self.payloadLength = payloadLength; self.descriptorCount = descriptorCount
    }
}
