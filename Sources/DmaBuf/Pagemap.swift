import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// `/proc/<pid>/pagemap`: one 64-bit entry per virtual page (Documentation/admin-guide/mm/pagemap.rst).
///
/// Physical frame numbers are visible only to CAP_SYS_ADMIN since Linux 4.0; other readers see PFN 0.
/// Heap and udmabuf mappings are `VM_PFNMAP`, so pagemap shows nothing for them: read the PFNs of a
/// udmabuf through a mapping of the memfd behind it instead.
public enum Pagemap {
    /// One pagemap entry.
    public struct Entry: Sendable, Hashable {
        public var rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }

        /// Bit 63: the page is present in RAM.
        public var isPresent: Bool { rawValue & (1 << 63) != 0 }
        /// Bit 62: the page is swapped out.
        public var isSwapped: Bool { rawValue & (1 << 62) != 0 }
        /// Bit 61: file-backed or shared-anonymous page.
        public var isFileOrShared: Bool { rawValue & (1 << 61) != 0 }
        /// Bit 56: mapped exclusively.
        public var isExclusive: Bool { rawValue & (1 << 56) != 0 }
        /// Bit 55: soft-dirty.
        public var isSoftDirty: Bool { rawValue & (1 << 55) != 0 }
        /// Bits 0–54: the PFN when present (0 without CAP_SYS_ADMIN).
        public var pfn: UInt64? { isPresent && !isSwapped ? rawValue & ((1 << 55) - 1) : nil }
    }

    /// Faults every page of `mapping` in, so pagemap shows it present. Reading the pages from Swift is not
    /// enough: the optimiser drops loads whose values go unused, and release builds then saw no pages.
    /// `MADV_POPULATE_READ` (Linux 5.14) asks the kernel instead; `mlock` populates on older kernels.
    static func populate(_ mapping: UnsafeRawBufferPointer, pageSize page: Int) {
        guard let base = mapping.baseAddress, mapping.count > 0 else { return }
        let madvPopulateRead: CInt = 22
        if madvise(UnsafeMutableRawPointer(mutating: base), mapping.count, madvPopulateRead) == 0 { return }
        if mlock(base, mapping.count) == 0 {
            munlock(base, mapping.count)
        }
    }

    /// Parses little-endian 8-byte entries.
    public static func entries(from bytes: UnsafeRawBufferPointer) -> [Entry] {
        stride(from: 0, to: bytes.count - bytes.count % 8, by: 8).map {
            Entry(rawValue: UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: $0, as: UInt64.self)))
        }
    }

    /// `/proc/self/pagemap` opened early, while the process still had CAP_SYS_ADMIN. The kernel decides
    /// whether to show PFNs by the opener's credentials, so a daemon that drops its capabilities after
    /// opening it keeps reading PFNs through it. Set once at start-up, before any other thread reads it.
    nonisolated(unsafe) private static var opened: FileDescriptor?

    /// Reads this process's pagemap through `descriptor` from now on (it stays open for the process).
    public static func adopt(_ descriptor: CInt) {
        opened = descriptor >= 0 ? FileDescriptor(rawValue: descriptor) : nil
    }

    /// Reads the entries for `count` bytes of this process's address space starting at `address`.
    public static func read(address: UnsafeRawPointer, count: Int, path: String = "/proc/self/pagemap") throws -> [Entry] {
        let page = UInt(pageSize)
        let first = UInt(bitPattern: address) / page
        let last = (UInt(bitPattern: address) + UInt(count) + page - 1) / page
        let fd: FileDescriptor
        let owned: Bool
        if path == "/proc/self/pagemap", let opened {
            fd = opened
            owned = false
        } else {
            do {
                fd = try FileDescriptor.open(path, .readOnly, options: [.closeOnExec], retryOnInterrupt: true)
            } catch let errno as Errno {
                throw DmaBufError("pagemap", errno, "cannot open \(path)")
            }
            owned = true
        }
        defer { if owned { try? fd.close() } }
        var bytes = [UInt8](repeating: 0, count: Int(last - first) * 8)
        var done = 0
        while done < bytes.count {
            let n = try bytes.withUnsafeMutableBytes { raw in
                try Sys.pread(fd, UnsafeMutableRawBufferPointer(rebasing: raw[done...]), Int64(first * 8) + Int64(done))
                    .get(or: "pagemap", "read of \(path) failed")
            }
            if n == 0 { break }
            done += n
        }
        return bytes.withUnsafeBytes { entries(from: UnsafeRawBufferPointer(rebasing: $0[0..<done])) }
    }
}

extension PageRuns {
    /// Physical PFN runs of a mapping, read from `/proc/self/pagemap` in one pass. Pages are touched
    /// (read) first so they are present.
    ///
    /// Needs CAP_SYS_ADMIN: without it the kernel reports every PFN as 0. Works for memfd (shmem,
    /// hugetlbfs) mappings; heap and udmabuf mappings are VM_PFNMAP and have no pagemap PFNs.
    /// - Throws: ``DmaBufError`` EPERM when the PFNs read as 0, ENODATA when a page is not present.
    public init(physicalPagesOf mapping: UnsafeRawBufferPointer) throws {
        self.init()
        let page = pageSize
        Pagemap.populate(mapping, pageSize: page)
        let entries = try Pagemap.read(address: mapping.baseAddress!, count: mapping.count)
        for (index, entry) in entries.enumerated() {
            guard let pfn = entry.pfn else {
                throw DmaBufError(
                    "pagemap", .init(rawValue: 61), "page \(index) of the mapping is not present",
                    fix: "map a memfd, not a dma-buf (dma-buf mappings are VM_PFNMAP)")
            }
            if pfn == 0 {
                throw DmaBufError(
                    "pagemap", .notPermitted, "PFNs read as 0: physical addresses are hidden",
                    fix: "run with CAP_SYS_ADMIN (the kernel hides PFNs from others since Linux 4.0)")
            }
            append(start: pfn, pages: 1)
        }
    }
}
