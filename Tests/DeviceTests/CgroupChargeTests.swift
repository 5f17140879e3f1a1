import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

// cgroup.charge-*: allocations a client asks for are charged to the client's memory cgroup, through the
// dmabufd-charge helper the daemon moves there (docs/DESIGN.md, "Charging the client's cgroup"). Each test
// makes its own cgroups under the root of the cgroup v2 tree, puts an unprivileged client (uid 65534) in
// one and the daemon in another, and compares their memory.current.

private let mib = 1 << 20
private let size = 64 * mib

/// cgroup v2 under /sys/fs/cgroup, as root.
enum TestCgroups {
    static let root = "/sys/fs/cgroup"

    /// A fresh cgroup with the memory controller (enabled in the root's subtree_control).
    static func make(_ name: String) throws -> String {
        guard access(root + "/cgroup.controllers", F_OK) == 0 else { throw TestFailure(description: "no cgroup v2 hierarchy at \(root)") }
        if !(Harness.readFile(root + "/cgroup.subtree_control") ?? "").contains("memory") {
            try expect(Harness.writeFile(root + "/cgroup.subtree_control", "+memory"), "cannot enable +memory in \(root)/cgroup.subtree_control")
        }
        let path = root + "/" + name
        _ = rmdir(path)
        try expect(mkdir(path, 0o755) == 0, "mkdir \(path): \(Errno(rawValue: errno))")
        return path
    }

    static func move(_ pid: pid_t, to path: String) throws {
        try expect(Harness.writeFile(path + "/cgroup.procs", "\(pid)"), "cannot move \(pid) into \(path)")
    }

    static func current(_ path: String) -> Int { Harness.readNumber(path + "/memory.current") ?? -1 }

    /// Removes a cgroup once its processes are gone (exiting ones linger for a moment).
    static func remove(_ path: String) {
        for _ in 0..<200 where rmdir(path) != 0 && errno == EBUSY { usleep(10_000) }
    }

    /// Pids in `path` (cgroup.procs).
    static func pids(_ path: String) -> [pid_t] {
        (Harness.readFile(path + "/cgroup.procs") ?? "").split(separator: "\n").compactMap { pid_t($0) }
    }
}

/// A process's open fds and VmRSS (KiB), and its dmabufd-charge children.
private enum ProcessFacts {
    static func fds(_ pid: pid_t) -> Int { ((try? SmallFiles.entries(of: "/proc/\(pid)/fd")) ?? []).count }
    static func rssKiB(_ pid: pid_t) -> Int {
        let status = Harness.readFile("/proc/\(pid)/status") ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? -1
    }
    static func helpers(of parent: pid_t) -> [pid_t] {
        ((try? SmallFiles.entries(of: "/proc")) ?? []).compactMap { pid_t($0) }.filter { pid in
            guard let stat = Harness.readFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return false }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            return stat.contains("(dmabufd-charge)") && fields.count > 1 && pid_t(fields[1]) == parent
        }
    }
}

/// An unprivileged client process (uid 65534) the test puts in a cgroup before it connects.
final class CgroupClient {
    let channel: Channel
    let pid: pid_t

    init() throws {
        let (mine, theirs) = try UnixSocket.pair(.seqpacket)
        pid = try Harness.child("cgroup-client", [], fds: [theirs.descriptor])
        channel = Channel(socket: mine)
    }

    @discardableResult
    func ok(_ command: String) throws -> [String] {
        try channel.send(command)
        let reply = try channel.receive(timeout: .seconds(60)).text
        guard reply.hasPrefix("ok") else { throw TestFailure(description: "client '\(command)': \(reply)") }
        return reply.split(separator: " ").dropFirst().map(String.init)
    }

    /// Sends a command without waiting for its answer (read it later with ``answer()``).
    func start(_ command: String) throws { try channel.send(command) }
    func answer() throws -> String { try channel.receive(timeout: .seconds(60)).text }

    func exit() {
        try? channel.send("exit")
        _ = Harness.wait(pid)
    }
}

/// The `cgroup-client` child: drops to uid 65534, then serves `connect PATH`, `alloc SIZE HEAP`,
/// `udmabuf SIZE`, `release ID`, `loop N SIZE HEAP` (N allocate-release pairs; answers the nanoseconds).
enum CgroupChargeChildren {
    static func run(role: String, arguments: [String]) -> Int32 {
        let channel = Channel(socket: SharedFD(adopting: 3))
        guard setgroups(0, nil) == 0, setgid(65534) == 0, setuid(65534) == 0 else { return 2 }
        var connection: DmaBufConnection?
        var held: [BufferID: RemoteBuffer] = [:]
        while true {
            guard let (text, _) = try? channel.receive(timeout: .seconds(300)), !text.isEmpty else { return 0 }
            let words = text.split(separator: " ").map(String.init)
            do {
                switch words[0] {
                case "connect":
                    connection = try DmaBufConnection(path: words[1], clientName: "cgroup-client")
                    try channel.send("ok")
                case "alloc", "udmabuf":
                    let buffer = words[0] == "alloc" ? try connection!.allocate(size: Int(words[1])!, heap: words[2], tag: "charged")
                        : try connection!.createUDmabuf(size: Int(words[1])!, tag: "charged")
                    held[buffer.info.id] = buffer
                    try channel.send("ok \(buffer.info.id)")
                case "release":
                    try connection!.release(BufferID(words[1])!)
                    held[BufferID(words[1])!] = nil
                    try channel.send("ok")
                case "loop":
                    let start = ContinuousClock.now
                    for _ in 0..<Int(words[1])! {
                        let buffer = try connection!.allocate(size: Int(words[2])!, heap: words[3], tag: "loop")
                        try connection!.release(buffer.info.id)
                    }
                    let elapsed = ContinuousClock.now - start
                    try channel.send("ok \(elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000)")
                case "exit":
                    try channel.send("ok")
                    return 0
                default:
                    try channel.send("err EINVAL \(words[0])")
                }
            } catch let error as DmaBufClientError {
                try? channel.send("err \(error.errno?.name ?? "EIO") \(error.description)")
            } catch {
                try? channel.send("err EIO \(error)")
            }
        }
    }
}

/// A daemon in cgroup `cgc-daemon` and a client in `cgc-client`; `body` gets both cgroup paths.
private func withChargedClient(config: String = "", _ body: (TestDaemon, CgroupClient, _ daemonCgroup: String, _ clientCgroup: String) throws -> Void) throws {
    let daemonCgroup = try TestCgroups.make("cgc-daemon"), clientCgroup = try TestCgroups.make("cgc-client")
    defer { TestCgroups.remove(clientCgroup); TestCgroups.remove(daemonCgroup) }
    try withDaemon(config: "charge_client = required\n" + config) { daemon in
        try TestCgroups.move(daemon.pid, to: daemonCgroup)
        let client = try CgroupClient()
        defer { client.exit() }
        try TestCgroups.move(client.pid, to: clientCgroup)
        try client.ok("connect \(daemon.socketPath)")
        try body(daemon, client, daemonCgroup, clientCgroup)
    }
}

/// Allocates with `command` and checks where the charge landed: the client's cgroup grows by at least 90%
/// of the size, the daemon's by at most 5%.
private func expectChargedToClient(_ client: CgroupClient, _ command: String, daemonCgroup: String, clientCgroup: String) throws {
    let daemonBefore = TestCgroups.current(daemonCgroup), clientBefore = TestCgroups.current(clientCgroup)
    let id = try client.ok(command)[0]
    let daemonGrew = TestCgroups.current(daemonCgroup) - daemonBefore, clientGrew = TestCgroups.current(clientCgroup) - clientBefore
    Harness.say("    \(command): client cgroup +\(clientGrew / 1024) KiB, daemon cgroup +\(daemonGrew / 1024) KiB")
    try expect(clientGrew >= size * 9 / 10, "the client's memory.current grew by \(clientGrew) bytes, less than 90% of \(size)")
    try expect(daemonGrew <= size / 20, "the daemon's memory.current grew by \(daemonGrew) bytes, more than 5% of \(size)")
    try client.ok("release \(id)")
    // Freed once the daemon's last reference closes (off the loop): wait, so the next measurement starts clean.
    try expect(waitUntil { TestCgroups.current(clientCgroup) < clientBefore + size / 10 }, "the client's cgroup kept the charge after release")
}

enum CgroupChargeTests {
    static let all: [DeviceTest] = [
        DeviceTest("cgroup.charge-heap-to-client", requires: [.heap("system"), .root, .kernel(.heapMemcg)]) {
            try withChargedClient { _, client, daemonCgroup, clientCgroup in
                try expectChargedToClient(client, "alloc \(size) system", daemonCgroup: daemonCgroup, clientCgroup: clientCgroup)
            }
        },
        DeviceTest("cgroup.charge-udmabuf-to-client", requires: [.udmabuf, .root]) {
            // memfd pages are charged to whoever faults them in, on every kernel: the helper makes the memfd.
            try withChargedClient { _, client, daemonCgroup, clientCgroup in
                try expectChargedToClient(client, "udmabuf \(size)", daemonCgroup: daemonCgroup, clientCgroup: clientCgroup)
                try expectChargedToClient(client, "alloc \(size) udmabuf", daemonCgroup: daemonCgroup, clientCgroup: clientCgroup)
            }
        },
        DeviceTest("cgroup.charge-helper-reaped-fds-rss-baseline", requires: [.udmabuf, .root]) {
            try withChargedClient { daemon, first, _, clientCgroup in
                // Warm up: one helper's whole life, so the daemon's allocator and tables have their size.
                try first.ok("udmabuf \(mib)")
                first.exit()
                try expect(waitUntil { ProcessFacts.helpers(of: daemon.pid).isEmpty }, "the helper outlived its cgroup's last client")
                let fds = ProcessFacts.fds(daemon.pid), rss = ProcessFacts.rssKiB(daemon.pid)
                for _ in 0..<3 {
                    let client = try CgroupClient()
                    try TestCgroups.move(client.pid, to: clientCgroup)
                    try client.ok("connect \(daemon.socketPath)")
                    try client.ok("udmabuf \(size)")
                    try expectEqual(ProcessFacts.helpers(of: daemon.pid).count, 1, "helpers while the client is connected")
                    client.exit()
                    try expect(waitUntil { ProcessFacts.helpers(of: daemon.pid).isEmpty }, "the helper outlived its cgroup's last client")
                }
                try expect(waitUntil { ProcessFacts.fds(daemon.pid) <= fds }, "daemon fds: \(ProcessFacts.fds(daemon.pid)) now, \(fds) at baseline")
                let rssNow = ProcessFacts.rssKiB(daemon.pid)
                Harness.say("    daemon VmRSS \(rss) KiB at baseline, \(rssNow) KiB after three helpers")
                try expect(rssNow <= rss + 2048, "daemon VmRSS \(rssNow) KiB, baseline \(rss) KiB")
                try expect(TestCgroups.pids(clientCgroup).isEmpty, "processes left in the client's cgroup: \(TestCgroups.pids(clientCgroup))")
            }
        },
        DeviceTest("cgroup.charge-frozen-helper-times-out", requires: [.heap("system"), .root]) {
            // udmabufs, whose memfd pages every kernel charges, go through the helper everywhere (a heap
            // buffer does only where the kernel charges heap memory).
            try withChargedClient(config: "charge_timeout = 1s") { daemon, frozen, _, clientCgroup in
                try frozen.ok("udmabuf \(mib)")  // the helper now lives in cgc-client
                // Move the client itself out, so freezing its cgroup freezes only the helper.
                let elsewhere = try TestCgroups.make("cgc-elsewhere")
                defer { TestCgroups.remove(elsewhere) }
                try TestCgroups.move(frozen.pid, to: elsewhere)
                try expect(Harness.writeFile(clientCgroup + "/cgroup.freeze", "1"), "cannot freeze \(clientCgroup)")
                defer { _ = Harness.writeFile(clientCgroup + "/cgroup.freeze", "0") }
                try frozen.start("udmabuf \(mib)")
                let bystander = try CgroupClient()
                defer { bystander.exit() }
                let other = try TestCgroups.make("cgc-other")
                defer { TestCgroups.remove(other) }
                try TestCgroups.move(bystander.pid, to: other)
                try bystander.ok("connect \(daemon.socketPath)")
                try bystander.ok("udmabuf \(mib)")  // through its own cgroup's helper, on every kernel
                let answer = try frozen.answer()
                try expect(answer.hasPrefix("err ETIMEDOUT") && answer.contains("charge_timeout"), "the frozen helper's request answered: \(answer)")
                _ = Harness.writeFile(clientCgroup + "/cgroup.freeze", "0")
                // The timed-out helper was killed, and its cgroup cools down: for 5 × charge_timeout no new
                // helper starts there (EAGAIN saying so); after that the next request gets a new one.
                try frozen.start("udmabuf \(mib)")
                let cooling = try frozen.answer()
                try expect(cooling.hasPrefix("err EAGAIN") && cooling.contains("timed out"), "right after the timeout: \(cooling)")
                var again = cooling
                for _ in 0..<40 where !again.hasPrefix("ok") {
                    usleep(500_000)
                    try frozen.start("udmabuf \(mib)")
                    again = try frozen.answer()
                }
                try expect(again.hasPrefix("ok"), "after the cooldown: \(again)")
                try expect(waitUntil { ProcessFacts.helpers(of: daemon.pid).count == 2 }, "helpers: \(ProcessFacts.helpers(of: daemon.pid))")
            }
        },
        DeviceTest("cgroup.charge-cost-per-allocation", requires: [.heap("system"), .root, .kernel(.heapMemcg)]) {
            // Not asserted: the ratio is recorded in docs/PERF.md.
            var samples: [String] = []
            for mode in ["required", "off"] {
                try withChargedClient(config: "charge_client = \(mode)") { _, client, _, _ in
                    _ = try client.ok("loop 20 4096 system")
                    var best = Int.max
                    for _ in 0..<3 { best = min(best, Int(try client.ok("loop 100 4096 system")[0])!) }
                    samples.append("\(mode): \(best / 100 / 1000) us per 4 KiB allocate+release")
                }
            }
            Harness.say("    " + samples.joined(separator: "; "))
        },
    ]
}

/// Polls `condition` for up to ten seconds.
private func waitUntil(_ condition: () -> Bool) -> Bool {
    for _ in 0..<1000 {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}
