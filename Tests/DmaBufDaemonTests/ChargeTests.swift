import DmaBuf
import DmaBufWire
import Foundation
import Logging
import SystemPackage
import Testing
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

/// An in-process ``ChargeService``: jobs wait until the test completes or fails them, as a helper in the
/// client's cgroup would answer (or not). Allocations come from the fake kernel.
final class FakeCharger: ChargeService {
    struct Job { var request: ChargeRequest; var cgroup: String; var done: (Result<ChargeReply, Error>) -> Void }
    let kernel: FakeKernel
    var jobs: [Job] = []
    var clients: [String: Int] = [:]
    /// Set: no helper can be placed (as without cgroup v2 or write access).
    var unplaceable = false
    var helperCount: Int { clients.count }

    init(kernel: FakeKernel) { self.kernel = kernel }

    func needsHelper(cgroup: String) -> Bool { cgroup != "/daemon" }
    func submit(_ request: ChargeRequest, cgroup: String, done: @escaping (Result<ChargeReply, Error>) -> Void) throws {
        if unplaceable {
            throw ChargeUnavailable(errno: .notSupported, description: "no cgroup v2 hierarchy at /sys/fs/cgroup", fix: "boot with it", placement: true)
        }
        jobs.append(Job(request: request, cgroup: cgroup, done: done))
    }
    func clientConnected(cgroup: String) { clients[cgroup, default: 0] += 1 }
    func clientLeft(cgroup: String) {
        clients[cgroup, default: 0] -= 1
        if clients[cgroup] == 0 { clients[cgroup] = nil }
    }
    func devicesChanged() {}

    /// Answers the oldest job as a helper would.
    func complete() throws {
        let job = jobs.removeFirst()
        switch job.request {
        case .heap(let name, let size, let fdFlags, let heapFlags):
            job.done(.success(ChargeReply(buffer: try kernel.allocate(heap: name, size: size, fdFlags: fdFlags, heapFlags: heapFlags), inClientCgroup: true)))
        case .udmabuf(let size, let huge):
            let made = try kernel.createUDmabuf(size: size, hugePages: huge)
            job.done(.success(ChargeReply(buffer: made.buffer, memfd: made.memfd, inClientCgroup: true)))
        case .udmabufFromMemfds(let memfds, let ranges):
            job.done(.success(ChargeReply(buffer: try kernel.createUDmabuf(ranges: ranges.map { (memfds[$0.memfd], $0.offset, $0.size) }), inClientCgroup: true)))
        }
    }

    func fail(_ errno: Errno, _ text: String) {
        jobs.removeFirst().done(.failure(ChargeUnavailable(errno: errno, description: text, fix: "retry")))
    }
}

extension BrokerHarness {
    /// A harness whose broker allocates through a ``FakeCharger``.
    static func charged(_ configure: (inout DaemonConfig) -> Void = { _ in }, _ body: (BrokerHarness, FakeCharger) throws -> Void) throws {
        try scenario(configure) { h in
            let charger = FakeCharger(kernel: h.kernel)
            h.broker.charger = charger
            // A 7.x kernel with dma_heap.mem_accounting: system-heap pages are charged to the allocator,
            // so heap allocations go through the helper too.
            h.kernel.accounting = true
            try body(h, charger)
        }
    }

    /// True when the client has a message waiting (after a few loop iterations).
    func hasReply(_ client: TestClient) -> Bool {
        pump(iterations: 10, waitMilliseconds: 1)
        guard let socket = client.socket else { return false }
        var p = pollfd(fd: socket.descriptor.rawValue, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) == 1
    }
}

@Suite("Charging the client's cgroup", .serialized)
struct ChargeTests {
    @Test func deferredReplyKeepsTheOrderOfReplies() throws {
        try BrokerHarness.charged { h, charger in
            let client = try h.connect(cgroup: "/user.slice/app.scope")
            let first = try client.send(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "a")))
            let second = try client.send(.stats)
            #expect(!h.hasReply(client), "nothing may be answered before the deferred allocation")
            #expect(charger.jobs.count == 1 && charger.jobs[0].cgroup == "/user.slice/app.scope")
            try charger.complete()
            let (header1, reply1, fds1) = try #require(try client.receive())
            let (header2, reply2, _) = try #require(try client.receive())
            #expect(header1.requestID == first && header2.requestID == second)
            guard case .buffer(let info) = reply1, case .stats = reply2 else { Issue.record("\(reply1), \(reply2)"); return }
            #expect(info.size == 4096 && fds1.count == 1)
            try client.expectOK(.release(info.id))
        }
    }

    @Test func heapsTheKernelDoesNotChargeAreMadeInTheDaemon() throws {
        try BrokerHarness.charged { h, charger in
            h.kernel.accounting = false  // 6.12: heap pages are charged to nobody, a helper would gain nothing
            let client = try h.connect(cgroup: "/user.slice/app.scope")
            let (reply, fds) = try client.request(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "a")))
            guard case .buffer(let info) = reply else { Issue.record("\(reply)"); return }
            #expect(charger.jobs.isEmpty && fds.count == 1)
            try client.expectOK(.release(info.id))
            // memfd pages are charged on every kernel: a udmabuf still goes through the helper.
            _ = try client.send(.createUDmabuf(UDmabufRequest(size: 8192, tag: "u")))
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            try charger.complete()
            guard case .buffer(let u) = try #require(try client.receive()).1 else { Issue.record("no udmabuf"); return }
            try client.expectOK(.release(u.id))
        }
    }

    @Test func anotherClientIsServedWhileOneIsDeferred() throws {
        try BrokerHarness.charged { h, charger in
            let waiting = try h.connect(cgroup: "/a.scope")
            let other = try h.connect(uid: 1001, cgroup: "/daemon")  // the daemon's own cgroup: no helper
            _ = try waiting.send(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "w")))
            let (info, _) = try other.allocate()
            try other.expectOK(.release(info.id))
            #expect(charger.jobs.count == 1)
            charger.fail(.timedOut, "the allocation did not finish within charge_timeout (2s)")
            guard case .error(let error) = try #require(try waiting.receive()).1 else { Issue.record("no error"); return }
            #expect(error.errno == Errno.timedOut.rawValue && error.code == .limit && error.message.contains("charge_timeout"))
        }
    }

    @Test func timeoutFailsTheRequestCleanlyAndTheClientIsServedAgain() throws {
        try BrokerHarness.charged { h, charger in
            let client = try h.connect(cgroup: "/frozen.scope")
            let id = try client.send(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "t")))
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            charger.fail(.timedOut, "the allocation did not finish within charge_timeout (2s) in the client's cgroup /frozen.scope")
            let (header, reply, fds) = try #require(try client.receive())
            guard case .error(let error) = reply else { Issue.record("\(reply)"); return }
            #expect(header.requestID == id && fds.isEmpty)
            #expect(error.errno == Errno.timedOut.rawValue && error.message.contains("ETIMEDOUT") && error.message.contains("/frozen.scope"))
            #expect(h.broker.books.charges.isEmpty && h.broker.buffers.isEmpty)
            _ = try client.send(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "again")))
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            try charger.complete()
            guard case .buffer(let info) = try #require(try client.receive()).1 else { Issue.record("no buffer"); return }
            try client.expectOK(.release(info.id))
        }
    }

    @Test func helperDeathFailsTheRequest() throws {
        try BrokerHarness.charged { h, charger in
            let client = try h.connect(cgroup: "/dies.scope")
            _ = try client.send(.createUDmabuf(UDmabufRequest(size: 8192, tag: "u")))
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            charger.fail(.connectionAbort, "the charge helper in /dies.scope died")
            guard case .error(let error) = try #require(try client.receive()).1 else { Issue.record("no error"); return }
            #expect(error.errno == Errno.connectionAbort.rawValue && error.message.contains("died"))
        }
    }

    @Test func disconnectWhileDeferredClosesWhatComesBack() throws {
        try BrokerHarness.charged { h, charger in
            let client = try h.connect(cgroup: "/gone.scope")
            _ = try client.send(.allocate(AllocateRequest(size: 1 << 20, heap: "system", tag: "g")))
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            client.close()
            #expect(h.pump(until: { h.broker.sessions.isEmpty }))
            try charger.complete()  // its buffer is closed, never registered; the baseline check counts fds
            #expect(h.broker.buffers.isEmpty && h.broker.deferredRequests.isEmpty)
        }
    }

    @Test func batchAndUdmabufFromMemfdGoThroughTheHelper() throws {
        try BrokerHarness.charged { h, charger in
            let client = try h.connect(version: 2, cgroup: "/b.scope")
            _ = try client.send(.allocateBatch(AllocateBatchRequest(count: 3, size: 4096, heap: "system", tag: "b")))
            for _ in 0..<3 {
                #expect(h.pump(until: { charger.jobs.count == 1 }))
                try charger.complete()
            }
            guard case .buffers(let infos) = try #require(try client.receive()).1 else { Issue.record("no buffers"); return }
            #expect(infos.count == 3)
            let memfd = try makeMemfd(8192)
            _ = try client.send(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 0, size: 8192)], tag: "m")), fds: [memfd])
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            guard case .udmabufFromMemfds(_, let ranges) = charger.jobs[0].request else { Issue.record("\(charger.jobs[0].request)"); return }
            #expect(ranges.count == 1 && ranges[0].size == 8192)
            try charger.complete()
            guard case .buffer(let info) = try #require(try client.receive()).1 else { Issue.record("no buffer"); return }
            for id in infos.map(\.id) + [info.id] { try client.expectOK(.release(id)) }
        }
    }

    /// A batch that fails half-way releases what it made: another connection of the uid that fetched one
    /// while the batch was deferred keeps it, charged, until it lets go (it was discarded and uncharged,
    /// and the fetched fd held memory nobody was charged for).
    @Test func aFailedBatchReleasesWhatAnotherConnectionFetched() throws {
        try BrokerHarness.charged { h, charger in
            let client = try h.connect(version: 2, cgroup: "/b.scope")
            let other = try h.connect(version: 2, cgroup: "/b.scope")
            _ = try client.send(.allocateBatch(AllocateBatchRequest(count: 3, size: 4096, heap: "system", tag: "b")))
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            try charger.complete()
            let id = try #require(h.broker.buffers.values.first?.id)
            let (fetched, fds) = try other.request(.fetch(FetchRequest(buffer: id, token: 0)))
            guard case .buffer = fetched, fds.count == 1 else { Issue.record("fetch while the batch is deferred: \(fetched)"); return }
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            charger.fail(.timedOut, "the allocation did not finish within charge_timeout")
            guard case .error = try #require(try client.receive()).1 else { Issue.record("the batch did not fail"); return }
            h.pump(iterations: 10, waitMilliseconds: 1)
            #expect(h.broker.buffers[id] != nil, "a buffer another connection holds was dropped from the books")
            #expect(h.broker.books.usage[1000]?.buffers == 1)
            // Released by the failed batch, so it drains: freed (and uncharged) once the fetched fd is closed.
            _ = consume fds
            #expect(h.pump(until: { h.broker.buffers.isEmpty }), "the buffer was not freed once nobody held it")
        }
    }

    /// The client leaves while a helper works on the first heap of its chain; the helper then fails, and
    /// the next heap of the chain (made in the daemon) is not tried for a connection that is gone.
    @Test func noFallbackHeapIsTriedForAClientThatLeft() throws {
        try BrokerHarness.charged({ $0.policies["chain"] = ["system", "cma"] }) { h, charger in
            let client = try h.connect(cgroup: "/gone.scope")
            _ = try client.send(.allocate(AllocateRequest(size: 4096, heap: "chain", tag: "c")))
            #expect(h.pump(until: { charger.jobs.count == 1 }))
            client.close()
            #expect(h.pump(until: { h.broker.sessions.isEmpty }))
            // The kernel's refusal in the helper (as ChargeHelpers.check reports it): the chain goes on.
            charger.jobs.removeFirst().done(.failure(DmaBufError("dma-heap", .noMemory, "DMA_HEAP_IOCTL_ALLOC failed in the client's cgroup")))
            h.pump(iterations: 10, waitMilliseconds: 1)
            #expect(h.broker.buffers.isEmpty, "a buffer was made for a connection that is gone")
        }
    }

    /// Memfds a helper makes are charged to the client's cgroup: they do not use up max_daemon_memfd_bytes,
    /// which bounds what dmabufd itself is charged for; a best-effort fallback (made here) still does.
    @Test func helperMadeMemfdsAreNotTheDaemonsMemfds() throws {
        try BrokerHarness.charged({ $0.maxDaemonMemfdBytes = 8 << 20 }) { h, charger in
            let client = try h.connect(cgroup: "/u.scope")
            var ids: [BufferID] = []
            for _ in 0..<3 {
                _ = try client.send(.createUDmabuf(UDmabufRequest(size: 4 << 20, tag: "u")))
                #expect(h.pump(until: { charger.jobs.count == 1 }))
                try charger.complete()
                guard case .buffer(let info) = try #require(try client.receive()).1 else { Issue.record("no buffer"); return }
                ids.append(info.id)
            }
            charger.unplaceable = true  // best-effort: made in the daemon, bounded
            guard case .buffer(let here) = try client.request(.createUDmabuf(UDmabufRequest(size: 4 << 20, tag: "d"))).0 else {
                Issue.record("the best-effort udmabuf was refused"); return
            }
            ids.append(here.id)
            try client.expectRefusal(.createUDmabuf(UDmabufRequest(size: 8 << 20, tag: "d")), .noMemory, .limit, "max_daemon_memfd_bytes")
            for id in ids { try client.expectOK(.release(id)) }
        }
    }

    @Test func bestEffortFallsBackAndCounts() throws {
        try BrokerHarness.charged { h, charger in
            charger.unplaceable = true
            let client = try h.connect(cgroup: "/nowhere.scope")
            let (info, _) = try client.allocate()
            #expect(h.broker.chargeFallbacks == 1)
            try client.expectOK(.release(info.id))
        }
    }

    @Test func requiredRefusesWhenNoHelperCanBePlaced() throws {
        try BrokerHarness.charged({ $0.chargeClient = .required }) { h, charger in
            charger.unplaceable = true
            let client = try h.connect(cgroup: "/nowhere.scope")
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "r")), .notSupported, .limit, "cgroup v2")
            #expect(h.broker.chargeFallbacks == 0 && h.broker.buffers.isEmpty)
        }
    }

    @Test func clientsAreCountedPerCgroup() throws {
        try BrokerHarness.charged { h, charger in
            let a = try h.connect(cgroup: "/x.scope"), b = try h.connect(cgroup: "/x.scope")
            #expect(charger.clients["/x.scope"] == 2)
            a.close()
            b.close()
            #expect(h.pump(until: { charger.clients.isEmpty }))
        }
    }

    @Test func configKeys() throws {
        let config = try DaemonConfig(parsing: "charge_client = required\ncharge_helpers_max = 8\ncharge_timeout = 500ms\ncharge_helper = /usr/libexec/dmabufd-charge\n")
        #expect(config.chargeClient == .required && config.chargeHelpersMax == 8 && config.chargeTimeout == .milliseconds(500))
        #expect(config.chargeHelper == "/usr/libexec/dmabufd-charge")
        #expect(throws: DaemonConfig.ParseError.self) { try DaemonConfig(parsing: "charge_client = sometimes\n") }
        #expect(DaemonConfig().chargeClient == .bestEffort)
    }
}

/// The real ``ChargeHelpers`` with the real `dmabufd-charge` (built beside the tests) on the host: the
/// cgroup tree is a directory of plain files, and the "heap" a plain file, so the helper's ioctl fails
/// with ENOTTY. What is tested is the process side: spawn, move, the wire round trip, timeout, kill, reap.
@Suite("Charge helper processes", .serialized)
struct ChargeHelperProcessTests {
    final class Fixture {
        let directory: String
        let loop: EventLoop
        let helpers: ChargeHelpers
        init(helper: String? = nil, timeout: Duration = .seconds(5)) throws {
            directory = NSTemporaryDirectory() + "dmabufd-charge-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            for path in [directory, directory + "/cgroup", directory + "/cgroup/x.scope", directory + "/heaps"] { mkdir(path, 0o755) }
            for file in ["/cgroup/cgroup.controllers", "/cgroup/x.scope/cgroup.procs", "/heaps/system"] {
                FileManager.default.createFile(atPath: directory + file, contents: Data())
            }
            var config = DaemonConfig()
            config.heapDirectory = directory + "/heaps"
            config.chargeTimeout = timeout
            if let helper { config.chargeHelper = helper }
            loop = try EventLoop()
            var logger = Logger(label: "charge-test")
            logger.logLevel = .critical
            helpers = ChargeHelpers(loop: loop, logger: logger, config: config, closer: .shared, kernel: FakeKernel(), ownCgroup: "/daemon",
                                    cgroupRoot: directory + "/cgroup")
        }
        deinit { try? FileManager.default.removeItem(atPath: directory) }

        func run(until condition: () -> Bool) -> Bool {
            for _ in 0..<2000 where !condition() { loop.runOnce(timeoutMilliseconds: 5) }
            return condition()
        }
    }

    @Test func roundTripMovesTheHelperAndReapsItAfterTheLastClient() throws {
        let f = try Fixture()
        f.helpers.clientConnected(cgroup: "/x.scope")
        var result: Result<ChargeReply, Error>?
        try f.helpers.submit(.heap(name: "system", size: 4096, fdFlags: 0, heapFlags: 0), cgroup: "/x.scope") { result = $0 }
        #expect(f.run { result != nil })
        guard case .failure(let error as DmaBufError) = result else { Issue.record("\(String(describing: result))"); return }
        #expect(error.errno == .inappropriateIOCTLForDevice, "\(error)")
        let moved = (try? String(contentsOfFile: f.directory + "/cgroup/x.scope/cgroup.procs", encoding: .utf8)) ?? ""
        #expect(Int32(moved) != nil, "cgroup.procs holds '\(moved)'")
        #expect(f.helpers.helperCount == 1)
        if let pid = Int32(moved) { Self.expectUnprivileged(pid) }
        f.helpers.clientLeft(cgroup: "/x.scope")
        #expect(f.run { f.helpers.helperCount == 0 }, "the helper was not reaped")
        #expect(Int32(moved).map { kill($0, 0) != 0 } ?? false, "the helper process still exists")
    }

    /// The helper holds no capability and cannot gain one, not even when the daemon runs as root (these
    /// tests usually do): then its bounding set is empty too (SECURITY.md, "The daemon's own privileges").
    static func expectUnprivileged(_ pid: Int32) {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        func field(_ name: String) -> String? {
            status.split(separator: "\n").first { $0.hasPrefix(name + ":") }.map { $0.dropFirst(name.count + 1).trimmingCharacters(in: .whitespaces) }
        }
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            #expect(field(set).flatMap { UInt64($0, radix: 16) } == 0, "\(set): \(field(set) ?? "missing")")
        }
        if geteuid() == 0 { #expect(field("CapBnd").flatMap { UInt64($0, radix: 16) } == 0, "CapBnd: \(field("CapBnd") ?? "missing")") }
        #expect(field("NoNewPrivs") == "1")
    }

    @Test func aHelperThatDoesNotAnswerTimesOutAndIsKilled() throws {
        let script = NSTemporaryDirectory() + "dmabufd-silent-\(getpid())"
        try "#!/bin/sh\nexec sleep 1000\n".write(toFile: script, atomically: true, encoding: .utf8)
        chmod(script, 0o755)
        defer { unlink(script) }
        let f = try Fixture(helper: script, timeout: .milliseconds(100))
        f.helpers.clientConnected(cgroup: "/x.scope")
        var result: Result<ChargeReply, Error>?
        defer { f.helpers.clientLeft(cgroup: "/x.scope") }
        try f.helpers.submit(.heap(name: "system", size: 4096, fdFlags: 0, heapFlags: 0), cgroup: "/x.scope") { result = $0 }
        #expect(f.run { result != nil })
        guard case .failure(let error as ChargeUnavailable) = result else { Issue.record("\(String(describing: result))"); return }
        #expect(error.errno == .timedOut && error.description.contains("charge_timeout"))
        #expect(f.run { f.helpers.helperCount == 0 }, "the silent helper was not killed and reaped")

        // The cgroup cools down: no new helper there (even for a new client) until 5 × charge_timeout passed.
        f.helpers.clientConnected(cgroup: "/x.scope")
        defer { f.helpers.clientLeft(cgroup: "/x.scope") }
        do {
            try f.helpers.submit(.heap(name: "system", size: 4096, fdFlags: 0, heapFlags: 0), cgroup: "/x.scope") { _ in }
            Issue.record("a helper was started in a cgroup that is cooling down")
        } catch let refused as ChargeUnavailable {
            #expect(refused.errno == .resourceTemporarilyUnavailable && !refused.placement && refused.description.contains("timed out"), "\(refused)")
        }
        #expect(f.helpers.helperCount == 0)
        let started = ContinuousClock.now
        var submitted = false
        #expect(f.run {
            submitted = submitted || (try? f.helpers.submit(.heap(name: "system", size: 4096, fdFlags: 0, heapFlags: 0), cgroup: "/x.scope") { _ in }) != nil
            return submitted
        }, "the cgroup never cooled down")
        #expect(ContinuousClock.now - started >= .milliseconds(300), "the cooldown was shorter than 5 × charge_timeout")
    }

    @Test func unplaceableCgroupsAreRefusedWithAReason() throws {
        let f = try Fixture()
        for cgroup in ["/", "", "/a/../b", "relative"] {
            #expect(throws: ChargeUnavailable.self) {
                try f.helpers.submit(.heap(name: "system", size: 4096, fdFlags: 0, heapFlags: 0), cgroup: cgroup) { _ in }
            }
        }
        #expect(f.helpers.helperCount == 0)
    }
}
