import DmaBuf
import DmaBufWire
import SystemPackage
import Logging

#if canImport(Glibc)
import Glibc
#endif

extension Broker {
    // MARK: - Allocation family: allocate, create_udmabuf(_from_memfd), import, release

    func allocate(_ session: ClientSession, _ a: AllocateRequest) throws -> (Response?, [SharedFD]) {
        try Validate.tag(a.tag)
        try Validate.size(a.size, config: config)
        try Validate.allocationFlags(fdFlags: a.fdFlags, heapFlags: a.heapFlags)
        try admit(session, size: a.size, daemonMemfd: !chargesClient(session) && firstTargetIsDaemonMemfd(a.heap))
        if chargesClient(session) {
            return deferAdmitted(session, bytes: a.size, buffers: 1) { reply in
                allocateCharged(session, size: a.size, heap: a.heap, tag: a.tag, fdFlags: a.fdFlags, count: 1) { [unowned self] result in
                    reply(result.map { (.buffer(self.info($0[0], for: session)), [$0[0].fd]) })
                }
            }
        }
        let record = try allocateOne(session, size: a.size, heap: a.heap, tag: a.tag, fdFlags: a.fdFlags)
        return (.buffer(info(record, for: session)), [record.fd])
    }

    /// v2 `allocate_batch`: all or nothing. Admission covers count × size; on a failure part-way, what was
    /// made is freed (and uncharged) before the error is returned.
    func allocateBatch(_ session: ClientSession, _ b: AllocateBatchRequest) throws -> (Response?, [SharedFD]) {
        try Validate.tag(b.tag)
        try Validate.size(b.size, config: config)
        try Validate.allocationFlags(fdFlags: b.fdFlags, heapFlags: b.heapFlags)
        guard (1...UInt16(WireLimits.maximumBatchCount)).contains(b.count) else {
            throw Refusal(.invalidArgument, .invalidArgument, "count \(b.count) is outside 1...\(WireLimits.maximumBatchCount)")
        }
        try admit(session, size: b.size, count: UInt32(b.count), daemonMemfd: !chargesClient(session) && firstTargetIsDaemonMemfd(b.heap))
        if chargesClient(session) {
            return deferAdmitted(session, bytes: b.size &* UInt64(b.count), buffers: UInt32(b.count)) { reply in  // admit checked the product
                allocateCharged(session, size: b.size, heap: b.heap, tag: b.tag, fdFlags: b.fdFlags, count: Int(b.count)) { [unowned self] result in
                    reply(result.map { made in (.buffers(made.map { self.info($0, for: session) }), made.map(\.fd)) })
                }
            }
        }
        var made: [BufferRecord] = []
        do {
            for _ in 0..<b.count { made.append(try allocateOne(session, size: b.size, heap: b.heap, tag: b.tag, fdFlags: b.fdFlags)) }
        } catch {
            for record in made { discard(record, from: session) }
            throw error
        }
        return (.buffers(made.map { info($0, for: session) }), made.map(\.fd))
    }

    /// Undoes a buffer that was never handed out: out of the tables, the books and the fd store.
    func discard(_ record: BufferRecord, from session: ClientSession) {
        session.owned.remove(record.id)
        buffers[record.id] = nil
        books.uncharge(record.id)
        fdStore.remove(record.id)  // stored or still queued: either way it must not stay in the store
    }

    /// The heaps to try for `heap` (a heap or a policy), in order; rescans once when there are none.
    func heapChain(_ heap: String) throws -> [(String, HeapResolver.Target)] {
        var chain = resolver.chain(for: heap)
        if chain.isEmpty, rescanHeapsIfDue() {
            chain = resolver.chain(for: heap)
        }
        guard !chain.isEmpty else {
            throw Refusal(.noSuchFileOrDirectory, .noHeap, "no heap or policy named '\(heap)' is available", fix: "available: \(availableNames())")
        }
        return chain.map { ($0.0, $0.1) }
    }

    private func allocateOne(_ session: ClientSession, size: UInt64, heap: String, tag: String, fdFlags: UInt32) throws -> BufferRecord {
        var lastError: Error?
        for (logical, target) in try heapChain(heap) {
            do {
                return try make(target, logical: logical, size: size, session: session, tag: tag, fdFlags: fdFlags)
            } catch let error as DmaBufError {
                lastError = heapFailed(error, logical: logical, target: target, size: size)
            }
        }
        throw lastError!
    }

    /// One heap of a chain failed: counted per heap, logged, and explained for the error the client gets
    /// if no later heap succeeds.
    func heapFailed(_ error: DmaBufError, logical: String, target: HeapResolver.Target, size: UInt64) -> DmaBufError {
        books.countHeapFailure(logical)
        logger.notice("allocation failed; trying the next heap", metadata: ["heap": "\(logical)", "error": "\(error)"])
        return explained(error, target: target, size: size)
    }

    /// A CMA heap that is out of memory says how much it has left, so a camera program's log tells the
    /// user what happened (CMA exhaustion is the common failure there) instead of a bare ENOMEM.
    func explained(_ error: DmaBufError, target: HeapResolver.Target, size: UInt64) -> DmaBufError {
        guard error.errno == .noMemory, case .heap(let name) = target,
              resolver.heaps.contains(where: { $0.kind == "cma" && $0.device.hasSuffix("/" + name) }) else { return error }
        let totals = kernel.heapTotals(kind: "cma")
        guard totals.total > 0 else { return error }
        return DmaBufError("dma-heap", .noMemory,
                           "'\(name)' (cma) has no room for \(ByteCount(Int(clamping: size))): \(ByteCount(Int(clamping: totals.free))) free of \(ByteCount(Int(clamping: totals.total))) (CmaFree/CmaTotal)",
                           fix: "free CMA buffers, ask for less, or use a policy that falls back to another heap")
    }

    /// udmabufs ignore the access mode of `fd_flags`: the kernel makes them O_RDWR.
    func make(_ target: HeapResolver.Target, logical: String, size: UInt64, session: ClientSession, tag: String,
                      fdFlags: UInt32) throws -> BufferRecord {
        switch target {
        case .heap(let name):
            let fd = try pools.take(heap: name, size: size, fdFlags: fdFlags) ?? kernel.allocate(heap: name, size: size, fdFlags: fdFlags, heapFlags: 0)
            let record = try register(fd, session: session, heap: logical, tag: tag)
            record.contiguous = resolver.isCMA(logical)
            return record
        case .udmabuf:
            // A policy that falls back to udmabuf makes a memfd here: bounded like a udmabuf asked for.
            try admitDaemonMemfd(roundedToPages(size))
            let made = try kernel.createUDmabuf(size: size, hugePages: false)
            return try register(made.buffer, session: session, heap: logical, tag: tag, memfd: made.memfd, ownedMemfd: true,
                                 runs: PageRuns(memfdRanges: [(0, made.size)]))
        }
    }

    func createUDmabuf(_ session: ClientSession, _ u: UDmabufRequest) throws -> (Response?, [SharedFD]) {
        try Validate.tag(u.tag)
        try Validate.size(u.size, config: config)
        // The memfd is rounded up to its page size (2 MiB with huge pages): bound and charge what will
        // really be allocated, not what was asked for.
        let unit: UInt64 = u.hugePages ? 2 << 20 : UInt64(pageSize)
        let (sum, overflow) = u.size.addingReportingOverflow(unit - 1)
        guard !overflow else {
            throw Refusal(.overflow, .invalidArgument, "size \(u.size) rounded up to \(unit) bytes overflows 64 bits", fix: "ask for less")
        }
        try Validate.size(sum / unit * unit, config: config)
        // A helper makes the memfd in the client's cgroup: not dmabufd's memory (a fallback is checked there).
        try admit(session, size: sum / unit * unit, daemonMemfd: !chargesClient(session))
        guard resolver.chain(for: "udmabuf").first != nil else {
            throw Refusal(.noSuchFileOrDirectory, .noHeap, "udmabuf is not available", fix: "the kernel needs CONFIG_UDMABUF")
        }
        if chargesClient(session) {
            let rounded = sum / unit * unit
            return deferAdmitted(session, bytes: rounded, buffers: 1) { reply in
                charge(session, .udmabuf(size: rounded, hugePages: u.hugePages)) { [unowned self] result in
                    reply(result.flatMap { made in
                        Result { try self.registerCharged(made, session: session, heap: "udmabuf", tag: u.tag, size: u.size, memfdSize: rounded) }
                    }.map { (.buffer(self.info($0, for: session)), [$0.fd]) })
                }
            }
        }
        let made = try kernel.createUDmabuf(size: u.size, hugePages: u.hugePages)
        let record = try register(made.buffer, session: session, heap: "udmabuf", tag: u.tag, memfd: made.memfd, ownedMemfd: true,
                                  runs: PageRuns(memfdRanges: [(0, made.size)]))
        return (.buffer(info(record, for: session)), [record.fd])
    }

    /// A udmabuf over the client's memfds (one in v1; in v2 each range names one of the message's fds, as
    /// `UDMABUF_CREATE_LIST` names a memfd per entry). Seals and bounds are the kernel's to refuse, with its errno.
    func createUDmabuf(_ session: ClientSession, _ u: UDmabufFromMemfdRequest, memfds: [SharedFD]) throws -> (Response?, [SharedFD]) {
        try Validate.tag(u.tag)
        guard u.flags & ~UDmabufFlags.valid == 0 else {
            throw Refusal(.invalidArgument, .invalidArgument, "udmabuf flags 0x\(String(u.flags, radix: 16)) are not supported", fix: "use UDMABUF_FLAGS_CLOEXEC (0x01) or 0")
        }
        let total = try Validate.memfdRanges(u.ranges, config: config, limits: kernel.udmabufLimits())
        for (i, memfd) in memfds.enumerated() where kernel.kind(of: memfd) != .memfd {
            throw Refusal(.badFileDescriptorState, .invalidArgument, "fd \(i) of the message is not a memfd",
                          fix: "send memfd_create() descriptors with F_SEAL_SHRINK")
        }
        guard u.ranges.allSatisfy({ Int($0.memfd) < memfds.count }) else {
            throw Refusal(.badFileDescriptor, .invalidArgument, "a range names a memfd the message does not carry")
        }
        try admit(session, size: total, createsMemory: false)
        let ranges = u.ranges.map { (memfd: Int($0.memfd), offset: $0.offset, size: $0.size) }
        // Memfd page runs are only meaningful within one memfd; over several the layout counts buffer pages.
        let used = Set(u.ranges.map(\.memfd))
        let single = used.count == 1 ? memfds[Int(used.first!)] : nil
        let runs = single == nil ? nil : PageRuns(memfdRanges: u.ranges.map { ($0.offset, $0.size) })
        if chargesClient(session) {
            // UDMABUF_CREATE faults in the memfds' holes: in the helper, they are charged to the client.
            return deferAdmitted(session, bytes: total, buffers: 1, createsMemory: false) { reply in
                charge(session, .udmabufFromMemfds(memfds: memfds, ranges: ranges)) { [unowned self] result in
                    reply(result.flatMap { made in
                        // Made by a helper, the holes it faulted in are the client's; made here (a
                        // best-effort fallback) they are dmabufd's and count against the headroom.
                        Result { try self.registerCharged(made, session: session, heap: "udmabuf", tag: u.tag, size: total,
                                                          runs: runs, clientMemfd: single, clientMemory: made.inClientCgroup) }
                    }.map { (.buffer(self.info($0, for: session)), [$0.fd]) })
                }
            }
        }
        let fd = try kernel.createUDmabuf(ranges: ranges.map { (memfds[$0.memfd], $0.offset, $0.size) })
        let record = try register(fd, session: session, heap: "udmabuf", tag: u.tag, memfd: single, ownedMemfd: false,
                                  runs: runs, clientMemory: true)
        return (.buffer(info(record, for: session)), [record.fd])
    }

    func importBuffer(_ session: ClientSession, tag: String, fd: SharedFD) throws -> (Response, [SharedFD]) {
        try Validate.tag(tag)
        guard kernel.kind(of: fd) == .dmaBuf, kernel.exporter(fd) != nil else {
            throw Refusal(.badFileDescriptor, .invalidArgument, "import: the fd is not a dma-buf",
                          fix: "send a descriptor from a heap, udmabuf or PRIME export")
        }
        let facts = try kernel.facts(fd)
        // A second record of a dma-buf the daemon already holds would count the first record's fd as an
        // outside reference, and each would keep the other charged forever (found by the request fuzzer).
        if let held = buffers.holding(inode: facts.inode) {
            throw Refusal(.fileExists, .invalidArgument, "import: dmabufd already holds this dma-buf as buffer \(held.id)",
                          fix: "fetch buffer \(held.id) instead of importing it again")
        }
        try Validate.size(facts.size, config: config)
        try admit(session, size: facts.size, createsMemory: false)
        let record = try register(fd, session: session, heap: "import", tag: tag, rename: false, facts: facts)
        // Every buffer reply carries the buffer, so a client can drop its own fd and keep the daemon's.
        return (.buffer(info(record, for: session)), [record.fd])
    }

    /// v2 `release_quiet`: `release` for each id, with no reply. Ids this connection does not hold are
    /// ignored and counted as ENOENT failures.
    func releaseQuiet(_ session: ClientSession, _ ids: [BufferID]) {
        for id in ids {
            do { try release(session, id) } catch { books.countFailure(.noSuchFileOrDirectory, uid: session.uid) }
        }
    }

    func release(_ session: ClientSession, _ id: BufferID) throws {
        if session.owned.contains(id), let record = buffers[id] {
            session.owned.remove(id)
            record.ownerSession = nil
            maybeFree(record)
        } else if session.fetched.remove(id) == nil {
            throw Refusal(.noSuchFileOrDirectory, .notFound, "this connection holds no buffer \(id)", fix: "list yours with `dmabufctl ls`")
        }
    }

    /// Refuses requests that are over quota or would exhaust memory, before touching the kernel: the uid's
    /// quota and the connection's bound, MemAvailable, the cgroup quotas and the headroom of the client's
    /// cgroup path (`createsMemory`: new pages, not an import or a client's memfd), the bound on dmabufd's
    /// own memfds (`daemonMemfd`), and the fd store.
    func admit(_ session: ClientSession, size: UInt64, count: UInt32 = 1, createsMemory: Bool = true, daemonMemfd: Bool = false) throws {
        try books.admit(uid: session.uid, cgroup: session.cgroup, size: size, count: count, sessionBuffers: session.owned.count, config: config,
                        memAvailable: kernel.memAvailable())
        let total = size &* UInt64(count)  // books.admit refused an overflowing product
        try admitCgroup(session, total: total, count: count, createsMemory: createsMemory)
        if daemonMemfd { try admitDaemonMemfd(total) }
        guard fdStore.count + Int(count) <= Int(config.fdStoreMax) || !fdStore.enabled else {
            throw Refusal(.tooManyOpenFiles, .limit, "the fd store holds \(fdStore.count) buffers, fd_store_max \(config.fdStoreMax)",
                          fix: "release buffers, or raise fd_store_max with FileDescriptorStoreMax= in the unit")
        }
    }

    /// Records a new buffer owned by `session`, names it `uid:pid:tag`, charges its owner and puts it in
    /// systemd's fd store.
    func register(_ fd: SharedFD, session: ClientSession, heap: String, tag: String, memfd: SharedFD? = nil, ownedMemfd: Bool = false,
                  runs: PageRuns? = nil, rename: Bool = true, facts known: BufferFacts? = nil, clientMemory: Bool = false) throws -> BufferRecord {
        var name = "\(session.uid):\(session.credentials.pid):\(tag)"
        while name.utf8.count > DmaBuffer.maximumNameLength { name.removeLast() }
        if rename { try? kernel.setName(fd, name) } else { name = "" }
        let facts = try known ?? kernel.facts(fd)
        let record = BufferRecord(id: nextBufferID, fd: fd, facts: facts, heap: heap, tag: tag, name: name,
                                  owner: session.credentials, cgroup: session.cgroup, ownerSession: session.id)
        nextBufferID += 1
        record.memfd = memfd
        record.memfdOwnedByDaemon = ownedMemfd
        record.memfdRuns = runs
        buffers[record.id] = record
        session.owned.insert(record.id)
        // A client's own memfd is in its cgroup already, and an import is memory dmabufd did not make:
        // neither is counted against the cgroup's headroom again.
        books.charge(record.id, uid: record.ownerUID, heap: heap, size: record.size, cgroup: record.ownerCgroup,
                     inCgroup: clientMemory || (memfd != nil && !ownedMemfd) || heap == "import")
        record.stored = fdStore.store(record)
        retryFDStoreLater()  // a no-op unless systemd's queue was full
        logger.debug("buffer", metadata: ["id": "\(record.id)", "heap": "\(heap)", "size": "\(record.size)"])
        return record
    }

    func availableNames() -> String {
        let names = resolver.heaps.map(\.name) + resolver.policies.keys.sorted()
        return names.isEmpty ? "none" : names.joined(separator: ", ")
    }
}
