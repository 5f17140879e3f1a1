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
    public var name: String {
        Errno.names[rawValue] ?? "errno \(rawValue)"
    }

    static let names: [CInt: String] = [
        1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 6: "ENXIO", 7: "E2BIG", 8: "ENOEXEC",
        9: "EBADF", 10: "ECHILD", 11: "EAGAIN", 12: "ENOMEM", 13: "EACCES", 14: "EFAULT", 16: "EBUSY",
        17: "EEXIST", 18: "EXDEV", 19: "ENODEV", 20: "ENOTDIR", 21: "EISDIR", 22: "EINVAL", 23: "ENFILE",
        24: "EMFILE", 25: "ENOTTY", 26: "ETXTBSY", 27: "EFBIG", 28: "ENOSPC", 29: "ESPIPE", 30: "EROFS",
        31: "EMLINK", 32: "EPIPE", 34: "ERANGE", 35: "EDEADLK", 36: "ENAMETOOLONG", 38: "ENOSYS",
        39: "ENOTEMPTY", 61: "ENODATA", 62: "ETIME", 71: "EPROTO", 74: "EBADMSG", 75: "EOVERFLOW",
        77: "EBADFD", 84: "EILSEQ", 88: "ENOTSOCK", 90: "EMSGSIZE", 91: "EPROTOTYPE", 93: "EPROTONOSUPPORT",
        95: "EOPNOTSUPP", 98: "EADDRINUSE", 103: "ECONNABORTED", 104: "ECONNRESET", 105: "ENOBUFS",
        107: "ENOTCONN", 110: "ETIMEDOUT", 111: "ECONNREFUSED", 114: "EALREADY", 115: "EINPROGRESS",
        116: "ESTALE", 122: "EDQUOT", 125: "ECANCELED",
    ]

    /// Looks up an errno by its C name (`"EINVAL"`).
    public init?(name: String) {
        guard let raw = Errno.names.first(where: { $0.value == name })?.key else { return nil }
        self.init(rawValue: raw)
    }

    /// EBADFD ("file descriptor in bad state"), which swift-system does not name.
    public static var badFileDescriptorState: Errno { Errno(rawValue: 77) }
    /// ETIME ("timer expired"), the errno of a fence wait that ran out.
    public static var timerExpired: Errno { Errno(rawValue: 62) }
}
