import DmaBuf
import DmaBufWire

/// The async client: one connection to dmabufd, safe to share between tasks.
///
/// Each call sends one request and waits for its reply; the daemon answers from its event loop without
/// blocking on other clients, so a call takes as long as the kernel work behind it.
public actor DmaBufClient {
    private let connection: DmaBufConnection

    /// What the daemon said in the handshake.
    public nonisolated let server: HelloReply

    /// Connects to dmabufd at `path` and negotiates the protocol version.
    public init(path: String = DmaBufConnection.defaultSocketPath, clientName: String = "dmabuf-client") throws {
        let connection = try DmaBufConnection(path: path, clientName: clientName)
        self.connection = connection
        self.server = connection.server
    }

    public func heaps() throws -> HeapsReply { try connection.heaps() }

    public func allocate(size: Int, heap: String = "any", tag: String = "", cpuAccess: CPUAccessHint = .readWrite) throws -> RemoteBuffer {
        try connection.allocate(size: size, heap: heap, tag: tag, cpuAccess: cpuAccess)
    }

    public func createUDmabuf(size: Int, tag: String = "", hugePages: Bool = false) throws -> RemoteBuffer {
        try connection.createUDmabuf(size: size, tag: tag, hugePages: hugePages)
    }

    public func createUDmabuf(memfd: Memfd, ranges: [ByteRange], tag: String = "") throws -> RemoteBuffer {
        try connection.createUDmabuf(memfd: memfd, ranges: ranges, tag: tag)
    }

    public func importBuffer(_ buffer: DmaBuffer, tag: String = "") throws -> BufferInfo {
        try connection.importBuffer(buffer, tag: tag)
    }

    @discardableResult
    public func share(_ buffer: BufferID, uid: UInt32? = nil, oneTimeToken: Bool = false) throws -> UInt64? {
        try connection.share(buffer, uid: uid, oneTimeToken: oneTimeToken)
    }

    public func fetch(_ buffer: BufferID, token: UInt64 = 0) throws -> RemoteBuffer { try connection.fetch(buffer, token: token) }
    public func release(_ buffer: BufferID) throws { try connection.release(buffer) }
    public func list(all: Bool = false) throws -> [BufferInfo] { try connection.list(all: all) }
    public func info(_ buffer: BufferID) throws -> BufferInfo { try connection.info(buffer) }
    public func stats() throws -> Stats { try connection.stats() }

    public func layout(_ buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, physical: Bool = false) throws -> Layout {
        try connection.layout(buffer, firstPage: firstPage, pageCount: pageCount, physical: physical)
    }

    public func releaseLease(_ lease: LeaseID, fence: SyncFile? = nil) throws { try connection.releaseLease(lease, fence: fence) }

    public func attachFence(_ fence: SyncFile, buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, access: AccessMode) throws {
        try connection.attachFence(fence, buffer: buffer, firstPage: firstPage, pageCount: pageCount, access: access)
    }

    public func beginAccess(buffer: BufferID, firstPage: UInt64 = 0, pageCount: UInt64 = 0, access: AccessMode) throws -> (fences: Int, syncFile: SyncFile?) {
        try connection.beginAccess(buffer: buffer, firstPage: firstPage, pageCount: pageCount, access: access)
    }

    public func revoke(_ buffer: BufferID, deadline: Duration? = nil) throws { try connection.revoke(buffer, deadline: deadline) }

    /// The next event, waiting at most `timeout`.
    public func nextEvent(timeout: Duration?) throws -> Response? { try connection.nextEvent(timeout: timeout) }
}
