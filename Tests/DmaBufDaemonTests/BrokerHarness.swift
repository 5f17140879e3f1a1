import DmaBuf
import DmaBufWire
import Logging
import SystemPackage
import Testing
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

struct NoReply: Error, CustomStringConvertible { var description: String }

/// A broker on the host: its event loop driven by the test's own thread, clients over socket pairs with
/// whatever credentials the test names, and a ``FakeKernel``.
final class BrokerHarness {
    let loop: EventLoop
    let kernel = FakeKernel()
    let broker: Broker
    let fdsAtStart: Int
    var clients: [TestClient] = []

    init(_ configure: (inout DaemonConfig) -> Void = { _ in }, fdStore: FDStore? = nil) throws {
        var config = DaemonConfig()
        config.fdStore = false
        config.revokeDeadline = .milliseconds(20)
        config.policies["fallback"] = ["system", "udmabuf"]
        configure(&config)
        loop = try EventLoop()
        fdsAtStart = FakeKernel.openFDs().count
        var logger = Logger(label: "broker-test")
        logger.logLevel = .critical
        broker = Broker(config: config, loop: loop, logger: logger, kernel: kernel,
                        fdStore: fdStore ?? FDStore(enabled: false, directory: "/nonexistent", socket: nil))
    }

    /// Runs `body` against a fresh broker, then (with every local of `body` gone) checks the baseline.
    static func scenario(_ configure: (inout DaemonConfig) -> Void = { _ in }, fdStore: FDStore? = nil,
                         sourceLocation: SourceLocation = #_sourceLocation, _ body: (BrokerHarness) throws -> Void) throws {
        let h = try BrokerHarness(configure, fdStore: fdStore)
        try body(h)
        h.expectBaseline(sourceLocation: sourceLocation)
    }

    /// A connected client of `uid`, after hello unless `hello` is false.
    func connect(uid: UInt32 = 1000, pid: Int32 = 4242, hello: Bool = true, version: UInt16 = 1, cgroup: String = "") throws -> TestClient {
        let (daemonEnd, clientEnd) = try UnixSocket.pair()
        let client = TestClient(harness: self, socket: clientEnd, uid: uid)
        broker.adopt(daemonEnd, credentials: PeerCredentials(pid: pid, uid: uid, gid: uid), cgroup: cgroup)
        clients.append(client)
        if hello {
            let reply = try client.request(.hello(Hello(minimumVersion: 1, maximumVersion: version, client: "test")))
            client.version = version
            guard case .hello = reply.0 else { throw NoReply(description: "hello answered \(reply.0)") }
        }
        return client
    }

    /// Runs loop iterations until `condition` holds, or a bounded number of them (then false).
    @discardableResult
    func pump(until condition: () -> Bool = { false }, iterations: Int = 200, waitMilliseconds: CInt = 5) -> Bool {
        for _ in 0..<iterations {
            if condition() { return true }
            loop.runOnce(timeoutMilliseconds: waitMilliseconds)
        }
        return condition()
    }

    /// Closes every client and checks the books and the process's fds are back where they started.
    func expectBaseline(sourceLocation: SourceLocation = #_sourceLocation) {
        for client in clients { client.close() }
        clients = []
        kernel.signalMerges()  // their inputs are signalled or gone; the fake keeps them open until then
        let idle = pump(until: { self.broker.isIdle }, iterations: 400)
        #expect(idle, "books not at baseline: buffers \(broker.buffers.count), leases \(broker.leases.count), fences \(broker.fences.count), tokens \(broker.tokens.count), sessions \(broker.sessions.count), charges \(broker.books.charges.count), perUID \(broker.perUID)", sourceLocation: sourceLocation)
        // The fd closer runs on its own thread: give it a bounded number of chances.
        var fds = FakeKernel.openFDs().count
        for _ in 0..<400 where fds > fdsAtStart {
            loop.runOnce(timeoutMilliseconds: 5)
            fds = FakeKernel.openFDs().count
        }
        #expect(fds <= fdsAtStart, "fds: \(fds) now, \(fdsAtStart) at start", sourceLocation: sourceLocation)
    }
}

/// One client connection, synchronous: send a request, pump the broker until the reply arrives.
final class TestClient {
    let harness: BrokerHarness
    private(set) var socket: SharedFD?
    let uid: UInt32
    var events: [Response] = []
    var nextID: UInt32 = 1
    /// The negotiated version: requests are encoded and replies decoded in it.
    var version: UInt16 = 1

    init(harness: BrokerHarness, socket: SharedFD, uid: UInt32) {
        self.harness = harness
        self.socket = socket
        self.uid = uid
    }

    func close() { socket = nil }

    func send(_ request: Request, fds: [SharedFD] = []) throws -> UInt32 {
        guard let socket else { throw NoReply(description: "closed") }
        let id = nextID
        nextID += 1
        try UnixSocket.send(socket.descriptor, bytes: WireMessage.encode(request, requestID: id, descriptors: fds.count, version: version), fds: fds.map(\.descriptor))
        return id
    }

    /// Sends without waiting; false when the socket is full (the broker is not reading).
    func send(_ request: Request, dontWait: Bool) throws -> Bool {
        do {
            try UnixSocket.send(socket!.descriptor, bytes: WireMessage.encode(request, requestID: nextID), flags: CInt(MSG_DONTWAIT))
            nextID += 1
            return true
        } catch let error as DmaBufError where error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable {
            return false
        }
    }

    func sendRaw(_ bytes: [UInt8], fds: [SharedFD] = []) throws {
        try UnixSocket.send(socket!.descriptor, bytes: bytes, fds: fds.map(\.descriptor))
    }

    /// The next message, pumping the broker; nil at end of stream.
    func receive() throws -> (Header, Response, [SharedFD])? {
        guard let socket else { throw NoReply(description: "closed") }
        for _ in 0..<2000 {
            do {
                let message = try UnixSocket.receive(socket.descriptor, maxBytes: WireLimits.maximumMessageSize, flags: CInt(MSG_DONTWAIT))
                if message.isEndOfStream { return nil }
                let (header, response) = try WireMessage.decodeResponse(message.bytes, descriptors: message.fds.count, version: version)
                return (header, response, message.fds)
            } catch let error as DmaBufError where error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable {
                harness.loop.runOnce(timeoutMilliseconds: 1)
            }
        }
        throw NoReply(description: "no message from the broker")
    }

    /// Sends a request and returns its reply; events that arrive first are kept in `events`.
    @discardableResult
    func request(_ request: Request, fds: [SharedFD] = []) throws -> (Response, [SharedFD]) {
        let id = try send(request, fds: fds)
        while let (header, response, fds) = try receive() {
            if header.requestID == id { return (response, fds) }
            events.append(response)
        }
        throw NoReply(description: "connection closed before the reply to \(request)")
    }

    /// Waits for the next event (pumping the broker).
    func event() throws -> Response? {
        if !events.isEmpty { return events.removeFirst() }
        return try receive()?.1
    }

    /// True once the daemon has closed the connection.
    func isClosed() -> Bool {
        guard let socket else { return true }
        var p = pollfd(fd: socket.descriptor.rawValue, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, 0) == 1 else { return false }
        var byte: UInt8 = 0
        return recv(socket.descriptor.rawValue, &byte, 1, CInt(MSG_PEEK | MSG_DONTWAIT)) == 0
    }

    // Conveniences

    func allocate(_ size: UInt64 = 4096, heap: String = "system", tag: String = "t") throws -> (BufferInfo, SharedFD) {
        let (reply, fds) = try request(.allocate(AllocateRequest(size: size, heap: heap, tag: tag)))
        guard case .buffer(let info) = reply, fds.count == 1 else { throw NoReply(description: "allocate answered \(reply)") }
        return (info, fds[0])
    }

    func expectOK(_ request: Request, fds: [SharedFD] = [], sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (reply, _) = try self.request(request, fds: fds)
        #expect(reply == .ok, "\(request) answered \(reply)", sourceLocation: sourceLocation)
    }

    /// Expects an error reply with `errno`, `code`, and a message containing each of `parts`.
    @discardableResult
    func expectRefusal(_ request: Request, fds: [SharedFD] = [], _ errno: Errno, _ code: WireError.Code, _ parts: String...,
                       sourceLocation: SourceLocation = #_sourceLocation) throws -> WireError? {
        let (reply, _) = try self.request(request, fds: fds)
        guard case .error(let error) = reply else {
            Issue.record("\(request) answered \(reply), expected \(errno.name)", sourceLocation: sourceLocation)
            return nil
        }
        #expect(error.errno == errno.rawValue, "errno \(error.errno), expected \(errno.name): \(error.message)", sourceLocation: sourceLocation)
        #expect(error.code == code, "code \(error.code): \(error.message)", sourceLocation: sourceLocation)
        #expect(error.message.contains(errno.name), "message lacks the errno name: \(error.message)", sourceLocation: sourceLocation)
        for part in parts {
            #expect(error.message.contains(part), "message lacks '\(part)': \(error.message)", sourceLocation: sourceLocation)
        }
        return error
    }
}

func makeMemfd(_ size: Int, seals: Memfd.Seals = [.shrink]) throws -> SharedFD {
    try Memfd(name: "client", size: size, seals: seals).fd
}
