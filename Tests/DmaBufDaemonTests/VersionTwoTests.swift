import DmaBuf
import DmaBufWire
import SystemPackage
import Testing
@testable import DmaBufDaemon

/// Protocol v2 as the broker serves it (docs/PROTOCOL.md, version 2).
@Suite("Broker protocol v2", .serialized)
struct VersionTwoTests {
    @Test func allocateChecksFdAndHeapFlags() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect(version: 2)
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "", fdFlags: 0o40)), .invalidArgument, .invalidArgument, "fd_flags")
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "", heapFlags: 1)), .invalidArgument, .invalidArgument, "heap_flags")
            let (reply, fds) = try client.request(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "", fdFlags: FDFlags.readOnly)))
            guard case .buffer = reply else { Issue.record("\(reply)"); return }
            #expect(fds.count == 1)
        }
    }

    @Test func allocateBatchIsAllOrNothing() throws {
        try BrokerHarness.scenario({ $0.defaultQuota = .init(bytes: 1 << 30, buffers: 5) }) { h in
            let client = try h.connect(version: 2)
            let (reply, fds) = try client.request(.allocateBatch(AllocateBatchRequest(count: 4, size: 4096, heap: "system", tag: "b")))
            guard case .buffers(let infos) = reply else { Issue.record("\(reply)"); return }
            #expect(infos.count == 4 && fds.count == 4 && Set(infos.map(\.id)).count == 4)
            // Admission covers the whole batch: 4 held + 2 asked > 5.
            try client.expectRefusal(.allocateBatch(AllocateBatchRequest(count: 2, size: 4096, heap: "system", tag: "")), .diskQuotaExceeded, .quotaExceeded)
            h.kernel.failing["system"] = .noMemory
            try client.expectRefusal(.allocateBatch(AllocateBatchRequest(count: 1, size: 4096, heap: "system", tag: "")), .noMemory, .kernel)
            #expect(h.broker.books.usage[1000]?.buffers == 4)
        }
    }

    @Test func releaseQuietHasNoReplyAndCountsUnknownIds() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect(version: 2)
            let (a, _) = try client.allocate()
            let (b, _) = try client.allocate()
            _ = try client.send(.releaseQuiet([a.id, b.id, 999]))
            let (stats, _) = try client.request(.stats)
            guard case .stats(let s) = stats else { Issue.record("\(stats)"); return }
            let events = client.events
            #expect(events.allSatisfy { $0.isEvent })  // no reply to release_quiet
            #expect(s.failures == [ErrnoCount(errno: "ENOENT", count: 1)])
            #expect(!h.broker.sessions.values.contains { $0.owned.contains(a.id) || $0.owned.contains(b.id) })
        }
    }

    @Test func bufferInfoCarriesCgroupAndMemfdOwnership() throws {
        try BrokerHarness.scenario { h in
            let long = "/" + String(repeating: "x", count: 300)
            let client = try h.connect(version: 2, cgroup: long)
            let (reply, _) = try client.request(.createUDmabuf(UDmabufRequest(size: 4096, tag: "", hugePages: false)))
            guard case .buffer(let info) = reply else { Issue.record("\(reply)"); return }
            #expect(info.memfdOwnedByDaemon && info.cgroup.hasPrefix("...") && info.cgroup.utf8.count == 255)
            let memfd = try makeMemfd(4096)
            try client.expectRefusal(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 0, size: 4096)], tag: "", flags: 2)), fds: [memfd], .invalidArgument, .invalidArgument, "flags")
            let (own, _) = try client.request(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 0, size: 4096)], tag: "", flags: 1)), fds: [memfd])
            guard case .buffer(let clientBuffer) = own else { Issue.record("\(own)"); return }
            #expect(!clientBuffer.memfdOwnedByDaemon)
        }
    }

    @Test func contiguousFlagForCMAHeapsOnly() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect(version: 2)
            for heap in ["cma", "cma:linux,cma", "linux,cma"] {
                let (info, _) = try client.allocate(8192, heap: heap)
                #expect(info.isContiguous, "\(heap)")
                let (reply, _) = try client.request(.layout(LayoutRequest(buffer: info.id, firstPage: 1, pageCount: 1)))
                guard case .layout(let layout) = reply else { Issue.record("\(reply)"); return }
                #expect(layout.isContiguous && layout.runs == [PageRun(start: 1, pages: 1)], "\(heap)")
            }
            let (system, _) = try client.allocate(8192)
            #expect(system.flags == 0)
            let (reply, _) = try client.request(.layout(LayoutRequest(buffer: system.id)))
            guard case .layout(let layout) = reply else { Issue.record("\(reply)"); return }
            #expect(!layout.isContiguous)
        }
    }

    @Test func udmabufOverSeveralMemfds() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect(version: 2)
            let a = try makeMemfd(8192), b = try makeMemfd(4096)
            let ranges = [ByteRange(offset: 0, size: 8192), ByteRange(offset: 0, size: 4096, memfd: 1)]
            let (reply, _) = try client.request(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: ranges, tag: "l")), fds: [a, b])
            guard case .buffer(let info) = reply else { Issue.record("\(reply)"); return }
            #expect(info.size == 12288)
            // Over two memfds a memfd page index means nothing: the layout counts buffer pages.
            let (layoutReply, _) = try client.request(.layout(LayoutRequest(buffer: info.id)))
            guard case .layout(let layout) = layoutReply else { Issue.record("\(layoutReply)"); return }
            #expect(layout.kind == .bufferPages && layout.runs == [PageRun(start: 0, pages: 3)])
            // Every fd must be a memfd: the kernel's EBADFD.
            let pipeEnds = try pipePair()
            try client.expectRefusal(.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: ranges, tag: "")), fds: [a, pipeEnds.0],
                                     .badFileDescriptorState, .invalidArgument, "not a memfd")
        }
    }

    @Test func heapsAndStatsCarryTotalsAndCgroups() throws {
        try BrokerHarness.scenario { h in
            h.kernel.accounting = true
            let client = try h.connect(version: 2, cgroup: "/user.slice/app")
            _ = try client.allocate(8192)
            let (heaps, _) = try client.request(.listHeaps)
            guard case .heaps(let reply) = heaps else { Issue.record("\(heaps)"); return }
            #expect(reply.memAccounting)
            #expect(reply.heaps.first { $0.name == "cma" }?.totalBytes == 64 << 20)
            #expect(reply.heaps.first { $0.name == "system" }?.chargesMemcg == true)
            #expect(reply.heaps.first { $0.name == "udmabuf" }?.chargesMemcg == true)
            let (stats, _) = try client.request(.stats)
            guard case .stats(let s) = stats else { Issue.record("\(stats)"); return }
            #expect(s.cgroups == [CgroupStats(cgroup: "/user.slice/app", bytes: 8192, buffers: 1)])
        }
    }

    @Test func v1ClientsKeepV1Encodings() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect(version: 1)
            let (info, _) = try client.allocate()
            #expect(info.cgroup.isEmpty)
            try client.expectRefusal(.allocateBatch(AllocateBatchRequest(count: 1, size: 4096, heap: "system", tag: "")), .badMessage, .malformed)
        }
    }
}
