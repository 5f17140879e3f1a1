import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Which way the CPU touches a buffer: the direction bits of `DMA_BUF_IOCTL_SYNC` and of fence export/import.
/// The one access vocabulary (``AccessMode``, in DmaBufTypes) under the name this layer has always used.
public typealias CPUAccess = AccessMode

extension AccessMode {
    var syncBits: UInt64 {
        switch self {
        case .read: CDmaBuf_DMA_BUF_SYNC_READ
        case .write: CDmaBuf_DMA_BUF_SYNC_WRITE
        case .readWrite: CDmaBuf_DMA_BUF_SYNC_READ | CDmaBuf_DMA_BUF_SYNC_WRITE
        }
    }
}

/// A dma-buf: memory exported by a kernel driver (a dma-heap, udmabuf, a GPU) as a file descriptor.
///
/// The descriptor is held in a ``SharedFD``: copies of a `DmaBuffer` share it, and the last copy to go away
/// closes it. The memory itself lives until every descriptor and every device mapping of it is gone.
public struct DmaBuffer: Sendable {
    /// The dma-buf's descriptor. Closed by `SharedFD` when the last owner drops it.
    public let fd: SharedFD

    /// Wraps a descriptor already known to be a dma-buf. The buffer now owns (and eventually closes) it.
    public init(adopting fd: consuming UniqueFD) {
        self.fd = fd.shared()
    }

    /// Wraps a shared descriptor already known to be a dma-buf.
    public init(shared fd: SharedFD) {
        self.fd = fd
    }

    /// Checks that `fd` really is a dma-buf (its fdinfo names an exporter) before wrapping it.
    /// - Throws: ``DmaBufError`` with EBADF when the descriptor is not a dma-buf.
    public init(checking fd: SharedFD) throws {
        let info = try FdInfo.read(fd.descriptor)
        guard info.exporter != nil else {
            throw DmaBufError(
                "dma-buf", .badFileDescriptor, "fd \(fd.descriptor.rawValue) is not a dma-buf",
                fix: "pass a descriptor from a dma-heap, udmabuf or a driver's PRIME export")
        }
        self.fd = fd
    }

    /// The buffer's size in bytes, from `lseek(SEEK_END)` (dma-bufs support only that seek).
    public func size() throws -> Int {
        let end = try Sys.lseek(fd.descriptor, 0, SEEK_END).get(or: "dma-buf", "cannot read the size of \(fd)")
        _ = Sys.lseek(fd.descriptor, 0, SEEK_SET)
        return Int(end)
    }

    /// The inode of the buffer's file: the same number in every process holding the buffer.
    public func inode() throws -> UInt64 {
        UInt64(try Sys.fstat(fd.descriptor).get(or: "dma-buf", "cannot stat \(fd)").st_ino)
    }

    /// What `/proc/self/fdinfo/<fd>` says: size, exporter, name, and how many file references exist.
    public func info() throws -> FdInfo {
        try FdInfo.read(fd.descriptor)
    }

    /// The longest name `DMA_BUF_SET_NAME` takes, in bytes (DMA_BUF_NAME_LEN less the terminator).
    public static let maximumNameLength = Int(CDmaBuf_DMA_BUF_NAME_LEN) - 1

    /// Names the buffer (`DMA_BUF_SET_NAME`); the name shows in fdinfo and `/sys/kernel/debug/dma_buf`.
    /// - Throws: ``DmaBufError`` EINVAL for a name longer than ``maximumNameLength``; EBUSY from kernels
    ///   before 5.14 when the buffer is attached to a device.
    public func setName(_ name: String) throws {
        guard name.utf8.count <= Self.maximumNameLength else {
            throw DmaBufError(
                "dma-buf", .invalidArgument,
                "name '\(name)' is \(name.utf8.count) bytes, longer than \(Self.maximumNameLength)",
                fix: "shorten it to \(Self.maximumNameLength) bytes")
        }
        var bytes = Array(name.utf8CString)
        try bytes.withUnsafeMutableBytes { raw in
            _ = try Sys.ioctl(fd.descriptor, CDmaBuf_DMA_BUF_SET_NAME, raw.baseAddress).get(
                or: "dma-buf", "DMA_BUF_SET_NAME '\(name)' failed")
        }
    }

    /// Raw `DMA_BUF_IOCTL_SYNC` flags. Prefer ``withCPUAccess(_:_:)``, which pairs START and END.
    public struct SyncFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// `DMA_BUF_SYNC_READ`
        public static let read = SyncFlags(rawValue: CDmaBuf_DMA_BUF_SYNC_READ)
        /// `DMA_BUF_SYNC_WRITE`
        public static let write = SyncFlags(rawValue: CDmaBuf_DMA_BUF_SYNC_WRITE)
        /// `DMA_BUF_SYNC_END` (absent means `DMA_BUF_SYNC_START`)
        public static let end = SyncFlags(rawValue: CDmaBuf_DMA_BUF_SYNC_END)
    }

    /// `DMA_BUF_IOCTL_SYNC` with raw flags.
    /// - Throws: ``DmaBufError`` EINVAL for flags outside `DMA_BUF_SYNC_VALID_FLAGS_MASK` or without a direction.
    public func sync(_ flags: SyncFlags) throws {
        var arg = dma_buf_sync(flags: flags.rawValue)
        let result = withUnsafeMutableBytes(of: &arg) { Sys.ioctl(fd.descriptor, CDmaBuf_DMA_BUF_IOCTL_SYNC, $0.baseAddress) }
        if case .failure(let errno) = result {
            if errno == .invalidArgument {
                throw DmaBufError(
                    "dma-buf", errno, "DMA_BUF_IOCTL_SYNC flags 0x\(String(flags.rawValue, radix: 16)) are invalid",
                    fix: "use READ, WRITE or both, optionally with END")
            }
            throw DmaBufError("dma-buf", errno, "DMA_BUF_IOCTL_SYNC failed on \(fd)")
        }
    }

    /// Runs `body` between `DMA_BUF_IOCTL_SYNC` START and END for `access`, so CPU caches are coherent
    /// with devices for the duration (libcamera's DmaSyncer). END is issued even when `body` throws.
    public func withCPUAccess<R>(_ access: CPUAccess, _ body: () throws -> R) throws -> R {
        try sync(SyncFlags(rawValue: access.syncBits))
        defer { try? sync(SyncFlags(rawValue: access.syncBits).union(.end)) }
        return try body()
    }

    /// Maps the buffer (shared, read-write unless `writable` is false), brackets the access with
    /// START/END, and hands `body` the mapped bytes. The mapping is gone when `body` returns.
    public func withMappedCPUAccess<R>(
        _ access: CPUAccess, _ body: (UnsafeMutableRawBufferPointer) throws -> R
    ) throws -> R {
        let mapping = try map(writable: access != .read)
        return try withCPUAccess(access) { try body(mapping.bytes) }
    }

    /// Maps the whole buffer with `MAP_SHARED`. The mapping is unmapped when the returned value goes away.
    /// - Note: heap and udmabuf mappings are `VM_PFNMAP`: `/proc/self/pagemap` shows no PFNs for them.
    public func map(writable: Bool = true) throws -> Mapping {
        let length = try size()
        let protection = writable ? (PROT_READ | PROT_WRITE) : PROT_READ
        let base = try Sys.mmap(fd.descriptor, length: length, protection: protection, flags: MAP_SHARED, offset: 0)
            .get(or: "dma-buf", "mmap of \(length) bytes failed")
        return Mapping(base: base, count: length)
    }

    /// Exports the buffer's current fences as a sync_file (`DMA_BUF_IOCTL_EXPORT_SYNC_FILE`): for `.read`,
    /// the fences a reader must wait for (writers); for `.write`/`.readWrite`, all fences.
    /// The caller owns the returned sync_file.
    public func exportSyncFile(_ access: CPUAccess) throws -> SyncFile {
        var arg = dma_buf_export_sync_file(flags: UInt32(access.syncBits), fd: -1)
        _ = try withUnsafeMutableBytes(of: &arg) {
            Sys.ioctl(fd.descriptor, CDmaBuf_DMA_BUF_IOCTL_EXPORT_SYNC_FILE, $0.baseAddress)
        }.get(or: "dma-buf", "DMA_BUF_IOCTL_EXPORT_SYNC_FILE failed on \(fd)")
        return SyncFile(adopting: UniqueFD(adopting: arg.fd))
    }

    /// Adds the fences of `syncFile` to the buffer's reservation (`DMA_BUF_IOCTL_IMPORT_SYNC_FILE`), so that
    /// drivers and later exports wait for them: as a write fence for `.write`/`.readWrite`, else as a read fence.
    /// The sync_file stays owned by the caller.
    /// - Throws: ``DmaBufError`` EINVAL when `syncFile` is not a sync_file.
    public func importSyncFile(_ syncFile: SyncFile, access: CPUAccess) throws {
        var arg = dma_buf_import_sync_file(flags: UInt32(access.syncBits), fd: syncFile.fd.descriptor.rawValue)
        let result = withUnsafeMutableBytes(of: &arg) {
            Sys.ioctl(fd.descriptor, CDmaBuf_DMA_BUF_IOCTL_IMPORT_SYNC_FILE, $0.baseAddress)
        }
        if case .failure(let errno) = result {
            if errno == .invalidArgument {
                throw DmaBufError(
                    "dma-buf", errno, "fd \(syncFile.fd.descriptor.rawValue) is not a sync_file",
                    fix: "pass an fd from DMA_BUF_IOCTL_EXPORT_SYNC_FILE, SYNC_IOC_MERGE or a driver's out-fence")
            }
            throw DmaBufError("dma-buf", errno, "DMA_BUF_IOCTL_IMPORT_SYNC_FILE failed on \(fd)")
        }
    }
}

/// A CPU mapping of a buffer. Unmapped (`munmap`) when it goes away; it cannot be copied.
public struct Mapping: ~Copyable, @unchecked Sendable {
    /// The start of the mapping.
    public let base: UnsafeMutableRawPointer
    /// Its length in bytes.
    public let count: Int

    init(base: UnsafeMutableRawPointer, count: Int) {
        self.base = base
        self.count = count
    }

    /// The mapped bytes. Valid only while this `Mapping` lives.
    public var bytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base, count: count)
    }

    deinit {
        Sys.munmap(base, count)
    }
}
