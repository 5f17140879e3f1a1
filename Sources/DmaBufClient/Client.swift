import DmaBuf
import DmaBufWire

/// The async client: one connection to dmabufd, safe to share between tasks.
///
/// No call blocks a thread of Swift's cooperative pool: every socket operation runs on the connection's
/// own I/O thread (``ClientIO``), and a call suspends until its reply arrives. Calls from many tasks are
/// pipelined on the one connection and matched to their replies by request id. It is a `Sendable` class,
/// not an actor: its state lives behind the I/O thread's lock, so there is nothing for an actor to guard.
///
/// For code that is not async, ``DmaBufConnection`` is the same protocol over blocking calls.
public final class DmaBufClient: Sendable {
    private let io: ClientIO

    /// What the daemon said in the handshake: the negotiated version, limits, and who it thinks we are.
    public let server: HelloReply

    /// The negotiated protocol version.
    public var version: UInt16 { server.version }

    /// Connects to dmabufd at `path` (on the I/O thread) and negotiates the protocol version.
    public convenience init(path: String = DmaBufConnection.defaultSocketPath, clientName: String = "dmabuf-client") async throws {
        try await self.init(io: ClientIO.start { try UnixSocket.connect(path: path, kind: .seqpacket).shared() }, clientName: clientName)
    }

    /// Wraps an already connected socket (e.g. one end of a socketpair) and negotiates the version.
    public convenience init(socket: SharedFD, clientName: String = "dmabuf-client") async throws {
        try await self.init(io: ClientIO.start { socket }, clientName: clientName)
    }

    private init(io: ClientIO, clientName: String) async throws {
        self.io = io
        guard case .hello(let reply) = try await io.call(.hello(Hello(client: clientName))).response else {
            io.stop()
            throw DmaBufClientError(local: "the daemon answered the handshake with something else")
        }
        guard WireLimits.supportedVersions.contains(reply.version) else {
            io.stop()
            throw DmaBufClientError(local: "the daemon chose protocol version \(reply.version), which this client does not speak")
        }
        server = reply
    }

    deinit { io.stop() }

    /// Closes the connection now: pending calls and event waits fail with ``DmaBufClientError/Kind/disconnected``.
    public func close() { io.stop() }

    /// Sends any request and waits for its reply; fds are kept alive until sent.
    public func call(_ request: Request, fds: [SharedFD] = []) async throws -> (response: Response, fds: [SharedFD]) {
        try await io.call(request, fds: fds)
    }

    // MARK: - Requests (as in ``DmaBufConnection``)

    public func heaps() async throws -> HeapsReply {
        guard case .heaps(let reply) = try await call(.listHeaps).response else { throw DmaBufClientError(local: "expected heaps") }
        return reply
    }

    /// Allocates `size` bytes; `fdFlags` (``FDFlags``) and `heapFlags` need v2 unless they are the defaults.
    public func allocate(size: Int, heap: String = "any", tag: String = "", fdFlags: UInt32 = FDFlags.default,
                         heapFlags: UInt64 = 0) async throws -> RemoteBuffer {
        try Replies.requireV2(version, unless: fdFlags == FDFlags.default && heapFlags == 0, "fd_flags and heap_flags")
        let request = AllocateRequest(size: UInt64(clamping: size), heap: heap, tag: tag, fdFlags: fdFlags, heapFlags: heapFlags)
        let result = try Replies.buffer(await call(.allocate(request)))
        try Replies.keepOpenOnExec(result.buffer.fd, unless: fdFlags)
        return result
    }

    /// v2: `count` (1...16) buffers of `size` bytes in one round trip, all or nothing.
    public func allocateBatch(count: Int, size: Int, heap: String = "any", tag: String = "", fdFlags: UInt32 = FDFlags.default,
                              heapFlags: UInt64 = 0) async throws -> [RemoteBuffer] {
        let request = try Replies.batch(version, count: count, size: size, heap: heap, tag: tag, fdFlags: fdFlags, heapFlags: heapFlags)
        return try Replies.buffers(await call(.allocateBatch(request)), count: count, fdFlags: fdFlags)
    }

    /// Drops this client's hold on each buffer without waiting for anything (v2 `release_quiet`; on v1,
    /// one `release` each, refusals ignored).
    public func releaseQuiet(_ buffers: [BufferID]) async throws {
        guard version >= 2 else {
            for id in buffers {
                do { try await release(id) } catch let error as DmaBufClientError where error.kind == .refused {}
            }
            return
        }
        var rest = buffers[...]
        while !rest.isEmpty {
            let chunk = Array(rest.prefix(WireLimits.maximumListEntries))
            rest = rest.dropFirst(chunk.count)
            try io.send(.releaseQuiet(chunk))
        }
    }

    public func createUDmabuf(size: Int, tag: String = "", hugePages: Bool = false) async throws -> RemoteBuffer {
        try Replies.buffer(await call(.createUDmabuf(UDmabufRequest(size: UInt64(clamping: size), tag: tag, hugePages: hugePages))))
    }

    public func createUDmabuf(memfd: Memfd, ranges: [ByteRange], tag: String = "", flags: UInt32 = 0) async throws -> RemoteBuffer {
        try await createUDmabuf(memfds: [memfd], ranges: ranges, tag: tag, flags: flags)
    }

    /// Ranges of several memfds (1...16), each range's `memfd` an index into `memfds`; more than one needs v2.
    public func createUDmabuf(memfds: [Memfd], ranges: [ByteRange], tag: String = "", flags: UInt32 = 0) async throws -> RemoteBuffer {
        try Replies.checkMemfds(memfds.count, ranges: ranges, version: version, flags: flags)
        let request = UDmabufFromMemfdRequest(ranges: ranges, tag: tag, flags: flags)
        return try Replies.buffer(await call(.createUDmabufFromMemfd(request), fds: memfds.map(\.fd)))
    }

    public func importBuffer(_ buffer: DmaBuffer, tag: String = "") async throws -> BufferInfo {
        try Replies.buffer(await call(.importBuffer(tag: tag), fds: [buffer.fd])).info
    }

    @discardableResult
    public func share(_ buffer: BufferID, uid: UInt32? = nil, oneTimeToken: Bool = false) async throws -> UInt64? {
        guard case .share(let reply) = try await call(.share(ShareRequest(buffer: buffer, uid: uid, oneTimeToken: oneTimeToken))).response else {
            throw DmaBufClientError(local: "expected a share reply")
        }
        return reply.token
    }

    public func fetch(_ buffer: BufferID, token: UInt64 = 0) async throws -> RemoteBuffer {
        try Replies.buffer(await call(.fetch(FetchRequest(buffer: buffer, token: token))))
    }

    public func release(_ buffer: BufferID) async throws { try Replies.expectOK(await call(.release(buffer))) }

    /// This client's buffers (every buffer for root when `all`), page after page.
    public func list(all: Bool = false) async throws -> [BufferInfo] {
        var items: [BufferInfo] = []
        var after: BufferID = 0
        while true {
            guard case .list(let page, let more) = try await call(.list(all: all, after: after)).response else {
                throw DmaBufClientError(local: "expected a list")
            }
            items += page
            guard more, let last = page.last?.id, last > after else { return items }
            after = last
        }
    }

    public func info(_ buffer: BufferID) async throws -> BufferInfo {
        guard case .buffer(let info) = try await call(.info(buffer)).response else { throw DmaBufClientError(local: "expected a buffer") }
        return info
    }

    public func stats() async throws -> Stats {
        guard case .stats(let stats) = try await call(.stats).response else { throw DmaBufClientError(local: "expected stats") }
        return stats
    }

    public func layout(_ buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, physical: Bool = false) async throws -> Layout {
        let request = LayoutRequest(buffer: buffer, firstPage: firstPage, pageCount: pageCount, physical: physical)
        guard case .layout(let layout) = try await call(.layout(request)).response else { throw DmaBufClientError(local: "expected a layout") }
        return layout
    }

    public func releaseLease(_ lease: LeaseID, fence: SyncFile? = nil) async throws {
        try Replies.expectOK(await call(.releaseLease(lease), fds: fence.map { [$0.fd] } ?? []))
    }

    public func attachFence(_ fence: SyncFile, buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, access: AccessMode) async throws {
        let request = FenceAttachRequest(buffer: buffer, firstPage: firstPage, pageCount: pageCount, access: access)
        try Replies.expectOK(await call(.attachFence(request), fds: [fence.fd]))
    }

    public func beginAccess(buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0,
                            access: AccessMode) async throws -> (fences: Int, syncFile: SyncFile?) {
        try Replies.access(await call(.beginAccess(AccessRequest(buffer: buffer, firstPage: firstPage, pageCount: pageCount, access: access))))
    }

    public func revoke(_ buffer: BufferID, deadline: Duration? = nil) async throws {
        try Replies.expectOK(await call(Replies.revokeRequest(buffer, deadline: deadline)))
    }

    /// The next event, waiting at most `timeout` (nil: until one arrives or the connection fails); nil when
    /// none came in time. Waiting suspends the task; no thread is held.
    public func nextEvent(timeout: Duration?) async throws -> Response? { try await io.nextEvent(timeout: timeout) }
}
