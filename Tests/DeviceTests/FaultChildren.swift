// Child processes for the fault and load tests (roles `fault-*`). fd 3 is a socketpair back to the test.
import DmaBufTestSupport
import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum FaultChildren {
    static func run(role: String, arguments: [String]) -> Int32 {
        let channel = Channel(socket: SharedFD(adopting: 3))
        do {
            switch role {
            case "fault-churn":
                // `fault-churn SOCKET SEED`: several connections at once doing random requests, plus abrupt
                // cycles, forever: the test kills it with SIGKILL at a random moment.
                guard arguments.count >= 2, let seed = UInt64(arguments[1]) else { return 64 }
                try churn(socketPath: arguments[0], seed: seed, channel: channel)
                return 0
            case "fault-load-worker":
                // `fault-load-worker SOCKET UID CONNECTIONS SECONDS SEED QUOTA_BYTES QUOTA_BUFFERS PER_CONNECTION`
                guard arguments.count >= 8, let uid = UInt32(arguments[1]), let connections = Int(arguments[2]),
                      let seconds = Int(arguments[3]), let seed = UInt64(arguments[4]), let quotaBytes = UInt64(arguments[5]),
                      let quotaBuffers = Int(arguments[6]), let perConnection = Int(arguments[7])
                else { return 64 }
                return try LoadWorker.run(socketPath: arguments[0], uid: uid, connections: connections, seconds: seconds, seed: seed,
                                          quota: (quotaBytes, quotaBuffers), perConnection: perConnection, channel: channel)
            default:
                Harness.warn("unknown child role \(role)")
                return 64
            }
        } catch {
            Harness.warn("child \(role): \(error)")
            try? channel.send("err \(error)")
            return 1
        }
    }

    static func churn(socketPath: String, seed: UInt64, channel: Channel) throws {
        var rng = SplitMix64(seed: seed)
        var faults = FaultCycles(socketPath: socketPath, seed: rng.next(), useUDmabuf: true, useFences: true)
        var live: [(connection: DmaBufConnection, held: [RemoteBuffer], leases: [LeaseID])] = []
        live.append((try DmaBufConnection(path: socketPath, clientName: "churn"), [], []))
        try channel.send("ready")
        var requests = 0
        while true {
            let roll = Int.random(in: 0..<100, using: &rng)
            if roll < 20 {
                try faults.run(cycles: 1)
            } else if roll < 30 && live.count < 4 {
                live.append((try DmaBufConnection(path: socketPath, clientName: "churn"), [], []))
            } else if roll < 35 && live.count > 1 {
                live.remove(at: Int.random(in: 0..<live.count, using: &rng))
            } else {
                let index = Int.random(in: 0..<live.count, using: &rng)
                if live[index].held.count >= 8 {
                    let buffer = live[index].held.removeFirst()
                    try live[index].connection.release(buffer.info.id)
                } else {
                    var (held, leases) = (live[index].held, live[index].leases)
                    try faults.step(live[index].connection, &held, &leases)
                    live[index].held = held
                    live[index].leases = leases
                }
            }
            requests += 1
            if requests % 4 == 0 {
                try channel.send("\(requests) steps, \(live.count) connections, \(live.reduce(0) { $0 + $1.held.count }) buffers")
            }
        }
    }
}

/// Lets a value that is used by one thread at a time cross into a thread's closure.
final class Handoff<Value>: @unchecked Sendable {
    var value: Value
    init(_ value: Value) { self.value = value }
}

/// A pthread mutex around a value, for counters shared by load threads.
final class Locked<Value>: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var value: Value
    init(_ value: Value) {
        self.value = value
        pthread_mutex_init(&mutex, nil)
    }
    deinit { pthread_mutex_destroy(&mutex) }
    func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body(&value)
    }
}

/// One load client's tally.
struct LoadTally: Sendable, CustomStringConvertible {
    var ops = 0
    var allocations = 0
    var refusals = 0
    var errors = 0
    var mostHeld = 0
    var violations = 0
    var firstError = ""

    /// `ops allocations refusals errors mostHeld violations firstError...`
    var description: String { "\(ops) \(allocations) \(refusals) \(errors) \(mostHeld) \(violations) \(firstError)" }

    init() {}

    init?(_ text: Substring) {
        let words = text.split(separator: " ", maxSplits: 6, omittingEmptySubsequences: false)
        guard words.count >= 6, let ops = Int(words[0]), let allocations = Int(words[1]), let refusals = Int(words[2]),
              let errors = Int(words[3]), let mostHeld = Int(words[4]), let violations = Int(words[5]) else { return nil }
        self.ops = ops; self.allocations = allocations; self.refusals = refusals; self.errors = errors
        self.mostHeld = mostHeld; self.violations = violations
        self.firstError = words.count > 6 ? String(words[6]) : ""
    }
}

/// A process of load clients under one uid: `connections` threads, each with its own connection,
/// allocating and releasing at random against the uid's quota for `seconds`.
enum LoadWorker {
    static let sizes = [4096, 16384, 65536, 262_144]

    static func run(socketPath: String, uid: UInt32, connections: Int, seconds: Int, seed: UInt64,
                    quota: (bytes: UInt64, buffers: Int), perConnection: Int, channel: Channel) throws -> Int32 {
        if uid != 0 {
            guard setgroups(0, nil) == 0, setgid(uid) == 0, setuid(uid) == 0 else {
                try channel.send("err cannot drop to uid \(uid)")
                return 2
            }
        }
        var clients: [Handoff<DmaBufConnection>] = []
        for i in 0..<connections {
            clients.append(Handoff(try DmaBufConnection(path: socketPath, clientName: "load-\(uid)-\(i)")))
        }
        try channel.send("ready")
        let (go, _) = try channel.receive(timeout: .seconds(120))
        guard go == "go" else { return 3 }
        // What this uid holds for sure: added once an allocation is answered, taken off before a release is
        // sent. It can only lag the daemon's books, so if it ever exceeds the quota the daemon did too.
        let surelyHeld = Locked((bytes: UInt64(0), buffers: 0))
        let deadline = ContinuousClock.now + .seconds(seconds)
        let threads = clients.enumerated().map { index, client in
            BackgroundThread { () -> LoadTally in
                var rng = SplitMix64(seed: seed &+ UInt64(index) &* 0x9E37_79B9)
                var held: [RemoteBuffer] = []
                var tally = LoadTally()
                let connection = client.value
                while ContinuousClock.now < deadline {
                    if held.isEmpty || (held.count < perConnection + 2 && rng.chance(0.6)) {
                        let size = sizes.randomElement(using: &rng)!
                        do {
                            let buffer = try connection.allocate(size: size, heap: "system", tag: "load")
                            held.append(buffer)
                            tally.allocations += 1
                            tally.mostHeld = max(tally.mostHeld, held.count)
                            if held.count > perConnection {
                                tally.violations += 1
                                if tally.firstError.isEmpty { tally.firstError = "granted buffer \(held.count) on one connection, max_buffers_per_client \(perConnection)" }
                            }
                            let over = surelyHeld.withLock { total -> Bool in
                                total.bytes += buffer.info.size
                                total.buffers += 1
                                return total.bytes > quota.bytes || total.buffers > quota.buffers
                            }
                            if over {
                                tally.violations += 1
                                if tally.firstError.isEmpty { tally.firstError = "uid \(uid) surely holds more than its quota" }
                            }
                        } catch let error as DmaBufClientError where error.errno == .diskQuotaExceeded {
                            tally.refusals += 1
                        } catch {
                            tally.errors += 1
                            if tally.firstError.isEmpty { tally.firstError = "\(error)" }
                        }
                    } else {
                        let buffer = held.remove(at: Int.random(in: 0..<held.count, using: &rng))
                        surelyHeld.withLock { total in
                            total.bytes -= buffer.info.size
                            total.buffers -= 1
                        }
                        let id = buffer.info.id
                        _ = consume buffer  // close our fd first, so the release frees it at once
                        do {
                            try connection.release(id)
                        } catch {
                            tally.errors += 1
                            if tally.firstError.isEmpty { tally.firstError = "release: \(error)" }
                        }
                    }
                    tally.ops += 1
                }
                let ids = held.map(\.info.id)
                surelyHeld.withLock { total in
                    total.bytes -= held.reduce(0) { $0 + $1.info.size }
                    total.buffers -= held.count
                }
                held.removeAll()
                for id in ids { try? connection.release(id) }
                return tally
            }
        }
        for (index, thread) in threads.enumerated() {
            let tally = try thread.join()
            try channel.send("t \(index) \(tally)")
        }
        try channel.send("done")
        return 0
    }
}
