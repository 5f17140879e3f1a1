import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

private let system: [Requirement] = [.heap("system"), .root]
private let fenced: [Requirement] = [.heap("system"), .root, .fence]
private let udmabuf: [Requirement] = [.udmabuf, .root]

/// Waits for an event matching `match`, failing after `timeout`.
private func expectEvent(_ connection: DmaBufConnection, _ what: String, timeout: Duration = .seconds(5), _ match: (Response) -> Bool) throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if let event = try connection.nextEvent(timeout: .milliseconds(50)), match(event) { return }
    }
    throw TestFailure(description: "no \(what) event within \(timeout)")
}

private func expectNoEvent(_ connection: DmaBufConnection, _ what: String, for duration: Duration, _ match: (Response) -> Bool) throws {
    let deadline = ContinuousClock.now + duration
    while ContinuousClock.now < deadline {
        if let event = try connection.nextEvent(timeout: .milliseconds(20)), match(event) {
            throw TestFailure(description: "unexpected \(what) event: \(event)")
        }
    }
}

enum LeaseTests {
    static let all: [DeviceTest] = [
        DeviceTest("lease.layout-heap-buffer-pages", requires: system) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 1 << 20, heap: "system")
                let layout = try connection.layout(buffer.info.id)
                try expectEqual(layout.kind, .bufferPages, "kind")
                try expectEqual(layout.runs, [PageRun(start: 0, pages: 256)], "runs")
                let part = try connection.layout(buffer.info.id, firstPage: 10, pageCount: 5)
                try expectEqual(part.runs, [PageRun(start: 10, pages: 5)], "runs of [10, 15)")
                try expect(part.lease != layout.lease, "each layout has its own lease")
            }
        },
        DeviceTest("lease.layout-udmabuf-memfd-pages", requires: udmabuf) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let page = UInt64(pageSize)
                let memfd = try Memfd(name: "runs", size: 32 * pageSize)
                let buffer = try connection.createUDmabuf(memfd: memfd, ranges: [
                    ByteRange(offset: 8 * page, size: 4 * page), ByteRange(offset: 0, size: 2 * page), ByteRange(offset: 2 * page, size: 2 * page),
                ])
                let layout = try connection.layout(buffer.info.id)
                try expectEqual(layout.kind, .memfdPages, "kind")
                try expectEqual(layout.runs, [PageRun(start: 8, pages: 4), PageRun(start: 0, pages: 4)], "runs")
                let slice = try connection.layout(buffer.info.id, firstPage: 3, pageCount: 3)
                try expectEqual(slice.runs, [PageRun(start: 11, pages: 1), PageRun(start: 0, pages: 2)], "runs of [3, 6)")
            }
        },
        DeviceTest("lease.physical-runs-for-root", requires: udmabuf) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.createUDmabuf(size: 1 << 20)
                let layout = try connection.layout(buffer.info.id, physical: true)
                try expectEqual(layout.kind, .physical, "kind")
                try expectEqual(layout.runs.reduce(0) { $0 + $1.pages }, 256, "pages covered")
                try expect(layout.runs.allSatisfy { $0.start != 0 }, "PFNs non-zero")
                try expect(layout.runs.count <= 256, "runs ≤ pages")
            }
        },
        DeviceTest("lease.physical-refused-for-unauthorised", requires: udmabuf) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.createUDmabuf(size: 1 << 20)
                try owner.share(buffer.info.id, uid: 65534)
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                try nobody.refused("layout \(buffer.info.id) physical", "EPERM", "physical addresses are only for authorised peers")
                let pages = try nobody.ok("layout \(buffer.info.id)")
                try expectEqual(pages[1], "1", "page runs are fine")
            }
        },
        DeviceTest("lease.physical-allowed-by-config", requires: udmabuf) {
            try withDaemon(config: "physical_addresses = root, 65534") { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.createUDmabuf(size: 1 << 20)
                try owner.share(buffer.info.id, uid: 65534)
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                try nobody.ok("layout \(buffer.info.id) physical")
            }
        },
        DeviceTest("lease.physical-heap-refused-vm-pfnmap", requires: system) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 4096, heap: "system")
                try expectRefusal(.notSupported, "VM_PFNMAP") { try connection.layout(buffer.info.id, physical: true) }
            }
        },
        DeviceTest("lease.hugetlb-64mib-at-most-32-runs", requires: udmabuf + [.hugePages(32)]) {
            try withDaemon(config: "max_buffer_size = 64M") { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.createUDmabuf(size: 64 << 20, tag: "huge", hugePages: true)
                let layout = try connection.layout(buffer.info.id, physical: true)
                try expectEqual(layout.runs.reduce(0) { $0 + $1.pages }, UInt64((64 << 20) / pageSize), "pages covered")
                try expect(layout.runs.count <= 32, "\(layout.runs.count) runs for 32 huge pages")
            }
        },
        DeviceTest("lease.release-unknown-refused", requires: system) {
            try withDaemon { daemon in
                try expectRefusal(.noSuchFileOrDirectory, "no lease 77") { try daemon.connect().releaseLease(77) }
            }
        },
        DeviceTest("lease.release-ends-lease-event", requires: system) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 4096, heap: "system")
                let layout = try connection.layout(buffer.info.id)
                try expectEqual(try connection.info(buffer.info.id).leases, 1, "leases")
                try connection.releaseLease(layout.lease)
                try expectEvent(connection, "leaseEnded") { $0 == .leaseEnded(lease: layout.lease, buffer: buffer.info.id) }
                try expectEqual(try connection.info(buffer.info.id).leases, 0, "leases after release")
            }
        },
        DeviceTest("lease.pending-fence-keeps-buffer-until-signal", requires: fenced) {
            try withDaemon { daemon in
                let root = try daemon.connect("observer")
                let id: BufferID
                let lease: LeaseID
                let fence = try TestFence.make()
                let holder = try daemon.connect("holder")
                do {
                    let buffer = try holder.allocate(size: 1 << 20, heap: "system", tag: "leased")
                    id = buffer.info.id
                    lease = try holder.layout(id).lease
                    try holder.releaseLease(lease, fence: fence.syncFile)
                    try holder.release(id)
                }
                try expectNoEvent(holder, "leaseEnded", for: .milliseconds(300)) { if case .leaseEnded = $0 { true } else { false } }
                try expect(try root.list(all: true).contains { $0.id == id }, "buffer kept while the fence is pending")
                try fence.signal()
                try expectEvent(holder, "leaseEnded") { $0 == .leaseEnded(lease: lease, buffer: id) }
                try eventually(.seconds(3), "buffer freed right after the signal") { !(try root.list(all: true).contains { $0.id == id }) }
            }
        },
        DeviceTest("lease.client-dies-with-pending-fence", requires: fenced) {
            try withDaemon { daemon in
                let root = try daemon.connect("observer")
                let fence = try TestFence.make()
                let (mine, theirs) = try UnixSocket.pair(.seqpacket)
                let channel = Channel(socket: mine)
                let pid = try Harness.child("daemon-lease-fence-die", [daemon.socketPath], fds: [theirs.descriptor])
                try channel.send("fence", fds: [fence.syncFile.fd.descriptor])
                let reply = try channel.receive().text.split(separator: " ")
                try expectEqual(String(reply[0]), "ready", "child")
                let id = BufferID(reply[1])!
                kill(pid, SIGKILL)
                _ = Harness.wait(pid)
                usleep(300_000)
                try expect(try root.list(all: true).contains { $0.id == id }, "buffer freed before the fence signalled")
                try expectEqual(try root.stats().pendingFences, 1, "pending fences")
                try fence.signal()
                try eventually(.seconds(3), "buffer freed after the signal") { !(try root.list(all: true).contains { $0.id == id }) }
            }
        },
        DeviceTest("fence.read-read-does-not-wait", requires: fenced) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 64 * 4096, heap: "system")
                let fence = try TestFence.make(write: false)
                try connection.attachFence(fence.syncFile, buffer: buffer.info.id, firstPage: 0, pageCount: 4, access: .read)
                let (count, file) = try connection.beginAccess(buffer: buffer.info.id, firstPage: 2, pageCount: 4, access: .read)
                try expectEqual(count, 0, "fences a reader waits for")
                try expect(file == nil, "no sync_file when nothing conflicts")
                try fence.signal()
            }
        },
        DeviceTest("fence.write-waits-for-overlapping-read", requires: fenced) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 64 * 4096, heap: "system")
                let fence = try TestFence.make(write: false)
                try connection.attachFence(fence.syncFile, buffer: buffer.info.id, firstPage: 0, pageCount: 4, access: .read)
                let (count, file) = try connection.beginAccess(buffer: buffer.info.id, firstPage: 3, pageCount: 4, access: .write)
                try expectEqual(count, 1, "fences a writer waits for")
                try expect(!(try file!.isSignaled()), "pending before the signal")
                try fence.signal()
                try file!.wait(timeout: .seconds(5))
            }
        },
        DeviceTest("fence.read-waits-for-overlapping-write-only", requires: fenced) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 64 * 4096, heap: "system")
                let write = try TestFence.make(write: true)
                let read = try TestFence.make(write: false)
                try connection.attachFence(write.syncFile, buffer: buffer.info.id, firstPage: 10, pageCount: 2, access: .write)
                try connection.attachFence(read.syncFile, buffer: buffer.info.id, firstPage: 10, pageCount: 10, access: .read)
                try expectEqual(try connection.beginAccess(buffer: buffer.info.id, firstPage: 11, pageCount: 9, access: .read).fences, 1, "reader waits for the write only")
                try expectEqual(try connection.beginAccess(buffer: buffer.info.id, firstPage: 11, pageCount: 9, access: .write).fences, 2, "writer waits for both")
                try expectEqual(try connection.beginAccess(buffer: buffer.info.id, firstPage: 12, pageCount: 8, access: .read).fences, 0, "reader past the write")
                try expectEqual(try connection.beginAccess(buffer: buffer.info.id, firstPage: 20, pageCount: 4, access: .write).fences, 0, "adjacent range does not overlap")
                try write.signal()
                try read.signal()
            }
        },
        DeviceTest("fence.exactly-the-conflicting-fences", requires: fenced) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 64 * 4096, heap: "system")
                let a = try TestFence.make(), b = try TestFence.make(), c = try TestFence.make()
                try connection.attachFence(a.syncFile, buffer: buffer.info.id, firstPage: 0, pageCount: 8, access: .write)
                try connection.attachFence(b.syncFile, buffer: buffer.info.id, firstPage: 8, pageCount: 8, access: .write)
                try connection.attachFence(c.syncFile, buffer: buffer.info.id, firstPage: 32, pageCount: 8, access: .write)
                let (count, file) = try connection.beginAccess(buffer: buffer.info.id, firstPage: 4, pageCount: 8, access: .read)
                try expectEqual(count, 2, "a and b conflict, c does not")
                try a.signal()
                try expect(!(try file!.isSignaled()), "merged fence still waits for b")
                try b.signal()
                try file!.wait(timeout: .seconds(5))
                try c.signal()
            }
        },
        DeviceTest("fence.whole-buffer-fence-imported-into-dmabuf", requires: fenced) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 16 * 4096, heap: "system")
                let fence = try TestFence.make()
                try connection.attachFence(fence.syncFile, buffer: buffer.info.id, access: .write)
                let seenByKernel = try buffer.buffer.exportSyncFile(.read)
                try expect(!(try seenByKernel.isSignaled()), "the dma-buf's own reservation holds the fence")
                try fence.signal()
                try seenByKernel.wait(timeout: .seconds(5))
            }
        },
        DeviceTest("fence.signalled-fences-dropped", requires: fenced) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 16 * 4096, heap: "system")
                let fence = try TestFence.make()
                try connection.attachFence(fence.syncFile, buffer: buffer.info.id, firstPage: 0, pageCount: 4, access: .write)
                try expectEqual(try connection.stats().pendingFences, 1, "pending")
                try fence.signal()
                try expectEvent(connection, "fenceSignaled") { $0 == .fenceSignaled(buffer.info.id) }
                try expectEqual(try connection.stats().pendingFences, 0, "pending after the signal")
                try expectEqual(try connection.beginAccess(buffer: buffer.info.id, firstPage: 0, pageCount: 4, access: .write).fences, 0, "nothing to wait for")
            }
        },
        DeviceTest("fence.attach-non-syncfile-refused", requires: system) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 4096, heap: "system")
                let memfd = try Memfd(name: "not-a-fence", size: 4096)
                try expectRefusal(.invalidArgument, "not a sync_file") {
                    try connection.attachFence(SyncFile(shared: memfd.fd), buffer: buffer.info.id, access: .write)
                }
            }
        },
        DeviceTest("fence.range-outside-buffer-refused", requires: fenced) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 4 * 4096, heap: "system")
                try expectRefusal(.invalidArgument, "outside buffer") {
                    try connection.beginAccess(buffer: buffer.info.id, firstPage: 3, pageCount: 2, access: .read)
                }
            }
        },
        DeviceTest("revoke.cooperative-holder", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect("owner")
                let buffer = try owner.allocate(size: 4096, heap: "system")
                let holder = try daemon.connect("holder")
                let layout = try holder.layout(buffer.info.id)
                try owner.revoke(buffer.info.id, deadline: .seconds(10))
                try expectEvent(holder, "leaseRevoked") {
                    if case .leaseRevoked(let lease, let id, _) = $0 { return lease == layout.lease && id == buffer.info.id }
                    return false
                }
                // info of a revoked buffer is refused like fetch (it would hand out the fd); list still shows it.
                try expectEqual(try owner.list().first { $0.id == buffer.info.id }?.generation, layout.generation + 1, "generation bumped")
                try expectRefusal(.staleNFSFileHandle, "revoked") { try holder.layout(buffer.info.id) }
                try holder.releaseLease(layout.lease)
                try expectEvent(owner, "bufferFreed") { $0 == .bufferFreed(buffer.info.id) }
            }
        },
        DeviceTest("revoke.deadline-ends-silent-holder", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect("owner")
                let buffer = try owner.allocate(size: 4096, heap: "system")
                let holder = try daemon.connect("silent")
                let layout = try holder.layout(buffer.info.id)
                let start = ContinuousClock.now
                try owner.revoke(buffer.info.id, deadline: .milliseconds(300))
                try expectEvent(holder, "leaseEnded", timeout: .seconds(10)) { $0 == .leaseEnded(lease: layout.lease, buffer: buffer.info.id) }
                try expect(ContinuousClock.now - start >= .milliseconds(300), "lease ended before the deadline")
                try expectEvent(owner, "bufferFreed") { $0 == .bufferFreed(buffer.info.id) }
            }
        },
        DeviceTest("revoke.refused-for-non-owner", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.allocate(size: 4096, heap: "system")
                try owner.share(buffer.info.id, uid: 65534)
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                try nobody.refused("revoke \(buffer.info.id)", "EPERM", "only the owner or root")
            }
        },
        DeviceTest("revoke.generation-never-republished", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.allocate(size: 4096, heap: "system")
                let holder = try daemon.connect()
                let before = try holder.layout(buffer.info.id)
                try owner.revoke(buffer.info.id, deadline: .seconds(10))
                try expectRefusal(.staleNFSFileHandle, "never published again") { try owner.layout(buffer.info.id) }
                try expectRefusal(.staleNFSFileHandle) { try owner.fetch(buffer.info.id) }
                try holder.releaseLease(before.lease)
            }
        },
    ]
}
