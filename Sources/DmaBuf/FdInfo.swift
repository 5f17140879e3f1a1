import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// What `/proc/<pid>/fdinfo/<fd>` says about a descriptor. dma-bufs add `size`, `count`, `exp_name`, `name`.
///
/// Only part of this text is the kernel's own. `DMA_BUF_SET_NAME` lets anyone holding the buffer set its
/// `name` to any bytes, newlines included, so a name can carry lines that look like `count:` or `size:`.
/// The kernel prints `pos`, `flags`, `mnt_id`, `ino`, `size`, `count` and `exp_name` before the name and
/// the name last (fs/proc/fd.c, then dma_buf_show_fdinfo), so the parser takes the first occurrence of
/// each key, and treats everything after `name:` as the name. Anything else that does not look like what
/// the kernel prints is listed in ``unexpected``: a caller deciding a charge from ``count`` or ``size``
/// must keep the charge when that list is not empty.
public struct FdInfo: Sendable, Hashable {
    /// `pos`
    public var position: Int64 = 0
    /// `flags` (octal in the file): the open file's flags (O_RDWR, O_CLOEXEC, ...).
    public var flags: Int = 0
    /// `mnt_id`
    public var mountID: Int = 0
    /// `ino`
    public var inode: UInt64?
    /// `size`: the dma-buf's size in bytes (never negative).
    public var size: Int?
    /// `count`: file references to the dma-buf, procfs's own temporary one excluded. More than the holder's
    /// own references means someone else (another process, a device import) still holds it.
    /// Always within `0...UInt32.max` when set: a larger number is reported in ``unexpected`` instead.
    public var count: Int?
    /// `exp_name`: the exporter's module (`system` for the system heap, `udmabuf`, `drm` for any GEM driver's
    /// PRIME export, vgem included). Present only for dma-bufs.
    public var exporter: String?
    /// `name`: the name set with `DMA_BUF_SET_NAME`, when set. Client-controlled text: it may hold newlines
    /// and control characters, so never take a fact from it and escape it before printing or storing it.
    public var name: String?
    /// What did not look like the kernel's own output: a key printed twice before the name, a number that
    /// does not parse or is out of range, a dma-buf without `size` or `count`. Empty for every fdinfo a
    /// kernel prints; callers that charge or uncharge from ``count``/``size`` keep the charge otherwise.
    public var unexpected: [String] = []

    public init() {}

    /// The keys the kernel prints before a dma-buf's name, each exactly once, as bits of a `seen` mask.
    private static func keyBit(_ key: String) -> UInt8? {
        switch key {
        case "pos": 1
        case "flags": 2
        case "mnt_id": 4
        case "ino": 8
        case "size": 16
        case "count": 32
        case "exp_name": 64
        default: nil
        }
    }

    /// Parses fdinfo text: the first occurrence of each kernel key counts, unknown keys are ignored,
    /// malformed or out-of-range numbers are left unset and listed in ``unexpected``.
    public init(parsing text: String) {
        self.init(parsing: Array(text.utf8))
    }

    /// Parses fdinfo bytes (see ``init(parsing:)-(String)``). Bytes, not Characters: "\r\n" is one
    /// Character in Swift, and splitting on "\n" would not see it.
    public init<Bytes: RandomAccessCollection<UInt8>>(parsing bytes: Bytes) where Bytes.Index == Int {
        var seen: UInt8 = 0
        var start = bytes.startIndex
        while start < bytes.endIndex {
            let end = bytes[start...].firstIndex(of: UInt8(ascii: "\n")) ?? bytes.endIndex
            defer { start = end + 1 }
            guard let colon = bytes[start..<end].firstIndex(of: UInt8(ascii: ":")) else { continue }
            let key = String(decoding: bytes[start..<colon], as: UTF8.self)
            if key == "name" {
                name = FdInfo.nameValue(bytes[(colon + 1)...])
                break
            }
            guard let bit = FdInfo.keyBit(key) else { continue }
            guard seen & bit == 0 else {
                unexpected.append("'\(key):' printed twice; the first was kept")
                continue
            }
            seen |= bit
            record(key, String(decoding: bytes[(colon + 1)..<end], as: UTF8.self).trimmingSpaces())
        }
        if exporter != nil {
            if size == nil && seen & 16 == 0 { unexpected.append("a dma-buf without 'size:'") }
            if count == nil && seen & 32 == 0 { unexpected.append("a dma-buf without 'count:'") }
        }
    }

    /// Stores one kernel key's value, range-checked.
    private mutating func record(_ key: String, _ value: String) {
        func bad() { unexpected.append("'\(key):' has a malformed or out-of-range value '\(value.prefix(32))'") }
        switch key {
        case "pos": if let v = Int64(value) { position = v } else { bad() }
        case "flags": if let v = Int(value, radix: 8), v >= 0 { flags = v } else { bad() }
        case "mnt_id": if let v = Int(value), v >= 0 { mountID = v } else { bad() }
        case "ino": if let v = UInt64(value) { inode = v } else { bad() }
        case "size": if let v = Int(value), v >= 0 { size = v } else { bad() }
        case "count": if let v = UInt32(value) { count = Int(v) } else { bad() }
        case "exp_name": exporter = value
        default: break
        }
    }

    /// The name: everything after `name:` and the kernel's tab, less the one newline the kernel ends it with.
    private static func nameValue<Bytes: RandomAccessCollection<UInt8>>(_ bytes: Bytes) -> String {
        var value = bytes[...]
        if value.first == UInt8(ascii: "\t") { value = value.dropFirst() }
        if value.last == UInt8(ascii: "\n") { value = value.dropLast() }
        return String(decoding: value, as: UTF8.self)
    }

    /// Reads this process's fdinfo for `fd`.
    public static func read(_ fd: FileDescriptor) throws -> FdInfo {
        try read(path: "/proc/self/fdinfo/\(fd.rawValue)")
    }

    /// Reads an fdinfo file by path (`/proc/<pid>/fdinfo/<fd>`).
    public static func read(path: String) throws -> FdInfo {
        do {
            return FdInfo(parsing: try SmallFiles.read(path))
        } catch let errno as Errno {
            throw DmaBufError("fdinfo", errno, "cannot read \(path)")
        }
    }

    /// Reads this process's fdinfo for `fd` through `directory`, an open `/proc/self/fdinfo`: `openat`,
    /// one `read` (fdinfo is produced whole by one `show`, so a short read is all of it) and `close`.
    /// Nil when unreadable. The daemon reads fdinfo on every release, so this path is kept short.
    public static func read(at directory: CInt, _ fd: FileDescriptor) -> FdInfo? {
        let file = Sys.retrying { openat(directory, String(fd.rawValue), O_RDONLY | O_CLOEXEC) }
        guard case .success(let handle) = file else { return nil }
        defer { Sys.close(handle) }
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 4096) { buffer -> FdInfo? in
            guard case .success(let n) = Sys.retrying({ Glibc.read(handle, buffer.baseAddress, buffer.count) }) else { return nil }
            // A full buffer may have more behind it: read the whole file the slow way (never for a dma-buf).
            if n == buffer.count { return try? FdInfo.read(fd) }
            return FdInfo(parsing: UnsafeBufferPointer(rebasing: buffer[0..<n]))
        }
    }
}
