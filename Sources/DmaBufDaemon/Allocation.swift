import DmaBuf
import DmaBufWire
import SystemPackage
import Logging

/// The fd flags `allocate` uses when the client names none (v1): read-write, close-on-exec.
let defaultFDFlags = UInt32(O_RDWR | O_CLOEXEC)

#if canImport(Glibc)
import Glibc
#endif

extension Broker {
    // MARK: - Allocation family: allocate, create_udmabuf(_from_memfd), import, release

    func allocate(_ session: ClientSession, _ a: AllocateRequest) throws -> (Response, [SharedFD]) {
        try Validate.tag(a.tag)
        try Validate.size(a.size, config: config)
        try admit(session, size: a.size)
        var chain = resolver.chain(for: a.heap)
        if chain.isEmpty {
            rescanHeaps()
            chain = resolver.chain(for: a.heap)
        }
        guard !chain.isEmpty else {
            throw Refusal(.noSuchFileOrDirectory, .noHeap, "no heap or policy named '\(a.heap)' is available", fix: "available: \(availableNames())")
        }
        var lastError: Error?
        for (logical, target) in chain {
            do {
                let record = try make(target, logical: logical, size: a.size, session: session, tag: a.tag)
                return (.buffer(info(record)), [record.fd])
            } catch let error as DmaBufError {
                books.countHeapFailure(logical)
                logger.notice("allocation failed; trying the next heap", metadata: ["heap": "\(logical)", "error": "\(error)"])
                lastError = error
            }
        }
        throw lastError!
    }

    private func make(_ target: HeapResolver.Target, logical: String, size: UInt64, session: ClientSession, tag: String) throws -> BufferRecord {
        switch target {
        case .heap(let name):
            let fd = try kernel.allocate(heap: name, size: size, fdFlags: defaultFDFlags, heapFlags: 0)
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
        try admit(session, size: u.size)
        guard resolver.chain(for: "udmabuf").first != nil else {
            throw Refusal(.noSuchFileOrDirectory, .noHeap, "udmabuf is not available", fix: "the kernel needs CONFIG_UDMABUF")
        }
        let made = try kernel.createUDmabuf(size: u.size, hugePages: u.hugePages)
        let record = try register(made.buffer, session: session, heap: "udmabuf", tag: u.tag, memfd: made.memfd, ownedMemfd: true,
                                  runs: PageRuns(memfdRanges: [(0, made.size)]))
        return (.buffer(info(record)), [record.fd])
    }

    func createUDmabuf(_ session: ClientSession, _ u: UDmabufFromMemfdRequest, memfd: SharedFD) throws -> (Response, [SharedFD]) {
        try Validate.tag(u.tag)
        let total = try Validate.memfdRanges(u.ranges, config: config, limits: kernel.udmabufLimits())
        guard kernel.kind(of: memfd) == .memfd else {
            throw Refusal(.invalidArgument, .invalidArgument, "the fd is not a memfd", fix: "send a memfd_create() descriptor with F_SEAL_SHRINK")
        }
        try admit(session, size: total)
        let pairs = u.ranges.map { (offset: $0.offset, size: $0.size) }
        let fd = try kernel.createUDmabuf(memfd: memfd, ranges: pairs)
        let record = try register(fd, session: session, heap: "udmabuf", tag: u.tag, memfd: memfd, ownedMemfd: false,
                                  runs: PageRuns(memfdRanges: pairs))
        return (.buffer(info(record)), [record.fd])
    }

    func importBuffer(_ session: ClientSession, tag: String, fd: SharedFD) throws -> (Response, [SharedFD]) {
        try Validate.tag(tag)
        guard kernel.kind(of: fd) == .dmaBuf, kernel.exporter(fd) != nil else {
            throw Refusal(.badFileDescriptor, .invalidArgument, "import: the fd is not a dma-buf",
                          fix: "send a descriptor from a heap, udmabuf or PRIME export")
        }
        let facts = try kernel.facts(fd)
        try Validate.size(facts.size, config: config)
        try admit(session, size: facts.size)
        let record = try register(fd, session: session, heap: "import", tag: tag, rename: false, facts: facts)
        // Every buffer reply carries the buffer, so a client can drop its own fd and keep the daemon's.
        return (.buffer(info(record)), [record.fd])
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
        try books.admit(uid: session.uid, size: size, count: count, sessionBuffers: session.owned.count, config: config,
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
        books.charge(record.id, uid: record.ownerUID, heap: heap, size: record.size)
        record.stored = fdStore.store(record)
        logger.debug("buffer", metadata: ["id": "\(record.id)", "heap": "\(heap)", "size": "\(record.size)"])
        return record
    }

    func availableNames() -> String {
        let names = resolver.heaps.map(\.name) + resolver.policies.keys.sorted()
        return names.isEmpty ? "none" : names.joined(separator: ", ")
    }
}
