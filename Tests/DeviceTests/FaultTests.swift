// Fault injection against a real dmabufd: clients that vanish at random points (connections closed
// abruptly mid-request, processes killed with SIGKILL while they hold buffers, leases and fences), many
// cycles, then proof that the daemon is back where it started: no buffer, lease or fence left, nothing
// charged to anyone, its open fd count back to the baseline and its memory near it.
//
// Cycles are seeded (DMABUFD_FAULT_SEED) so that a failing run reproduces, and bounded by a count
// (DMABUFD_FAULT_CYCLES, default 1000) and a time budget (DMABUFD_FAULT_SECONDS, default 60) so that the
// test fits a slow emulated machine; `scripts/bench` runs the same cycles 10 000 times as a soak.
import DmaBufTestSupport
import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

extension SplitMix64 {
    /// True with probability `p`.
    mutating func chance(_ p: Double) -> Bool { Double.random(in: 0..<1, using: &self) < p }
}

/// What /proc says about another process.
enum ProcessProbe {
    /// Entries in /proc/PID/fd.
    static func openFDs(_ pid: pid_t) -> Int {
        guard let dir = opendir("/proc/\(pid)/fd") else { return -1 }
        defer { closedir(dir) }
        var count = 0
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { count += 1 }
        }
        return count
    }

    /// A `Name:   N kB` field of /proc/PID/status, in KiB (VmRSS, VmHWM, ...).
    static func statusKiB(_ pid: pid_t, _ field: String = "VmRSS") -> Int {
        guard let text = Harness.readFile("/proc/\(pid)/status") else { return -1 }
        for line in text.split(separator: "\n") where line.hasPrefix(field + ":") {
            let digits = line.dropFirst(field.count + 1).filter { $0.isNumber }
            return Int(String(digits)) ?? -1
        }
        return -1
    }
}

/// The daemon's books, as its root client sees them, for before/after comparisons.
struct DaemonBooks: CustomStringConvertible {
    var buffers: Int
    var bytes: UInt64
    var leases: Int
    var pendingFences: Int
    var connected: Int
    var charged: UInt64
    var listed: Int

    init(_ connection: DmaBufConnection) throws {
        let stats = try connection.stats()
        buffers = Int(stats.buffers)
        bytes = stats.bytes
        leases = Int(stats.leases)
        pendingFences = Int(stats.pendingFences)
        connected = Int(stats.connectedClients)
        charged = stats.clients.reduce(0) { $0 + $1.bytes + UInt64($1.buffers) }
        listed = try connection.list(all: true).count
    }

    /// Nothing held by anyone; only `connections` clients connected.
    func isEmpty(connections: Int) -> Bool {
        buffers == 0 && bytes == 0 && leases == 0 && pendingFences == 0 && charged == 0 && listed == 0 && connected == connections
    }

    var description: String {
        "buffers \(buffers), bytes \(bytes), leases \(leases), pending fences \(pendingFences), clients \(connected), charged \(charged), listed \(listed)"
    }
}

/// Clients that go away at random points. One `FaultCycles` value runs in this process: each cycle opens
/// one or two connections, does a few things with them, and then drops them without warning — before
/// the handshake, mid-request with the reply unread, after a malformed or truncated message, or
/// holding buffers, shared tokens, leases and fences.
struct FaultCycles {
    let socketPath: String
    var rng: SplitMix64
    let useUDmabuf: Bool
    let useFences: Bool
    /// Dma-buf fds kept past their connection, so the daemon must drain them once they are dropped.
    private var kept: [DmaBuffer] = []
    /// vgem fences attached through dying connections; signalled at the end.
    private var fences: [TestFence] = []
    /// How each cycle ended, by kind.
    private(set) var endings: [String: Int] = [:]

    init(socketPath: String, seed: UInt64, useUDmabuf: Bool, useFences: Bool) {
        self.socketPath = socketPath
        self.rng = SplitMix64(seed: seed)
        self.useUDmabuf = useUDmabuf
        self.useFences = useFences
    }

    /// Runs up to `cycles` cycles, stopping early at `deadline`; returns how many ran.
    @discardableResult
    mutating func run(cycles: Int, until deadline: ContinuousClock.Instant? = nil) throws -> Int {
        for index in 0..<cycles {
            if let deadline, ContinuousClock.now >= deadline { return index }
            do {
                try cycle()
            } catch {
                throw TestFailure(description: "cycle \(index): \(error)")
            }
        }
        return cycles
    }

    /// Signals every fence still pending and drops every kept fd: after this the daemon has no reason
    /// left to hold anything.
    mutating func finish() {
        for fence in fences { try? fence.signal() }
        fences.removeAll()
        kept.removeAll()
    }

    private mutating func note(_ ending: String) { endings[ending, default: 0] += 1 }

    private mutating func cycle() throws {
        switch Int.random(in: 0..<20, using: &rng) {
        case 0, 1:
            // Connect and vanish before saying anything.
            _ = try UnixSocket.connect(path: socketPath)
            note("before-hello")
        case 2, 3:
            // Say hello and vanish before the reply.
            let socket = try UnixSocket.connect(path: socketPath)
            try UnixSocket.send(socket.descriptor, bytes: WireMessage.encode(.hello(Hello(client: "fault")), requestID: 1))
            note("mid-hello")
        case 4, 5:
            try sharedPair()
        default:
            try session()
        }
    }

    /// One connection: a few completed steps, then an abrupt end.
    private mutating func session() throws {
        let connection = try DmaBufConnection(path: socketPath, clientName: "fault")
        var held: [RemoteBuffer] = []
        var leases: [LeaseID] = []
        for _ in 0..<Int.random(in: 0...4, using: &rng) {
            try step(connection, &held, &leases)
        }
        try abruptEnd(connection, held)
        if rng.chance(0.15), let buffer = held.randomElement(using: &rng) {
            kept.append(buffer.buffer)
            if kept.count > 8 { kept.removeFirst() }
        }
    }

    /// Two connections: one allocates and shares by token, the other fetches it; both vanish.
    private mutating func sharedPair() throws {
        let owner = try DmaBufConnection(path: socketPath, clientName: "fault-owner")
        let buffer = try owner.allocate(size: pageSize * Int.random(in: 1...16, using: &rng), heap: "system", tag: "fault-shared")
        let token = try owner.share(buffer.info.id, oneTimeToken: true)!
        let peer = try DmaBufConnection(path: socketPath, clientName: "fault-peer")
        let fetched = try peer.fetch(buffer.info.id, token: token)
        if rng.chance(0.5) { _ = try peer.layout(fetched.info.id) }
        // Whoever goes first, the other still holds it; then both are gone.
        if rng.chance(0.5) {
            try abruptEnd(owner, [buffer])
            try abruptEnd(peer, [fetched])
        } else {
            try abruptEnd(peer, [fetched])
            try abruptEnd(owner, [buffer])
        }
        note("shared-pair")
    }

    /// One completed request on `connection`: allocate, make a udmabuf, share, take or release a lease (maybe
    /// with a fence), attach a fence to a range, release, or ask for stats.
    mutating func step(_ connection: DmaBufConnection, _ held: inout [RemoteBuffer], _ leases: inout [LeaseID]) throws {
        let roll = Int.random(in: 0..<100, using: &rng)
        switch roll {
        case 0..<35:
            held.append(try connection.allocate(size: pageSize * Int.random(in: 1...64, using: &rng), heap: "system", tag: "fault"))
        case 35..<45 where useUDmabuf:
            held.append(try connection.createUDmabuf(size: pageSize * Int.random(in: 1...16, using: &rng), tag: "fault-u"))
        case 45..<55 where !held.isEmpty:
            _ = try connection.share(held.randomElement(using: &rng)!.info.id, oneTimeToken: true)
        case 55..<70 where !held.isEmpty:
            leases.append(try connection.layout(held.randomElement(using: &rng)!.info.id).lease)
        case 70..<78 where !leases.isEmpty:
            let lease = leases.removeLast()
            if useFences && rng.chance(0.2) {
                let fence = try TestFence.make()
                fences.append(fence)
                try connection.releaseLease(lease, fence: fence.syncFile)
            } else {
                try connection.releaseLease(lease)
            }
        case 78..<83 where useFences && !held.isEmpty:
            let fence = try TestFence.make()
            fences.append(fence)
            let buffer = held.randomElement(using: &rng)!
            let pages = UInt64(buffer.info.size) / UInt64(pageSize)
            let first = UInt64.random(in: 0..<pages, using: &rng)
            try connection.attachFence(fence.syncFile, buffer: buffer.info.id, firstPage: first,
                                       pageCount: UInt64.random(in: 1...(pages - first), using: &rng),
                                       access: rng.chance(0.5) ? .write : .read)
        case 83..<93 where !held.isEmpty:
            let index = Int.random(in: 0..<held.count, using: &rng)
            let buffer = held.remove(at: index)
            try connection.release(buffer.info.id)
        default:
            _ = try connection.stats()
        }
    }

    /// Ends a connection without warning. The reply to a last request, and any fds it carries, are left
    /// unread in the socket when it closes.
    private mutating func abruptEnd(_ connection: DmaBufConnection, _ held: [RemoteBuffer]) throws {
        let socket = connection.socket.descriptor
        let roll = Int.random(in: 0..<10, using: &rng)
        switch roll {
        case 0..<3:
            note("dropped")
        case 3..<6:
            let request: Request
            switch Int.random(in: 0..<4, using: &rng) {
            case 0: request = .allocate(AllocateRequest(size: UInt64(pageSize * Int.random(in: 1...64, using: &rng)), heap: "system", tag: "unread"))
            case 1 where useUDmabuf: request = .createUDmabuf(UDmabufRequest(size: UInt64(pageSize * 4), tag: "unread-u"))
            case 2 where !held.isEmpty: request = .layout(LayoutRequest(buffer: held.randomElement(using: &rng)!.info.id))
            default: request = .info(held.randomElement(using: &rng)?.info.id ?? 1)
            }
            try UnixSocket.send(socket, bytes: WireMessage.encode(request, requestID: 999_999, version: connection.version))
            note("reply-unread")
        case 6..<8:
            var bytes = WireMessage.encode(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "cut")), requestID: 999_998, version: connection.version)
            bytes.removeLast(Int.random(in: 1..<bytes.count, using: &rng))
            try UnixSocket.send(socket, bytes: bytes)
            note("truncated")
        default:
            var bytes = [UInt8](repeating: 0, count: Int.random(in: 1...64, using: &rng))
            for i in bytes.indices { bytes[i] = UInt8.random(in: 0...255, using: &rng) }
            try UnixSocket.send(socket, bytes: bytes)
            note("garbage")
        }
    }
}

/// Where a fault run leaves the daemon relative to its baseline.
struct FaultOutcome: CustomStringConvertible {
    var cycles: Int
    var seconds: Double
    var fdsBefore: Int
    var fdsAfter: Int
    var rssBeforeKiB: Int
    var rssAfterKiB: Int
    var rssPeakKiB: Int
    var books: String

    var description: String {
        let perCycle = seconds * 1000 / Double(max(cycles, 1))
        return "\(cycles) cycles in \(fmt(seconds, 1)) s (\(fmt(perCycle, 1)) ms/cycle); daemon fds \(fdsBefore) -> \(fdsAfter); "
            + "VmRSS \(rssBeforeKiB) -> \(rssAfterKiB) KiB (\(rssAfterKiB - rssBeforeKiB >= 0 ? "+" : "")\(rssAfterKiB - rssBeforeKiB), peak \(rssPeakKiB)); \(books)"
    }
}

func fmt(_ value: Double, _ decimals: Int) -> String {
    guard value.isFinite else { return "\(value)" }
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let rounded = (value * scale).rounded() / scale
    var text = "\(rounded)"
    if decimals == 0, text.hasSuffix(".0") { text.removeLast(2) }
    if let dot = text.firstIndex(of: "."), decimals > 0 {
        let have = text.distance(from: dot, to: text.endIndex) - 1
        if have < decimals { text += String(repeating: "0", count: decimals - have) }
    }
    return text
}

enum FaultRun {
    /// Runs `cycles` abrupt-client cycles against the daemon at `socketPath` (process `pid`) after a
    /// warm-up, then waits for the daemon to settle and measures it against the warm baseline.
    /// With a `budget`, stops early when it runs out (a slow emulated machine does fewer cycles); the
    /// outcome says how many ran.
    /// `otherConnections` is how many connections besides its own probe the caller keeps open meanwhile.
    static func abruptClients(socketPath: String, pid: pid_t, cycles: Int, budget: Duration? = nil, seed: UInt64,
                              useFences: Bool, otherConnections: Int = 0) throws -> FaultOutcome {
        let probe = try DmaBufConnection(path: socketPath, clientName: "fault-probe")
        var warmup = FaultCycles(socketPath: socketPath, seed: seed ^ 0x5741_524D, useUDmabuf: true, useFences: useFences)
        try warmup.run(cycles: min(30, cycles))
        warmup.finish()
        try settle(probe, connections: 1 + otherConnections)
        let fdsBefore = ProcessProbe.openFDs(pid)
        let rssBefore = ProcessProbe.statusKiB(pid)
        let start = ContinuousClock.now
        var faults = FaultCycles(socketPath: socketPath, seed: seed, useUDmabuf: true, useFences: useFences)
        let done = try faults.run(cycles: cycles, until: budget.map { start + $0 })
        let elapsed = ContinuousClock.now - start
        let peak = ProcessProbe.statusKiB(pid)
        faults.finish()
        let books = try settle(probe, connections: 1 + otherConnections)
        return FaultOutcome(
            cycles: done, seconds: seconds(elapsed), fdsBefore: fdsBefore, fdsAfter: ProcessProbe.openFDs(pid),
            rssBeforeKiB: rssBefore, rssAfterKiB: ProcessProbe.statusKiB(pid), rssPeakKiB: max(peak, ProcessProbe.statusKiB(pid, "VmHWM")),
            books: "endings \(faults.endings.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")); after: \(books)")
    }

    /// Waits until nothing is held and only `connections` clients (the probe among them) are connected;
    /// returns the books then.
    @discardableResult
    static func settle(_ probe: DmaBufConnection, connections: Int = 1, timeout: Duration = .seconds(20)) throws -> DaemonBooks {
        var books = try DaemonBooks(probe)
        let deadline = ContinuousClock.now + timeout
        while !books.isEmpty(connections: connections) {
            guard ContinuousClock.now < deadline else {
                throw TestFailure(description: "the daemon did not return to empty within \(timeout): \(books)")
            }
            usleep(20_000)
            books = try DaemonBooks(probe)
        }
        return books
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }

    static func environment(_ name: String) -> String? {
        getenv(name).map { String(cString: $0) }
    }

    static var seed: UInt64 {
        environment("DMABUFD_FAULT_SEED").flatMap { UInt64($0, radix: $0.hasPrefix("0x") ? 16 : 10) ?? UInt64($0.dropFirst(2), radix: 16) } ?? 0xD0_5EED
    }

    /// The most cycles a test runs (DMABUFD_FAULT_CYCLES, default 1000).
    static var cycles: Int {
        environment("DMABUFD_FAULT_CYCLES").flatMap { Int($0) } ?? 1000
    }

    /// How long a test may spend on cycles (DMABUFD_FAULT_SECONDS, default 60): under TCG on a busy host
    /// 1000 cycles may not fit, and the test then checks the cycles that did.
    static var budget: Duration {
        .seconds(environment("DMABUFD_FAULT_SECONDS").flatMap { Int($0) } ?? 60)
    }

    /// The fewest cycles that still make a meaningful run; fewer within the budget is a failure.
    static let minimumCycles = 150
}

private let heapAndUDmabuf: [Requirement] = [.heap("system"), .udmabuf, .root, .fence]

enum FaultTests {
    /// The most VmRSS the daemon may keep above its warm baseline after a run.
    static let rssSlackKiB = 2048

    static let all: [DeviceTest] = [
        DeviceTest("fault.abrupt-clients-return-to-baseline", requires: heapAndUDmabuf) {
            try withDaemon { daemon in
                let seed = FaultRun.seed
                let outcome: FaultOutcome
                do {
                    outcome = try FaultRun.abruptClients(socketPath: daemon.socketPath, pid: daemon.pid, cycles: FaultRun.cycles,
                                                         budget: FaultRun.budget, seed: seed, useFences: true)
                } catch {
                    throw TestFailure(description: "seed 0x\(String(seed, radix: 16)): \(error)")
                }
                Harness.say("  fault.abrupt-clients: seed 0x\(String(seed, radix: 16)): \(outcome)")
                try expect(outcome.cycles >= min(FaultRun.minimumCycles, FaultRun.cycles), "only \(outcome.cycles) cycles fit the budget: \(outcome)")
                try expect(outcome.fdsAfter <= outcome.fdsBefore, "daemon fds grew: \(outcome)")
                try expect(outcome.rssAfterKiB - outcome.rssBeforeKiB <= rssSlackKiB, "daemon VmRSS grew more than \(rssSlackKiB) KiB: \(outcome)")
                try expect(daemon.isRunning, "the daemon died")
            }
        },
        DeviceTest("fault.kill-9-clients-at-random-points", requires: heapAndUDmabuf) {
            try withDaemon { daemon in
                let seed = FaultRun.seed
                var rng = SplitMix64(seed: seed)
                let probe = try daemon.connect("fault-probe")
                // Round 0 warms up: the baseline is taken after one killed child, so it includes what the
                // daemon allocates for good on first use.
                let kills = FaultRun.environment("DMABUFD_FAULT_KILLS").flatMap { Int($0) } ?? 8
                var fdsBefore = 0, rssBefore = 0
                var lifetimes: [Int] = []
                var reports: [String] = []
                let start = ContinuousClock.now
                for round in 0...kills {
                    if round == 1 {
                        try FaultRun.settle(probe)
                        fdsBefore = ProcessProbe.openFDs(daemon.pid)
                        rssBefore = ProcessProbe.statusKiB(daemon.pid)
                    }
                    let (mine, theirs) = try UnixSocket.pair(.seqpacket)
                    let childSeed = rng.next()
                    let pid = try Harness.child("fault-churn", [daemon.socketPath, String(childSeed)], fds: [theirs.descriptor])
                    let channel = Channel(socket: mine)
                    let (text, _) = try channel.receive(timeout: .seconds(60))
                    try expect(text == "ready", "churn child: \(text)")
                    let lifetime = Int.random(in: 0...1200, using: &rng)
                    usleep(UInt32(lifetime) * 1000)
                    kill(pid, SIGKILL)
                    let status = Harness.wait(pid)
                    // What the child had done by the time it died (it reports every 4 requests), or its error.
                    var progress = "0 steps"
                    while let message = try? channel.receive(timeout: .zero), !message.text.isEmpty { progress = message.text }
                    try expect(status == 128 + SIGKILL, "the churn child exited with \(status) before it was killed: \(progress)")
                    if round > 0 {
                        lifetimes.append(lifetime)
                        reports.append(String(progress.prefix(while: { $0 != " " })))
                    }
                }
                let books = try FaultRun.settle(probe)
                let fdsAfter = ProcessProbe.openFDs(daemon.pid)
                let rssAfter = ProcessProbe.statusKiB(daemon.pid)
                let elapsed = FaultRun.seconds(ContinuousClock.now - start)
                Harness.say("  fault.kill-9: seed 0x\(String(seed, radix: 16)): \(kills) kills after \(lifetimes.map(String.init).joined(separator: "/")) ms, having done ≥\(reports.joined(separator: "/")) requests, in \(fmt(elapsed, 1)) s; "
                    + "daemon fds \(fdsBefore) -> \(fdsAfter); VmRSS \(rssBefore) -> \(rssAfter) KiB; after: \(books)")
                try expect(fdsAfter <= fdsBefore, "daemon fds grew from \(fdsBefore) to \(fdsAfter)")
                try expect(rssAfter - rssBefore <= rssSlackKiB, "daemon VmRSS grew from \(rssBefore) to \(rssAfter) KiB")
                try expect(daemon.isRunning, "the daemon died")
            }
        },
    ]
}
