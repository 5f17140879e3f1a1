// Admission by memory cgroup, per-cgroup quotas, the daemon-memfd bound, stats that fit one message, and
// client identity through a pidfd. The broker runs against the fake kernel and a cgroup tree of the test's
// own (a temporary directory with `memory.max` and `memory.current` files): these tests check dmabufd's
// parsing and admission logic, not the kernel's accounting (that is `cgroup.*` in the device tests).
import DmaBuf
import DmaBufWire
import Foundation
import SystemPackage
import Testing
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

/// A fake cgroup v2 tree in a temporary directory.
final class FakeCgroupTree {
    let root: String

    init() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("dmabufd-cgroups-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        try "cpu memory pids\n".write(toFile: root + "/cgroup.controllers", atomically: true, encoding: .utf8)
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    /// Sets a cgroup's `memory.max` (nil: `max`) and `memory.current`, creating its directory.
    func set(_ path: String, max: UInt64?, current: UInt64) throws {
        let directory = root + path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try ((max.map(String.init) ?? "max") + "\n").write(toFile: directory + "/memory.max", atomically: true, encoding: .utf8)
        try "\(current)\n".write(toFile: directory + "/memory.current", atomically: true, encoding: .utf8)
    }
}

private let mib: UInt64 = 1 << 20
private let app = "/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.example.App-42.scope"

@Suite struct CgroupPathTests {
    @Test func validPathsAndTheirAncestors() throws {
        let path = try #require(CgroupPath("/a.slice/b.scope"))
        #expect(path.description == "/a.slice/b.scope")
        #expect(path.selfAndAncestors.map(\.description) == ["/a.slice/b.scope", "/a.slice", "/"])
        #expect(CgroupPath("/")?.isRoot == true)
        #expect(CgroupPath("/a.slice")!.contains(path))
        #expect(!path.contains(CgroupPath("/a.slice")!))
        #expect(!CgroupPath("/a")!.contains(CgroupPath("/ab")!))
    }

    @Test func weirdPathsAreRefused() {
        for bad in ["", "relative/path", "/..", "/../../escape", "/a/../b", "/a//b", "/a/./b", "/a/", "/a\nb", "/a\u{1b}[31m",
                    "/" + String(repeating: "x", count: 1100), "/" + Array(repeating: "d", count: 40).joined(separator: "/")] {
            #expect(CgroupPath(bad) == nil, "accepted \(bad.debugDescription)")
            #expect(CgroupPath.problem(with: bad) != nil)
        }
    }

    @Test func procCgroupIsParsed() {
        #expect(CgroupMembership(procCgroup: "0::/user.slice/x.scope\n") == .unified(CgroupPath("/user.slice/x.scope")!))
        #expect(CgroupMembership(procCgroup: "12:memory:/foo\n1:name=systemd:/foo\n") == .none)
        #expect(CgroupMembership(procCgroup: "1:name=systemd:/a\n0::/b\n") == .unified(CgroupPath("/b")!))
        guard case .refused(let path, _) = CgroupMembership(procCgroup: "0::/../outside\n") else {
            Issue.record("a path through another cgroup namespace was accepted")
            return
        }
        #expect(path == "/../outside")
    }

    @Test func headroomReadsTheFakeTree() throws {
        let tree = try FakeCgroupTree()
        try tree.set("/a", max: 100 * mib, current: 30 * mib)
        try tree.set("/a/b", max: nil, current: 10 * mib)
        let chain = CgroupFS(root: tree.root).chain(CgroupPath("/a/b")!)
        #expect(chain.map(\.path.description) == ["/a/b", "/a", "/"])
        #expect(chain.map(\.headroom) == [nil, 70 * mib, nil])
    }
}

@Suite struct CgroupAdmissionTests {
    /// A broker whose cgroup root is `tree`.
    private func scenario(_ tree: FakeCgroupTree, _ configure: @escaping (inout DaemonConfig) -> Void = { _ in },
                          _ body: (BrokerHarness) throws -> Void) throws {
        try BrokerHarness.scenario({ config in
            config.cgroupRoot = tree.root
            configure(&config)
        }, body)
    }

    @Test func overHeadroomIsRefusedNamingTheCgroupAndLimit() throws {
        let tree = try FakeCgroupTree()
        try tree.set("/app.slice", max: 64 * mib, current: 40 * mib)
        try tree.set("/app.slice/x.scope", max: nil, current: 40 * mib)
        try scenario(tree) { h in
            let client = try h.connect(cgroup: "/app.slice/x.scope")
            try client.expectRefusal(.allocate(AllocateRequest(size: 32 * mib, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded,
                                     "cgroup /app.slice ", "memory.max 64 MiB", "raise memory.max of /app.slice")
            #expect(h.broker.buffers.isEmpty, "the kernel was asked")
            _ = try client.allocate(16 * mib)
        }
    }

    /// On a kernel that does not charge heap memory (6.12; 7.x charges dmabufd), memory.current does not
    /// move: what dmabufd holds for the cgroup is taken off its headroom instead.
    @Test func heldBuffersCountAgainstHeadroom() throws {
        let tree = try FakeCgroupTree()
        try tree.set("/app.slice", max: 64 * mib, current: 8 * mib)
        try scenario(tree) { h in
            let client = try h.connect(cgroup: "/app.slice")
            let (first, _) = try client.allocate(40 * mib)
            try client.expectRefusal(.allocate(AllocateRequest(size: 20 * mib, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded,
                                     "dmabufd holds or is allocating 40 MiB more")
            // Another client in a sibling cgroup under the same limited parent is refused too.
            try tree.set("/app.slice/y.scope", max: nil, current: 0)
            let sibling = try h.connect(uid: 1001, cgroup: "/app.slice/y.scope")
            try sibling.expectRefusal(.allocate(AllocateRequest(size: 20 * mib, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded, "cgroup /app.slice ")
            try client.expectOK(.release(first.id))
            h.pump(until: { h.broker.books.cgroupUsage.isEmpty })
            _ = try sibling.allocate(20 * mib)
        }
    }

    /// Pages the kernel charged to the owner's cgroup are in memory.current already: not counted twice.
    @Test func chargesInTheCgroupAreNotCountedTwice() throws {
        var books = Accounting()
        books.charge(1, uid: 1, heap: "system", size: 10, cgroup: "/a/b", inCgroup: true)
        books.charge(2, uid: 1, heap: "system", size: 7, cgroup: "/a/b")
        books.charge(3, uid: 1, heap: "system", size: 5, cgroup: "/ab")
        books.started("/a", bytes: 3)
        let sub = books.subtreeUsage(CgroupPath("/a")!)
        #expect(sub.usage.bytes == 17 && sub.usage.outside == 7 && sub.inFlight == 3)
        books.finished("/a", bytes: 3)
        for id in [BufferID(1), 2, 3] { books.uncharge(id) }
        #expect(books.isBalanced)
    }

    @Test func importsAndClientMemfdsNeedNoHeadroom() throws {
        let tree = try FakeCgroupTree()
        try tree.set("/full", max: 4 * mib, current: 4 * mib)
        try scenario(tree) { h in
            let client = try h.connect(version: 2, cgroup: "/full")
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded, "cgroup /full")
            let memfd = try makeMemfd(1 << 20)
            let (reply, _) = try client.request(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 0, size: 1 << 20)], tag: "m")),
                                                fds: [memfd])
            guard case .buffer = reply else { throw NoReply(description: "udmabuf from a client memfd answered \(reply)") }
        }
    }

    @Test func perCgroupQuotaEachAndTogether() throws {
        let tree = try FakeCgroupTree()
        try scenario(tree, { config in
            config.cgroupQuotas = [CgroupQuotaRule(pattern: "user.slice/user-*.slice/user@*.service/app.slice/app-flatpak-*.scope", bytes: 8 * mib, buffers: 2),
                                   CgroupQuotaRule(pattern: "games.slice/*.scope", bytes: 8 * mib, together: true)]
        }) { h in
            let a = try h.connect(cgroup: app)
            let b = try h.connect(cgroup: app.replacingOccurrences(of: "App-42", with: "Other-7"))
            _ = try a.allocate(6 * mib)
            try a.expectRefusal(.allocate(AllocateRequest(size: 4 * mib, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded,
                                "cgroup quota exceeded for cgroup \(app)", "6 MiB held + 4 MiB asked > 8 MiB", "cgroup_quota user.slice/")
            _ = try a.allocate(1 * mib)
            try a.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded, "2 buffers held + 1 asked > 2")
            _ = try b.allocate(6 * mib)  // each matching cgroup has its own quota
            let g1 = try h.connect(uid: 1001, cgroup: "/games.slice/one.scope")
            let g2 = try h.connect(uid: 1002, cgroup: "/games.slice/two.scope")
            _ = try g1.allocate(6 * mib)
            try g2.expectRefusal(.allocate(AllocateRequest(size: 4 * mib, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded,
                                 "cgroups matching 'games.slice/*.scope' together")
            // A child cgroup of a governed one is inside its quota.
            let child = try h.connect(uid: 1003, cgroup: "/games.slice/one.scope/sub")
            try child.expectRefusal(.allocate(AllocateRequest(size: 4 * mib, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded)
        }
    }

    @Test func theUidQuotaStillCapsTheTotal() throws {
        let tree = try FakeCgroupTree()
        try scenario(tree, { config in
            config.defaultQuota = .init(bytes: 8 * mib, buffers: 100)
            config.cgroupQuotas = [CgroupQuotaRule(pattern: "*", bytes: 1 << 40)]
        }) { h in
            let a = try h.connect(cgroup: "/one")
            let b = try h.connect(cgroup: "/two")
            _ = try a.allocate(6 * mib)
            try b.expectRefusal(.allocate(AllocateRequest(size: 4 * mib, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded, "quota exceeded for uid 1000")
        }
    }

    @Test func daemonMemfdsAreBoundedTogether() throws {
        try BrokerHarness.scenario({ $0.maxDaemonMemfdBytes = 8 * mib }) { h in
            let a = try h.connect(uid: 1000)
            let b = try h.connect(uid: 1001)
            _ = try a.allocate(6 * mib, heap: "udmabuf")
            try b.expectRefusal(.allocate(AllocateRequest(size: 4 * mib, heap: "udmabuf", tag: "")), .noMemory, .limit,
                                "max_daemon_memfd_bytes 8 MiB", "create_udmabuf_from_memfd")
            try b.expectRefusal(.createUDmabuf(UDmabufRequest(size: 4 * mib, tag: "")), .noMemory, .limit, "max_daemon_memfd_bytes")
            _ = try b.allocate(4 * mib, heap: "system")
        }
    }

    @Test func refusalsAreCountedPerCgroupInStats() throws {
        let tree = try FakeCgroupTree()
        try tree.set("/small", max: mib, current: 0)
        try scenario(tree, { $0.cgroupQuotas = [CgroupQuotaRule(pattern: "small", bytes: 512 << 10)] }) { h in
            let client = try h.connect(uid: 0, version: 2, cgroup: "/small")
            try client.expectRefusal(.allocate(AllocateRequest(size: mib, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded)
            let (reply, _) = try client.request(.stats)
            guard case .stats(let stats) = reply else { throw NoReply(description: "stats answered \(reply)") }
            #expect(stats.cgroups == [CgroupStats(cgroup: "/small", bytes: 0, buffers: 0, quotaBytes: 512 << 10, refusals: 1)])
        }
    }
}

@Suite struct StatsBoundTests {
    /// Known gap 4 of docs/SECURITY.md: root's stats with thousands of long cgroup paths and many uids
    /// still fits one message; the rows left out are summed in one last row.
    @Test func rootStatsFitOneMessage() throws {
        try BrokerHarness.scenario { h in
            let long = String(repeating: "x", count: 200)
            for i in 0..<3000 {
                h.broker.books.charge(BufferID(1_000_000 + i), uid: UInt32(2000 + i), heap: "system", size: UInt64(i + 1), cgroup: "/\(long)/c\(i)")
            }
            let root = try h.connect(uid: 0, version: 2)
            let (reply, _) = try root.request(.stats)
            guard case .stats(let stats) = reply else { throw NoReply(description: "stats answered \(reply)") }
            #expect(WireMessage.encode(.stats(stats), requestID: 1, version: 2).count <= WireLimits.maximumMessageSize)
            let other = try #require(stats.cgroups.last)
            #expect(other.cgroup.hasPrefix("(") && other.cgroup.hasSuffix(" more cgroups)"))
            #expect(stats.cgroups.reduce(UInt64(0)) { $0 + $1.bytes } == (1...3000).reduce(0, +))
            #expect(stats.cgroups.first?.bytes == 3000, "largest first")
            #expect(stats.clients.last?.uid == .max)
            #expect(stats.clients.reduce(UInt64(0)) { $0 + $1.bytes } == (1...3000).reduce(0, +))
            for i in 0..<3000 { h.broker.books.uncharge(BufferID(1_000_000 + i)) }
        }
    }

    @Test func refusalCountersAreBounded() {
        var books = Accounting()
        books.charge(1, uid: 1, heap: "system", size: 1, cgroup: "/kept")
        books.countCgroupRefusal("/kept")
        for i in 0..<5000 { books.countCgroupRefusal("/gone/\(i)") }
        #expect(books.cgroupRefusals.count <= Accounting.maximumRefusalCgroups)
        #expect(books.cgroupRefusals["/kept"] == 1, "a cgroup that holds buffers keeps its counter")
        #expect(books.cgroupRefusals.values.reduce(0, +) == 5001, "no refusal is lost")
    }
}

@Suite struct PidFDTests {
    @Test func peerPidfdNamesTheConnectingProcess() throws {
        let (a, _) = try UnixSocket.pair()
        let pidfd = try PidFD.ofPeer(a.descriptor, pid: getpid())
        #expect(pidfd.isAlive())
    }

    @Test func aReapedProcessIsNotAlive() throws {
        let child = fork()
        if child == 0 { _exit(0) }
        let pidfd = try PidFD.open(pid: child)
        var status: CInt = 0
        _ = waitpid(child, &status, 0)
        #expect(!pidfd.isAlive())
    }

    /// A peer whose pid no longer names it (here: a reaped child's pid) is not served.
    @Test func aPeerThatIsGoneIsRefused() throws {
        try BrokerHarness.scenario { h in
            let child = fork()
            if child == 0 { _exit(0) }
            var status: CInt = 0
            _ = waitpid(child, &status, 0)
            let (a, _) = try UnixSocket.pair()
            guard case .failure(let refusal) = h.broker.identify(a, PeerCredentials(pid: child, uid: getuid(), gid: getgid())) else {
                Issue.record("a reaped pid was identified")
                return
            }
            #expect(refusal.errno == Errno.noSuchProcess.rawValue, "\(refusal.message)")
        }
    }

    /// A cgroup path seen through another cgroup namespace (`/..`) is refused, naming the path.
    @Test func aWeirdCgroupIsRefused() throws {
        let proc = FileManager.default.temporaryDirectory.appendingPathComponent("dmabufd-proc-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: proc) }
        try FileManager.default.createDirectory(atPath: proc + "/\(getpid())", withIntermediateDirectories: true)
        try "0::/../../escape\n".write(toFile: proc + "/\(getpid())/cgroup", atomically: true, encoding: .utf8)
        try BrokerHarness.scenario { h in
            let (a, _) = try UnixSocket.pair()
            let me = PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid())
            guard case .failure(let refusal) = h.broker.identify(a, me, procDirectory: proc) else {
                Issue.record("a path with '..' was accepted")
                return
            }
            #expect(refusal.errno == Errno.permissionDenied.rawValue)
            #expect(refusal.message.contains("'/../../escape'") && refusal.message.contains("'..'"), "\(refusal.message)")
        }
    }

    @Test func theBrokerIdentifiesItsPeer() throws {
        try BrokerHarness.scenario { h in
            let (a, _) = try UnixSocket.pair()
            let me = PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid())
            guard case .success(let (pidfd, cgroup)) = h.broker.identify(a, me) else {
                Issue.record("identify failed")
                return
            }
            #expect(pidfd?.isAlive() == true)
            let own = try CgroupMembership.of(pid: getpid())
            if case .unified(let path) = own { #expect(cgroup == path.description) } else { #expect(cgroup == "") }
        }
    }
}
