import DmaBuf
import DmaBufWire
import SystemPackage
import Testing
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

/// Every refusal of docs/PROTOCOL.md and every bound of the config, through the broker. Each refusal
/// leaves the client connected and the books where they were.
@Suite("Broker refusals and bounds", .serialized)
struct BoundsTests {
    static let page = UInt64(pageSize)

    @Test func allocationRefusals() throws {
        try BrokerHarness.scenario({ $0.maxBufferSize = 1 << 20; $0.defaultQuota = .init(bytes: 3 << 20, buffers: 3) }) { h in
            let client = try h.connect()
            try client.expectRefusal(.allocate(AllocateRequest(size: 0, heap: "system", tag: "")), .invalidArgument, .invalidArgument, "size 0")
            try client.expectRefusal(.allocate(AllocateRequest(size: 2 << 20, heap: "system", tag: "")), .fileTooLarge, .limit, "exceeds max_buffer_size")
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "nope", tag: "")), .noSuchFileOrDirectory, .noHeap, "no heap or policy named 'nope'", "system")
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "bad tag")), .invalidArgument, .invalidArgument, "[A-Za-z0-9._+-]")
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "x\ncount:\t1")), .invalidArgument, .invalidArgument)
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: String(repeating: "a", count: 33))), .invalidArgument, .invalidArgument)
            var held: [SharedFD] = []
            for _ in 0..<3 { held.append(try client.allocate(4096).1) }
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded, "3 buffers held, limit 3")
            #expect(h.broker.books.usage[1000]?.refusals == 1)
            h.kernel.available = 1 << 20
            let other = try h.connect(uid: 1001)
            try other.expectRefusal(.allocate(AllocateRequest(size: 1 << 20, heap: "system", tag: "")), .noMemory, .limit, "would leave too little memory")
        }
    }

    @Test func quotaBytesAndPerConnectionBuffers() throws {
        try BrokerHarness.scenario({ $0.defaultQuota = .init(bytes: 8192, buffers: 100); $0.maxBuffersPerClient = 1 }) { h in
            let client = try h.connect()
            _ = try client.allocate(8192)
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded, "quota exceeded for uid 1000", "quota.uid.1000")
            let other = try h.connect(uid: 1001)
            _ = try other.allocate(4096)
            try other.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded, "max_buffers_per_client")
        }
    }

    @Test func memfdRangesAreCheckedBeforeTheKernel() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect()
            let memfd = try makeMemfd(4 * 4096)
            func ranges(_ r: [ByteRange]) -> Request { .createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: r, tag: "")) }
            // The daemon-killer of issue 9: sizes that wrap when summed.
            try client.expectRefusal(ranges([ByteRange(offset: UInt64.max - 4095, size: 4096), ByteRange(offset: 0, size: 4096)]), fds: [memfd], .overflow, .invalidArgument, "overflows")
            try client.expectRefusal(ranges([ByteRange(offset: 0, size: UInt64.max - 4095), ByteRange(offset: 0, size: 8192)]), fds: [memfd], .overflow, .invalidArgument)
            try client.expectRefusal(ranges([ByteRange(offset: 1, size: 4096)]), fds: [memfd], .invalidArgument, .invalidArgument, "not page-aligned")
            try client.expectRefusal(ranges([ByteRange(offset: 0, size: 0)]), fds: [memfd], .invalidArgument, .invalidArgument)
            let pipeEnds = try pipePair()
            try client.expectRefusal(ranges([ByteRange(offset: 0, size: 4096)]), fds: [pipeEnds.0], .badFileDescriptorState, .invalidArgument, "not a memfd")
            h.kernel.limits = UDmabuf.Limits(sizeLimitMB: 64, listLimit: 2)
            try client.expectRefusal(ranges(Array(repeating: ByteRange(offset: 0, size: 4096), count: 3)), fds: [memfd], .invalidArgument, .invalidArgument, "list_limit")
            h.kernel.limits = UDmabuf.Limits(sizeLimitMB: 0, listLimit: 1024)
            try client.expectRefusal(ranges([ByteRange(offset: 0, size: 4096)]), fds: [memfd], .fileTooLarge, .limit, "size_limit_mb")
            #expect(h.broker.books.charges.isEmpty)
        }
    }

    @Test func importRefusesWhatIsNotADmaBuf() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect()
            let memfd = try makeMemfd(4096)
            try client.expectRefusal(.importBuffer(tag: ""), fds: [memfd], .badFileDescriptor, .invalidArgument, "not a dma-buf")
            let pipeEnds = try pipePair()
            try client.expectRefusal(.importBuffer(tag: ""), fds: [pipeEnds.1], .badFileDescriptor, .invalidArgument, "not a dma-buf")
        }
    }

    @Test func pageRangesCannotOverflow() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect()
            let (buffer, _) = try client.allocate(4 * 4096)
            for (first, count) in [(UInt64(4), UInt64(1)), (1, 4), (2, UInt64.max), (UInt64.max, 2)] {
                try client.expectRefusal(.layout(LayoutRequest(buffer: buffer.id, firstPage: first, pageCount: count, physical: false)),
                                         .invalidArgument, .invalidArgument, "outside buffer")
                try client.expectRefusal(.beginAccess(AccessRequest(buffer: buffer.id, firstPage: first, pageCount: count, access: .read)),
                                         .invalidArgument, .invalidArgument, "outside buffer")
            }
            let fence = FakeFence()
            try client.expectRefusal(.attachFence(FenceAttachRequest(buffer: buffer.id, firstPage: 3, pageCount: UInt64.max, access: .write)), fds: [fence.fd],
                                     .invalidArgument, .invalidArgument, "outside buffer")
        }
    }

    @Test func fenceRefusals() throws {
        try BrokerHarness.scenario({ $0.maxFencesPerClient = 1 }) { h in
            let owner = try h.connect(uid: 1000)
            let other = try h.connect(uid: 1001)
            let (buffer, _) = try owner.allocate()
            _ = try owner.request(.share(ShareRequest(buffer: buffer.id, uid: 1001, oneTimeToken: false)))
            let attach = Request.attachFence(FenceAttachRequest(buffer: buffer.id, firstPage: 0, pageCount: 1, access: .write))
            let memfd = try makeMemfd(4096)
            try owner.expectRefusal(attach, fds: [memfd], .invalidArgument, .invalidArgument, "not a sync_file")
            let (a, b) = (FakeFence(), FakeFence())
            // Someone else's fence would pin the owner's buffer (and its charge): refused.
            try other.expectRefusal(attach, fds: [a.fd], .notPermitted, .permissionDenied, "only the owner")
            try owner.expectOK(attach, fds: [a.fd])
            try owner.expectRefusal(attach, fds: [b.fd], .noBufferSpace, .limit, "max_fences_per_client")
            try owner.expectRefusal(.attachFence(FenceAttachRequest(buffer: 999, firstPage: 0, pageCount: 1, access: .write)), fds: [b.fd], .noSuchFileOrDirectory, .notFound)
            a.signal()
            #expect(try owner.event() == .fenceSignaled(buffer.id))
        }
    }

    @Test func leaseTokenAndShareBounds() throws {
        try BrokerHarness.scenario({ $0.maxLeasesPerClient = 2; $0.maxTokensPerClient = 2; $0.maxSharesPerBuffer = 2 }) { h in
            let client = try h.connect()
            let (buffer, _) = try client.allocate()
            let layout = Request.layout(LayoutRequest(buffer: buffer.id, firstPage: 0, pageCount: 0, physical: false))
            _ = try client.request(layout)
            _ = try client.request(layout)
            try client.expectRefusal(layout, .noBufferSpace, .limit, "max_leases_per_client")
            let token = Request.share(ShareRequest(buffer: buffer.id, uid: nil, oneTimeToken: true))
            _ = try client.request(token)
            _ = try client.request(token)
            try client.expectRefusal(token, .noBufferSpace, .limit, "max_tokens_per_client")
            for uid: UInt32 in [2000, 2001] { _ = try client.request(.share(ShareRequest(buffer: buffer.id, uid: uid, oneTimeToken: false))) }
            _ = try client.request(.share(ShareRequest(buffer: buffer.id, uid: 2000, oneTimeToken: false)))  // again: no new entry
            try client.expectRefusal(.share(ShareRequest(buffer: buffer.id, uid: 2002, oneTimeToken: false)), .noBufferSpace, .limit, "max_shares_per_buffer")
        }
    }

    @Test func connectionsPerUidAndInTotal() throws {
        try BrokerHarness.scenario({ $0.maxConnectionsPerUID = 2; $0.maxConnections = 3 }) { h in
            _ = try h.connect(uid: 1000)
            _ = try h.connect(uid: 1000)
            let third = try h.connect(uid: 1000, hello: false)
            guard let (_, reply, _) = try third.receive(), case .error(let error) = reply else { Issue.record("not refused"); return }
            #expect(error.errno == Errno.tooManyOpenFiles.rawValue && error.message.contains("max_connections"))
            #expect(third.isClosed())
            _ = try h.connect(uid: 1001)
            let fourth = try h.connect(uid: 1002, hello: false)
            #expect(try fourth.receive() != nil && fourth.isClosed())
        }
    }

    @Test func unreadRepliesStopReadingNotTheConnection() throws {
        try BrokerHarness.scenario({ $0.maxOutboxBytes = 4096 }) { h in
            let client = try h.connect()
            // Requests without reading a single reply: the socket fills, then the outbox, then reading stops.
            var sent = 0
            var blocked = 0
            while blocked < 50 {
                if try client.send(.stats, dontWait: true) { sent += 1; blocked = 0 } else { blocked += 1; h.pump(iterations: 1, waitMilliseconds: 0) }
            }
            let session = h.broker.sessions.values.first!
            #expect(session.readingPaused && !session.closing)
            #expect(session.outboxBytes <= 4 * 4096 + 1024)
            // Reading the replies lets the daemon catch up with every request.
            var replies = 0
            while replies < sent, let (_, response, _) = try client.receive() {
                if case .stats = response { replies += 1 }
            }
            #expect(replies == sent && sent > 100)
            #expect(!session.readingPaused)
        }
    }

    @Test func revokingManyLeasesEndsThemAllAndFrees() throws {
        try BrokerHarness.scenario({ $0.maxLeasesPerClient = 20_000; $0.maxLeasesPerUID = 20_000 }) { h in
            let owner = try h.connect(uid: 1000)
            let (buffer, _) = try owner.allocate()
            for _ in 0..<5000 { _ = try owner.request(.layout(LayoutRequest(buffer: buffer.id, firstPage: 0, pageCount: 0, physical: false))) }
            #expect(h.broker.leases.count == 5000)
            try owner.expectOK(.revoke(RevokeRequest(buffer: buffer.id, deadlineMilliseconds: 1)))
            #expect(h.pump(until: { h.broker.leases.isEmpty }, iterations: 1000))
        }
    }

    @Test func revokeRacingADisconnectUnchargesOnce() throws {
        try BrokerHarness.scenario { h in
            let owner = try h.connect(uid: 1000)
            let holder = try h.connect(uid: 1000)
            let (buffer, _) = try owner.allocate()
            _ = try holder.request(.layout(LayoutRequest(buffer: buffer.id, firstPage: 0, pageCount: 0, physical: false)))
            _ = try owner.send(.revoke(RevokeRequest(buffer: buffer.id, deadlineMilliseconds: 1)))
            holder.close()
            owner.close()
            h.pump(iterations: 50)
            #expect(h.broker.books.usage[1000] == nil)
        }
    }
}


func pipePair() throws -> (SharedFD, SharedFD) {
    var fds: [CInt] = [-1, -1]
    guard pipe(&fds) == 0 else { throw Errno(rawValue: errno) }
    return (SharedFD(adopting: fds[0]), SharedFD(adopting: fds[1]))
}
