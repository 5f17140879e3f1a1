import DmaBuf
import DmaBufWire
import SystemPackage

/// One allocation to make inside a client's cgroup (docs/DESIGN.md, "Charging the client's cgroup").
enum ChargeRequest {
    /// `DMA_HEAP_IOCTL_ALLOC` on heap `name`.
    case heap(name: String, size: UInt64, fdFlags: UInt32, heapFlags: UInt64)
    /// A sealed memfd of `size` bytes (already rounded to its page size) made into a udmabuf.
    case udmabuf(size: UInt64, hugePages: Bool)
    /// A udmabuf over ranges of a client's memfds (each range names one by index): faulting in their
    /// holes charges whoever asks.
    case udmabufFromMemfds(memfds: [SharedFD], ranges: [(memfd: Int, offset: UInt64, size: UInt64)])
}

/// What a charge helper made: a dma-buf, and for ``ChargeRequest/udmabuf(size:hugePages:)`` the memfd under it.
struct ChargeReply {
    var buffer: SharedFD
    var memfd: SharedFD?
    /// Made by a helper in the client's cgroup (not in the daemon, as a best-effort fallback does).
    var inClientCgroup = false
}

/// Why an allocation cannot run in the client's cgroup. The broker refuses with it under
/// `charge_client = required`, and allocates in the daemon (counted) under `best-effort`.
struct ChargeUnavailable: Error, CustomStringConvertible {
    var errno: Errno
    var description: String
    var fix: String
    /// No helper can be placed in the cgroup (as opposed to one that failed): `best-effort` falls back.
    var placement = false
}

/// The seam between the broker and whatever allocates in clients' cgroups: the real ``ChargeHelpers``
/// (child processes), or an in-process fake in host tests. Loop thread only. `submit` never blocks: it
/// returns at once and calls `done` later on the loop, exactly once, unless the service is shut down.
protocol ChargeService: AnyObject {
    /// False when allocating in the daemon charges `cgroup` anyway (the daemon's own cgroup).
    func needsHelper(cgroup: String) -> Bool
    /// Starts `request` in a helper in `cgroup`, or throws ``ChargeUnavailable`` when there can be none.
    func submit(_ request: ChargeRequest, cgroup: String, done: @escaping (Result<ChargeReply, Error>) -> Void) throws
    /// A client in `cgroup` connected or left; the helper of a cgroup without clients is reaped.
    func clientConnected(cgroup: String)
    func clientLeft(cgroup: String)
    /// Heaps changed: forget cached device descriptors.
    func devicesChanged()
    /// Helpers alive now, and allocations that had to run in the daemon (best-effort) so far.
    var helperCount: Int { get }
}

/// The fixed little structs between dmabufd and `dmabufd-charge`, byte for byte as in
/// Sources/dmabufd-charge/main.c (host byte order: both ends are the same build on the same machine).
enum ChargeWire {
    static let opHeap: UInt32 = 1, opUDmabufOwn: UInt32 = 2, opUDmabufMemfd: UInt32 = 3
    static let requestSize = 40, rangeSize = 24, replySize = 16
    static let maximumRanges = 1024
    /// Client memfds one op-3 request may carry (the protocol's per-message limit).
    static let maximumMemfds = 16
    /// The closer's account for fds helpers sent that were not used: (uid_t)-1, which no process has.
    static let closerUID = UInt32.max

    /// `struct request` (40 bytes), then for op 3 `count` `struct range`s (24 bytes each: offset, size,
    /// the index of its memfd among the memfds after the device fd, and 4 bytes reserved).
    static func encode(_ request: ChargeRequest, sequence: UInt32) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(requestSize)
        func u32(_ v: UInt32) { withUnsafeBytes(of: v) { bytes.append(contentsOf: $0) } }
        func u64(_ v: UInt64) { withUnsafeBytes(of: v) { bytes.append(contentsOf: $0) } }
        switch request {
        case .heap(_, let size, let fdFlags, let heapFlags):
            u32(opHeap); u32(sequence); u64(size); u32(fdFlags); u32(0); u64(heapFlags); u32(0); u32(0)
        case .udmabuf(let size, let huge):
            u32(opUDmabufOwn); u32(sequence); u64(size); u32(0); u32(huge ? 1 : 0); u64(0); u32(0); u32(0)
        case .udmabufFromMemfds(_, let ranges):
            u32(opUDmabufMemfd); u32(sequence); u64(0); u32(0); u32(0); u64(0); u32(UInt32(ranges.count)); u32(0)
            for range in ranges { u64(range.offset); u64(range.size); u32(UInt32(range.memfd)); u32(0) }
        }
        return bytes
    }

    /// `struct reply`: sequence, errno (0 on success), the memfd's size for op 2.
    static func decodeReply(_ bytes: [UInt8]) -> (sequence: UInt32, error: Int32, size: UInt64)? {
        guard bytes.count == replySize else { return nil }
        return bytes.withUnsafeBytes {
            ($0.loadUnaligned(fromByteOffset: 0, as: UInt32.self), $0.loadUnaligned(fromByteOffset: 4, as: Int32.self),
             $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        }
    }

    /// Descriptors a successful reply to `request` must carry.
    static func replyFDs(_ request: ChargeRequest) -> Int {
        if case .udmabuf = request { return 2 }
        return 1
    }
}
