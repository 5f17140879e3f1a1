import SystemPackage

/// A file descriptor with exactly one owner.
///
/// `UniqueFD` closes its descriptor in `deinit`. To hand the descriptor to someone else without closing it,
/// call ``release()``: from then on the receiver closes it. Borrowed descriptors are passed as plain
/// `FileDescriptor` values, which never close anything.
public struct UniqueFD: ~Copyable, @unchecked Sendable {
    /// The owned descriptor, lent out. The `UniqueFD` still closes it.
    public let descriptor: FileDescriptor

    /// Takes ownership of `descriptor`; this `UniqueFD` will close it.
    public init(adopting descriptor: FileDescriptor) {
        self.descriptor = descriptor
    }

    /// Takes ownership of a raw descriptor number; this `UniqueFD` will close it.
    public init(adopting rawValue: CInt) {
        self.descriptor = FileDescriptor(rawValue: rawValue)
    }

    /// Gives up ownership without closing: the caller now closes the returned descriptor.
    public consuming func release() -> FileDescriptor {
        let fd = descriptor
        discard self
        return fd
    }

    /// Duplicates the descriptor (`F_DUPFD_CLOEXEC`). The caller owns the returned `UniqueFD`.
    /// - Throws: ``DmaBufError`` with the errno of `fcntl` (EMFILE when the process is out of descriptors).
    public func duplicate() throws -> UniqueFD {
        let raw = try Sys.dup(descriptor).get(or: "fd", "cannot duplicate fd \(descriptor.rawValue)")
        return UniqueFD(adopting: raw)
    }

    /// Converts to a reference-counted ``SharedFD``, which closes the descriptor when its last reference goes.
    public consuming func shared() -> SharedFD {
        SharedFD(adopting: release())
    }

    deinit {
        Sys.close(descriptor.rawValue)
    }
}

/// A file descriptor shared by reference: the last reference to go away closes it.
///
/// Modelled on libcamera's `SharedFD`. Use it where several owners (a buffer table, an in-flight message,
/// a lease) keep the same kernel object alive; the descriptor number stays valid as long as any of them
/// holds the `SharedFD`.
public final class SharedFD: Sendable, CustomStringConvertible {
    /// The descriptor, lent out. Do not close it: the `SharedFD` does.
    public let descriptor: FileDescriptor

    /// Takes ownership of `descriptor`; it is closed when the last reference to this object goes away.
    public init(adopting descriptor: FileDescriptor) {
        self.descriptor = descriptor
    }

    /// Takes ownership of a raw descriptor number.
    public convenience init(adopting rawValue: CInt) {
        self.init(adopting: FileDescriptor(rawValue: rawValue))
    }

    /// Makes a new, independent owner of the same open file (`F_DUPFD_CLOEXEC`). The caller owns the result.
    public func duplicate() throws -> UniqueFD {
        let raw = try Sys.dup(descriptor).get(or: "fd", "cannot duplicate fd \(descriptor.rawValue)")
        return UniqueFD(adopting: raw)
    }

    public var description: String { "fd \(descriptor.rawValue)" }

    deinit {
        Sys.close(descriptor.rawValue)
    }
}
