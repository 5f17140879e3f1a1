import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// An anonymous shared-memory file from `memfd_create(2)`: the memory behind a udmabuf.
///
/// Copies share the descriptor, which is closed when the last copy goes.
public struct Memfd: Sendable {
    /// The memfd's descriptor. Closed by `SharedFD`.
    public let fd: SharedFD

    /// Flags for `memfd_create`.
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// `MFD_CLOEXEC`
        public static let closeOnExec = Flags(rawValue: CDmaBuf_MFD_CLOEXEC)
        /// `MFD_ALLOW_SEALING`: required for udmabuf, which needs `F_SEAL_SHRINK`.
        public static let allowSealing = Flags(rawValue: CDmaBuf_MFD_ALLOW_SEALING)
        /// `MFD_HUGETLB`: back the file with huge pages (reserve them in `/proc/sys/vm/nr_hugepages`).
        public static let hugeTLB = Flags(rawValue: CDmaBuf_MFD_HUGETLB)
    }

    /// File seals (`F_ADD_SEALS`/`F_GET_SEALS`).
    public struct Seals: OptionSet, Sendable, Hashable {
        public let rawValue: CInt
        public init(rawValue: CInt) { self.rawValue = rawValue }
        /// `F_SEAL_SEAL`: no more seals can be added.
        public static let seal = Seals(rawValue: CDmaBuf_F_SEAL_SEAL)
        /// `F_SEAL_SHRINK`: the file cannot shrink. udmabuf requires it.
        public static let shrink = Seals(rawValue: CDmaBuf_F_SEAL_SHRINK)
        /// `F_SEAL_GROW`: the file cannot grow.
        public static let grow = Seals(rawValue: CDmaBuf_F_SEAL_GROW)
        /// `F_SEAL_WRITE`: no writes. udmabuf refuses it.
        public static let write = Seals(rawValue: CDmaBuf_F_SEAL_WRITE)
        /// `F_SEAL_FUTURE_WRITE`: no new writable mappings. udmabuf refuses it.
        public static let futureWrite = Seals(rawValue: CDmaBuf_F_SEAL_FUTURE_WRITE)
    }

    /// Creates a memfd of `size` bytes, adding `seals` after sizing it.
    /// - Parameters:
    ///   - name: shown in `/proc/*/fd` links as `memfd:<name>`.
    ///   - size: the length to `ftruncate` to; for `.hugeTLB`, a multiple of the huge page size.
    ///   - flags: `memfd_create` flags; sealing is allowed by default so the result can back a udmabuf.
    ///   - seals: seals to add once sized; `F_SEAL_SHRINK` by default, as udmabuf needs.
    /// - Throws: ``DmaBufError`` from `memfd_create`, `ftruncate` (ENOSPC/ENOMEM: no huge pages reserved)
    ///   or `F_ADD_SEALS`.
    public init(name: String, size: Int, flags: Flags = [.closeOnExec, .allowSealing], seals: Seals = [.shrink]) throws {
        let raw = try Sys.memfdCreate(name, flags.rawValue).get(or: "memfd", "memfd_create('\(name)') failed")
        self.fd = SharedFD(adopting: raw)
        if case .failure(let errno) = Sys.ftruncate(fd.descriptor, Int64(size)) {
            throw DmaBufError(
                "memfd", errno, "cannot size '\(name)' to \(ByteCount(size))",
                fix: flags.contains(.hugeTLB) ? "reserve huge pages (/proc/sys/vm/nr_hugepages) and use a multiple of the huge page size" : nil)
        }
        if !seals.isEmpty { try addSeals(seals) }
    }

    /// Wraps an existing descriptor (which may not be a memfd at all: udmabuf checks that).
    public init(shared fd: SharedFD) {
        self.fd = fd
    }

    /// The current seals (`F_GET_SEALS`).
    /// - Throws: ``DmaBufError`` EINVAL when the descriptor is not a memfd/shmem file.
    public func seals() throws -> Seals {
        Seals(rawValue: try Sys.fcntl(fd.descriptor, CDmaBuf_F_GET_SEALS).get(or: "memfd", "F_GET_SEALS failed"))
    }

    /// Adds seals (`F_ADD_SEALS`).
    /// - Throws: ``DmaBufError`` EPERM when `F_SEAL_SEAL` is set (or the memfd lacks `MFD_ALLOW_SEALING`),
    ///   EBUSY for `F_SEAL_WRITE` while writable mappings exist.
    public func addSeals(_ seals: Seals) throws {
        if case .failure(let errno) = Sys.fcntl(fd.descriptor, CDmaBuf_F_ADD_SEALS, seals.rawValue) {
            throw DmaBufError(
                "memfd", errno, "cannot add seals 0x\(String(seals.rawValue, radix: 16))",
                fix: errno == .notPermitted ? "create the memfd with MFD_ALLOW_SEALING" : nil)
        }
    }

    /// The file's size in bytes.
    public func size() throws -> Int {
        Int(try Sys.fstat(fd.descriptor).get(or: "memfd", "fstat failed").st_size)
    }

    /// Maps exactly one validated extent (no more of the file: a sparse memfd stays sparse).
    /// The extent's offset and size fit `Int` by construction, so no conversion here can trap.
    public func map(_ extent: UDmabuf.Extent, writable: Bool = true, reserve: Bool = true) throws -> Mapping {
        try map(offset: Int(extent.offset), length: Int(extent.size), writable: writable, reserve: reserve)
    }

    /// Maps `length` bytes at `offset` shared (`MAP_SHARED`). Unmapped when the result goes away.
    /// - Parameters:
    ///   - writable: `PROT_WRITE` as well as `PROT_READ`.
    ///   - reserve: false adds `MAP_NORESERVE`, so mapping hugetlb pages that already exist does not
    ///     reserve more huge pages (reading PFNs of a pinned memfd).
    public func map(offset: Int = 0, length: Int, writable: Bool = true, reserve: Bool = true) throws -> Mapping {
        let protection = writable ? PROT_READ | PROT_WRITE : PROT_READ
        let flags = reserve ? MAP_SHARED : MAP_SHARED | MAP_NORESERVE
        let base = try Sys.mmap(fd.descriptor, length: length, protection: protection, flags: flags, offset: Int64(offset))
            .get(or: "memfd", "mmap of \(ByteCount(length)) failed")
        return Mapping(base: base, count: length)
    }
}
