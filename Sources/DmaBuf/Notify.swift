import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// systemd's notification socket (`NOTIFY_SOCKET`), written without ever blocking.
///
/// `sd_notify` opens a blocking datagram socket per call; if systemd is slow to drain its notification
/// queue, the caller waits. The daemon's loop must not, so this keeps one `SOCK_NONBLOCK` datagram socket
/// connected to the notify address and sends with `MSG_DONTWAIT`: a full queue is an `EAGAIN` to retry
/// later, never a stall.
public final class NotifySocket: @unchecked Sendable {
    private let fd: CInt

    /// nil when `NOTIFY_SOCKET` is unset or unusable.
    public init?(path: String? = getenv("NOTIFY_SOCKET").map { String(cString: $0) }) {
        guard let path, !path.isEmpty, path.hasPrefix("/") || path.hasPrefix("@") else { return nil }
        let fd = socket(AF_UNIX, CInt(SOCK_DGRAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue) | CInt(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { return nil }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        if bytes[0] == UInt8(ascii: "@") { bytes[0] = 0 }  // abstract namespace
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { Glibc.close(fd); return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (bytes[0] == 0 ? 0 : 1))
        let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) } }
        guard rc == 0 else { Glibc.close(fd); return nil }
        self.fd = fd
    }

    deinit { Glibc.close(fd) }

    /// Sends `state` with `fds` attached. nil on success, else the errno (EAGAIN: systemd's queue is full).
    public func send(_ state: String, fds: [CInt] = []) -> Errno? {
        let bytes = Array(state.utf8)
        let result = bytes.withUnsafeBytes { Sys.sendWithFDs(FileDescriptor(rawValue: fd), $0, fds, flags: CInt(MSG_DONTWAIT | MSG_NOSIGNAL)) }
        if case .failure(let errno) = result { return errno }
        return nil
    }
}
