import DmaBuf
import DmaBufWire
import SystemPackage
import Testing
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

/// Every request of docs/PROTOCOL.md, through the broker over a socket pair, against the fake kernel.
/// Each test ends with the books and the process's fds back at their baseline.
@Suite("Broker requests", .serialized)
struct RequestTests {
    @Test func helloNegotiatesAndReportsThePeer() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect(uid: 1000, hello: false)
        let (reply, _) = try client.request(.hello(Hello(minimumVersion: 1, maximumVersion: 9, client: "t")))
        guard case .hello(let hello) = reply else { Issue.record("\(reply)"); return }
        #expect(hello.version == WireLimits.supportedVersions.upperBound)
        #expect(hello.uid == 1000 && hello.pid == 4242)
        }
    }

    @Test func helloWithoutCommonVersionIsRefusedAndDisconnects() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect(hello: false)
        try client.expectRefusal(.hello(Hello(minimumVersion: 50, maximumVersion: 60, client: "t")), .protocolNotSupported, .unsupportedVersion, "no common protocol version")
        #expect(h.pump(until: client.isClosed))
        }
    }

    @Test func firstMessageMustBeHello() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect(hello: false)
        try client.expectRefusal(.stats, .protocolError, .malformed, "first message must be hello")
        #expect(h.pump(until: client.isClosed))
        }
    }

    @Test func malformedMessageGetsAnErrorAndADisconnect() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        var bytes = WireMessage.encode(.stats, requestID: 7)
        bytes[0] ^= 0xFF  // bad magic
        try client.sendRaw(bytes)
        guard let (_, reply, _) = try client.receive(), case .error(let error) = reply else { Issue.record("no error"); return }
        #expect(error.code == .malformed && error.errno == Errno.badMessage.rawValue)
        #expect(h.pump(until: client.isClosed))
        let other = try h.connect()
        try other.request(.stats)  // every other client keeps being served
        }
    }

    @Test func headerVersionNotSpokenIsUnsupportedAndSpokenButOtherIsMalformed() throws {
        try BrokerHarness.scenario() { h in
            for (version, errno, code) in [(UInt16(9), Errno.protocolNotSupported, WireError.Code.unsupportedVersion), (2, .badMessage, .malformed)] {
                let client = try h.connect()  // negotiated v1
                var bytes = WireMessage.encode(.stats, requestID: 7)
                bytes[4] = UInt8(version)
                try client.sendRaw(bytes)
                guard let (_, reply, _) = try client.receive(), case .error(let error) = reply else { Issue.record("no error"); return }
                #expect(error.errno == errno.rawValue && error.code == code, "\(error)")
                #expect(h.pump(until: client.isClosed))
            }
        }
    }

    @Test func silentPeerIsClosedAfterHelloTimeout() throws {
        try BrokerHarness.scenario({ $0.helloTimeout = .milliseconds(10) }) { h in
        let client = try h.connect(hello: false)
        #expect(h.pump(until: client.isClosed, iterations: 2000))
        }
    }

    @Test func listHeapsNamesHeapsPoliciesAndUsage() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (buffer, _) = try client.allocate(8192)
        let (reply, _) = try client.request(.listHeaps)
        guard case .heaps(let heaps) = reply else { Issue.record("\(reply)"); return }
        #expect(heaps.heaps.contains { $0.name == "system" && $0.allocatedBytes == 8192 && $0.buffers == 1 })
        #expect(heaps.heaps.contains { $0.name == "cma" })
        #expect(heaps.heaps.contains { $0.name == "udmabuf" })
        #expect(heaps.policies.contains { $0.name == "any" })
        // Another uid sees its own usage (none), root sees everyone's: list_heaps tells no uid another's.
        let (other, _) = try h.connect(uid: 1001).request(.listHeaps)
        guard case .heaps(let theirs) = other else { Issue.record("\(other)"); return }
        #expect(theirs.heaps.allSatisfy { $0.allocatedBytes == 0 && $0.buffers == 0 }, "\(theirs.heaps)")
        let (root, _) = try h.connect(uid: 0).request(.listHeaps)
        guard case .heaps(let all) = root else { Issue.record("\(root)"); return }
        #expect(all.heaps.contains { $0.name == "system" && $0.allocatedBytes == 8192 && $0.buffers == 1 })
        _ = buffer
        }
    }

    @Test func allocateReturnsTheBufferNamedAndCharged() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect(uid: 1000)
        let (info, fd) = try client.allocate(5000, tag: "frame.0")
        #expect(info.size == 8192 && info.heap == "system" && info.tag == "frame.0" && info.ownerUID == 1000)
        #expect(info.name == "1000:4242:frame.0")
        #expect(info.externalReferences == 0)  // allocate replies never read fdinfo
        #expect(h.kernel.kind(of: fd) == .dmaBuf)
        #expect(h.broker.books.usage[1000]?.bytes == 8192)
        }
    }

    @Test func allocateFallsBackAlongAPolicyAndCountsTheFailure() throws {
        try BrokerHarness.scenario() { h in
        h.kernel.failing["system"] = .noMemory
        let client = try h.connect()
        let (info, _) = try client.allocate(4096, heap: "fallback")
        #expect(info.heap == "udmabuf")
        #expect(h.broker.books.heapFailures["system"] == 1)
        }
    }

    @Test func allocateReportsTheKernelsErrorWhenEveryHeapFails() throws {
        try BrokerHarness.scenario() { h in
        h.kernel.failing["system"] = .noMemory
        let client = try h.connect()
        try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "")), .noMemory, .kernel)
        }
    }

    @Test func createUDmabufUsesADaemonMemfd() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (reply, fds) = try client.request(.createUDmabuf(UDmabufRequest(size: 3 * 4096, tag: "u", hugePages: false)))
        guard case .buffer(let info) = reply else { Issue.record("\(reply)"); return }
        #expect(info.heap == "udmabuf" && info.size == 3 * 4096 && fds.count == 1)
        #expect(h.broker.buffers[info.id]?.memfdOwnedByDaemon == true)
        }
    }

    @Test func createUDmabufFromAClientMemfd() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let memfd = try makeMemfd(8 * 4096)
        let request = UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 4096, size: 8192), ByteRange(offset: 0, size: 4096)], tag: "m")
        let (reply, _) = try client.request(.createUDmabufFromMemfd(request), fds: [memfd])
        guard case .buffer(let info) = reply else { Issue.record("\(reply)"); return }
        #expect(info.size == 3 * 4096)
        #expect(h.broker.buffers[info.id]?.memfdOwnedByDaemon == false)
        let (layout, _) = try client.request(.layout(LayoutRequest(buffer: info.id, firstPage: 0, pageCount: 0, physical: false)))
        guard case .layout(let l) = layout else { Issue.record("\(layout)"); return }
        #expect(l.kind == .memfdPages && l.runs == [PageRun(start: 1, pages: 2), PageRun(start: 0, pages: 1)])
        }
    }

    @Test func importAccountsAForeignDmaBuf() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect(uid: 1001)
        let foreign = try FakeKernel.makeBuffer(size: 4 * 4096)
        let (reply, fds) = try client.request(.importBuffer(tag: "imp"), fds: [foreign])
        guard case .buffer(let info) = reply else { Issue.record("\(reply)"); return }
        #expect(info.heap == "import" && info.size == 4 * 4096 && fds.count == 1 && info.name.isEmpty)
        #expect(h.broker.books.usage[1001]?.bytes == 4 * 4096)
        }
    }

    @Test func importOfABufferTheDaemonHoldsIsRefused() throws {
        // Found by the request fuzzer: two records of one dma-buf each counted the other's fd as an
        // outside reference, so neither was ever uncharged.
        try BrokerHarness.scenario() { h in
        let client = try h.connect(uid: 1001)
        let (info, fd) = try client.allocate()
        try client.expectRefusal(.importBuffer(tag: "again"), fds: [fd], .fileExists, .invalidArgument, "already holds this dma-buf as buffer \(info.id)")
        let foreign = try FakeKernel.makeBuffer(size: 4096)
        let (reply, back) = try client.request(.importBuffer(tag: "imp"), fds: [foreign])
        guard case .buffer = reply else { Issue.record("\(reply)"); return }
        try client.expectRefusal(.importBuffer(tag: "twice"), fds: [back[0]], .fileExists, .invalidArgument, "already holds this dma-buf")
        }
    }

    @Test func shareGrantsAUidAndFetchHandsTheBufferOver() throws {
        try BrokerHarness.scenario() { h in
        let owner = try h.connect(uid: 1000)
        let other = try h.connect(uid: 1001)
        let (info, _) = try owner.allocate()
        try other.expectRefusal(.fetch(FetchRequest(buffer: info.id, token: 0)), .permissionDenied, .permissionDenied, "not shared with uid 1001")
        let (shared, _) = try owner.request(.share(ShareRequest(buffer: info.id, uid: 1001, oneTimeToken: false)))
        #expect(shared == .share(ShareReply(token: nil)))
        let (fetched, fds) = try other.request(.fetch(FetchRequest(buffer: info.id, token: 0)))
        guard case .buffer(let got) = fetched else { Issue.record("\(fetched)"); return }
        #expect(got.id == info.id && got.sharedWith == [1001] && fds.count == 1)
        }
    }

    @Test func oneTimeTokenWorksOnce() throws {
        try BrokerHarness.scenario() { h in
        let owner = try h.connect(uid: 1000)
        let a = try h.connect(uid: 2000)
        let b = try h.connect(uid: 2001)
        let (info, _) = try owner.allocate()
        let (reply, _) = try owner.request(.share(ShareRequest(buffer: info.id, uid: nil, oneTimeToken: true)))
        guard case .share(let share) = reply, let token = share.token else { Issue.record("\(reply)"); return }
        let (first, _) = try a.request(.fetch(FetchRequest(buffer: info.id, token: token)))
        guard case .buffer = first else { Issue.record("\(first)"); return }
        try b.expectRefusal(.fetch(FetchRequest(buffer: info.id, token: token)), .permissionDenied, .permissionDenied)
        #expect(h.broker.tokens.isEmpty)
        }
    }

    @Test func shareOfSomeoneElsesBufferIsRefused() throws {
        try BrokerHarness.scenario() { h in
        let owner = try h.connect(uid: 1000)
        let other = try h.connect(uid: 1001)
        let (info, _) = try owner.allocate()
        try other.expectRefusal(.share(ShareRequest(buffer: info.id, uid: 1001, oneTimeToken: false)), .notPermitted, .permissionDenied, "not yours")
        try other.expectRefusal(.share(ShareRequest(buffer: 999, uid: 1001, oneTimeToken: false)), .noSuchFileOrDirectory, .notFound, "no buffer 999")
        }
    }

    @Test func releaseFreesAndUnchargesOnce() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (info, fd) = try client.allocate()
        try client.expectOK(.release(info.id))
        // Still referenced by the client's fd: accounted, draining.
        #expect(h.broker.books.usage[1000]?.buffers == 1)
        try client.expectRefusal(.release(info.id), .noSuchFileOrDirectory, .notFound, "holds no buffer")
        _ = consume fd
        #expect(h.pump(until: { h.broker.books.charges.isEmpty }, iterations: 400))
        }
    }

    @Test func listShowsOwnBuffersPagedAndAllIsForRoot() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect(uid: 1000)
        let other = try h.connect(uid: 1001)
        let (a, _) = try client.allocate()
        let (b, _) = try client.allocate()
        _ = try other.allocate()
        let (reply, _) = try client.request(.list(all: false, after: 0))
        #expect(reply.listIDs == [a.id, b.id])
        let (after, _) = try client.request(.list(all: false, after: a.id))
        #expect(after.listIDs == [b.id])
        try client.expectRefusal(.list(all: true, after: 0), .notPermitted, .permissionDenied, "for root")
        let root = try h.connect(uid: 0)
        let (all, _) = try root.request(.list(all: true, after: 0))
        #expect(all.listIDs?.count == 3)
        }
    }

    /// A page holds at most `Broker.listPageEntries` buffers (each costs an fdinfo read on the loop), and
    /// every entry carries its reference count, read for the page at once.
    @Test func listPagesAreCappedAndCarryReferences() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect(uid: 1000)
        var held: [SharedFD] = []
        for _ in 0..<(Broker.listPageEntries + 44) { held.append(try client.allocate().1) }
        guard case .list(let first, let more) = try client.request(.list(all: false, after: 0)).0 else {
            Issue.record("list answered otherwise"); return
        }
        #expect(first.count == Broker.listPageEntries && more)
        // The client's fd is the one reference outside the daemon, as info reports it.
        #expect(first.allSatisfy { $0.externalReferences == 1 })
        held.removeFirst(10)
        guard case .list(let again, _) = try client.request(.list(all: false, after: 0)).0,
              case .buffer(let info) = try client.request(.info(again[0].id)).0 else { Issue.record("list or info answered otherwise"); return }
        #expect(again.prefix(10).allSatisfy { $0.externalReferences == 0 } && again[10].externalReferences == 1)
        #expect(info.externalReferences == 0)
        guard case .list(let rest, let done) = try client.request(.list(all: false, after: first.last!.id)).0 else {
            Issue.record("list answered otherwise"); return
        }
        #expect(rest.count == 44 && !done)
        held.removeAll()
        }
    }

    /// `more` is set exactly when a buffer beyond the page exists: not at 256 buffers, at 257.
    @Test func listSetsMoreOnlyPastAFullPage() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect(uid: 1000)
        var held: [SharedFD] = []
        for _ in 0..<Broker.listPageEntries { held.append(try client.allocate().1) }
        guard case .list(let full, let more) = try client.request(.list(all: false, after: 0)).0 else { Issue.record("not a list"); return }
        #expect(full.count == Broker.listPageEntries && !more)
        held.append(try client.allocate().1)
        guard case .list(let again, let moreNow) = try client.request(.list(all: false, after: 0)).0 else { Issue.record("not a list"); return }
        #expect(again.count == Broker.listPageEntries && moreNow)
        held.removeAll()
        }
    }

    @Test func infoReadsReferencesAndRefusesRevoked() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (buffer, fd) = try client.allocate()
        let (reply, fds) = try client.request(.info(buffer.id))
        guard case .buffer(let info) = reply else { Issue.record("\(reply)"); return }
        #expect(info.externalReferences >= 1 && fds.count == 1)  // the client's fd (and the reply's)
        try client.expectOK(.revoke(RevokeRequest(buffer: buffer.id, deadlineMilliseconds: 0)))
        _ = consume fd
        }
    }

    @Test func revokedBufferInfoCarriesNoFd() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (buffer, _) = try client.allocate()
        _ = try client.request(.layout(LayoutRequest(buffer: buffer.id, firstPage: 0, pageCount: 0, physical: false)))
        try client.expectOK(.revoke(RevokeRequest(buffer: buffer.id, deadlineMilliseconds: 60_000)))
        try client.expectRefusal(.info(buffer.id), .staleNFSFileHandle, .revoked, "revoked")
        try client.expectRefusal(.fetch(FetchRequest(buffer: buffer.id, token: 0)), .staleNFSFileHandle, .revoked)
        }
    }

    @Test func statsForNonRootShowsOnlyTheCallersUid() throws {
        try BrokerHarness.scenario() { h in
        let a = try h.connect(uid: 1000)
        let b = try h.connect(uid: 1001)
        _ = try a.allocate(4096)
        _ = try b.allocate(8192)
        try b.expectRefusal(.release(77), .noSuchFileOrDirectory, .notFound)
        let (reply, _) = try a.request(.stats)
        guard case .stats(let stats) = reply else { Issue.record("\(reply)"); return }
        #expect(stats.clients.map(\.uid) == [1000] && stats.bytes == 4096 && stats.buffers == 1)
        #expect(stats.failures.isEmpty && stats.heaps.map(\.bytes) == [4096])
        let root = try h.connect(uid: 0)
        let (all, _) = try root.request(.stats)
        guard case .stats(let everything) = all else { Issue.record("\(all)"); return }
        #expect(everything.clients.map(\.uid) == [1000, 1001] && everything.bytes == 12288)
        #expect(everything.failures == [ErrnoCount(errno: "ENOENT", count: 1)])
        }
    }

    @Test func layoutPublishesRunsUnderALease() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (buffer, _) = try client.allocate(4 * 4096)
        let (reply, _) = try client.request(.layout(LayoutRequest(buffer: buffer.id, firstPage: 1, pageCount: 2, physical: false)))
        guard case .layout(let layout) = reply else { Issue.record("\(reply)"); return }
        #expect(layout.kind == .bufferPages && layout.firstPage == 1 && layout.runs == [PageRun(start: 1, pages: 2)])
        try client.expectOK(.releaseLease(layout.lease))
        #expect(try client.event() == .leaseEnded(lease: layout.lease, buffer: buffer.id))
        try client.expectRefusal(.releaseLease(layout.lease), .noSuchFileOrDirectory, .notFound, "no lease")
        }
    }

    @Test func physicalLayoutOnlyForDaemonMemfdsAndAuthorisedUids() throws {
        try BrokerHarness.scenario() { h in
        let user = try h.connect(uid: 1000)
        let root = try h.connect(uid: 0)
        let (heapBuffer, _) = try root.allocate()
        let (reply, _) = try root.request(.createUDmabuf(UDmabufRequest(size: 2 * 4096, tag: "", hugePages: false)))
        guard case .buffer(let udmabuf) = reply else { Issue.record("\(reply)"); return }
        let memfd = try makeMemfd(4096)
        let (clientReply, _) = try root.request(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 0, size: 4096)], tag: "")), fds: [memfd])
        guard case .buffer(let clientBuffer) = clientReply else { Issue.record("\(clientReply)"); return }
        try root.expectRefusal(.layout(LayoutRequest(buffer: heapBuffer.id, firstPage: 0, pageCount: 0, physical: true)), .notSupported, .invalidArgument, "VM_PFNMAP")
        try root.expectRefusal(.layout(LayoutRequest(buffer: clientBuffer.id, firstPage: 0, pageCount: 0, physical: true)), .notSupported, .invalidArgument, "client's memfd")
        let (physical, _) = try root.request(.layout(LayoutRequest(buffer: udmabuf.id, firstPage: 0, pageCount: 0, physical: true)))
        guard case .layout(let layout) = physical else { Issue.record("\(physical)"); return }
        #expect(layout.kind == .physical && layout.runs == [PageRun(start: 1000, pages: 2)])
        let (mine, _) = try user.allocate()
        try user.expectRefusal(.layout(LayoutRequest(buffer: mine.id, firstPage: 0, pageCount: 0, physical: true)), .notPermitted, .permissionDenied, "physical_addresses")
        }
    }

    @Test func fenceOnALeaseReleaseEndsItWithOneMessage() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (buffer, _) = try client.allocate()
        let (reply, _) = try client.request(.layout(LayoutRequest(buffer: buffer.id, firstPage: 0, pageCount: 0, physical: false)))
        guard case .layout(let layout) = reply else { Issue.record("\(reply)"); return }
        let fence = FakeFence()
        try client.expectOK(.releaseLease(layout.lease), fds: [fence.fd])
        h.pump(iterations: 5)
        #expect(h.broker.leases[layout.lease] != nil)  // held until the fence signals
        fence.signal()
        #expect(try client.event() == .leaseEnded(lease: layout.lease, buffer: buffer.id))
        try client.request(.stats)
        #expect(client.events.isEmpty)  // no fence_signaled as well
        }
    }

    @Test func aReleasedLeaseCannotBeReleasedAgainWithAnotherFence() throws {
        // Found in review: re-releasing with a fresh fence before the last one signalled kept the lease,
        // and so the buffer and its owner's charge, open past any revocation.
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (buffer, _) = try client.allocate()
        let (reply, _) = try client.request(.layout(LayoutRequest(buffer: buffer.id, firstPage: 0, pageCount: 0, physical: false)))
        guard case .layout(let layout) = reply else { Issue.record("\(reply)"); return }
        let first = FakeFence(), second = FakeFence()
        try client.expectOK(.releaseLease(layout.lease), fds: [first.fd])
        try client.expectRefusal(.releaseLease(layout.lease), fds: [second.fd], .noSuchFileOrDirectory, .notFound, "no lease")
        first.signal()
        #expect(try client.event() == .leaseEnded(lease: layout.lease, buffer: buffer.id))
        second.signal()
        }
    }

    @Test func aRefusedFetchLeavesTheTokenUnused() throws {
        try BrokerHarness.scenario() { h in
        let owner = try h.connect(uid: 1000)
        let other = try h.connect(uid: 2000)
        let (info, _) = try owner.allocate()
        let (shared, _) = try owner.request(.share(ShareRequest(buffer: info.id, uid: nil, oneTimeToken: true)))
        guard case .share(let reply) = shared, let token = reply.token else { Issue.record("\(shared)"); return }
        // A lease keeps the revoked buffer (and the token) alive until the revocation deadline.
        _ = try owner.request(.layout(LayoutRequest(buffer: info.id, firstPage: 0, pageCount: 0, physical: false)))
        try owner.expectOK(.revoke(RevokeRequest(buffer: info.id, deadlineMilliseconds: 60_000)))
        try other.expectRefusal(.fetch(FetchRequest(buffer: info.id, token: token)), .staleNFSFileHandle, .revoked, "revoked")
        #expect(h.broker.tokens[token] != nil)
        }
    }

    @Test func attachFenceHoldsPagesUntilItSignals() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (buffer, _) = try client.allocate(4 * 4096)
        let fence = FakeFence()
        try client.expectOK(.attachFence(FenceAttachRequest(buffer: buffer.id, firstPage: 0, pageCount: 4, access: .write)), fds: [fence.fd])
        #expect(h.kernel.imports == 1)  // whole buffer: imported into the reservation too
        let (access, fds) = try client.request(.beginAccess(AccessRequest(buffer: buffer.id, firstPage: 1, pageCount: 1, access: .read)))
        #expect(access == .access(AccessReply(fences: 1)) && fds.count == 1)
        try client.expectOK(.release(buffer.id))
        #expect(h.broker.buffers[buffer.id] != nil)  // the fence keeps it
        fence.signal()
        #expect(try client.event() == .fenceSignaled(buffer.id))
        }
    }

    @Test func beginAccessWithoutConflictsCarriesNoFd() throws {
        try BrokerHarness.scenario() { h in
        let client = try h.connect()
        let (buffer, _) = try client.allocate(4 * 4096)
        let fence = FakeFence()
        try client.expectOK(.attachFence(FenceAttachRequest(buffer: buffer.id, firstPage: 0, pageCount: 1, access: .read)), fds: [fence.fd])
        let (reply, fds) = try client.request(.beginAccess(AccessRequest(buffer: buffer.id, firstPage: 0, pageCount: 1, access: .read)))
        #expect(reply == .access(AccessReply(fences: 0)) && fds.isEmpty)
        fence.signal()
        }
    }

    @Test func revokeWarnsHoldersThenEndsTheirLeases() throws {
        try BrokerHarness.scenario() { h in
        let owner = try h.connect(uid: 1000)
        let reader = try h.connect(uid: 1001)
        let (buffer, _) = try owner.allocate()
        _ = try owner.request(.share(ShareRequest(buffer: buffer.id, uid: 1001, oneTimeToken: false)))
        let (reply, _) = try reader.request(.layout(LayoutRequest(buffer: buffer.id, firstPage: 0, pageCount: 0, physical: false)))
        guard case .layout(let layout) = reply else { Issue.record("\(reply)"); return }
        try reader.expectRefusal(.revoke(RevokeRequest(buffer: buffer.id, deadlineMilliseconds: 0)), .notPermitted, .permissionDenied, "only the owner or root")
        try owner.expectOK(.revoke(RevokeRequest(buffer: buffer.id, deadlineMilliseconds: 5)))
        try owner.expectRefusal(.layout(LayoutRequest(buffer: buffer.id, firstPage: 0, pageCount: 0, physical: false)), .staleNFSFileHandle, .revoked, "never published again")
        #expect(try reader.event() == .leaseRevoked(lease: layout.lease, buffer: buffer.id, deadlineMilliseconds: 5))
        #expect(try reader.event() == .leaseEnded(lease: layout.lease, buffer: buffer.id))
        }
    }
}

extension Response {
    var listIDs: [BufferID]? {
        if case .list(let items, _) = self { return items.map(\.id) }
        return nil
    }
}
