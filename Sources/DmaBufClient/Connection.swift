import DmaBuf
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A refusal from dmabufd, or a failure talking to it. Programs decide on ``kind``, ``errno`` and the
/// wire ``WireError/code``, never on the text.
public struct DmaBufClientError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The daemon refused: ``wire`` holds its errno, code and message.
        case refused
        /// The connection is gone (the daemon closed it, or the socket failed).
        case disconnected
        /// The daemon sent something this client cannot make sense of.
        case protocolViolation
        /// The negotiated protocol version cannot express the request (e.g. `fd_flags` on v1).
        case unsupported
        /// No answer within the caller's timeout.
        case timedOut
    }

    public var kind: Kind
    /// The daemon's refusal, when it sent one.
    public var wire: WireError?
    /// A local failure (connecting, a broken socket, a reply that made no sense).
    public var local: String?

    public init(wire: WireError) { self.kind = .refused; self.wire = wire; self.local = nil }
    public init(_ kind: Kind, _ local: String) { self.kind = kind; self.wire = nil; self.local = local }
    public init(local: String) { self.init(.protocolViolation, local) }

    /// The errno the daemon named, or the one that names a local failure (ECONNRESET, EPROTO, EOPNOTSUPP,
    /// ETIMEDOUT).
    public var errno: Errno? {
        switch kind {
        case .refused: wire.map { Errno(rawValue: $0.errno) }
        case .disconnected: .connectionReset
        case .protocolViolation: Errno(rawValue: 71)  // EPROTO
        case .unsupported: .notSupported
        case .timedOut: .timedOut
        }
    }

    public var description: String {
        if let wire { return "dmabufd: \(wire.message)" }
        return "dmabufd: \(local ?? "unknown error") (\(errno?.name ?? "?"))"
    }
}

/// A buffer handed over by the daemon: its description and the dma-buf itself, which the caller now holds.
public struct RemoteBuffer: Sendable {
    public var info: BufferInfo
    /// The dma-buf. Closed when the last copy of it goes; the daemon's own reference is separate.
    public var buffer: DmaBuffer
}

/// A blocking connection to dmabufd. Not thread-safe: use one per thread, or ``DmaBufClient``.
///
/// Calls send one request and wait for its reply; events the daemon sends meanwhile are queued and read
/// with ``nextEvent(timeout:)``.
public final class DmaBufConnection {
    /// The socket path used when none is given: `$DMABUFD_SOCKET`, else `/run/dmabufd/dmabufd.sock`.
    public static var defaultSocketPath: String {
        if let value = getenv("DMABUFD_SOCKET"), let path = String(validatingCString: value), !path.isEmpty { return path }
        return "/run/dmabufd/dmabufd.sock"
    }

    /// The connected socket; closed when the connection goes away.
    public let socket: SharedFD
    /// What the daemon said in the handshake (negotiated version, limits, and who it thinks we are).
    public private(set) var server: HelloReply
    private var nextRequestID: UInt32 = 1
    /// The negotiated version once the handshake is done; nil during it.
    private var negotiated: UInt16?
    /// The version requests are encoded in.
    public var version: UInt16 { negotiated ?? WireLimits.baseVersion }
    private var events: [Response] = []

    /// Connects and performs the version handshake.
    /// - Throws: ``DmaBufError`` when the socket cannot be reached; ``DmaBufClientError`` when the daemon refuses.
    public init(path: String = DmaBufConnection.defaultSocketPath, clientName: String = "dmabuf-client") throws {
        socket = try UnixSocket.connect(path: path, kind: .seqpacket).shared()
        server = HelloReply(version: 0, server: "", maximumMessageSize: 0, maximumDescriptors: 0, pageSize: 0, uid: 0, gid: 0, pid: 0)
        guard case .hello(let reply) = try call(.hello(Hello(client: clientName))).response else {
            throw DmaBufClientError(local: "the daemon answered the handshake with something else")
        }
        guard WireLimits.supportedVersions.contains(reply.version) else {
            throw DmaBufClientError(local: "the daemon chose protocol version \(reply.version), which this client does not speak")
        }
        server = reply
        negotiated = reply.version
    }

    /// Wraps an already connected socket (e.g. one end of a socketpair) and performs the handshake.
    public init(socket: SharedFD, clientName: String = "dmabuf-client") throws {
        self.socket = socket
        server = HelloReply(version: 0, server: "", maximumMessageSize: 0, maximumDescriptors: 0, pageSize: 0, uid: 0, gid: 0, pid: 0)
        guard case .hello(let reply) = try call(.hello(Hello(client: clientName))).response else {
            throw DmaBufClientError(local: "the daemon answered the handshake with something else")
        }
        guard WireLimits.supportedVersions.contains(reply.version) else {
            throw DmaBufClientError(local: "the daemon chose protocol version \(reply.version), which this client does not speak")
        }
        server = reply
        negotiated = reply.version
    }

    /// Sends `request` with `fds` (borrowed: they stay the caller's) and waits for its reply.
    /// An error reply is thrown as ``DmaBufClientError``.
    /// - Returns: the reply and any fds that came with it (owned by the returned `SharedFD`s).
    public func call(_ request: Request, fds: [FileDescriptor] = []) throws -> (response: Response, fds: [SharedFD]) {
        let id = send(request, fds: fds)
        while true {
            guard let (header, response, received) = try receive(deadline: nil) else { continue }
            if response.isEvent {
                events.append(response)
                continue
            }
            guard header.requestID == (try id.get()) else { continue }
            if case .error(let error) = response { throw DmaBufClientError(wire: error) }
            return (response, received)
        }
    }

    /// Sends without waiting; the request id, or the send's failure (thrown by the caller once it wants the reply).
    @discardableResult
    private func send(_ request: Request, fds: [FileDescriptor]) -> Result<UInt32, any Error> {
        let id = nextRequestID
        nextRequestID = nextRequestID == UInt32.max ? 1 : nextRequestID + 1
        let bytes = WireMessage.encode(request, requestID: id, descriptors: fds.count, version: version)
        do {
            try UnixSocket.send(socket.descriptor, bytes: bytes, fds: fds)
            return .success(id)
        } catch {
            return .failure(DmaBufClientError(.disconnected, "cannot send to the daemon: \(error)"))
        }
    }

    /// Receives one message, waiting until `deadline` (nil: forever). Nil when the deadline passed first.
    private func receive(deadline: ContinuousClock.Instant?) throws -> (Header, Response, [SharedFD])? {
        // Without a deadline the blocking recvmsg is the wait: a poll first would be one more syscall per
        // request (a tenth of a small allocation's cost under emulation).
        if let deadline {
            let left = deadline - ContinuousClock.now
            if left <= .zero { return nil }
            var fds = [pollfd(fd: socket.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
            let ready = poll(&fds, 1, CInt(clamping: left.wholeMilliseconds + 1))
            if ready < 0 && errno != EINTR { throw DmaBufClientError(.disconnected, "poll on the daemon's socket failed") }
            if ready <= 0 { return nil }
        }
        let message: UnixSocket.Message
        do {
            message = try UnixSocket.receive(socket.descriptor, maxBytes: WireLimits.maximumMessageSize, maxFDs: WireLimits.maximumDescriptors)
        } catch {
            throw DmaBufClientError(.disconnected, "cannot receive from the daemon: \(error)")
        }
        if message.isEndOfStream { throw DmaBufClientError(.disconnected, "the daemon closed the connection") }
        do {
            let (header, response) = try WireMessage.decodeResponse(message.bytes, descriptors: message.fds.count, version: negotiated)
            return (header, response, message.fds)
        } catch {
            throw DmaBufClientError(.protocolViolation, "malformed reply from the daemon: \(error)")
        }
    }

    /// Returns the next event (lease revoked or ended, buffer freed, fence signalled), waiting up to
    /// `timeout` (nil: forever). Nil when none arrived in time. Replies to nothing pending are dropped.
    public func nextEvent(timeout: Duration?) throws -> Response? {
        if !events.isEmpty { return events.removeFirst() }
        let deadline = timeout.map { ContinuousClock.now + $0 }
        while true {
            guard let (_, response, _) = try receive(deadline: deadline) else {
                if deadline == nil { continue }
                return nil
            }
            if response.isEvent { return response }
        }
    }

    // MARK: - Requests

    /// The heaps the daemon serves and its policies (`any` and configured chains).
    public func heaps() throws -> HeapsReply {
        guard case .heaps(let reply) = try call(.listHeaps).response else { throw DmaBufClientError(local: "expected heaps") }
        return reply
    }

    /// Allocates `size` bytes from `heap` (a heap or policy name). The caller holds the returned fd.
    /// - Parameters:
    ///   - fdFlags: the fd's `O_ACCMODE | O_CLOEXEC` bits (``FDFlags``); without `O_CLOEXEC` the received
    ///     fd has `FD_CLOEXEC` cleared. Anything but the default needs protocol v2.
    ///   - heapFlags: dma-heap heap flags (the kernel defines none); needs v2 unless 0.
    public func allocate(size: Int, heap: String = "any", tag: String = "", fdFlags: UInt32 = FDFlags.default,
                         heapFlags: UInt64 = 0) throws -> RemoteBuffer {
        try Replies.requireV2(version, unless: fdFlags == FDFlags.default && heapFlags == 0, "fd_flags and heap_flags")
        let result = try Replies.buffer(call(.allocate(AllocateRequest(size: UInt64(clamping: size), heap: heap, tag: tag,
                                                              fdFlags: fdFlags, heapFlags: heapFlags))))
        try Replies.keepOpenOnExec(result.buffer.fd, unless: fdFlags)
        return result
    }

    /// v2: allocates `count` (1...16) buffers of `size` bytes in one round trip, all or nothing.
    public func allocateBatch(count: Int, size: Int, heap: String = "any", tag: String = "", fdFlags: UInt32 = FDFlags.default,
                              heapFlags: UInt64 = 0) throws -> [RemoteBuffer] {
        let request = try Replies.batch(version, count: count, size: size, heap: heap, tag: tag, fdFlags: fdFlags, heapFlags: heapFlags)
        return try Replies.buffers(call(.allocateBatch(request)), count: count, fdFlags: fdFlags)
    }

    /// Drops this client's hold on each buffer without waiting: v2 sends one `release_quiet` per 4 000 ids and
    /// gets no reply (ids not held are ignored). On a v1 daemon it falls back to `release` each, ignoring refusals.
    public func releaseQuiet(_ buffers: [BufferID]) throws {
        guard version >= 2 else {
            for id in buffers {
                do { try release(id) } catch let error as DmaBufClientError where error.kind == .refused {}
            }
            return
        }
        var rest = buffers[...]
        while !rest.isEmpty {
            let chunk = Array(rest.prefix(WireLimits.maximumListEntries))
            rest = rest.dropFirst(chunk.count)
            _ = try send(.releaseQuiet(chunk), fds: []).get()
        }
    }

    /// Makes a udmabuf over a daemon-made memfd of `size` bytes (huge pages when `hugePages`).
    public func createUDmabuf(size: Int, tag: String = "", hugePages: Bool = false) throws -> RemoteBuffer {
        try Replies.buffer(call(.createUDmabuf(UDmabufRequest(size: UInt64(clamping: size), tag: tag, hugePages: hugePages))))
    }

    /// Makes a udmabuf over ranges of the caller's memfd (which stays the caller's). `flags`
    /// (``UDmabufFlags``) need protocol v2 unless 0.
    public func createUDmabuf(memfd: Memfd, ranges: [ByteRange], tag: String = "", flags: UInt32 = 0) throws -> RemoteBuffer {
        try createUDmabuf(memfds: [memfd], ranges: ranges, tag: tag, flags: flags)
    }

    /// Makes a udmabuf over ranges of several of the caller's memfds (1...16), as `UDMABUF_CREATE_LIST`
    /// does: each range's `memfd` is an index into `memfds`. More than one memfd needs protocol v2.
    public func createUDmabuf(memfds: [Memfd], ranges: [ByteRange], tag: String = "", flags: UInt32 = 0) throws -> RemoteBuffer {
        try Replies.checkMemfds(memfds.count, ranges: ranges, version: version, flags: flags)
        return try Replies.buffer(call(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: ranges, tag: tag, flags: flags)),
                               fds: memfds.map(\.fd.descriptor)))
    }

    /// Hands the daemon a reference to a dma-buf made elsewhere, so it is named and accounted.
    public func importBuffer(_ buffer: DmaBuffer, tag: String = "") throws -> BufferInfo {
        try Replies.buffer(call(.importBuffer(tag: tag), fds: [buffer.fd.descriptor])).info
    }

    /// Lets `uid` fetch the buffer, and/or mints a one-time token. Returns the token when asked for.
    @discardableResult
    public func share(_ buffer: BufferID, uid: UInt32? = nil, oneTimeToken: Bool = false) throws -> UInt64? {
        guard case .share(let reply) = try call(.share(ShareRequest(buffer: buffer, uid: uid, oneTimeToken: oneTimeToken))).response else {
            throw DmaBufClientError(local: "expected a share reply")
        }
        return reply.token
    }

    /// Fetches a buffer shared with this uid, or with a one-time `token`.
    public func fetch(_ buffer: BufferID, token: UInt64 = 0) throws -> RemoteBuffer {
        try Replies.buffer(call(.fetch(FetchRequest(buffer: buffer, token: token))))
    }

    /// Drops this client's hold on a buffer. Fds already handed out keep the memory alive in the kernel.
    public func release(_ buffer: BufferID) throws {
        try Replies.expectOK(call(.release(buffer)))
    }

    /// This client's buffers; every buffer for root when `all`.
    public func list(all: Bool = false) throws -> [BufferInfo] {
        var items: [BufferInfo] = []
        var after: BufferID = 0
        while true {
            guard case .list(let page, let more) = try call(.list(all: all, after: after)).response else {
                throw DmaBufClientError(local: "expected a list")
            }
            items += page
            guard more, let last = page.last?.id, last > after else { return items }
            after = last
        }
    }

    /// One buffer's description.
    public func info(_ buffer: BufferID) throws -> BufferInfo {
        guard case .buffer(let info) = try call(.info(buffer)).response else { throw DmaBufClientError(local: "expected a buffer") }
        return info
    }

    /// Per-heap and per-client accounting.
    public func stats() throws -> Stats {
        guard case .stats(let stats) = try call(.stats).response else { throw DmaBufClientError(local: "expected stats") }
        return stats
    }

    /// Publishes the page runs of pages `[firstPage, firstPage + pageCount)` (0: to the end) under a new lease.
    public func layout(_ buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, physical: Bool = false) throws -> Layout {
        guard case .layout(let layout) = try call(.layout(LayoutRequest(buffer: buffer, firstPage: firstPage, pageCount: pageCount, physical: physical))).response else {
            throw DmaBufClientError(local: "expected a layout")
        }
        return layout
    }

    /// Ends a lease once `fence` (if any) signals.
    public func releaseLease(_ lease: LeaseID, fence: SyncFile? = nil) throws {
        try Replies.expectOK(call(.releaseLease(lease), fds: fence.map { [$0.fd.descriptor] } ?? []))
    }

    /// Attaches `fence` to pages of a buffer: others accessing overlapping pages wait for it.
    public func attachFence(_ fence: SyncFile, buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, access: AccessMode) throws {
        try Replies.expectOK(call(.attachFence(FenceAttachRequest(buffer: buffer, firstPage: firstPage, pageCount: pageCount, access: access)),
                          fds: [fence.fd.descriptor]))
    }

    /// Asks to access pages; returns the merged sync_file to wait for, or nil when nothing conflicts.
    public func beginAccess(buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, access: AccessMode) throws -> (fences: Int, syncFile: SyncFile?) {
        try Replies.access(call(.beginAccess(AccessRequest(buffer: buffer, firstPage: firstPage, pageCount: pageCount, access: access))))
    }

    /// Revokes a buffer: holders are told, get `deadline` to release, then the buffer is freed after their fences.
    public func revoke(_ buffer: BufferID, deadline: Duration? = nil) throws {
        try Replies.expectOK(call(Replies.revokeRequest(buffer, deadline: deadline)))
    }
}
