import CDmaBuf
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A kernel for host tests. "dma-bufs" are memfds named `fake-dmabuf` (real files, so they travel over
/// sockets and count as open files), sync_files are eventfds (readable once written: signalled), and a
/// buffer's reference count is the number of this process's fds open on it — the test client's included,
/// since client and broker share the process.
final class FakeKernel: KernelBackend {
    var heaps = ["system", "linux,cma"]
    var udmabuf = true
    /// Heaps whose allocations fail with this errno.
    var failing: [String: Errno] = [:]
    var available: UInt64? = 1 << 40
    var limits = UDmabuf.Limits(sizeLimitMB: 64, listLimit: 1024)
    private(set) var names: [CInt: String] = [:]
    private(set) var imports = 0
    private(set) var rescans = 0

    func rescan() -> (heaps: [String], udmabuf: Bool) {
        rescans += 1
        return (heaps, udmabuf)
    }

    static func makeBuffer(size: UInt64) throws -> SharedFD {
        let page = UInt64(pageSize)
        return try Memfd(name: "fake-dmabuf", size: Int((size + page - 1) / page * page), seals: []).fd
    }

    func allocate(heap: String, size: UInt64, fdFlags: UInt32, heapFlags: UInt64) throws -> SharedFD {
        guard heaps.contains(heap) else { throw DmaBufError("fake", .noSuchFileOrDirectory, "no heap \(heap)") }
        if let errno = failing[heap] { throw DmaBufError("dma-heap '\(heap)'", errno, "fake failure") }
        return try FakeKernel.makeBuffer(size: size)
    }

    func createUDmabuf(size: UInt64, hugePages: Bool) throws -> DaemonUDmabuf {
        guard udmabuf else { throw DmaBufError("udmabuf", .noSuchFileOrDirectory, "no udmabuf") }
        if let errno = failing["udmabuf"] { throw DmaBufError("udmabuf", errno, "fake failure") }
        let memfd = try Memfd(name: "dmabufd", size: Int(size))
        let rounded = UInt64(try memfd.size())
        return DaemonUDmabuf(buffer: try FakeKernel.makeBuffer(size: rounded), memfd: memfd.fd, size: rounded)
    }

    func createUDmabuf(ranges: [(memfd: SharedFD, offset: UInt64, size: UInt64)]) throws -> SharedFD {
        try FakeKernel.makeBuffer(size: ranges.reduce(0) { $0 + $1.size })
    }

    func setName(_ buffer: SharedFD, _ name: String) throws { names[buffer.descriptor.rawValue] = name }

    func facts(_ buffer: SharedFD) throws -> BufferFacts {
        var st = stat()
        guard fstat(buffer.descriptor.rawValue, &st) == 0 else { throw DmaBufError("fake", Errno(rawValue: errno), "fstat") }
        return BufferFacts(size: UInt64(st.st_size), inode: UInt64(st.st_ino))
    }

    /// fds of this process open on the buffer's file: same device and inode (one fstat per fd, no
    /// readlink: the request-handling fuzzer calls this on every free).
    func referenceCount(_ buffer: SharedFD) -> Int? { referenceCounts([buffer])[0] }

    /// ``referenceCount(_:)`` for a page of buffers from one pass over the fds (a `list` asks for up to 256).
    func referenceCounts(_ buffers: [SharedFD]) -> [Int?] {
        struct File: Hashable { let device: UInt64, inode: UInt64 }
        func file(_ fd: CInt) -> File? {
            var st = stat()
            return fstat(fd, &st) == 0 ? File(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)) : nil
        }
        let targets = buffers.map { file($0.descriptor.rawValue) }
        guard targets.contains(where: { $0 != nil }) else { return targets.map { _ in nil } }
        var counts: [File: Int] = [:]
        for target in targets.compactMap({ $0 }) { counts[target] = 0 }
        FakeKernel.forEachOpenFD { fd in
            if let open = file(fd), let count = counts[open] { counts[open] = count + 1 }
        }
        return targets.map { $0.flatMap { counts[$0] } }
    }

    func exporter(_ buffer: SharedFD) -> String? { kind(of: buffer) == .dmaBuf ? "fake" : nil }

    func kind(of fd: SharedFD) -> FdKind {
        let target = link(fd.descriptor.rawValue)
        if target.hasPrefix("/memfd:fake-dmabuf") { return .dmaBuf }
        if target == "anon_inode:[eventfd]" { return .syncFile }
        return identifyFdKind(fd.descriptor)
    }

    func importFence(_ fence: SharedFD, into buffer: SharedFD, write: Bool) throws { imports += 1 }

    /// Merged fences made while some input was pending. A real merged sync_file signals when its inputs
    /// do; this fake one does not know its inputs, so whoever signals every fence must signal these too.
    /// Kept open until ``signalMerges()`` (the copy a reply carries is another fd on the same file, so
    /// only a reference of its own lets the fake signal it); BrokerHarness calls it before counting fds.
    private(set) var pendingMerges: [FakeFence] = []

    func mergeFences(_ fences: [SharedFD]) throws -> SharedFD? {
        guard !fences.isEmpty else { return nil }
        let merged = FakeFence()
        if fences.allSatisfy(FakeFence.isSignaled) { merged.signal() } else { pendingMerges.append(merged) }
        return merged.fd
    }

    /// Signals every merged fence made so far (their inputs have been signalled) and lets go of them.
    func signalMerges() {
        pendingMerges.forEach { $0.signal() }
        pendingMerges.removeAll()
    }

    func physicalRuns(memfd: SharedFD, pages: PageRuns) throws -> PageRuns {
        PageRuns(runs: pages.map { PageRun(start: $0.start + 1000, pages: $0.pages) })
    }

    func memAvailable() -> UInt64? { available }
    func udmabufLimits() -> UDmabuf.Limits { limits }
    func heapTotals(kind: String) -> (total: UInt64, free: UInt64) { kind == "cma" ? (64 << 20, 32 << 20) : (0, 0) }
    var accounting = false
    func memAccounting() -> Bool { accounting }
    /// Pool refills run on another thread: made without touching this object's state.
    func heapAllocator() -> HeapAllocator? { { _, size in try FakeKernel.makeBuffer(size: size) } }

    // MARK: - fd helpers

    func link(_ fd: CInt) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/\(fd)", &buffer, 255)
        return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
    }

    static func inode(of fd: CInt) -> UInt64? {
        var st = stat()
        return fstat(fd, &st) == 0 ? UInt64(st.st_ino) : nil
    }

    static func openFDs() -> [CInt] {
        var fds: [CInt] = []
        forEachOpenFD { fds.append($0) }
        return fds
    }

    /// Calls `body` with every fd of this process but the one listing /proc/self/fd, read with readdir
    /// and parsed in place: no String per entry (the fuzzer lists the fds two or more times per input).
    static func forEachOpenFD(_ body: (CInt) -> Void) {
        guard let dir = opendir("/proc/self/fd") else { return }
        defer { closedir(dir) }
        let own = dirfd(dir)
        while let entry = readdir(dir) {
            let fd: CInt? = withUnsafeBytes(of: entry.pointee.d_name) { name in
                var value: CInt = 0
                for byte in name {
                    if byte == 0 { break }
                    guard byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") else { return nil }
                    value = value * 10 + CInt(byte - UInt8(ascii: "0"))
                }
                return name.first == 0 ? nil : value
            }
            if let fd, fd != own { body(fd) }
        }
    }
}


/// A fake sync_file: an eventfd, signalled by writing to it.
struct FakeFence {
    let fd: SharedFD
    init() { fd = SharedFD(adopting: eventfd(0, CInt(EFD_CLOEXEC | EFD_NONBLOCK))) }
    func signal() {
        var one: UInt64 = 1
        _ = write(fd.descriptor.rawValue, &one, 8)
    }
    static func isSignaled(_ fd: SharedFD) -> Bool {
        var p = pollfd(fd: fd.descriptor.rawValue, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) == 1
    }
}
