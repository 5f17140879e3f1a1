// libFuzzer target for the broker's request handling (scripts/fuzz-broker): each input is a sequence of
// requests, from up to three clients of different uids, with fake fds (memfds, pipes, eventfds standing
// for sync_files, fake dma-bufs), served by a fresh Broker over socket pairs against the FakeKernel of
// the host tests. After every input the clients hang up, every fence signals, and the broker's books and
// the process's fds must be back at their baseline; anything else aborts (a finding).
//
// Input: records of [client u8][fd kind u8][length u16 LE][message bytes]. The header's magic, version,
// payload length and fd count are patched so most inputs reach the handlers; the type, request id and
// payload are the fuzzer's.
import DmaBuf
import DmaBufWire
import Logging
import SystemPackage
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

private let uids: [UInt32] = [0, 1000, 1001]

private final class FuzzClient {
    let socket: SharedFD
    var version: UInt16 = 1
    init(socket: SharedFD) { self.socket = socket }
}

private func fakeFD(_ kind: UInt8, fences: inout [FakeFence]) -> SharedFD? {
    switch kind % 6 {
    case 1: return try? Memfd(name: "fuzz", size: 4 * pageSize).fd
    case 2:
        var fds: [CInt] = [-1, -1]
        guard pipe(&fds) == 0 else { return nil }
        close(fds[1])
        return SharedFD(adopting: fds[0])
    case 3, 4:
        let fence = FakeFence()
        fences.append(fence)
        return fence.fd
    case 5: return try? FakeKernel.makeBuffer(size: 2 * UInt64(pageSize))
    default: return nil
    }
}

private func patch(_ bytes: inout [UInt8], version: UInt16, fds: Int) {
    guard bytes.count >= WireLimits.headerSize else { return }
    let magic: UInt32 = 0x4642_4D44
    for i in 0..<4 { bytes[i] = UInt8(truncatingIfNeeded: magic >> (8 * UInt32(i))) }
    bytes[4] = UInt8(truncatingIfNeeded: version); bytes[5] = UInt8(truncatingIfNeeded: version >> 8)
    let length = UInt32(bytes.count - WireLimits.headerSize)
    for i in 0..<4 { bytes[12 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i))) }
    bytes[16] = UInt8(fds); bytes[17] = 0
}

private func drain(_ client: FuzzClient) {
    while let message = try? UnixSocket.receive(client.socket.descriptor, maxBytes: WireLimits.maximumMessageSize, flags: CInt(MSG_DONTWAIT)),
          !message.isEndOfStream {
        if let (_, response) = try? WireMessage.decodeResponse(message.bytes, descriptors: message.fds.count, version: client.version),
           case .hello(let hello) = response {
            client.version = hello.version
        }
    }
}

private func run(_ data: UnsafeRawBufferPointer) {
    let before = FakeKernel.openFDs().count
    var config = DaemonConfig()
    config.fdStore = false
    config.revokeDeadline = .milliseconds(1)
    config.defaultQuota = .init(bytes: 64 << 20, buffers: 32)
    config.maxBufferSize = 16 << 20
    guard let loop = try? EventLoop() else { return }
    var logger = Logger(label: "fuzz")
    logger.logLevel = .critical
    let kernel = FakeKernel()
    do {
        let broker = Broker(config: config, loop: loop, logger: logger, kernel: kernel,
                            fdStore: FDStore(enabled: false, directory: "/nonexistent", socket: nil))
        broker.drainInterval = .zero
        var clients: [FuzzClient] = []
        var fences: [FakeFence] = []
        for uid in uids {
            guard let (daemonEnd, clientEnd) = try? UnixSocket.pair() else { return }
            broker.adopt(daemonEnd, credentials: PeerCredentials(pid: 4242, uid: uid, gid: uid))
            let client = FuzzClient(socket: clientEnd)
            clients.append(client)
            // Clients 0 and 1 (uids 0, 1000) speak v1, client 2 (uid 1001) v2.
            _ = try? UnixSocket.send(clientEnd.descriptor, bytes: WireMessage.encode(.hello(Hello(minimumVersion: 1, maximumVersion: uid == 1001 ? 2 : 1, client: "fuzz")), requestID: 1))
        }
        for _ in 0..<4 { loop.runOnce(timeoutMilliseconds: 0) }
        clients.forEach(drain)
        var offset = 0
        var steps = 0
        while offset + 4 <= data.count, steps < 64 {
            let client = clients[Int(data[offset]) % clients.count]
            let kind = data[offset + 1]
            let length = min(Int(data[offset + 2]) | Int(data[offset + 3]) << 8, data.count - offset - 4)
            var bytes = Array(data[(offset + 4)..<(offset + 4 + length)])
            offset += 4 + length
            steps += 1
            let fd = fakeFD(kind, fences: &fences)
            patch(&bytes, version: client.version, fds: fd == nil ? 0 : 1)
            _ = try? UnixSocket.send(client.socket.descriptor, bytes: bytes, fds: fd.map { [$0.descriptor] } ?? [], flags: CInt(MSG_DONTWAIT))
            loop.runOnce(timeoutMilliseconds: 0)
            if kind & 0x80 != 0, let fence = fences.last { fence.signal() }
            drain(client)
        }
        clients.removeAll()
        fences.forEach { $0.signal() }
        fences.removeAll()
        for _ in 0..<200 where !broker.isIdle { loop.runOnce(timeoutMilliseconds: 1) }
        guard broker.isIdle else {
            fatalError("books not at baseline: buffers \(broker.buffers.count) leases \(broker.leases.count) fences \(broker.fences.count) tokens \(broker.tokens.count) sessions \(broker.sessions.count) charges \(broker.books.charges.count)")
        }
    }
    // The closer thread closes what clients sent; give it a bounded number of chances.
    var fds = FakeKernel.openFDs().count
    for _ in 0..<2000 where fds > before + 2 {
        usleep(100)
        fds = FakeKernel.openFDs().count
    }
    if fds > before + 2 { fatalError("fds: \(fds) after the input, \(before) before") }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzBroker(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    signal(SIGPIPE, SIG_IGN)
    run(UnsafeRawBufferPointer(start: data, count: count))
    return 0
}
