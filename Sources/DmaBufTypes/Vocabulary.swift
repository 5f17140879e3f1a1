// One word per concept, for every layer: access modes, errno names, durations, trimming. Pure Swift, so
// the protocol, the client, the kernel layer, the daemon and the CLI all speak the same vocabulary.

/// How something touches memory: a fence's or an access's mode, and the direction of a CPU sync.
///
/// Raw values are the wire's `access` values (read 1, write 2). The wire carries only read and write: a
/// read-write access is a write as far as conflicts go, and `readWrite` exists for `DMA_BUF_IOCTL_SYNC`.
public enum AccessMode: UInt8, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    case read = 1, write = 2, readWrite = 3

    /// True for `write` and `readWrite`: such an access conflicts with every other on the same pages.
    public var writes: Bool { self != .read }
    /// True for `read` and `readWrite`.
    public var reads: Bool { self != .write }
    /// Two accesses to the same pages conflict unless both only read.
    public func conflicts(with other: AccessMode) -> Bool { writes || other.writes }

    public var description: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .readWrite: "read-write"
        }
    }
}

/// The C names of errno values (`EINVAL`), without SystemPackage, so the protocol can render refusals.
public enum ErrnoNames {
    /// The C name of `code`, or `errno N` for numbers not named here (Linux numbering).
    public static func name(_ code: Int32) -> String { table[code] ?? "errno \(code)" }

    /// The number behind a C name, or nil.
    public static func code(named name: String) -> Int32? { byName[name] }

    public static let table: [Int32: String] = [
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

    private static let byName: [String: Int32] = Dictionary(uniqueKeysWithValues: table.map { ($0.value, $0.key) })
}

/// Durations as people write them in config files and on command lines.
public enum DurationText {
    /// Parses a non-negative number with an optional unit: `ms`; `s`, `sec` (also a bare number); `m`, `min`;
    /// `h`. Surrounding whitespace is ignored, case is not significant, fractions round to the millisecond.
    /// Nil for anything else, or beyond 2^53 ms (where doubles stop counting milliseconds exactly).
    public static func parse(_ text: String) -> Duration? {
        let t = text.trimmingWhitespace().lowercased()
        let number = t.prefix(while: { $0.isASCII && ($0.isNumber || $0 == ".") })
        let scale: [Substring: Double] = ["": 1, "s": 1, "sec": 1, "ms": 0.001, "m": 60, "min": 60, "h": 3600]
        guard !number.isEmpty, let value = Double(number), value.isFinite, value >= 0,
              let multiplier = scale[t.dropFirst(number.count)] else { return nil }
        let milliseconds = (value * multiplier * 1000).rounded()
        guard milliseconds <= 0x1p53 else { return nil }
        return .milliseconds(Int64(milliseconds))
    }
}

extension StringProtocol {
    /// Without leading and trailing spaces, tabs, carriage returns and newlines: the whitespace of config
    /// lines, procfs and sysfs values, and fdinfo fields. Nothing else is whitespace here (no Unicode
    /// spaces), so a value never silently loses a character a client chose.
    public func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let first = s.first, isBlank(first) { s = s.dropFirst() }
        while let last = s.last, isBlank(last) { s = s.dropLast() }
        return String(s)
    }
}

private func isBlank(_ c: Character) -> Bool { c == " " || c == "\t" || c == "\r" || c == "\n" || c == "\r\n" }
