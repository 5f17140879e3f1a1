// Load against a real dmabufd: 64 clients (4 processes under 4 uids, 16 connections each, one thread per
// connection) allocate and release as fast as they can for a bounded time against tight quotas. No
// client may exceed its quota, none may be starved, and the only refusals allowed are quota refusals.
import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum LoadTests {
    static let processes = 4
    static let connectionsPerProcess = 16
    static let firstUID: UInt32 = 60001
    static let quotaBytes: UInt64 = 3 << 20
    static let quotaBuffers = 40
    static let perConnection = 4
    /// The least share of the mean op count any one client must get.
    static let fairness = 0.2

    static var seconds: Int { FaultRun.environment("DMABUFD_LOAD_SECONDS").flatMap { Int($0) } ?? 12 }

    static let all: [DeviceTest] = [
        DeviceTest("load.64-clients-quotas-fair-no-errors", requires: [.heap("system"), .root]) {
            let config = """
                quota.default.bytes = \(quotaBytes)
                quota.default.buffers = \(quotaBuffers)
                max_buffers_per_client = \(perConnection)
                """
            try withDaemon(config: config) { daemon in
                let seed = FaultRun.seed
                let probe = try daemon.connect("load-probe")
                var workers: [(pid: pid_t, channel: Channel)] = []
                defer {
                    for worker in workers { kill(worker.pid, SIGKILL); _ = Harness.wait(worker.pid) }
                }
                for p in 0..<processes {
                    let (mine, theirs) = try UnixSocket.pair(.seqpacket)
                    let uid = firstUID + UInt32(p)
                    let pid = try Harness.child("fault-load-worker", [
                        daemon.socketPath, String(uid), String(connectionsPerProcess), String(seconds), String(seed &+ UInt64(p) << 32),
                        String(quotaBytes), String(quotaBuffers), String(perConnection),
                    ], fds: [theirs.descriptor])
                    workers.append((pid, Channel(socket: mine)))
                }
                for worker in workers {
                    let (text, _) = try worker.channel.receive(timeout: .seconds(90))
                    try expect(text == "ready", "load worker \(worker.pid): \(text)")
                }
                try expectEqual(try probe.stats().connectedClients, UInt32(processes * connectionsPerProcess + 1), "connected clients")
                for worker in workers { try worker.channel.send("go") }
                let start = ContinuousClock.now

                // Watch the daemon's own books while the clients hammer it.
                var samples = 0
                var most: [UInt32: (bytes: UInt64, buffers: UInt32)] = [:]
                var refusalsSeen: UInt32 = 0
                while ContinuousClock.now - start < .seconds(seconds) {
                    let stats = try probe.stats()
                    samples += 1
                    for client in stats.clients where client.uid >= firstUID {
                        try expect(client.bytes <= quotaBytes, "uid \(client.uid) holds \(client.bytes) bytes, quota \(quotaBytes)")
                        try expect(client.buffers <= UInt32(quotaBuffers), "uid \(client.uid) holds \(client.buffers) buffers, quota \(quotaBuffers)")
                        let seen = most[client.uid] ?? (0, 0)
                        most[client.uid] = (max(seen.bytes, client.bytes), max(seen.buffers, client.buffers))
                    }
                    refusalsSeen = stats.clients.reduce(0) { $0 + $1.refusals }
                    usleep(250_000)
                }

                var tallies: [LoadTally] = []
                for worker in workers {
                    while true {
                        let (text, _) = try worker.channel.receive(timeout: .seconds(120))
                        if text == "done" { break }
                        guard text.hasPrefix("t "), let tally = LoadTally(text.split(separator: " ", maxSplits: 2).last!) else {
                            throw TestFailure(description: "load worker \(worker.pid): \(text)")
                        }
                        tallies.append(tally)
                    }
                    try expectEqual(Harness.wait(worker.pid), 0, "load worker exit status")
                }
                workers.removeAll()
                let elapsed = FaultRun.seconds(ContinuousClock.now - start)

                let ops = tallies.map(\.ops)
                let total = ops.reduce(0, +)
                let mean = Double(total) / Double(max(ops.count, 1))
                let least = ops.min() ?? 0
                let refusals = tallies.reduce(0) { $0 + $1.refusals }
                let errors = tallies.reduce(0) { $0 + $1.errors }
                let violations = tallies.reduce(0) { $0 + $1.violations }
                let books = try FaultRun.settle(probe)
                Harness.say("  load: \(tallies.count) clients, \(total) ops in \(fmt(elapsed, 1)) s (\(fmt(Double(total) / elapsed, 0)) ops/s); "
                    + "per client min \(least) / mean \(fmt(mean, 1)) / max \(ops.max() ?? 0) (min/mean \(fmt(Double(least) / max(mean, 1), 2))); "
                    + "allocations \(tallies.reduce(0) { $0 + $1.allocations }), EDQUOT \(refusals) (daemon's count at the last sample \(refusalsSeen)), other errors \(errors); "
                    + "most held per uid \(most.sorted { $0.key < $1.key }.map { "\($0.value.bytes / 1024) KiB/\($0.value.buffers)" }.joined(separator: ", ")) "
                    + "of \(quotaBytes / 1024) KiB/\(quotaBuffers) in \(samples) samples; after: \(books)")

                try expectEqual(tallies.count, processes * connectionsPerProcess, "clients reporting")
                try expect(errors == 0, "errors other than EDQUOT: \(tallies.first { $0.errors > 0 }?.firstError ?? "")")
                try expect(violations == 0, "\(violations) allocations beyond a quota or max_buffers_per_client were granted: \(tallies.first { $0.violations > 0 }?.firstError ?? "")")
                try expect(tallies.allSatisfy { $0.mostHeld <= perConnection }, "a connection held more than \(perConnection) buffers")
                try expect(refusals > 0, "no quota refusals: the load did not reach the quotas")
                try expect(Double(least) >= fairness * mean, "a client was starved: \(least) ops against a mean of \(fmt(mean, 1))")
            }
        },
    ]
}
