import DmaBuf
import DmaBufWire
import SystemPackage
import Logging

#if canImport(Glibc)
import Glibc
#endif

extension Broker {
    // MARK: - Allocation family: allocate, create_udmabuf(_from_memfd), import, release

    func allocate(_ session: ClientSession, _ a: AllocateRequest) throws -> (Response, [SharedFD]) {
        try Validate.tag(a.tag)
        try Validate.size(a.size, config: config)
        try Validate.allocationFlags(fdFlags: a.fdFlags, heapFlags: a.heapFlags)
        try admit(session, size: a.size)
        let record = try allocateOne(session, size: a.size, heap: a.heap, tag: a.tag, fdFlags: a.fdFlags)
        return (.buffer(info(record, for: session)), [record.fd])
    }

    /// v2 `allocate_batch`: all or nothing. Admission covers count × size; on a failure part-way, what was
    /// made is freed (and uncharged) before the error is returned.
    func allocateBatch(_ session: ClientSession, _ b: AllocateBatchRequest) throws -> (Response, [SharedFD]) {
        try Validate.tag(b.tag)
        try Validate.size(b.size, config: config)
        try Validate.allocationFlags(fdFlags: b.fdFlags, heapFlags: b.heapFlags)
        guard (1...UInt16(WireLimits.maximumBatchCount)).contains(b.count) else {
            throw Refusal(.invalidArgument, .invalidArgument, "count \(b.count) is outside 1...\(WireLimits.maximumBatchCount)")
        }
        try admit(session, size: b.size, count: UInt32(b.count))
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
    private func discard(_ record: BufferRecord, from session: ClientSession) {
        session.owned.remove(record.id)
        buffers[record.id] = nil
        books.uncharge(record.id)
        if record.stored { fdStore.remove(record.id) }
    }

    private func allocateOne(_ session: ClientSession, size: UInt64, heap: String, tag: String, fdFlags: UInt32) throws -> BufferRecord {
        var chain = resolver.chain(for: heap)
        if chain.isEmpty {
            rescanHeaps()
            chain = resolver.chain(for: heap)
        }
        guard !chain.isEmpty else {
            throw Refusal(.noSuchFileOrDirectory, .noHeap, "no heap or policy named '\(heap)' is available", fix: "available: \(availableNames())")
        }
        var lastError: Error?
        for (logical, target) in chain {
            do {
                return try make(target, logical: logical, size: size, session: session, tag: tag, fdFlags: fdFlags)
            } catch let error as DmaBufError {
                books.countHeapFailure(logical)
                logger.notice("allocation failed; trying the next heap", metadata: ["heap": "\(logical)", "error": "\(error)"])
                lastError = explained(error, target: target, size: size)
            }
        }
        throw lastError!
    }

    /// A CMA heap that is out of memory says how much it has left, so a camera program's log tells the
    /// user what happened (CMA exhaustion is the common failure there) instead of a bare ENOMEM.
    private func explained(_ error: DmaBufError, target: HeapResolver.Target, size: UInt64) -> DmaBufError {
        guard error.errno == .noMemory, case .heap(let name) = target,
              resolver.heaps.contains(where: { $0.kind == "cma" && $0.device.hasSuffix("/" + name) }) else { return error }
        let totals = kernel.heapTotals(kind: "cma")
        guard totals.total > 0 else { return error }
        return DmaBufError("dma-heap", .noMemory,
                           "'\(name)' (cma) has no room for \(ByteCount(Int(clamping: size))): \(ByteCount(Int(clamping: totals.free))) free of \(ByteCount(Int(clamping: totals.total))) (CmaFree/CmaTotal)",
                           fix: "free CMA buffers, ask for less, or use a policy that falls back to another heap")
    }

    /// udmabufs ignore the access mode of `fd_flags`: the kernel makes them O_RDWR.
    private func make(_ target: HeapResolver.Target, logical: String, size: UInt64, session: ClientSession, tag: String,
                      fdFlags: UInt32) throws -> BufferRecord {
        switch target {
        case .heap(let name):
            let fd = try pools.take(heap: name, size: size, fdFlags: fdFlags) ?? kernel.allocate(heap: name, size: size, fdFlags: fdFlags, heapFlags: 0)
            return try register(fd, session: session, heap: logical, tag: tag)
        case .udmabuf:
            let made = try kernel.createUDmabuf(size: size, hugePages: false)
            return try register(made.buffer, session: session, heap: logical, tag: tag, memfd: made.memfd, ownedMemfd: true,
                                 runs: PageRuns(memfdRanges: [(0, made.size)]))
        }
    }

    func createUDmabuf(_ session: ClientSession, _ u: UDmabufRequest) throws -> (Response, [SharedFD]) {
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
        try admit(session, size: sum / unit * unit)
        guard resolver.chain(for: "udmabuf").first != nil else {
            throw Refusal(.noSuchFileOrDirectory, .noHeap, "udmabuf is not available", fix: "the kernel needs CONFIG_UDMABUF")
        }
        let made = try kernel.createUDmabuf(size: u.size, hugePages: u.hugePages)
        let record = try register(made.buffer, session: session, heap: "udmabuf", tag: u.tag, memfd: made.memfd, ownedMemfd: true,
                                  runs: PageRuns(memfdRanges: [(0, made.size)]))
        return (.buffer(info(record, for: session)), [record.fd])
    }

    func createUDmabuf(_ session: ClientSession, _ u: UDmabufFromMemfdRequest, memfd: SharedFD) throws -> (Response, [SharedFD]) {
        try Validate.tag(u.tag)
        guard u.flags & ~UDmabufFlags.valid == 0 else {
            throw Refusal(.invalidArgument, .invalidArgument, "udmabuf flags 0x\(String(u.flags, radix: 16)) are not supported", fix: "use UDMABUF_FLAGS_CLOEXEC (0x01) or 0")
        }
        let total = try Validate.memfdRanges(u.ranges, config: config, limits: kernel.udmabufLimits())
        guard kernel.kind(of: memfd) == .memfd else {
            throw Refusal(.invalidArgument, .invalidArgument, "the fd is not a memfd", fix: "send a memfd_create() descriptor with F_SEAL_SHRINK")
        }
        try admit(session, size: total)
        let pairs = u.ranges.map { (offset: $0.offset, size: $0.size) }
        let fd = try kernel.createUDmabuf(memfd: memfd, ranges: pairs)
        let record = try register(fd, session: session, heap: "udmabuf", tag: u.tag, memfd: memfd, ownedMemfd: false,
                                  runs: PageRuns(memfdRanges: pairs))
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
        try admit(session, size: facts.size)
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

    /// Refuses requests that are over quota or would exhaust memory, before touching the kernel.
    func admit(_ session: ClientSession, size: UInt64, count: UInt32 = 1) throws {
        try books.admit(uid: session.uid, cgroup: session.cgroup, size: size, count: count, sessionBuffers: session.owned.count, config: config,
                        memAvailable: kernel.memAvailable())
        guard fdStore.count + Int(count) <= Int(config.fdStoreMax) || !fdStore.enabled else {
            throw Refusal(.tooManyOpenFiles, .limit, "the fd store holds \(fdStore.count) buffers, fd_store_max \(config.fdStoreMax)",
                          fix: "release buffers, or raise fd_store_max with FileDescriptorStoreMax= in the unit")
        }
    }

    /// Records a new buffer owned by `session`, names it `uid:pid:tag`, charges its owner and puts it in
    /// systemd's fd store.
    func register(_ fd: SharedFD, session: ClientSession, heap: String, tag: String, memfd: SharedFD? = nil, ownedMemfd: Bool = false,
                  runs: PageRuns? = nil, rename: Bool = true, facts known: BufferFacts? = nil) throws -> BufferRecord {
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
        books.charge(record.id, uid: record.ownerUID, heap: heap, size: record.size, cgroup: record.ownerCgroup)
        record.stored = fdStore.store(record)
        logger.debug("buffer", metadata: ["id": "\(record.id)", "heap": "\(heap)", "size": "\(record.size)"])
        return record
    }

    func availableNames() -> String {
        let names = resolver.heaps.map(\.name) + resolver.policies.keys.sorted()
        return names.isEmpty ? "none" : names.joined(separator: ", ")
    }
}
