import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `/dev/udmabuf`: turns page ranges of memfds into a dma-buf (`UDMABUF_CREATE`, `UDMABUF_CREATE_LIST`).
///
/// Requests are checked here first against what the kernel would refuse, so that the error says why:
/// page alignment, `F_SEAL_SHRINK` present, `F_SEAL_WRITE`/`F_SEAL_FUTURE_WRITE` absent, the range inside
/// the memfd, and the module's `size_limit_mb` and `list_limit`.
public struct UDmabuf: ~Copyable, Sendable {
    /// The device node.
    public static let defaultDevicePath = "/dev/udmabuf"
    /// Where the module's parameters are.
    public static let defaultParametersDirectory = "/sys/module/udmabuf/parameters"

    private let device: UniqueFD
    /// The module limits read when the device was opened.
    public let limits: Limits

    /// The udmabuf module's parameters.
    public struct Limits: Sendable, Hashable {
        /// `size_limit_mb`: the most MiB one buffer may have (default 64).
        public var sizeLimitMB: Int
        /// `list_limit`: the most entries one `UDMABUF_CREATE_LIST` may have (default 1024).
        public var listLimit: Int

        public init(sizeLimitMB: Int, listLimit: Int) {
            self.sizeLimitMB = sizeLimitMB
            self.listLimit = listLimit
        }

        /// Reads the parameters; the kernel's defaults (64 MiB, 1024 entries) for any that cannot be read.
        public static func current(in directory: String = UDmabuf.defaultParametersDirectory) -> Limits {
            Limits(
                sizeLimitMB: readInteger(directory + "/size_limit_mb") ?? 64,
                listLimit: readInteger(directory + "/list_limit") ?? 1024)
        }

        public var sizeLimitBytes: Int { sizeLimitMB << 20 }
    }

    /// One piece of a udmabuf: `size` bytes at `offset` in `memfd`. The memfd is borrowed, not closed.
    public struct Range: Sendable, Hashable {
        public var memfd: FileDescriptor
        public var offset: UInt64
        public var size: UInt64

        public init(memfd: FileDescriptor, offset: UInt64, size: UInt64) {
            self.memfd = memfd
            self.offset = offset
            self.size = size
        }
    }

    /// Opens the device and reads the module limits.
    /// - Throws: ``DmaBufError`` ENOENT when the kernel has no udmabuf (CONFIG_UDMABUF), EACCES without access.
    public init(devicePath: String = defaultDevicePath, parametersDirectory: String = defaultParametersDirectory) throws {
        do {
            self.device = UniqueFD(adopting: try FileDescriptor.open(devicePath, .readWrite, options: [.closeOnExec], retryOnInterrupt: true))
        } catch let errno as Errno {
            throw DmaBufError(
                "udmabuf", errno, "cannot open \(devicePath)",
                fix: errno == .noSuchFileOrDirectory ? "this kernel lacks CONFIG_UDMABUF (or `modprobe udmabuf`)"
                    : errno == .permissionDenied ? "/dev/udmabuf is root-only by default: go through dmabufd" : nil)
        }
        self.limits = Limits.current(in: parametersDirectory)
    }

    /// Creates a dma-buf over `size` bytes at `offset` of `memfd` (`UDMABUF_CREATE`, `UDMABUF_FLAGS_CLOEXEC`).
    /// The caller owns the returned buffer; `memfd` stays the caller's.
    public func create(memfd: FileDescriptor, offset: UInt64 = 0, size: UInt64) throws -> DmaBuffer {
        let range = Range(memfd: memfd, offset: offset, size: size)
        try check([range])
        var arg = udmabuf_create(memfd: UInt32(bitPattern: memfd.rawValue), flags: UInt32(UDMABUF_FLAGS_CLOEXEC), offset: offset, size: size)
        let result = withUnsafeMutableBytes(of: &arg) { Sys.ioctl(device.descriptor, CDmaBuf_UDMABUF_CREATE, $0.baseAddress) }
        switch result {
        case .success(let fd): return DmaBuffer(adopting: UniqueFD(adopting: fd))
        case .failure(let errno): throw explain(errno)
        }
    }

    /// Creates one dma-buf from several memfd ranges, in order (`UDMABUF_CREATE_LIST`). Adjacent ranges of
    /// the same memfd are merged first (``mergeAdjacent(_:)``) so that more fit under `list_limit`.
    /// The caller owns the returned buffer; the memfds stay the caller's.
    public func create(list: [Range]) throws -> DmaBuffer {
        // Validate the caller's entries before merging sums them.
        _ = try UDmabuf.extents(list.map { ($0.offset, $0.size) })
        let merged = UDmabuf.mergeAdjacent(list)
        try check(merged)
        let items = merged.map {
            udmabuf_create_item(memfd: UInt32(bitPattern: $0.memfd.rawValue), __pad: 0, offset: $0.offset, size: $0.size)
        }
        let result = Sys.retrying {
            items.withUnsafeBufferPointer {
                CDmaBuf_udmabuf_create_list(device.descriptor.rawValue, UInt32(UDMABUF_FLAGS_CLOEXEC), $0.baseAddress, UInt32($0.count))
            }
        }
        switch result {
        case .success(let fd): return DmaBuffer(adopting: UniqueFD(adopting: fd))
        case .failure(let errno): throw explain(errno)
        }
    }

    /// Merges entries where one ends exactly where the next begins in the same memfd. One pass; order kept.
    /// Sums that would overflow are not merged (``check(_:)`` refuses such entries anyway).
    public static func mergeAdjacent(_ ranges: [Range]) -> [Range] {
        var merged: [Range] = []
        merged.reserveCapacity(ranges.count)
        for range in ranges {
            if let last = merged.last, last.memfd == range.memfd,
               case (let end, false) = last.offset.addingReportingOverflow(last.size), end == range.offset,
               case (let size, false) = last.size.addingReportingOverflow(range.size) {
                merged[merged.count - 1].size = size
            } else {
                merged.append(range)
            }
        }
        return merged
    }

    /// A validated piece of a memfd: page-aligned, non-empty, and ending at or below `Int64.max` (file
    /// offsets are `off_t`), so `end` and any sum of up to `Int32.max` extents' sizes cannot overflow a UInt64.
    public struct Extent: Sendable, Hashable {
        public let offset: UInt64
        public let size: UInt64
        /// `offset + size`; cannot overflow (checked when made).
        public var end: UInt64 { offset + size }

        /// Checks a caller's `offset` and `size`.
        /// - Throws: ``DmaBufError`` EINVAL for an unaligned offset or a size that is not a positive
        ///   multiple of the page size; EOVERFLOW when the range ends past `Int64.max`.
        public init(offset: UInt64, size: UInt64) throws {
            let page = UInt64(pageSize)
            if offset % page != 0 {
                throw DmaBufError("udmabuf", .invalidArgument, "offset \(offset) is not page-aligned", fix: "use multiples of \(page) bytes")
            }
            if size % page != 0 || size == 0 {
                throw DmaBufError(
                    "udmabuf", .invalidArgument, "size \(size) is not a positive multiple of the page size",
                    fix: "use multiples of \(page) bytes")
            }
            let (end, overflow) = offset.addingReportingOverflow(size)
            if overflow || end > UInt64(Int64.max) {
                throw DmaBufError(
                    "udmabuf", .overflow, "range of \(size) bytes at offset \(offset) ends past the largest file offset (2^63-1)",
                    fix: "offsets and sizes must describe bytes inside the memfd")
            }
            self.offset = offset
            self.size = size
        }
    }

    /// Validates a caller's list of (offset, size) pieces once, at the boundary: each one an ``Extent``,
    /// at least one and at most `maximumCount`, and their total no more than `maximumTotal`.
    /// Returns the extents and their total, which later arithmetic can use without overflow checks.
    /// - Throws: ``DmaBufError`` EINVAL for an empty or too long list or a bad piece, EOVERFLOW when a
    ///   piece or the total does not fit (`maximumTotal` is at most `Int64.max`).
    public static func extents(
        _ pieces: [(offset: UInt64, size: UInt64)], maximumCount: Int = Int(Int32.max), maximumTotal: UInt64 = UInt64(Int64.max)
    ) throws -> (extents: [Extent], total: UInt64) {
        guard !pieces.isEmpty else {
            throw DmaBufError("udmabuf", .invalidArgument, "the list of ranges is empty", fix: "give at least one range")
        }
        guard pieces.count <= maximumCount else {
            throw DmaBufError("udmabuf", .invalidArgument, "\(pieces.count) ranges are more than \(maximumCount)", fix: "merge adjacent ranges")
        }
        let limit = min(maximumTotal, UInt64(Int64.max))
        var extents: [Extent] = []
        extents.reserveCapacity(pieces.count)
        var total: UInt64 = 0
        for piece in pieces {
            let extent = try Extent(offset: piece.offset, size: piece.size)
            // Both are at most Int64.max, so the sum fits a UInt64; compare before keeping it.
            total += extent.size
            if total > limit {
                throw DmaBufError(
                    "udmabuf", .overflow, "the ranges add up to more than \(limit) bytes",
                    fix: "ask for less in one buffer")
            }
            extents.append(extent)
        }
        return (extents, total)
    }

    /// The checks the kernel makes, done first so the error can say which one failed and how to fix it.
    /// Every sum is overflow-checked: offsets and sizes come from callers (and, through dmabufd, clients).
    func check(_ ranges: [Range]) throws {
        if ranges.count > limits.listLimit {
            throw DmaBufError(
                "udmabuf", .invalidArgument, "\(ranges.count) list entries exceed the module's list_limit=\(limits.listLimit)",
                fix: "merge adjacent ranges, or raise /sys/module/udmabuf/parameters/list_limit")
        }
        let sizeLimit = UInt64(clamping: limits.sizeLimitBytes)
        let (_, total) = try UDmabuf.extents(ranges.map { ($0.offset, $0.size) }, maximumTotal: UInt64(Int64.max))
        for range in ranges {
            try checkMemfd(range)
        }
        if total > sizeLimit {
            throw DmaBufError(
                "udmabuf", .invalidArgument,
                "\(ByteCount(Int(total))) exceeds the module's size_limit_mb=\(limits.sizeLimitMB)",
                fix: "ask for less, or raise /sys/module/udmabuf/parameters/size_limit_mb")
        }
    }

    /// One entry's memfd: a memfd at all, its seals, and the range inside it. The range is already an
    /// ``Extent``, so `offset + size` cannot overflow.
    private func checkMemfd(_ range: Range) throws {
        let memfd = Memfd(shared: SharedFD(adopting: try Sys.dup(range.memfd).get(or: "udmabuf", "cannot dup fd \(range.memfd.rawValue)")))
        let seals: Memfd.Seals
        do {
            seals = try memfd.seals()
        } catch {
            throw DmaBufError(
                "udmabuf", .badFileDescriptorState, "fd \(range.memfd.rawValue) is not a memfd",
                fix: "create the memory with memfd_create(MFD_ALLOW_SEALING)")
        }
        if !seals.contains(.shrink) {
            throw DmaBufError(
                "udmabuf", .invalidArgument, "memfd lacks F_SEAL_SHRINK",
                fix: "create it with MFD_ALLOW_SEALING and add F_SEAL_SHRINK")
        }
        if !seals.isDisjoint(with: [.write, .futureWrite]) {
            throw DmaBufError(
                "udmabuf", .invalidArgument, "memfd has F_SEAL_WRITE or F_SEAL_FUTURE_WRITE",
                fix: "udmabuf needs writable memory: create a memfd without write seals")
        }
        let fileSize = UInt64(clamping: try memfd.size())
        let end = range.offset + range.size
        if end > fileSize {
            throw DmaBufError(
                "udmabuf", .invalidArgument,
                "range [\(range.offset), \(end)) ends past the memfd's \(ByteCount(Int(fileSize)))",
                fix: "ftruncate the memfd to cover the range first")
        }
    }

    private func explain(_ errno: Errno) -> DmaBufError {
        switch errno {
        case .badFileDescriptorState:
            DmaBufError("udmabuf", errno, "a list entry is not a shmem or hugetlbfs memfd", fix: "use memfd_create")
        case .noMemory:
            DmaBufError("udmabuf", errno, "cannot pin the memfd's pages", fix: "free memory or ask for less")
        default:
            DmaBufError("udmabuf", errno, "the kernel refused the request")
        }
    }
}

/// The system page size.
public let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

func readInteger(_ path: String) -> Int? {
    guard let text = try? SmallFiles.read(path) else { return nil }
    return Int(text.trimmingSpaces())
}
