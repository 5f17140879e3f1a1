import SystemPackage

/// What `/proc/<pid>/fdinfo/<fd>` says about a descriptor. dma-bufs add `size`, `count`, `exp_name`, `name`.
public struct FdInfo: Sendable, Hashable {
    /// `pos`
    public var position: Int64 = 0
    /// `flags` (octal in the file): the open file's flags (O_RDWR, O_CLOEXEC, ...).
    public var flags: Int = 0
    /// `mnt_id`
    public var mountID: Int = 0
    /// `ino`
    public var inode: UInt64?
    /// `size`: the dma-buf's size in bytes.
    public var size: Int?
    /// `count`: file references to the dma-buf, procfs's own temporary one excluded. More than the holder's
    /// own references means someone else (another process, a device import) still holds it.
    public var count: Int?
    /// `exp_name`: the exporter's module (`system` for the system heap, `udmabuf`, `drm` for any GEM driver's
    /// PRIME export, vgem included). Present only for dma-bufs.
    public var exporter: String?
    /// `name`: the name set with `DMA_BUF_SET_NAME`, when set.
    public var name: String?

    public init() {}

    /// Parses fdinfo text; unknown keys are ignored and malformed numbers are left unset.
    public init(parsing text: String) {
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let key = line[..<colon]
            let value = line[line.index(after: colon)...].trimmingSpaces()
            switch key {
            case "pos": position = Int64(value) ?? 0
            case "flags": flags = Int(value, radix: 8) ?? 0
            case "mnt_id": mountID = Int(value) ?? 0
            case "ino": inode = UInt64(value)
            case "size": size = Int(value)
            case "count": count = Int(value)
            case "exp_name": exporter = value
            case "name": name = value
            default: break
            }
        }
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
}
