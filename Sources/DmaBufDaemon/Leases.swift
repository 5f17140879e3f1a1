import DmaBuf
import DmaBufWire
import SystemPackage
import Logging

extension Broker {
    // MARK: - Leases and fences family: layout, release_lease, attach_fence, begin_access

    func layout(_ request: LayoutRequest, session: ClientSession) throws -> Layout {
        let record = try visible(request.buffer, to: session)
        try notRevoked(record)
        let range = try Validate.pages(request.firstPage, request.pageCount, of: record.pages, buffer: record.id)
        guard session.leases.count < Int(config.maxLeasesPerClient), perUID[session.uid, default: UIDCounts()].leases < Int(config.maxLeasesPerUID) else {
            throw Refusal(.noBufferSpace, .limit, "too many open leases (max_leases_per_client \(config.maxLeasesPerClient), max_leases_per_uid \(config.maxLeasesPerUID))",
                          fix: "release leases you no longer need")
        }
        let (kind, runs) = try runs(of: record, range: range, physical: request.physical, session: session)
        guard runs.count <= WireLimits.maximumListEntries else {
            throw Refusal(.fileTooLarge, .limit, "\(runs.count) runs do not fit one reply", fix: "ask for fewer pages at a time")
        }
        let lease = Lease(id: nextLeaseID, buffer: record.id, session: session.id, uid: session.uid, generation: record.generation)
        nextLeaseID += 1
        leases[lease.id] = lease
        record.leases.insert(lease.id)
        session.leases.insert(lease.id)
        perUID[session.uid, default: UIDCounts()].leases += 1
        // Contiguous: a CMA buffer by construction, or PFNs measured as one run. Never an invented address.
        let contiguous = record.contiguous || (kind == .physical && runs.count == 1)
        return Layout(buffer: record.id, lease: lease.id, generation: record.generation, kind: kind, pageSize: UInt32(pageSize),
                      firstPage: range.lowerBound, runs: Array(runs), flags: contiguous ? BufferFlags.contiguous : 0)
    }

    private func runs(of record: BufferRecord, range: Range<UInt64>, physical: Bool, session: ClientSession) throws -> (RunKind, PageRuns) {
        guard physical else {
            if let memfdRuns = record.memfdRuns { return (.memfdPages, memfdRuns.slice(range)) }
            return (.bufferPages, PageRuns(runs: [PageRun(start: range.lowerBound, pages: UInt64(range.count))]))
        }
        guard config.physicalAddressUIDs.contains(session.uid) else {
            throw Refusal(.notPermitted, .permissionDenied, "physical addresses are only for authorised peers",
                          fix: "the kernel hides PFNs from unprivileged processes, and so does dmabufd unless physical_addresses in dmabufd.conf names uid \(session.uid)")
        }
        guard let memfd = record.memfd, let memfdRuns = record.memfdRuns else {
            throw Refusal(.notSupported, .invalidArgument, "buffer \(record.id) comes from a heap: its mappings are VM_PFNMAP, so no PFNs are visible to userspace",
                          fix: "use a udmabuf made by dmabufd to see physical runs")
        }
        guard record.memfdOwnedByDaemon else {
            // The pages udmabuf pinned are not visible (VM_PFNMAP), and the client can punch holes in its
            // own memfd, so its mapping may show pages that are not the buffer's.
            throw Refusal(.notSupported, .invalidArgument, "buffer \(record.id) is over a client's memfd, whose pages the client can replace",
                          fix: "use create_udmabuf (a memfd that never leaves dmabufd) to see physical runs")
        }
        if record.physicalRuns == nil { record.physicalRuns = try kernel.physicalRuns(memfd: memfd, pages: memfdRuns) }
        return (.physical, record.physicalRuns!.slice(range))
    }

    func releaseLease(_ session: ClientSession, _ id: LeaseID, fence fd: SharedFD?) throws {
        // A released lease is no longer held, even while its fences keep it open: releasing it again
        // with a new fence each time would pin the buffer, and its owner's charge, past any revocation.
        guard let lease = leases[id], lease.session == session.id, !lease.released else {
            throw Refusal(.noSuchFileOrDirectory, .notFound, "no lease \(id) held by this connection")
        }
        if let fd {
            try checkFence(fd, session: session)
            let key = try watch(fd, buffer: lease.buffer, session: session, lease: id, interval: nil)
            lease.fences.insert(key)
        }
        lease.released = true
        session.leases.remove(id)
        maybeEndLease(lease)
    }

    /// A fence pins the buffer until it signals. Only the owner (or root) may attach one: a fence from
    /// anyone else could pin the owner's buffer, and its charge, for ever. (Lease holders pin through
    /// `release_lease` instead, bounded by revocation.)
    func attachFence(_ session: ClientSession, _ f: FenceAttachRequest, fence fd: SharedFD) throws {
        let record = try visible(f.buffer, to: session)
        try notRevoked(record)
        guard record.ownerUID == session.uid || session.uid == 0 else {
            throw Refusal(.notPermitted, .permissionDenied, "only the owner of buffer \(record.id) may attach fences to it",
                          fix: "ask the owner to attach it, or hold a lease and release it with the fence")
        }
        let range = try Validate.pages(f.firstPage, f.pageCount, of: record.pages, buffer: record.id)
        try checkFence(fd, session: session)
        if range.lowerBound == 0 && range.upperBound == record.pages {
            // Whole-buffer fences also go into the dma-buf's reservation, so kernel drivers wait too.
            try kernel.importFence(fd, into: record.fd, write: f.access.writes)
        }
        let key = nextFenceKey
        guard let interval = record.fences.insert(range, access: f.access, value: key) else {
            throw Refusal(.invalidArgument, .invalidArgument, "empty page range")
        }
        do {
            _ = try watch(fd, buffer: record.id, session: session, lease: nil, interval: interval)
        } catch {
            // Not watched, so nothing would ever remove the range, and it would pin the buffer for ever.
            _ = record.fences.remove(interval)
            throw error
        }
    }

    private func checkFence(_ fd: SharedFD, session: ClientSession) throws {
        guard kernel.kind(of: fd) == .syncFile else {
            throw Refusal(.invalidArgument, .invalidArgument, "the fd is not a sync_file",
                          fix: "send one from EXPORT_SYNC_FILE, SYNC_IOC_MERGE or a driver")
        }
        guard session.fences < Int(config.maxFencesPerClient), perUID[session.uid, default: UIDCounts()].fences < Int(config.maxFencesPerUID) else {
            throw Refusal(.noBufferSpace, .limit, "too many pending fences (max_fences_per_client \(config.maxFencesPerClient), max_fences_per_uid \(config.maxFencesPerUID))",
                          fix: "wait for fences to signal")
        }
    }

    func beginAccess(_ session: ClientSession, _ a: AccessRequest) throws -> (Response, [SharedFD]) {
        let record = try visible(a.buffer, to: session)
        try notRevoked(record)
        let range = try Validate.pages(a.firstPage, a.pageCount, of: record.pages, buffer: record.id)
        let conflicts = record.fences.conflicts(with: range, access: a.access)
        // Each SYNC_IOC_MERGE copies every fence merged so far: merging n costs O(n²) on the loop, so a
        // request merges at most max_merge_fences and is refused beyond (the fences signal by themselves).
        guard conflicts.count <= Int(config.maxMergeFences) else {
            throw Refusal(.resourceBusy, .limit, "\(conflicts.count) pending fences conflict with these pages, more than max_merge_fences \(config.maxMergeFences) merged per request",
                          fix: "ask for fewer pages, or wait for some fences to signal (fence_signaled) and ask again")
        }
        let files = conflicts.compactMap { fences[$0.value]?.syncFile }
        guard let merged = try kernel.mergeFences(files) else {
            return (.access(AccessReply(fences: 0)), [])
        }
        return (.access(AccessReply(fences: UInt32(files.count))), [merged])
    }

    /// Starts waiting for `fence` on the event loop; returns its key.
    func watch(_ fence: SharedFD, buffer: BufferID, session: ClientSession, lease: LeaseID?, interval: IntervalStore<UInt64>.ID?) throws -> UInt64 {
        let key = nextFenceKey
        try loop.register(fence.descriptor) { [unowned self] _ in self.fenceSignaled(key) }
        nextFenceKey += 1
        fences[key] = PendingFence(key: key, syncFile: fence, buffer: buffer, since: .now, session: session.id, uid: session.uid,
                                   lease: lease, interval: interval)
        session.fences += 1
        perUID[session.uid, default: UIDCounts()].fences += 1
        return key
    }

    /// A sync_file became readable: every fence in it has signalled. A fence that only held a lease open
    /// produces one message, `lease_ended`; a fence attached to pages produces `fence_signaled`.
    func fenceSignaled(_ key: UInt64) {
        guard let fence = fences.removeValue(forKey: key) else { return }
        loop.unregister(fence.syncFile.descriptor)
        sessionsByID[fence.session ?? 0].map { $0.fences -= 1 }
        perUID[fence.uid, default: UIDCounts()].fences -= 1
        cleanUID(fence.uid)
        if fence.lease == nil, let session = fence.session.flatMap({ sessionsByID[$0] }) {
            send(session, .fenceSignaled(fence.buffer), requestID: 0)
        }
        if let record = buffers[fence.buffer], let interval = fence.interval {
            _ = record.fences.remove(interval)
        }
        if let leaseID = fence.lease, let lease = leases[leaseID] {
            lease.fences.remove(key)
            maybeEndLease(lease)
        }
        if let record = buffers[fence.buffer] { maybeFree(record) }
    }

    func maybeEndLease(_ lease: Lease) {
        guard lease.released, lease.fences.isEmpty, leases[lease.id] === lease else { return }
        leases[lease.id] = nil
        perUID[lease.uid, default: UIDCounts()].leases -= 1
        cleanUID(lease.uid)
        if let timer = lease.deadlineTimer { loop.cancelTimer(timer) }
        if let session = lease.session.flatMap({ sessionsByID[$0] }) {
            session.leases.remove(lease.id)
            send(session, .leaseEnded(lease: lease.id, buffer: lease.buffer), requestID: 0)
        }
        if let record = buffers[lease.buffer] {
            record.leases.remove(lease.id)
            maybeFree(record)
        }
    }
}
