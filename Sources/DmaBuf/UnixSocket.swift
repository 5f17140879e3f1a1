import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The identity of the process at the other end of a Unix socket (`SO_PEERCRED`), as the kernel recorded
/// it at `connect`/`socketpair` time: it cannot be forged by the peer.
public struct PeerCredentials: Sendable, Hashable, Codable {
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32

    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }
}

/// Unix-domain sockets with descriptor passing (`SCM_RIGHTS`).
public enum UnixSocket {
    /// Socket kinds dmabufd uses.
    public enum Kind: Sendable {
        /// `SOCK_STREAM`
        case stream
        /// `SOCK_SEQPACKET`: message boundaries kept, which dmabufd's protocol relies on.
        case seqpacket

        var raw: CInt {
            switch self {
            case .stream: CInt(SOCK_STREAM.rawValue)
            case .seqpacket: CInt(SOCK_SEQPACKET.rawValue)
            }
        }
    }

    /// The most descriptors one message can carry (`SCM_MAX_FD`).
    public static let maximumDescriptors = Int(CDmaBuf_SCM_MAX_FD)

    /// A connected pair (`socketpair(AF_UNIX)`, close-on-exec). Each end closes when its last reference goes.
    public static func pair(_ kind: Kind = .seqpacket) throws -> (SharedFD, SharedFD) {
        let (a, b) = try Sys.socketpair(kind.raw).get(or: "socket", "socketpair failed")
        return (SharedFD(adopting: a), SharedFD(adopting: b))
    }

    /// Connects to the socket at `path`. The caller owns the result.
    /// - Throws: ``DmaBufError`` ENOENT/ECONNREFUSED when nothing listens there, EACCES without permission.
    public static func connect(path: String, kind: Kind = .seqpacket) throws -> UniqueFD {
        let fd = UniqueFD(adopting: try Sys.socket(AF_UNIX, kind.raw).get(or: "socket", "socket(AF_UNIX) failed"))
        if case .failure(let errno) = Sys.connect(fd.descriptor, path: path) {
            throw DmaBufError(
                "socket", errno, "cannot connect to \(path)",
                fix: errno == .noSuchFileOrDirectory || errno == .connectionRefused ? "is dmabufd running? (systemctl status dmabufd.socket)"
                    : errno == .permissionDenied ? "join the socket's group (dmabuf) or ask an admin" : nil)
        }
        return fd
    }

    /// Binds and listens at `path`, replacing a stale socket file. The caller owns the result.
    public static func listen(path: String, kind: Kind = .seqpacket, backlog: CInt = 128) throws -> UniqueFD {
        let fd = UniqueFD(adopting: try Sys.socket(AF_UNIX, kind.raw).get(or: "socket", "socket(AF_UNIX) failed"))
        _ = unlink(path)
        _ = try Sys.bind(fd.descriptor, path: path).get(or: "socket", "cannot bind \(path)")
        _ = try Sys.listen(fd.descriptor, backlog: backlog).get(or: "socket", "cannot listen on \(path)")
        return fd
    }

    /// Accepts one connection (close-on-exec). The caller owns the result.
    public static func accept(_ listener: FileDescriptor) throws -> UniqueFD {
        UniqueFD(adopting: try Sys.accept(listener).get(or: "socket", "accept failed"))
    }

    /// Sends `bytes` with `fds` attached in one `SCM_RIGHTS` message. The descriptors stay the caller's:
    /// the receiver gets new ones to the same files.
    /// - Returns: the bytes sent.
    /// - Throws: ``DmaBufError`` EPIPE when the peer is gone, EINVAL for more than ``maximumDescriptors``.
    @discardableResult
    public static func send(_ socket: FileDescriptor, bytes: [UInt8], fds: [FileDescriptor] = [], flags: CInt = 0) throws -> Int {
        try bytes.withUnsafeBytes { raw in
            try Sys.sendWithFDs(socket, raw, fds.map(\.rawValue), flags: flags).get(
                or: "socket", "sendmsg of \(bytes.count) bytes with \(fds.count) fds failed")
        }
    }

    /// A received message.
    public struct Message: Sendable {
        /// The data; empty at end of stream.
        public var bytes: [UInt8]
        /// Descriptors that arrived with it; each `SharedFD` closes its descriptor when dropped.
        public var fds: [SharedFD]
        /// Descriptors beyond `maxFDs` that arrived with it. They are open: each closes when dropped, on
        /// the thread that drops it, so a caller that must not block in `close()` (a peer's socket or FUSE
        /// file can make it block) takes them out and closes them elsewhere (the daemon: its closer).
        public var surplus: [SharedFD]
        /// How many descriptors beyond `maxFDs` arrived (`surplus.count` at receipt).
        public var surplusFDs: Int
        /// `MSG_TRUNC`: the datagram was longer than `maxBytes`.
        public var dataTruncated: Bool
        /// `MSG_CTRUNC`: the kernel dropped descriptors that did not fit the control buffer.
        public var controlTruncated: Bool
        /// Moves every descriptor out (``fds`` then ``surplus``), leaving the message holding none: whoever
        /// takes them decides where the last close happens.
        public mutating func takeDescriptors() -> [SharedFD] {
            var all: [SharedFD] = []
            swap(&all, &fds)
            all.append(contentsOf: surplus)
            surplus = []
            return all
        }
        /// True when the peer closed the connection.
        public var isEndOfStream: Bool { bytes.isEmpty && fds.isEmpty && !dataTruncated }
    }

    /// Receives one message of at most `maxBytes` bytes and `maxFDs` descriptors (`MSG_CMSG_CLOEXEC`).
    /// Every descriptor the kernel delivered (up to ``maximumDescriptors``; it drops none with room for
    /// that many) is returned: the first `maxFDs` in ``Message/fds``, the rest in ``Message/surplus``.
    /// Nothing is closed here.
    public static func receive(_ socket: FileDescriptor, maxBytes: Int, maxFDs: Int = maximumDescriptors, flags: CInt = 0) throws -> Message {
        var fds = [CInt](repeating: -1, count: maximumDescriptors)
        var count = maximumDescriptors
        var surplus = 0
        var messageFlags: CInt = 0
        // Received into a shared scratch buffer and copied out at the message's own size: a fresh 64 KiB
        // array per receive (and per EAGAIN) was much of a small request's cost, and of the fuzzer's.
        var failure: Errno?
        let bytes = ReceiveScratch.shared.use(capacity: max(maxBytes, 1)) { raw -> [UInt8] in
            let buffer = UnsafeMutableRawBufferPointer(start: raw.baseAddress, count: maxBytes)
            switch Sys.receiveWithFDs(socket, buffer, &fds, count: &count, surplus: &surplus, messageFlags: &messageFlags, flags: flags) {
            case .success(let n): return Array(UnsafeRawBufferPointer(rebasing: buffer[0..<min(n, maxBytes)]))
            case .failure(let errno): failure = errno; return []
            }
        }
        if let failure { throw DmaBufError("socket", failure, "recvmsg failed") }
        let kept = min(count, max(maxFDs, 0))
        return Message(
            bytes: bytes,
            fds: fds[0..<kept].map { SharedFD(adopting: $0) },
            surplus: fds[kept..<count].map { SharedFD(adopting: $0) },
            surplusFDs: count - kept + surplus,
            dataTruncated: messageFlags & CInt(MSG_TRUNC) != 0,
            controlTruncated: messageFlags & CInt(MSG_CTRUNC) != 0)
    }

    /// The peer's pid, uid and gid (`SO_PEERCRED`).
    public static func peerCredentials(_ socket: FileDescriptor) throws -> PeerCredentials {
        let (pid, uid, gid) = try Sys.peerCredentials(socket).get(or: "socket", "SO_PEERCRED failed")
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }
}

/// One receive buffer, for whichever thread takes it (a try-lock); a thread that finds it taken uses a
/// buffer of its own for that call. Grows to the largest `maxBytes` asked for (64 KiB and a byte).
final class ReceiveScratch: @unchecked Sendable {
    static let shared = ReceiveScratch()
    private var mutex = pthread_mutex_t()
    private var buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1, alignment: 16)

    private init() { pthread_mutex_init(&mutex, nil) }

    func use<R>(capacity: Int, _ body: (UnsafeMutableRawBufferPointer) -> R) -> R {
        guard pthread_mutex_trylock(&mutex) == 0 else {
            let own = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
            defer { own.deallocate() }
            return body(own)
        }
        defer { pthread_mutex_unlock(&mutex) }
        if buffer.count < capacity {
            buffer.deallocate()
            buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 16)
        }
        return body(buffer)
    }
}
