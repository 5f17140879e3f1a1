import SystemPackage

/// An error a user of dmabufd can cause or meet, worded to be acted upon: what failed, the errno, and the fix.
///
/// `description` reads like `udmabuf: memfd lacks F_SEAL_SHRINK (EINVAL); create it with MFD_ALLOW_SEALING
/// and add F_SEAL_SHRINK`.
public struct DmaBufError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The part of the stack that refused: `dma-heap`, `udmabuf`, `dma-buf`, `sync_file`, `pagemap`, ...
    public var subsystem: String
    /// The errno that the kernel returned, or that best names a refusal made before calling the kernel.
    public var errno: Errno?
    /// What went wrong, in the caller's terms.
    public var cause: String
    /// What to do about it, when there is something to do.
    public var fix: String?

    public init(_ subsystem: String, _ errno: Errno?, _ cause: String, fix: String? = nil) {
        self.subsystem = subsystem
        self.errno = errno
        self.cause = cause
        self.fix = fix
    }

    public var description: String {
        var text = "\(subsystem): \(cause)"
        if let errno { text += " (\(errno.name))" }
        if let fix { text += "; \(fix)" }
        return text
    }
}

extension Result where Failure == Errno {
    /// Unwraps, turning an errno into a ``DmaBufError`` with a generic cause.
    func get(or subsystem: String, _ cause: @autoclosure () -> String) throws(DmaBufError) -> Success {
        switch self {
        case .success(let value): return value
        case .failure(let errno): throw DmaBufError(subsystem, errno, cause())
        }
    }
}

extension Errno {
    /// The C name of this errno (`EINVAL`), or `errno N` for numbers we do not name.
    public var name: String { ErrnoNames.name(rawValue) }

    /// Looks up an errno by its C name (`"EINVAL"`).
    public init?(name: String) {
        guard let raw = ErrnoNames.code(named: name) else { return nil }
        self.init(rawValue: raw)
    }

    /// EBADFD ("file descriptor in bad state"), which swift-system does not name.
    public static var badFileDescriptorState: Errno { Errno(rawValue: 77) }
    /// ETIME ("timer expired"), the errno of a fence wait that ran out.
    public static var timerExpired: Errno { Errno(rawValue: 62) }
}
