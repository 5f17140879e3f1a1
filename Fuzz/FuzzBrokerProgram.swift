// One fuzz input as a program over a fresh broker (see FuzzBroker.swift for the checks around it).
//
// Layout: one config byte (bits pick tight limits, so refusal paths are reachable in a few steps), then
// up to `maximumSteps` operations, each an opcode byte and its operands. Operands pick among ids the broker
// handed out (buffers, tokens, leases) or raw values near the boundaries that matter (page multiples,
// 2^30, 2^32, 2^63, UInt64.max), strings among heap and policy names or raw bytes (control characters,
// invalid UTF-8, over-long), and fds of every kind the FakeKernel tells apart: fake dma-bufs, memfds with
// and without seals, pipes, eventfds as sync_files (signalled or not), /dev/null, sockets, and buffers a
// client received. Requests go out without waiting for the reply; the loop then runs without blocking
// and every listening client drains what it was sent. A reply that does not decode traps.

import DmaBuf
import DmaBufWire
import Logging
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

private let maximumSteps = 64
private let maximumClients = 4
private let maximumHeldFDs = 48
/// FUZZ_BROKER_TRACE=1 prints every message the clients receive.
private let tracing = getenv("FUZZ_BROKER_TRACE") != nil

/// Values near the boundaries the broker must refuse or round correctly.
private let boundaries: [UInt64] = [
    0, 1, 4095, 4096, 4097, 8192, 1 << 20, (1 << 30) - 1, 1 << 30, (1 << 30) + 1, 1 << 32, (1 << 32) - 4096,
    1 << 40, 1 << 52, (1 << 63) - 1, 1 << 63, UInt64.max - 4095, UInt64.max - 1, UInt64.max, UInt64.max / 4096,
    UInt64(UInt32.max), UInt64(Int32.max), 2, 3, 16, 64, 255, 256, 1024, 4000, 4001, 65536,
]

private let names = ["system", "linux,cma", "udmabuf", "any", "fallback", "cma", "", "physical", "..", "system\0x"]

/// A client connection of the program: a socket pair end, plus what it received.
final class FuzzClient {
    var socket: SharedFD?
    let uid: UInt32
    var nextID: UInt32 = 1
    var held: [SharedFD] = []
    /// A deaf client does not read: the broker's outbox for it fills up.
    var deaf = false
    var peerClosed = false
    /// The version the broker's last hello reply named; nil before one.
    var version: UInt16?

    init(socket: SharedFD, uid: UInt32) {
        self.socket = socket
        self.uid = uid
    }
}

final class BrokerRun {
    private var input: ByteReader
    let loop: EventLoop
    let kernel = FakeKernel()
    let broker: Broker
    var clients: [FuzzClient?] = Array(repeating: nil, count: maximumClients)
    var bufferIDs: [BufferID] = []
    var tokens: [UInt64] = []
    var leaseIDs: [LeaseID] = []
    var fences: [FakeFence] = []

    init(_ input: ByteReader) throws {
        self.input = input
        let config = BrokerRun.config(self.input.byte())
        loop = try EventLoop()
        var logger = Logger(label: "fuzz-broker")
        logger.logLevel = .critical
        broker = Broker(config: config, loop: loop, logger: logger, kernel: kernel, closer: fuzzCloser,
                        fdStore: FDStore(enabled: false, directory: "/nonexistent", socket: nil))
    }

    static func config(_ bits: UInt8) -> DaemonConfig {
        var config = DaemonConfig()
        config.fdStore = false
        config.policies["fallback"] = ["system", "udmabuf"]
        config.revokeDeadline = .milliseconds(bits & 0x80 != 0 ? 1 : 20)
        if bits & 0x01 != 0 { config.maxConnectionsPerUID = 2; config.maxConnections = 3 }
        if bits & 0x02 != 0 { config.defaultQuota = .init(bytes: 1 << 20, buffers: 4); config.maxBufferSize = 1 << 16 }
        if bits & 0x04 != 0 { config.maxOutboxBytes = 4096; config.maxOutboxFDs = 2; config.maxClosingFDsPerUID = 18 }
        if bits & 0x08 != 0 {
            config.maxLeasesPerClient = 2; config.maxLeasesPerUID = 3
            config.maxTokensPerClient = 2; config.maxTokensPerUID = 3
            config.maxFencesPerClient = 2; config.maxFencesPerUID = 3
            config.maxMergeFences = 1
        }
        if bits & 0x10 != 0 { config.helloTimeout = .milliseconds(1) }
        if bits & 0x20 != 0 { config.maxSharesPerBuffer = 1; config.maxSharesPerUID = 2; config.maxBuffersPerClient = 2 }
        if bits & 0x40 != 0 { config.physicalAddressUIDs = [0, 1000] }
        return config
    }

    // MARK: - The program

    func execute() {
        var steps = 0
        while !input.atEnd && steps < maximumSteps {
            steps += 1
            step(input.byte())
            settle()
        }
    }

    private func step(_ opcode: UInt8) {
        switch opcode % 30 {
        case 0: connect()
        case 1: send(.hello(Hello(minimumVersion: version(), maximumVersion: version(), client: text())))
        case 2: send(.listHeaps)
        case 3:
            let (size, heap, tag, cpu) = (value(), text(), text(), input.byte() % 5)
            let (fdFlags, heapFlags) = flags()
            send(.allocate(AllocateRequest(size: size, heap: heap, tag: tag, cpuAccess: cpu, fdFlags: fdFlags, heapFlags: heapFlags)))
        case 4: send(.createUDmabuf(UDmabufRequest(size: value(), tag: text(), hugePages: input.byte() & 1 == 1)))
        case 5:
            let (ranges, tag, udmabufFlags) = (ranges(), text(), input.byte() & 1 == 1 ? input.u32() : 0)
            send(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: ranges, tag: tag, flags: udmabufFlags)), fds: [attachment()])
        case 6: send(.importBuffer(tag: text()), fds: [attachment()])
        case 7: send(.share(ShareRequest(buffer: bufferID(), uid: input.byte() & 1 == 1 ? uid() : nil, oneTimeToken: input.byte() & 1 == 1)))
        case 8: send(.fetch(FetchRequest(buffer: bufferID(), token: token())))
        case 9: send(.release(bufferID()))
        case 10: send(.list(all: input.byte() & 1 == 1, after: input.byte() & 1 == 1 ? bufferID() : 0))
        case 11: send(.info(bufferID()))
        case 12: send(.stats)
        case 13: send(.layout(LayoutRequest(buffer: bufferID(), firstPage: value(), pageCount: value(), physical: input.byte() & 1 == 1)))
        case 14: send(.releaseLease(leaseID()), fds: input.byte() & 1 == 1 ? [attachment()] : [])
        case 15: send(.attachFence(fenceRequest()), fds: [attachment()])
        case 16: send(.beginAccess(fenceRequest()))
        case 17: send(.revoke(RevokeRequest(buffer: bufferID(), deadlineMilliseconds: deadline())))
        case 18: sendRaw()
        case 19: sendMutated()
        case 20: disconnect()
        case 21: signalFence()
        case 22: passTime()
        case 23: client()?.held.removeAll()
        case 24: if let c = client() { c.deaf.toggle() }
        case 25: changeKernel()
        case 26: flood()
        case 27: send(.hello(Hello(minimumVersion: 1, maximumVersion: 1, client: "fuzz")))
        case 28:
            let (count, size, heap, tag) = (UInt16(input.byte() % 20), value(), text(), text())
            let (fdFlags, heapFlags) = flags()
            send(.allocateBatch(AllocateBatchRequest(count: count, size: size, heap: heap, tag: tag, fdFlags: fdFlags, heapFlags: heapFlags)))
        default: send(.releaseQuiet((0..<Int(input.byte() % 6)).map { _ in bufferID() }))
        }
    }

    /// Runs the loop without blocking, and lets listening clients read, until neither had anything to do
    /// (at most four rounds, as before: a flood may keep both busy).
    private func settle() {
        for _ in 0..<4 {
            let events = loop.runOnce(timeoutMilliseconds: 0)
            let received = drainClients()
            if events == 0 && received == 0 { return }
        }
    }

    // MARK: - Operations

    private func connect() {
        let slot = Int(input.byte()) % maximumClients
        let uid = uid()
        guard clients[slot] == nil, let (daemonEnd, clientEnd) = try? UnixSocket.pair() else { return }
        clients[slot] = FuzzClient(socket: clientEnd, uid: uid)
        broker.adopt(daemonEnd, credentials: PeerCredentials(pid: 4000 + Int32(slot), uid: uid, gid: uid))
    }

    private func disconnect() {
        let slot = Int(input.byte()) % maximumClients
        clients[slot] = nil
    }

    /// Sends `request` from a client, with `fds`, and sometimes a descriptor count in the header or a
    /// number of attached fds that does not match the request type.
    private func send(_ request: Request, fds: [SharedFD] = []) {
        guard let client = client(), let socket = client.socket else { return }
        var attached = fds
        var declared = fds.count
        var version = client.version ?? WireLimits.baseVersion
        switch input.byte() % 16 {
        case 0: attached.append(attachment()); declared = attached.count
        case 1: attached = []; declared = fds.count
        case 2: declared = attached.count + 1
        case 5: version = version == 1 ? 2 : 1  // the other version's encoding and header
        default: break
        }
        let id = client.nextID
        client.nextID &+= 1
        let bytes = WireMessage.encode(request, requestID: id, descriptors: declared, version: version)
        _ = try? UnixSocket.send(socket.descriptor, bytes: bytes, fds: attached.map(\.descriptor), flags: CInt(MSG_DONTWAIT))
    }

    /// Raw bytes as a message, sometimes behind a valid header prefix, with up to three fds.
    private func sendRaw() {
        guard let client = client(), let socket = client.socket else { return }
        var bytes: [UInt8] = []
        if input.byte() & 1 == 1 {
            bytes = WireMessage.encode(.stats, requestID: 1)  // magic, version, and a type the next bytes overwrite
            bytes[6] = input.byte() % 0x12
            bytes.removeLast(bytes.count - 20)
        }
        bytes += input.chunk(limit: WireLimits.maximumMessageSize + 16)
        let fds = (0..<Int(input.byte() % 4)).map { _ in attachment() }
        _ = try? UnixSocket.send(socket.descriptor, bytes: bytes, fds: fds.map(\.descriptor), flags: CInt(MSG_DONTWAIT))
    }

    /// A well-formed request with a few bytes overwritten.
    private func sendMutated() {
        guard let client = client(), let socket = client.socket else { return }
        let requests: [Request] = [
            .allocate(AllocateRequest(size: 4096, heap: "system", tag: "m")), .createUDmabuf(UDmabufRequest(size: 8192, tag: "u")),
            .layout(LayoutRequest(buffer: bufferID(), pageCount: 1)), .list(all: true), .share(ShareRequest(buffer: bufferID())),
            .createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 0, size: 4096)], tag: "f")),
            .attachFence(FenceAttachRequest(buffer: bufferID(), access: .write)), .hello(Hello(minimumVersion: 1, maximumVersion: 1, client: "h")),
        ]
        var bytes = WireMessage.encode(requests[Int(input.byte()) % requests.count], requestID: client.nextID, descriptors: 1)
        for _ in 0..<Int(input.byte() % 4) + 1 {
            let at = Int(input.byte()) % bytes.count
            bytes[at] = input.byte()
        }
        let fds = (0..<Int(input.byte() % 3)).map { _ in attachment() }
        _ = try? UnixSocket.send(socket.descriptor, bytes: bytes, fds: fds.map(\.descriptor), flags: CInt(MSG_DONTWAIT))
    }

    /// Many copies of one cheap request without reading: the outbox and socket fill up.
    private func flood() {
        guard let client = client(), let socket = client.socket else { return }
        let request: Request = input.byte() & 1 == 1 ? .list(all: true) : .stats
        for _ in 0..<(Int(input.byte()) % 64 + 1) {
            let bytes = WireMessage.encode(request, requestID: client.nextID)
            client.nextID &+= 1
            guard (try? UnixSocket.send(socket.descriptor, bytes: bytes, flags: CInt(MSG_DONTWAIT))) != nil else { break }
        }
    }

    private func signalFence() {
        guard !fences.isEmpty else { return }
        let b = input.byte()
        if b == 255 {
            fences.forEach { $0.signal() }
            kernel.signalMerges()
        } else {
            fences[Int(b) % fences.count].signal()
        }
    }

    /// Changes what the fake kernel offers or makes fail, then has the broker rescan.
    private func changeKernel() {
        switch input.byte() % 5 {
        case 0: kernel.failing[names[Int(input.byte()) % 3]] = [.noMemory, .invalidArgument, .noSuchFileOrDirectory, .permissionDenied][Int(input.byte()) % 4]
        case 1: kernel.failing = [:]
        case 2: kernel.udmabuf.toggle()
        case 3: kernel.heaps = kernel.heaps.isEmpty ? ["system", "linux,cma"] : Array(kernel.heaps.dropFirst())
        default: kernel.available = input.byte() & 1 == 1 ? nil : value()
        }
        broker.rescanHeaps()
    }

    // MARK: - Reading replies

    /// Reads what listening clients were sent; returns how many messages (and ends of stream) were read.
    @discardableResult
    private func drainClients() -> Int {
        let listening = clients.compactMap { $0 }.filter { !$0.deaf && !$0.peerClosed && $0.socket != nil }
        guard !listening.isEmpty else { return 0 }
        // One poll for all: a receive sets up a 64 KiB buffer, and most clients have nothing waiting.
        var ready = listening.map { pollfd(fd: $0.socket!.descriptor.rawValue, events: Int16(POLLIN), revents: 0) }
        guard poll(&ready, nfds_t(ready.count), 0) > 0 else { return 0 }
        var received = 0
        for (client, state) in zip(listening, ready) where state.revents != 0 {
            guard let socket = client.socket else { continue }
            for _ in 0..<256 {
                guard let message = try? UnixSocket.receive(socket.descriptor, maxBytes: WireLimits.maximumMessageSize + 1, flags: CInt(MSG_DONTWAIT)) else { break }
                received += 1
                if message.isEndOfStream { client.peerClosed = true; break }
                record(message, for: client)
            }
        }
        return received
    }

    private func record(_ message: UnixSocket.Message, for client: FuzzClient) {
        guard !message.dataTruncated, !message.controlTruncated, message.surplusFDs == 0 else {
            fatalError("fuzz-broker: the broker sent a message over the limits: \(message.bytes.count) bytes, \(message.fds.count) fds")
        }
        let response: Response
        do {
            (_, response) = try WireMessage.decodeResponse(message.bytes, descriptors: message.fds.count, version: client.version)
        } catch {
            fatalError("fuzz-broker: the broker sent a message that does not decode in version \(client.version.map(String.init) ?? "nil") (\(error)): \(message.bytes) with \(message.fds.count) fds")
        }
        if tracing { print("fuzz-broker trace: uid \(client.uid) got \(response) with \(message.fds.count) fds") }
        switch response {
        case .hello(let reply): client.version = reply.version
        case .buffer(let info): remember(info.id, in: &bufferIDs)
        case .buffers(let infos): for info in infos.prefix(4) { remember(info.id, in: &bufferIDs) }
        case .share(let reply): if let token = reply.token { remember(token, in: &tokens) }
        case .layout(let layout): remember(layout.lease, in: &leaseIDs)
        case .list(let infos, _): for info in infos.prefix(4) { remember(info.id, in: &bufferIDs) }
        default: break
        }
        client.held += message.fds
        if client.held.count > maximumHeldFDs { client.held.removeFirst(client.held.count - maximumHeldFDs) }
    }

    private func remember(_ id: UInt64, in pool: inout [UInt64]) {
        if !pool.contains(id) && pool.count < 32 { pool.append(id) }
    }

    // MARK: - Finishing

    /// Every client goes away, every fence signals, and the broker must come back to idle: its loop runs
    /// until nothing is ready, then its clock jumps to the next timer (a drain retry, a revocation
    /// deadline), and so on. Not idle with no timer left to wait for means it never would be.
    func finish() {
        for client in clients.compactMap({ $0 }) { client.held.removeAll() }
        clients = Array(repeating: nil, count: maximumClients)
        fences.forEach { $0.signal() }
        fences.removeAll()
        // A begin_access reply's merged fence, attached again by a client, signals once its inputs have.
        kernel.signalMerges()
        for _ in 0..<10_000 {
            // The broker reads one message per wake-up: keep turning while anything was ready.
            let events = loop.runOnce(timeoutMilliseconds: 0)
            if broker.isIdle { return }
            if events > 0 { continue }
            guard let next = loop.nextTimerDelay else { break }
            loop.advanceTime(by: max(next, .milliseconds(1)))
        }
        let draining = broker.buffers.values.filter(\.draining).map(\.id)
        fatalError("fuzz-broker: books not at baseline after every client left and every timer ran: buffers \(broker.buffers.count) (draining \(draining), drain timer \(broker.drainTimer.map(String.init) ?? "none")), leases \(broker.leases.count), fences \(broker.fences.count), tokens \(broker.tokens.count), sessions \(broker.sessions.count), charges \(broker.books.charges.count), perUID \(broker.perUID), timers \(loop.pendingTimers)")
    }

    /// Time passes on the broker's clock without sleeping: hello timeouts, drain retries, revocation
    /// deadlines and read-pause retries fire as they would after that long.
    private func passTime() {
        let steps: [Duration] = [.milliseconds(1), .milliseconds(10), .milliseconds(50), .milliseconds(200), .seconds(1), .seconds(5), .seconds(60), .seconds(601)]
        loop.advanceTime(by: steps[Int(input.byte()) % steps.count])
    }

    // MARK: - Operands

    private func client() -> FuzzClient? {
        let slot = Int(input.byte()) % maximumClients
        if let client = clients[slot] { return client }
        return clients.lazy.compactMap { $0 }.first
    }

    private func uid() -> UInt32 { [1000, 1001, 0, 65534, UInt32.max][Int(input.byte()) % 5] }

    private func version() -> UInt16 {
        let b = input.byte()
        return b < 200 ? UInt16(b % 3) : input.u16()
    }

    private func value() -> UInt64 {
        let b = input.byte()
        switch b % 4 {
        case 0: return boundaries[Int(b / 4) % boundaries.count]
        case 1: return UInt64(input.byte())
        case 2: return UInt64(input.u16()) * 4096
        default: return input.u64()
        }
    }

    private func text() -> String {
        let b = input.byte()
        if b < 160 { return names[Int(b) % names.count] }
        if b < 200 { return "t\(b)" }
        let raw = input.chunk(limit: 300)
        return b < 240 ? String(decoding: raw, as: UTF8.self) : String(decoding: raw.map { $0 % 32 }, as: UTF8.self)
    }

    private func pick(_ pool: [UInt64]) -> UInt64 {
        let b = input.byte()
        if !pool.isEmpty && b < 200 { return pool[Int(b) % pool.count] }
        return value()
    }

    private func bufferID() -> BufferID { pick(bufferIDs) }
    private func token() -> UInt64 { input.byte() & 1 == 1 ? 0 : pick(tokens) }
    private func leaseID() -> LeaseID { pick(leaseIDs) }

    /// v2 allocation flags: the defaults, or raw values (invalid fd flags, nonzero heap flags).
    private func flags() -> (UInt32, UInt64) {
        switch input.byte() % 4 {
        case 0: return (FDFlags.default, 0)
        case 1: return (input.u32(), 0)
        case 2: return (FDFlags.default, value())
        default: return (input.u32(), input.u64())
        }
    }

    private func deadline() -> UInt32 {
        let b = input.byte()
        return b < 128 ? UInt32(b % 4) : (b < 250 ? UInt32(b) : input.u32())
    }

    private func ranges() -> [ByteRange] {
        (0..<Int(input.byte() % 5)).map { _ in ByteRange(offset: value(), size: value()) }
    }

    private func fenceRequest() -> FenceAttachRequest {
        FenceAttachRequest(buffer: bufferID(), firstPage: value(), pageCount: value(), access: AccessMode(rawValue: input.byte() % 4) ?? .read)
    }

    /// An fd of a kind picked by the input.
    private func attachment() -> SharedFD {
        let b = input.byte()
        let made: SharedFD?
        switch b % 10 {
        case 0: made = try? FakeKernel.makeBuffer(size: UInt64(input.byte() % 4 + 1) * 4096)
        case 1: made = try? Memfd(name: "client", size: Int(input.byte() % 8 + 1) * 4096, seals: [.shrink]).fd
        case 2: made = try? Memfd(name: "client", size: Int(input.byte()) * 512, seals: [[], [.write], [.grow, .shrink, .seal], [.futureWrite, .shrink]][Int(b / 10) % 4]).fd
        case 3: made = pipeEnd()
        case 4, 5:
            let fence = FakeFence()
            if b % 10 == 5 { fence.signal() }
            fences.append(fence)  // every one, so that finish() can signal it
            made = fence.fd
        case 6: made = SharedFD(adopting: open("/dev/null", O_RDONLY | O_CLOEXEC))
        case 7: made = try? UnixSocket.pair().0
        default:
            let held = clients.compactMap { $0 }.flatMap(\.held)
            made = held.isEmpty ? try? FakeKernel.makeBuffer(size: 4096) : held[Int(b / 10) % held.count]
        }
        return made ?? SharedFD(adopting: open("/dev/null", O_RDONLY | O_CLOEXEC))
    }

    private func pipeEnd() -> SharedFD? {
        var ends: [CInt] = [0, 0]
        guard pipe(&ends) == 0 else { return nil }
        let read = SharedFD(adopting: ends[0])
        let write = SharedFD(adopting: ends[1])
        return input.byte() & 1 == 1 ? read : write
    }
}
