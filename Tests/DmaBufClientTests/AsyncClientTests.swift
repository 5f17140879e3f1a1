import DmaBuf
import DmaBufClient
import DmaBufWire
import Foundation
import Synchronization
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// What the fake daemon does with one request: reply (or not), with fds, then send events.
struct Answer: Sendable {
    var response: Response?
    var fds: [SharedFD] = []
    var events: [Response] = []
}

/// The requests a fake daemon received.
final class RequestLog: Sendable {
    private let list = Mutex<[Request]>([])
    func append(_ request: Request) { list.withLock { $0.append(request) } }
    func withLock<T>(_ body: ([Request]) -> T) -> T { list.withLock { body($0) } }
}

/// A daemon stand-in on one end of a socketpair, speaking up to `version`. `batch` > 1 collects that many
/// requests and answers them in reverse order, to show replies are matched by id, not by order.
final class PairDaemon: Sendable {
    let client: SharedFD
    private let server: SharedFD
    let requests = RequestLog()

    init(version: UInt16 = 2, batch: Int = 1, _ answer: @escaping @Sendable (Request) -> Answer) throws {
        (client, server) = try UnixSocket.pair()
        let server = self.server
        let requests = self.requests
        Thread {
            var negotiated: UInt16?
            var held: [(UInt32, Request)] = []
            while let message = try? UnixSocket.receive(server.descriptor, maxBytes: WireLimits.maximumMessageSize), !message.isEndOfStream {
                guard let (header, request) = try? WireMessage.decodeRequest(message.bytes, descriptors: message.fds.count, version: negotiated)
                else { return }
                if case .hello(let hello) = request {
                    let v = min(hello.maximumVersion, version)
                    let reply = HelloReply(version: v, server: "pair", maximumMessageSize: 65_536, maximumDescriptors: 16,
                                           pageSize: 4096, uid: 1, gid: 1, pid: 1)
                    _ = try? UnixSocket.send(server.descriptor, bytes: WireMessage.encode(.hello(reply), requestID: header.requestID))
                    negotiated = v
                    continue
                }
                requests.append(request)
                held.append((header.requestID, request))
                guard held.count >= batch else { continue }
                for (id, request) in held.reversed() {
                    let a = answer(request)
                    if let response = a.response {
                        let bytes = WireMessage.encode(response, requestID: id, descriptors: a.fds.count, version: negotiated ?? 1)
                        _ = try? UnixSocket.send(server.descriptor, bytes: bytes, fds: a.fds.map(\.descriptor))
                    }
                    for event in a.events {
                        _ = try? UnixSocket.send(server.descriptor, bytes: WireMessage.encode(event, requestID: 0, version: negotiated ?? 1))
                    }
                }
                held = []
            }
        }.start()
    }

    /// Closes the daemon's end: the client sees end of stream.
    func hangUp() { _ = shutdown(server.descriptor.rawValue, CInt(SHUT_RDWR)) }
}

func info(_ id: BufferID) -> BufferInfo {
    BufferInfo(id: id, inode: id, size: 4096, heap: "system", tag: "", name: "", ownerUID: 1, ownerPID: 1, generation: 0,
               externalReferences: 0, leases: 0, sharedWith: [], revoked: false, orphaned: false, cgroup: "/test")
}

func pipeEnd() throws -> SharedFD {
    var fds: [CInt] = [-1, -1]
    guard pipe(&fds) == 0 else { throw Errno(rawValue: errno) }
    close(fds[1])
    return SharedFD(adopting: fds[0])
}

@Suite("Async client") struct AsyncClientTests {
    @Test("negotiates v2 with a v2 daemon and v1 with a v1 daemon", arguments: [UInt16(1), 2])
    func negotiation(_ version: UInt16) async throws {
        let daemon = try PairDaemon(version: version) { _ in Answer(response: .ok) }
        let client = try await DmaBufClient(socket: daemon.client)
        #expect(client.version == version)
        try await client.release(1)
        #expect(daemon.requests.withLock { $0 } == [.release(1)])
    }

    @Test("concurrent calls are pipelined and matched to their replies by id")
    func pipelined() async throws {
        let daemon = try PairDaemon(batch: 8) { request in
            guard case .info(let id) = request else { return Answer(response: .ok) }
            return Answer(response: .buffer(info(id)), fds: [try! pipeEnd()])
        }
        let client = try await DmaBufClient(socket: daemon.client)
        let ids = try await withThrowingTaskGroup(of: (BufferID, BufferID).self) { group in
            for id in BufferID(1)...8 { group.addTask { (id, try await client.info(id).id) } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(ids.count == 8)
        for (asked, got) in ids { #expect(asked == got) }
    }

    @Test("waiting for an event holds no thread: calls go on meanwhile, and the event arrives")
    func eventsDoNotBlockCalls() async throws {
        let daemon = try PairDaemon { request in
            if case .release(let id) = request { return Answer(response: .ok, events: [.bufferFreed(id)]) }
            return Answer(response: .stats(Stats(heaps: [], clients: [], failures: [], connectedClients: 1, buffers: 0, bytes: 0,
                                                 leases: 0, pendingFences: 0, oldestPendingFenceMilliseconds: 0)))
        }
        let client = try await DmaBufClient(socket: daemon.client)
        let waiter = Task { try await client.nextEvent(timeout: nil) }
        #expect(try await client.stats().connectedClients == 1)
        try await client.release(9)
        #expect(try await waiter.value == .bufferFreed(9))
    }

    @Test("a timeout with no event returns nil; a queued event comes at once")
    func eventTimeout() async throws {
        let daemon = try PairDaemon { _ in Answer(response: .ok, events: [.fenceSignaled(3)]) }
        let client = try await DmaBufClient(socket: daemon.client)
        #expect(try await client.nextEvent(timeout: .milliseconds(5)) == nil)
        #expect(try await client.nextEvent(timeout: .zero) == nil)
        try await client.release(3)
        #expect(try await client.nextEvent(timeout: .seconds(60)) == .fenceSignaled(3))
    }

    @Test("closing fails waiters; the daemon hanging up fails calls, as disconnected")
    func failures() async throws {
        let daemon = try PairDaemon { _ in Answer(response: nil) }
        let client = try await DmaBufClient(socket: daemon.client)
        let call = Task { try await client.release(1) }
        while daemon.requests.withLock({ $0.isEmpty }) { try await Task.sleep(for: .milliseconds(1)) }
        daemon.hangUp()
        await #expect(throws: DmaBufClientError.self) { try await call.value }
        do { try await call.value } catch let error as DmaBufClientError { #expect(error.kind == .disconnected) }
        await #expect(throws: DmaBufClientError.self) { try await client.stats() }

        let other = try PairDaemon { _ in Answer(response: .ok) }
        let second = try await DmaBufClient(socket: other.client)
        let waiter = Task { try await second.nextEvent(timeout: nil) }
        try await second.release(1)  // the waiter is registered or about to be; close fails it either way
        second.close()
        await #expect(throws: DmaBufClientError.self) { try await waiter.value }
    }

    @Test("release_quiet gets no reply on v2; v1 falls back to release, ignoring refusals")
    func releaseQuiet() async throws {
        let v2 = try PairDaemon { request in Answer(response: request.type == .releaseQuiet ? nil : .ok) }
        let client = try await DmaBufClient(socket: v2.client)
        try await client.releaseQuiet([1, 2, 3])
        try await client.release(4)  // answered after the quiet release, which got none
        #expect(v2.requests.withLock { $0 } == [.releaseQuiet([1, 2, 3]), .release(4)])

        let v1 = try PairDaemon(version: 1) { _ in Answer(response: .error(.refusal(2, code: .notFound, cause: "no buffer"))) }
        let old = try await DmaBufClient(socket: v1.client)
        try await old.releaseQuiet([5, 6])
        #expect(v1.requests.withLock { $0 } == [.release(5), .release(6)])
    }

    @Test("v2-only requests are refused locally on v1, and refusals keep their errno and code")
    func unsupportedOnV1() async throws {
        let daemon = try PairDaemon(version: 1) { _ in Answer(response: .error(.refusal(122, code: .quotaExceeded, cause: "over quota"))) }
        let client = try await DmaBufClient(socket: daemon.client)
        for attempt in [{ _ = try await client.allocate(size: 4096, fdFlags: FDFlags.readOnly) },
                        { _ = try await client.allocateBatch(count: 2, size: 4096) }] as [@Sendable () async throws -> Void] {
            do { try await attempt(); Issue.record("not refused") } catch let error as DmaBufClientError {
                #expect(error.kind == .unsupported && error.errno == .notSupported)
            }
        }
        do { _ = try await client.allocate(size: 4096); Issue.record("not refused") } catch let error as DmaBufClientError {
            #expect(error.kind == .refused && error.wire?.code == .quotaExceeded && error.errno == .diskQuotaExceeded)
        }
        #expect(daemon.requests.withLock { $0.count } == 1)
    }

    @Test("fd_flags without O_CLOEXEC leave the received fd open across exec")
    func closeOnExec() async throws {
        let daemon = try PairDaemon { request in
            switch request {
            case .allocate: Answer(response: .buffer(info(1)), fds: [try! pipeEnd()])
            case .allocateBatch(let b): Answer(response: .buffers((0..<UInt64(b.count)).map(info)), fds: (0..<b.count).map { _ in try! pipeEnd() })
            default: Answer(response: .ok)
            }
        }
        let client = try await DmaBufClient(socket: daemon.client)
        let kept = try await client.allocate(size: 4096, fdFlags: FDFlags.readWrite)
        #expect(fcntl(kept.buffer.fd.descriptor.rawValue, F_GETFD) & FD_CLOEXEC == 0)
        let closed = try await client.allocate(size: 4096)
        #expect(fcntl(closed.buffer.fd.descriptor.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        let batch = try await client.allocateBatch(count: 3, size: 4096, fdFlags: FDFlags.readOnly)
        #expect(batch.map(\.info.id) == [0, 1, 2])
        for b in batch { #expect(fcntl(b.buffer.fd.descriptor.rawValue, F_GETFD) & FD_CLOEXEC == 0) }
    }
}

@Suite("Blocking connection") struct BlockingConnectionTests {
    @Test("nextEvent honours its timeout, and v2 requests are encoded in the negotiated version")
    func timeoutAndVersion() throws {
        let daemon = try PairDaemon { request in
            if case .allocate(let a) = request, a.fdFlags == FDFlags.readOnly { return Answer(response: .buffer(info(1)), fds: [try! pipeEnd()]) }
            return Answer(response: .ok)
        }
        let connection = try DmaBufConnection(socket: daemon.client)
        #expect(connection.version == 2)
        #expect(try connection.nextEvent(timeout: .milliseconds(5)) == nil)
        #expect(try connection.allocate(size: 4096, fdFlags: FDFlags.readOnly).info.cgroup == "/test")
        try connection.releaseQuiet([7])
        try connection.release(8)
        #expect(daemon.requests.withLock { $0 }.suffix(2) == [.releaseQuiet([7]), .release(8)])
    }
}
