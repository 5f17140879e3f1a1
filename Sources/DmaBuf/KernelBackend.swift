import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// What a descriptor is, as far as the broker cares. Found by means that cannot block (see
/// ``KernelBackend/kind(of:)``).
public enum FdKind: Sendable, Equatable {
    case dmaBuf, syncFile, memfd, other
}

/// Facts about a dma-buf the broker records once, when it takes the buffer.
public struct BufferFacts: Sendable, Equatable {
    public var size: UInt64
    public var inode: UInt64
    public init(size: UInt64, inode: UInt64) { self.size = size; self.inode = inode }
}

/// Where a udmabuf the daemon made lives: the daemon's own memfd and the byte ranges of it.
public struct DaemonUDmabuf: Sendable {
    public var buffer: SharedFD
    public var memfd: SharedFD
    public var size: UInt64
    public init(buffer: SharedFD, memfd: SharedFD, size: UInt64) { self.buffer = buffer; self.memfd = memfd; self.size = size }
}

/// Every kernel touch the broker makes, and nothing else: the broker is host-testable against a fake, and
/// the real implementation (``RealKernel``) keeps devices open and caches what is slow to read.
public protocol KernelBackend: AnyObject {
    /// Heap names present now (rescans, reopening devices as needed). Called on hotplug and at start.
    func rescan() -> (heaps: [String], udmabuf: Bool)
    /// `DMA_HEAP_IOCTL_ALLOC` on the (kept open) heap device.
    func allocate(heap: String, size: UInt64, fdFlags: UInt32, heapFlags: UInt64) throws -> SharedFD
    /// A sealed memfd of the daemon's own, turned into a udmabuf.
    func createUDmabuf(size: UInt64, hugePages: Bool) throws -> DaemonUDmabuf
    /// A udmabuf over ranges of clients' memfds (already identified as memfds), each range naming its own.
    func createUDmabuf(ranges: [(memfd: SharedFD, offset: UInt64, size: UInt64)]) throws -> SharedFD
    /// `DMA_BUF_SET_NAME`.
    func setName(_ buffer: SharedFD, _ name: String) throws
    /// Size and inode of a dma-buf the broker holds.
    func facts(_ buffer: SharedFD) throws -> BufferFacts
    /// fdinfo's first `count:` line, range-checked; nil when unreadable or unexpected.
    func referenceCount(_ buffer: SharedFD) -> Int?
    /// ``referenceCount(_:)`` of each: exactly one per buffer, in order (`list` asks for a page at
    /// once; the Linux backend reads fdinfo per buffer, a fake can answer with one pass over its fds).
    func referenceCounts(_ buffers: [SharedFD]) -> [Int?]
    /// fdinfo's first `exp_name:` line.
    func exporter(_ buffer: SharedFD) -> String?
    /// The fd's kind, without touching the file's driver or filesystem.
    func kind(of fd: SharedFD) -> FdKind
    /// `DMA_BUF_IOCTL_IMPORT_SYNC_FILE`.
    func importFence(_ fence: SharedFD, into buffer: SharedFD, write: Bool) throws
    /// `SYNC_IOC_MERGE` of all of them; nil for none.
    func mergeFences(_ fences: [SharedFD]) throws -> SharedFD?
    /// PFN runs of the given page runs of a memfd the daemon made, from a mapping of just those ranges.
    func physicalRuns(memfd: SharedFD, pages: PageRuns) throws -> PageRuns
    /// `MemAvailable`, cached for a short while.
    func memAvailable() -> UInt64?
    /// The udmabuf module limits, cached until the next rescan.
    func udmabufLimits() -> UDmabuf.Limits
    /// Total and free bytes behind a heap of `kind` (`cma`: CmaTotal/CmaFree); 0 when unknown.
    func heapTotals(kind: String) -> (total: UInt64, free: UInt64)
    /// `/sys/module/dma_heap/parameters/mem_accounting` reads Y: the system heap charges memory cgroups.
    func memAccounting() -> Bool
    /// A heap allocation that is safe to call from another thread (the warm pools' refill thread), sharing
    /// no state with the rest of the backend; nil where there is none.
    func heapAllocator() -> HeapAllocator?
}

extension KernelBackend {
    /// One fdinfo read per buffer: the kernel has no batch form.
    public func referenceCounts(_ buffers: [SharedFD]) -> [Int?] { buffers.map(referenceCount) }
}

/// `DMA_HEAP_IOCTL_ALLOC` of `size` bytes (read-write, close-on-exec) on heap `heap`, from any one thread.
public typealias HeapAllocator = @Sendable (_ heap: String, _ size: UInt64) throws -> SharedFD

/// Identifies a descriptor's kind without blocking: the `/proc/self/fd` link names dma-bufs (`/dmabuf:`,
/// their pseudo-filesystem; `anon_inode:dmabuf` on old kernels) and sync_files (`anon_inode:sync_file`)
/// without calling into the file, and `F_GET_SEALS` answers only for shmem/hugetlbfs files, from the
/// file's own flags. Neither reaches a client-chosen filesystem, socket or driver (unlike `fstat` on FUSE
/// or an `ioctl`). A link is path text, so callers confirm a dma-buf with fdinfo's `exp_name` (which no
/// other file has, and which the kernel prints before any client-set name).
public func identifyFdKind(_ fd: FileDescriptor) -> FdKind {
    var buffer = [CChar](repeating: 0, count: 64)
    let n = readlink("/proc/self/fd/\(fd.rawValue)", &buffer, buffer.count - 1)
    if n > 0 {
        let link = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if link == "anon_inode:dmabuf" || link.hasPrefix("/dmabuf:") { return .dmaBuf }
        if link == "anon_inode:sync_file" { return .syncFile }
        if link.hasPrefix("anon_inode:") || link.hasPrefix("socket:") || link.hasPrefix("pipe:") { return .other }
    }
    if case .success = Sys.fcntl(fd, CDmaBuf_F_GET_SEALS) { return .memfd }
    return .other
}

/// The real kernel: heap devices and `/dev/udmabuf` are opened once and kept, reopened on ``rescan()``;
/// udmabuf limits are read on rescan; `MemAvailable` at most every 100 ms.
public final class RealKernel: KernelBackend {
    let heapDirectory: String
    let udmabufDevice: String
    private var heapDevices: [String: FileDescriptor] = [:]
    private var udmabuf: FileDescriptor?
    private var limits = UDmabuf.Limits(sizeLimitMB: 64, listLimit: 1024)
    private var memory: (value: UInt64?, at: ContinuousClock.Instant)?
    private var accounting = false
    /// `/proc/self/fdinfo`, opened once: each fdinfo read is then one `openat` of a number, one `read` and
    /// one `close`, with no walk through `/proc/self`.
    private let fdinfoDirectory: CInt = open("/proc/self/fdinfo", O_RDONLY | O_DIRECTORY | O_CLOEXEC)

    public init(heapDirectory: String = DmaHeap.defaultDirectory, udmabufDevice: String = UDmabuf.defaultDevicePath) {
        self.heapDirectory = heapDirectory
        self.udmabufDevice = udmabufDevice
        _ = rescan()
    }

    deinit {
        closeDevices()
        if fdinfoDirectory >= 0 { Sys.close(fdinfoDirectory) }
    }

    private func closeDevices() {
        for fd in heapDevices.values { Sys.close(fd.rawValue) }
        heapDevices = [:]
        if let udmabuf { Sys.close(udmabuf.rawValue) }
        udmabuf = nil
    }

    public func rescan() -> (heaps: [String], udmabuf: Bool) {
        closeDevices()
        for name in DmaHeap.available(in: heapDirectory) {
            if let fd = try? FileDescriptor.open(heapDirectory + "/" + name, .readOnly, options: [.closeOnExec], retryOnInterrupt: true) {
                heapDevices[name] = fd
            }
        }
        udmabuf = try? FileDescriptor.open(udmabufDevice, .readWrite, options: [.closeOnExec], retryOnInterrupt: true)
        limits = UDmabuf.Limits.current()
        accounting = (try? SmallFiles.read("/sys/module/dma_heap/parameters/mem_accounting"))?.hasPrefix("Y") ?? false
        return (heapDevices.keys.sorted(), udmabuf != nil)
    }

    public func allocate(heap: String, size: UInt64, fdFlags: UInt32, heapFlags: UInt64) throws -> SharedFD {
        guard let device = heapDevices[heap] else {
            throw DmaBufError("dma-heap", .noSuchFileOrDirectory, "no heap named '\(heap)' in \(heapDirectory)")
        }
        var data = dma_heap_allocation_data(len: size, fd: 0, fd_flags: fdFlags, heap_flags: heapFlags)
        _ = try withUnsafeMutableBytes(of: &data) { Sys.ioctl(device, CDmaBuf_DMA_HEAP_IOCTL_ALLOC, $0.baseAddress) }
            .get(or: "dma-heap '\(heap)'", "DMA_HEAP_IOCTL_ALLOC of \(ByteCount(Int(clamping: size))) failed")
        return SharedFD(adopting: CInt(bitPattern: data.fd))
    }

    private func device() throws -> FileDescriptor {
        guard let udmabuf else {
            throw DmaBufError("udmabuf", .noSuchFileOrDirectory, "cannot open \(udmabufDevice)", fix: "this kernel lacks CONFIG_UDMABUF (or `modprobe udmabuf`)")
        }
        return udmabuf
    }

    public func createUDmabuf(size: UInt64, hugePages: Bool) throws -> DaemonUDmabuf {
        let unit = UInt64(hugePages ? 2 << 20 : pageSize)
        let (sum, overflow) = size.addingReportingOverflow(unit - 1)
        guard !overflow, sum / unit * unit <= UInt64(Int.max) else { throw DmaBufError("udmabuf", .overflow, "size \(size) overflows") }
        let rounded = sum / unit * unit
        let memfd = try Memfd(name: "dmabufd", size: Int(rounded),
                              flags: hugePages ? [.closeOnExec, .allowSealing, .hugeTLB] : [.closeOnExec, .allowSealing], seals: [.shrink])
        let buffer = try create(items: [udmabuf_create_item(memfd: UInt32(bitPattern: memfd.fd.descriptor.rawValue), __pad: 0, offset: 0, size: rounded)])
        return DaemonUDmabuf(buffer: buffer, memfd: memfd.fd, size: rounded)
    }

    public func createUDmabuf(ranges: [(memfd: SharedFD, offset: UInt64, size: UInt64)]) throws -> SharedFD {
        let items = ranges.map { udmabuf_create_item(memfd: UInt32(bitPattern: $0.memfd.descriptor.rawValue), __pad: 0, offset: $0.offset, size: $0.size) }
        return try create(items: items)
    }

    private func create(items: [udmabuf_create_item]) throws -> SharedFD {
        let device = try device()
        let result = Sys.retrying {
            items.withUnsafeBufferPointer {
                CDmaBuf_udmabuf_create_list(device.rawValue, UInt32(UDMABUF_FLAGS_CLOEXEC), $0.baseAddress, UInt32($0.count))
            }
        }
        switch result {
        case .success(let fd): return SharedFD(adopting: fd)
        case .failure(let errno):
            throw DmaBufError("udmabuf", errno, "UDMABUF_CREATE_LIST of \(items.count) ranges failed",
                              fix: "ranges must be page-aligned and inside the memfd, which needs F_SEAL_SHRINK and no write seal; the module's size_limit_mb and list_limit bound them")
        }
    }

    public func setName(_ buffer: SharedFD, _ name: String) throws {
        try DmaBuffer(shared: buffer).setName(name)
    }

    /// One `fstat`: a dma-buf's inode carries its size (`dma_buf_getfile` sets `i_size`), so no `lseek`s.
    public func facts(_ buffer: SharedFD) throws -> BufferFacts {
        let st = try Sys.fstat(buffer.descriptor).get(or: "dma-buf", "cannot stat \(buffer)")
        guard st.st_size >= 0 else { throw DmaBufError("dma-buf", .invalidArgument, "\(buffer) reports a negative size") }
        return BufferFacts(size: UInt64(st.st_size), inode: UInt64(st.st_ino))
    }

    /// This process's fdinfo for `fd`, parsed by ``FdInfo`` (which trusts nothing after `name:`); nil when
    /// unreadable.
    private func fdinfo(_ fd: SharedFD) -> FdInfo? {
        guard fdinfoDirectory >= 0 else { return try? FdInfo.read(fd.descriptor) }
        return FdInfo.read(at: fdinfoDirectory, fd.descriptor)
    }

    /// Unknown (nil) unless fdinfo looked exactly like the kernel's: a caller deciding a charge keeps it then.
    public func referenceCount(_ buffer: SharedFD) -> Int? {
        guard let info = fdinfo(buffer), info.unexpected.isEmpty else { return nil }
        return info.count
    }

    public func exporter(_ buffer: SharedFD) -> String? { fdinfo(buffer)?.exporter }
    public func kind(of fd: SharedFD) -> FdKind {
        let kind = identifyFdKind(fd.descriptor)
        // Confirmed from fdinfo: reading it does not call into the file's filesystem or driver.
        if kind == .dmaBuf && exporter(fd) == nil { return .other }
        return kind
    }

    public func importFence(_ fence: SharedFD, into buffer: SharedFD, write: Bool) throws {
        try DmaBuffer(shared: buffer).importSyncFile(SyncFile(shared: fence), access: write ? .write : .read)
    }

    public func mergeFences(_ fences: [SharedFD]) throws -> SharedFD? {
        try SyncFile.merge(fences.map { SyncFile(shared: $0) }, name: "dmabufd-access")?.fd
    }

    public func physicalRuns(memfd: SharedFD, pages runs: PageRuns) throws -> PageRuns {
        // Map just the buffer's ranges, read-only and MAP_NORESERVE: the pages are pinned by udmabuf, and a
        // mapping of the whole (possibly sparse) memfd would populate pages the buffer does not have.
        let file = Memfd(shared: memfd)
        var physical = PageRuns()
        for run in runs {
            let mapping = try file.map(offset: Int(run.start) * pageSize, length: Int(run.pages) * pageSize, writable: false, reserve: false)
            for pfn in try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapping.bytes)) { physical.append(start: pfn.start, pages: pfn.pages) }
        }
        return physical
    }

    public func memAvailable() -> UInt64? {
        let now = ContinuousClock.now
        if let memory, now - memory.at < .milliseconds(100) { return memory.value }
        let value = (try? SmallFiles.read("/proc/meminfo")).flatMap { meminfoField($0, "MemAvailable:") }
        memory = (value, now)
        return value
    }

    public func udmabufLimits() -> UDmabuf.Limits { limits }

    public func heapTotals(kind: String) -> (total: UInt64, free: UInt64) {
        guard kind == "cma", let text = try? SmallFiles.read("/proc/meminfo") else { return (0, 0) }
        return (meminfoField(text, "CmaTotal:") ?? 0, meminfoField(text, "CmaFree:") ?? 0)
    }

    /// Read on ``rescan()`` (start, hotplug, reload), not per request.
    public func memAccounting() -> Bool { accounting }

    /// Opens each heap device it is asked for once, on the calling thread, and keeps it: its own
    /// descriptors, so it never races ``rescan()``.
    public func heapAllocator() -> HeapAllocator? {
        let devices = HeapDevices(directory: heapDirectory)
        return { heap, size in try devices.allocate(heap: heap, size: size) }
    }
}

/// Heap devices of one thread (the pool refill thread): not shared, so no lock.
private final class HeapDevices: @unchecked Sendable {
    let directory: String
    private var open: [String: FileDescriptor] = [:]
    init(directory: String) { self.directory = directory }
    deinit { for fd in open.values { Sys.close(fd.rawValue) } }

    func allocate(heap: String, size: UInt64) throws -> SharedFD {
        let device: FileDescriptor
        if let known = open[heap] {
            device = known
        } else {
            guard !heap.contains("/") else { throw DmaBufError("dma-heap", .invalidArgument, "bad heap name '\(heap)'") }
            device = try FileDescriptor.open(directory + "/" + heap, .readOnly, options: [.closeOnExec], retryOnInterrupt: true)
            open[heap] = device
        }
        var data = dma_heap_allocation_data(len: size, fd: 0, fd_flags: UInt32(O_RDWR | O_CLOEXEC), heap_flags: 0)
        _ = try withUnsafeMutableBytes(of: &data) { Sys.ioctl(device, CDmaBuf_DMA_HEAP_IOCTL_ALLOC, $0.baseAddress) }
            .get(or: "dma-heap '\(heap)'", "DMA_HEAP_IOCTL_ALLOC of \(ByteCount(Int(clamping: size))) for a warm pool failed")
        return SharedFD(adopting: CInt(bitPattern: data.fd))
    }
}

/// A `Key: N kB` field of /proc/meminfo text, in bytes.
public func meminfoField(_ text: String, _ key: String) -> UInt64? {
    for line in text.split(separator: "\n") where line.hasPrefix(key) {
        let digits = line.dropFirst(key.count).drop { $0 == " " }.prefix { $0.isNumber }
        guard let kb = UInt64(digits) else { return nil }
        let (bytes, overflow) = kb.multipliedReportingOverflow(by: 1024)
        return overflow ? nil : bytes
    }
    return nil
}
