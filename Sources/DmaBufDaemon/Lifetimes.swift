import DmaBuf
import DmaBufWire
import Logging
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The lifetime rules (docs/DESIGN.md, "Lifetimes"):
/// 1. A buffer lives while its owner holds it, any lease on it is open, or any fence attached to it is
///    pending. Only then does the daemon drop its reference.
/// 2. A lease ends when its holder released it (or disconnected, or its revocation deadline passed) and
///    every fence given with the release has signalled.
/// 3. A revoked buffer's generation is bumped and never published again.
/// 4. After the daemon drops its reference, the buffer stays accounted to its owner until no one else
///    references it (fdinfo `count`), so memory passed on is never invisible to quotas.
extension Broker {
    // MARK: Layout and leases

    func layout(_ request: LayoutRequest, session: ClientSession) throws -> Layout {
        let record = try visible(request.buffer, to: session)
        try notRevoked(record)
        let range = try pages(request.firstPage, request.pageCount, of: record)
        let kind: RunKind
        let runs: PageRuns
        if request.physical {
            guard config.physicalAddressUIDs.contains(session.credentials.uid) else {
                throw WireError(errno: Errno.notPermitted.rawValue, code: .permissionDenied,
                                message: "physical addresses are only for authorised peers (EPERM); the kernel hides PFNs from unprivileged processes, and so does dmabufd unless physical_addresses in dmabufd.conf names uid \(session.credentials.uid)")
            }
            guard let memfd = record.memfd else {
                throw WireError(errno: Errno.notSupported.rawValue, code: .invalidArgument,
                                message: "buffer \(record.id) comes from a heap: its mappings are VM_PFNMAP, so no PFNs are visible to userspace (EOPNOTSUPP); use a udmabuf to see physical runs")
            }
            if record.physicalRuns == nil {
                // Read-only and MAP_NORESERVE: the pages are already pinned by udmabuf, and a hugetlb
                // mapping would otherwise try to reserve a second set of huge pages.
                let mapping = try memfd.map(length: Int(try memfd.size()), writable: false, reserve: false)
                let all = try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapping.bytes))
                // The memfd's page runs say which memfd pages make up the buffer, in order.
                var physical = PageRuns()
                for run in record.memfdRuns ?? PageRuns(runs: [PageRun(start: 0, pages: record.pages)]) {
                    for pageRun in all.slice(run.start..<run.end) { physical.append(start: pageRun.start, pages: pageRun.pages) }
                }
                record.physicalRuns = physical
            }
            kind = .physical
            runs = record.physicalRuns!.slice(range)
        } else if let memfdRuns = record.memfdRuns {
            kind = .memfdPages
            runs = memfdRuns.slice(range)
        } else {
            kind = .bufferPages
            runs = PageRuns(runs: [PageRun(start: range.lowerBound, pages: UInt64(range.count))])
        }
        guard runs.count <= WireLimits.maximumListEntries else {
            throw WireError(errno: Errno.fileTooLarge.rawValue, code: .limit,
                            message: "\(runs.count) runs do not fit one reply (EFBIG); ask for fewer pages at a time")
        }
        let lease = Lease(id: nextLeaseID, buffer: record.id, session: session.id, generation: record.generation)
        nextLeaseID += 1
        leases[lease.id] = lease
        record.leases.insert(lease.id)
        session.leases.insert(lease.id)
        return Layout(buffer: record.id, lease: lease.id, generation: record.generation, kind: kind, pageSize: UInt32(pageSize),
                      firstPage: range.lowerBound, runs: Array(runs))
    }

    /// Starts waiting for `fence` on the event loop; returns its key (`nextFenceKey` at the call).
    func watch(_ fence: SyncFile, buffer: BufferID, session: UInt64?, lease: LeaseID?, interval: IntervalStore<UInt64>.ID?) throws -> UInt64 {
        let key = nextFenceKey
        nextFenceKey += 1
        fences[key] = PendingFence(key: key, syncFile: fence, buffer: buffer, since: .now, session: session, lease: lease, interval: interval)
        fenceKeysByFD[fence.fd.descriptor.rawValue] = key
        try loop.register(fence.fd.descriptor) { [unowned self] _ in self.fenceSignaled(key) }
        return key
    }

    /// A sync_file became readable: every fence in it has signalled.
    func fenceSignaled(_ key: UInt64) {
        guard let fence = fences.removeValue(forKey: key) else { return }
        loop.unregister(fence.syncFile.fd.descriptor)
        fenceKeysByFD[fence.syncFile.fd.descriptor.rawValue] = nil
        if let session = fence.session.flatMap({ sessionsByID[$0] }) {
            send(session, .fenceSignaled(fence.buffer), requestID: 0)
        }
        if let record = buffers[fence.buffer], let interval = fence.interval {
            record.fences.remove(interval)
        }
        if let leaseID = fence.lease, let lease = leases[leaseID] {
            lease.fences.remove(key)
            maybeEndLease(lease)
        }
        if let record = buffers[fence.buffer] { maybeFree(record) }
    }

    func maybeEndLease(_ lease: Lease) {
        guard lease.released, lease.fences.isEmpty else { return }
        leases[lease.id] = nil
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

    /// Drops the daemon's reference once nothing holds the buffer; keeps it accounted while others
    /// still reference it.
    func maybeFree(_ record: BufferRecord) {
        guard record.ownerSession == nil, !record.restored, record.leases.isEmpty, record.fences.isEmpty else { return }
        if !record.draining {
            record.draining = true
            for session in sessionsByID.values where session.fetched.contains(record.id) || session.owned.contains(record.id) {
                session.fetched.remove(record.id)
                session.owned.remove(record.id)
                send(session, .bufferFreed(record.id), requestID: 0)
            }
            tokens = tokens.filter { $0.value != record.id }
            // A buffer that came back from systemd's fd store is still in it (see `restore`). systemd's
            // copy would keep the memory alive (so `externalReferences` never reached 0) and bring the
            // freed buffer back after a crash; take it out. Harmless for a buffer the store never had.
            // Not while shutting down: `persistToFDStore` has just put every buffer there, and the
            // disconnects that follow end here.
            if config.fdStore && Systemd.isSupervised && !shuttingDown { Systemd.removeStoredFD(name: "buf-\(record.id)") }
        }
        if record.externalReferences == 0 {
            buffers[record.id] = nil
            charge(record, sign: -1)
            logger.debug("buffer freed", metadata: ["id": "\(record.id)"])
        } else if drainTimer == nil {
            drainTimer = loop.schedule(after: .milliseconds(200)) { [unowned self] in
                self.drainTimer = nil
                for record in self.buffers.values where record.draining { self.maybeFree(record) }
            }
        }
    }

    /// Revokes a buffer: holders hear `leaseRevoked`, get `deadline` to release, then their leases are
    /// ended for them; the buffer is freed once their fences signal. Its generation is never reused.
    func revoke(_ record: BufferRecord, deadline: Duration) {
        guard !record.revoked else { return }
        record.revoked = true
        record.generation += 1
        let ms = UInt32(clamping: deadline.wholeMilliseconds)
        logger.info("revoking", metadata: ["id": "\(record.id)", "leases": "\(record.leases.count)", "deadline_ms": "\(ms)"])
        // The owner keeps the id in its `owned` set until the buffer is freed, so it hears `bufferFreed`.
        record.ownerSession = nil
        for leaseID in record.leases {
            guard let lease = leases[leaseID] else { continue }
            if let session = lease.session.flatMap({ sessionsByID[$0] }) {
                send(session, .leaseRevoked(lease: lease.id, buffer: record.id, deadlineMilliseconds: ms), requestID: 0)
            }
            lease.deadlineTimer = loop.schedule(after: deadline) { [unowned self] in
                guard let lease = self.leases[leaseID] else { return }
                lease.deadlineTimer = nil
                if !lease.released {
                    self.logger.notice("lease holder missed the revocation deadline", metadata: ["lease": "\(leaseID)"])
                    lease.released = true
                }
                self.maybeEndLease(lease)
            }
        }
        maybeFree(record)
    }

    // MARK: Reload

    /// Applies a re-read configuration (SIGHUP). Quotas, policies, physical-address rights, bounds and the
    /// revocation deadline take effect at once; a uid now over its quota has its newest buffers revoked
    /// until it fits. The socket and device paths need a restart.
    public func reload(_ new: DaemonConfig) {
        if new.socketPath != config.socketPath || new.heapDirectory != config.heapDirectory || new.udmabufDevice != config.udmabufDevice {
            logger.notice("socket and device paths change only on restart")
        }
        var applied = new
        applied.socketPath = config.socketPath
        applied.heapDirectory = config.heapDirectory
        applied.udmabufDevice = config.udmabufDevice
        config = applied
        resolver = HeapResolver(policies: applied.policies, heapDirectory: applied.heapDirectory, udmabufDevice: applied.udmabufDevice)
        var revoked = 0
        for (uid, used) in usage {
            let quota = config.quota(for: uid)
            var bytes = used.bytes, count = used.buffers
            guard bytes > quota.bytes || count > quota.buffers else { continue }
            let live = buffers.values.filter { $0.ownerUID == uid && !$0.revoked && !$0.draining }.sorted { $0.id > $1.id }
            for record in live where bytes > quota.bytes || count > quota.buffers {
                revoke(record, deadline: config.revokeDeadline)
                bytes -= min(bytes, record.size)
                count -= min(count, 1)
                revoked += 1
            }
        }
        logger.info("configuration reloaded", metadata: ["revoked_over_quota": "\(revoked)"])
    }

    // MARK: fd store

    /// Hands every buffer to systemd's fd store with its metadata in the state directory, so a restarted
    /// daemon takes them back. Owners reconnect and fetch them by id.
    func persistToFDStore() {
        var lines: [String] = []
        for record in buffers.values.sorted(by: { $0.id < $1.id }) where !record.draining {
            guard Systemd.storeFD(record.buffer.fd.descriptor.rawValue, name: "buf-\(record.id)") else { continue }
            let shared = record.sharedWith.sorted().map(String.init).joined(separator: ",")
            lines.append([String(record.id), String(record.ownerUID), String(record.ownerPID), record.heap, String(record.generation),
                          shared, record.tag.replacingTabs()].joined(separator: "\t"))
        }
        let path = config.stateDirectory + "/buffers.tsv"
        if (try? writeText(path, lines.joined(separator: "\n") + "\n")) == nil {
            logger.warning("cannot write buffer metadata", metadata: ["path": "\(path)"])
        }
        logger.info("buffers handed to the systemd fd store", metadata: ["count": "\(lines.count)"])
    }

    /// Takes back buffers from the fd store. They belong to their uid with no session: the owner fetches
    /// them again by id.
    func restore(_ stored: [BufferID: SharedFD]) {
        guard !stored.isEmpty else { return }
        var metadata: [BufferID: [Substring]] = [:]
        if let text = try? SmallFiles.read(config.stateDirectory + "/buffers.tsv") {
            for line in text.split(separator: "\n") {
                let fields = line.split(separator: "\t", omittingEmptySubsequences: false)
                if fields.count >= 7, let id = BufferID(fields[0]) { metadata[id] = fields }
            }
        }
        for (id, fd) in stored.sorted(by: { $0.key < $1.key }) {
            guard let fields = metadata[id], let buffer = try? DmaBuffer(checking: fd),
                  let size = try? buffer.size(), let inode = try? buffer.inode() else {
                Systemd.removeStoredFD(name: "buf-\(id)")
                continue
            }
            let record = BufferRecord(id: id, buffer: buffer, size: UInt64(size), inode: inode, heap: String(fields[3]), tag: String(fields[6]),
                                      name: (try? buffer.info().name) ?? "", ownerUID: UInt32(fields[1]) ?? 0, ownerPID: Int32(fields[2]) ?? 0,
                                      ownerSession: nil)
            record.generation = UInt32(fields[4]) ?? 1
            record.sharedWith = Set(fields[5].split(separator: ",").compactMap { UInt32($0) })
            record.restored = true
            buffers[id] = record
            charge(record, sign: 1)
            nextBufferID = max(nextBufferID, id + 1)
            // Each restored buffer stays in the store until it is freed, so a crash loses nothing either.
        }
        logger.info("restored buffers from the systemd fd store", metadata: ["count": "\(buffers.count)"])
    }
}

extension String {
    func replacingTabs() -> String { String(map { $0 == "\t" || $0 == "\n" ? " " : $0 }) }
}

func writeText(_ path: String, _ text: String) throws {
    let fd = try FileDescriptor.open(path, .writeOnly, options: [.create, .truncate, .closeOnExec], permissions: [.ownerReadWrite])
    defer { try? fd.close() }
    try fd.writeAll(Array(text.utf8))
}
