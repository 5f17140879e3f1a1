import DmaBuf
import DmaBufCLI
import DmaBufWire
import Foundation
import Synchronization
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Runs dmabufctl in-process with `arguments`, returning its exit status and what it wrote.
func run(_ arguments: [String]) -> (status: Int32, stdout: String, stderr: String) {
    let capture = CapturingConsole()
    let status = Console.$current.withValue(capture.console) { Dmabufctl.execute(arguments, columns: 100) }
    return (status, capture.stdout, capture.stderr)
}

/// Parses a JSON object's text.
func jsonObject(_ text: String) throws -> [String: Any] {
    let value = try JSONSerialization.jsonObject(with: Data(text.utf8))
    return try #require(value as? [String: Any])
}

/// What the fake daemon sends back for one request: a reply (with fds to pass along), then events.
struct FakeReply {
    var response: Response
    var fds: [FileDescriptor] = []
    var events: [Response] = []
}

/// A stand-in for dmabufd on a socket in /tmp: answers each request with `handler`'s reply, records the
/// requests, and serves connections one after another until stopped. The real daemon's own tests cover
/// the daemon; this one checks what dmabufctl sends and prints.
final class FakeDaemon: @unchecked Sendable {
    let path: String
    private let listener: SharedFD
    private let handler: @Sendable (Request) -> FakeReply
    private let state = Mutex<(requests: [Request], stop: Bool)>(([], false))
    private let finished = DispatchSemaphore(value: 0)
    /// The highest protocol version this fake speaks.
    let version: UInt16

    static let hello = HelloReply(
        version: 1, server: "fake-dmabufd", maximumMessageSize: UInt32(WireLimits.maximumMessageSize),
        maximumDescriptors: UInt16(WireLimits.maximumDescriptors), pageSize: 4096, uid: 1000, gid: 1000, pid: 4242)

    init(version: UInt16 = 2, _ handler: @escaping @Sendable (Request) -> FakeReply) throws {
        self.version = version
        path = "/tmp/dmabufctl-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        listener = try UnixSocket.listen(path: path).shared()
        self.handler = handler
        let thread = Thread { [self] in serve(); finished.signal() }
        thread.start()
    }

    /// Requests received so far (the handshake excluded).
    var requests: [Request] { state.withLock { $0.requests } }

    func stop() {
        state.withLock { $0.stop = true }
        finished.wait()
        unlink(path)
    }

    private var stopping: Bool { state.withLock { $0.stop } }

    private func serve() {
        while !stopping {
            var fds = [pollfd(fd: listener.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
            guard poll(&fds, 1, 20) > 0, let connection = try? UnixSocket.accept(listener.descriptor).shared() else { continue }
            converse(connection)
        }
    }

    private func converse(_ connection: SharedFD) {
        var negotiated: UInt16?
        while !stopping {
            var fds = [pollfd(fd: connection.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
            guard poll(&fds, 1, 20) > 0 else { continue }
            guard let message = try? UnixSocket.receive(connection.descriptor, maxBytes: WireLimits.maximumMessageSize),
                  !message.isEndOfStream,
                  let (header, request) = try? WireMessage.decodeRequest(message.bytes, descriptors: message.fds.count, version: negotiated)
            else { return }
            let reply: FakeReply
            if case .hello(let hello) = request {
                var answer = FakeDaemon.hello
                answer.version = min(hello.maximumVersion, version)
                reply = FakeReply(response: .hello(answer))
                negotiated = answer.version
            } else {
                state.withLock { $0.requests.append(request) }
                reply = handler(request)
            }
            let v = negotiated ?? WireLimits.baseVersion
            let bytes = WireMessage.encode(reply.response, requestID: header.requestID, descriptors: reply.fds.count, version: v)
            _ = try? UnixSocket.send(connection.descriptor, bytes: bytes, fds: reply.fds)
            for event in reply.events {
                _ = try? UnixSocket.send(connection.descriptor, bytes: WireMessage.encode(event, requestID: 0, version: v))
            }
        }
    }
}

/// A pipe; the read end stands in for a sync_file (readable = signalled) or for stdin.
struct Pipe {
    let read: SharedFD
    let write: SharedFD

    init() throws {
        var fds: [CInt] = [-1, -1]
        guard pipe(&fds) == 0 else { throw Errno(rawValue: errno) }
        read = SharedFD(adopting: fds[0])
        write = SharedFD(adopting: fds[1])
    }
}

// MARK: - Fixtures

enum Fixtures {
    static let buffer = BufferInfo(
        id: 7, inode: 12345, size: 4 << 20, heap: "system", tag: "frame", name: "1000:4242:frame", ownerUID: 1000,
        ownerPID: 4242, generation: 1, externalReferences: 2, leases: 1, sharedWith: [], revoked: false, orphaned: false)

    static let sharedOrphan = BufferInfo(
        id: 12, inode: 777, size: 65536, heap: "udmabuf", tag: "", name: "1001:99:", ownerUID: 1001,
        ownerPID: 99, generation: 2, externalReferences: 0, leases: 0, sharedWith: [1000], revoked: false, orphaned: true)

    static let heaps = HeapsReply(
        heaps: [
            HeapInfo(name: "system", device: "/dev/dma_heap/system", kind: "system", allocatedBytes: 8 << 20, buffers: 2),
            HeapInfo(name: "udmabuf", device: "/dev/udmabuf", kind: "udmabuf", allocatedBytes: 0, buffers: 0),
        ],
        policies: [PolicyInfo(name: "any", chain: ["system", "udmabuf"]), PolicyInfo(name: "camera", chain: ["cma", "system"])])

    static let stats = Stats(
        heaps: [HeapStats(heap: "system", bytes: 8 << 20, buffers: 2, failures: 1), HeapStats(heap: "udmabuf", bytes: 4096, buffers: 1, failures: 0)],
        clients: [
            ClientStats(uid: 1000, bytes: 8 << 20, buffers: 2, quotaBytes: 1 << 30, quotaBuffers: 1024, refusals: 3),
            ClientStats(uid: 1001, bytes: 4096, buffers: 1, quotaBytes: 0, quotaBuffers: 0, refusals: 0),
        ],
        failures: [ErrnoCount(errno: "ENOMEM", count: 1), ErrnoCount(errno: "EDQUOT", count: 3)],
        connectedClients: 2, buffers: 3, bytes: (8 << 20) + 4096, leases: 1, pendingFences: 2,
        oldestPendingFenceMilliseconds: 1500)

    static let layout = Layout(
        buffer: 7, lease: 31, generation: 1, kind: .bufferPages, pageSize: 4096, firstPage: 0,
        runs: [PageRun(start: 0, pages: 256), PageRun(start: 512, pages: 16)])
}
