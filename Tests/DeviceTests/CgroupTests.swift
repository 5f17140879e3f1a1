import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

// cgroup.*: admission by memory cgroup on real kernels (docs/DESIGN.md, "Accounting model"). Each test
// makes its own cgroups (`cga-*`) under the cgroup v2 root with the memory controller, puts unprivileged
// clients (agents, uid 65534) in them before they connect, and reads the kernel's memory.current,
// memory.max and memory.events. The daemon runs in the test's own cgroup unless a test moves it.
//
// They run on every kernel: what differs is what memory.current shows. On 6.12 the kernel charges heap
// memory to nobody, and on 7.3 (dma_heap.mem_accounting=1) to the process that allocates; either way
// dmabufd counts what it holds for a cgroup against that cgroup's headroom unless the kernel charged it
// there. `cgroup.kernel-charging-reported` needs heap charging (7.3: N/A on 6.12).

private let mib = 1 << 20
private let nobody: UInt32 = 65534

/// The cgroup v2 tree at /sys/fs/cgroup, as root.
private enum AdmissionCgroups {
    static let root = "/sys/fs/cgroup"

    /// A fresh cgroup `name` (relative to the root) with the memory controller enabled in its parent.
    static func make(_ name: String) throws -> String {
        guard access(root + "/cgroup.controllers", F_OK) == 0 else { throw TestFailure(description: "no cgroup v2 hierarchy at \(root)") }
        let path = root + "/" + name
        let parent = String(path[..<path.lastIndex(of: "/")!])
        if !(Harness.readFile(parent + "/cgroup.subtree_control") ?? "").contains("memory") {
            try expect(Harness.writeFile(parent + "/cgroup.subtree_control", "+memory"), "cannot enable +memory in \(parent)/cgroup.subtree_control")
        }
        _ = rmdir(path)
        try expect(mkdir(path, 0o755) == 0, "mkdir \(path): \(Errno(rawValue: errno))")
        return path
    }

    static func move(_ pid: pid_t, to path: String) throws {
        try expect(Harness.writeFile(path + "/cgroup.procs", "\(pid)"), "cannot move \(pid) into \(path)")
    }

    static func setMax(_ path: String, _ bytes: Int) throws {
        try expect(Harness.writeFile(path + "/memory.max", "\(bytes)"), "cannot set \(path)/memory.max")
    }

    static func current(_ path: String) throws -> Int { try expectSome(Harness.readNumber(path + "/memory.current"), "\(path)/memory.current") }

    /// `oom_kill` of memory.events: processes the OOM killer killed in this cgroup.
    static func oomKills(_ path: String) -> Int {
        let line = (Harness.readFile(path + "/memory.events") ?? "").split(separator: "\n").first { $0.hasPrefix("oom_kill ") }
        return line.flatMap { Int($0.dropFirst("oom_kill ".count)) } ?? 0
    }

    /// Removes cgroups (children first) once their processes are gone.
    static func remove(_ paths: [String]) {
        for path in paths.reversed() {
            for _ in 0..<200 where rmdir(path) != 0 && errno == EBUSY { usleep(10_000) }
        }
    }

    /// The wire's form of a cgroup path: relative to the root, with a leading `/`.
    static func wire(_ path: String) -> String { String(path.dropFirst(root.count)) }
}

/// An unprivileged agent placed in `cgroup` before it connects to `daemon`.
private func agent(in cgroup: String, _ daemon: TestDaemon) throws -> Agent {
    let agent = try Agent(uid: nobody)
    try AdmissionCgroups.move(agent.pid, to: cgroup)
    try agent.ok("connect \(daemon.socketPath)")
    return agent
}

/// Neither the agents nor the daemon were killed, and the kernel OOM-killed nothing in `cgroups`.
private func expectNobodyKilled(_ daemon: TestDaemon, _ agents: [Agent], _ cgroups: [String]) throws {
    try expect(daemon.isRunning, "dmabufd died")
    for agent in agents { try expect(kill(agent.pid, 0) == 0, "agent \(agent.pid) died") }
    for cgroup in cgroups { try expectEqual(AdmissionCgroups.oomKills(cgroup), 0, "oom_kill in \(cgroup)/memory.events") }
}

enum CgroupTests {
    static let all: [DeviceTest] = [
        DeviceTest("cgroup.identity-in-ls-stats-and-metrics", requires: [.heap("system"), .root]) { try identity() },
        DeviceTest("cgroup.headroom-counts-what-dmabufd-holds", requires: [.heap("system"), .root]) { try headroomCountsHeld() },
        DeviceTest("cgroup.ancestor-limit-refuses-before-the-kernel", requires: [.heap("system"), .root]) { try ancestorLimit() },
        DeviceTest("cgroup.quotas-each-and-together", requires: [.heap("system"), .root]) { try quotas() },
        DeviceTest("cgroup.daemon-memfd-pages-charged-once", requires: [.udmabuf, .root]) { try memfdPages() },
        DeviceTest("cgroup.kernel-charging-reported", requires: [.heap("system"), .root, .kernel(.heapMemcg)]) { try chargingReported() },
    ]

    /// The owner's cgroup, read through a pidfd at connect, shows in `ls`, `stats` and OpenMetrics, and
    /// `heaps`/`stats` say what the kernel really does (the sysfs parameter).
    static func identity() throws {
        let cgroup = try AdmissionCgroups.make("cga-ident")
        defer { AdmissionCgroups.remove([cgroup]) }
        try withDaemon { daemon in
            let client = try agent(in: cgroup, daemon)
            let id = try client.ok("alloc \(mib)")[0]
            let name = AdmissionCgroups.wire(cgroup)
            let root = try daemon.connect()
            let listed = try expectSome(try root.list(all: true).first { String($0.id) == id }, "buffer \(id) in list --all")
            try expectEqual(listed.cgroup, name, "owner cgroup in list")
            let row = try expectSome(try root.stats().cgroups.first { $0.cgroup == name }, "stats row for \(name)")
            try expectEqual(row.bytes, UInt64(mib), "stats bytes of \(name)")
            try expectOK(try dmabufctl(daemon, "ls", "--all"), name)
            let charging = Harness.readFile("/sys/module/dma_heap/parameters/mem_accounting")?.hasPrefix("Y") ?? false
            try expectEqual(try root.heaps().memAccounting, charging, "heaps mem_accounting vs sysfs")
            try expectOK(try dmabufctl(daemon, "stats", "--format", "openmetrics"),
                         "dmabufd_cgroup_allocated_bytes{cgroup=\"\(name)\"} \(mib)\n", "dmabufd_kernel_charges_heap_memcg \(charging ? 1 : 0)\n")
            try expectOK(try dmabufctl(daemon, "stats"), charging ? "the kernel charges heap memory" : "the kernel does not charge heap memory")
        }
    }

    /// With headroom for one 24 MiB buffer but not two, the second is refused up front (EDQUOT naming the
    /// cgroup and its limit) whether or not the kernel charged the first to the cgroup; after a release
    /// it fits again.
    static func headroomCountsHeld() throws {
        let cgroup = try AdmissionCgroups.make("cga-held")
        defer { AdmissionCgroups.remove([cgroup]) }
        try withDaemon { daemon in
            let client = try agent(in: cgroup, daemon)
            try AdmissionCgroups.setMax(cgroup, try AdmissionCgroups.current(cgroup) + 56 * mib)
            let first = try client.ok("alloc \(24 * mib)")[0]
            let name = AdmissionCgroups.wire(cgroup)
            try client.refused("alloc \(40 * mib)", "EDQUOT", "cgroup \(name)", "memory.max", "raise memory.max of \(name)")
            try client.ok("release \(first)")
            try eventually(.seconds(10), "the released buffer to leave the books") {
                try daemon.connect().stats().cgroups.first { $0.cgroup == name }.map { $0.bytes == 0 } ?? true
            }
            try client.ok("alloc \(40 * mib)")
            try expectNobodyKilled(daemon, [client], [cgroup])
        }
    }

    /// A 64 MiB request from a leaf without a limit under a parent limited to 32 MiB is refused naming the
    /// parent, before the kernel is asked: on a charging kernel the allocation would OOM-kill instead.
    static func ancestorLimit() throws {
        let parent = try AdmissionCgroups.make("cga-parent")
        let leaf = try AdmissionCgroups.make("cga-parent/leaf")
        defer { AdmissionCgroups.remove([parent, leaf]) }
        try AdmissionCgroups.setMax(parent, 32 * mib)
        try withDaemon { daemon in
            let client = try agent(in: leaf, daemon)
            try client.refused("alloc \(64 * mib)", "EDQUOT", "cgroup \(AdmissionCgroups.wire(parent)) ", "memory.max 32 MiB")
            try client.refused("alloc \(64 * mib) udmabuf", "EDQUOT", "memory.max 32 MiB")
            try expectNobodyKilled(daemon, [client], [parent, leaf])
        }
    }

    /// `cgroup_quota` by pattern: `each` gives every matching cgroup its own quota, `together` one for all.
    static func quotas() throws {
        let names = ["cga-each-1", "cga-each-2", "cga-together-1", "cga-together-2"]
        let cgroups = try names.map(AdmissionCgroups.make)
        defer { AdmissionCgroups.remove(cgroups) }
        try withDaemon(config: "cgroup_quota cga-each-* = 8M 2\ncgroup_quota cga-together-* = 8M together\n") { daemon in
            let agents = try cgroups.map { try agent(in: $0, daemon) }
            try agents[0].ok("alloc \(6 * mib)")
            try agents[0].refused("alloc \(4 * mib)", "EDQUOT", "cgroup quota exceeded for cgroup /cga-each-1", "cgroup_quota cga-each-*")
            try agents[0].ok("alloc \(mib)")
            try agents[0].refused("alloc 4096", "EDQUOT", "2 buffers held")
            try agents[1].ok("alloc \(6 * mib)")
            try agents[2].ok("alloc \(6 * mib)")
            try agents[3].refused("alloc \(4 * mib)", "EDQUOT", "cgroups matching 'cga-together-*' together")
            try agents[3].ok("alloc \(2 * mib)")
            let rows = try daemon.connect().stats().cgroups
            try expectEqual(rows.first { $0.cgroup == "/cga-each-1" }?.refusals, 2, "refusals of /cga-each-1")
            try expectEqual(rows.first { $0.cgroup == "/cga-each-1" }?.quotaBytes, UInt64(8 * mib), "quota of /cga-each-1")
            try expectNobodyKilled(daemon, agents, cgroups)
        }
    }

    /// Pages of a memfd dmabufd makes for a udmabuf are charged once, to one cgroup: the daemon's today
    /// (dmabufd faults them in), the client's where a charge helper made them. The test says which.
    static func memfdPages() throws {
        let daemonCgroup = try AdmissionCgroups.make("cga-daemon"), clientCgroup = try AdmissionCgroups.make("cga-client")
        defer { AdmissionCgroups.remove([clientCgroup, daemonCgroup]) }
        try withDaemon { daemon in
            try AdmissionCgroups.move(daemon.pid, to: daemonCgroup)
            let client = try agent(in: clientCgroup, daemon)
            let (daemonBefore, clientBefore) = (try AdmissionCgroups.current(daemonCgroup), try AdmissionCgroups.current(clientCgroup))
            let id = try client.ok("alloc \(32 * mib) udmabuf")[0]
            let daemonRise = try AdmissionCgroups.current(daemonCgroup) - daemonBefore
            let clientRise = try AdmissionCgroups.current(clientCgroup) - clientBefore
            let (charged, other) = daemonRise > clientRise ? ("dmabufd", clientRise) : ("the client", daemonRise)
            Harness.say("    32 MiB daemon udmabuf: dmabufd's cgroup +\(daemonRise >> 10) KiB, the client's +\(clientRise >> 10) KiB (charged to \(charged))")
            try expect(max(daemonRise, clientRise) >= 32 * mib * 9 / 10, "neither cgroup rose by 90% of 32 MiB")
            try expect(other <= 32 * mib / 20, "both cgroups rose: \(daemonRise) and \(clientRise)")
            try client.ok("release \(id)")
        }
    }

    /// A charging kernel is reported as one: `heaps` says the system heap charges memory cgroups.
    static func chargingReported() throws {
        try withDaemon { daemon in
            let heaps = try daemon.connect().heaps()
            try expect(heaps.memAccounting, "heaps reply: mem_accounting false on a kernel with dma_heap.mem_accounting=Y")
            try expect(heaps.heaps.first { $0.name == "system" }?.chargesMemcg == true, "system heap not reported as charging memory cgroups")
            try expectOK(try dmabufctl(daemon, "heaps"), "charged", "dma_heap.mem_accounting=1")
        }
    }
}
