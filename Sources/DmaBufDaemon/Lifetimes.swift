import DmaBuf
import DmaBufWire
import Logging
import SystemPackage

extension Broker {
    // MARK: - Freeing

    /// Drops the daemon's reference once nothing holds the buffer; keeps it accounted while others
    /// still reference it. Idempotent: a buffer leaves the table and is uncharged once, whoever calls.
    func maybeFree(_ record: BufferRecord) {
        guard buffers[record.id] === record, record.ownerSession == nil, !record.restored, record.leases.isEmpty, record.fences.isEmpty else { return }
        if !record.draining { beginDraining(record) }
        // Unknown (untrusted or unreadable fdinfo) keeps the charge: retried from the drain timer.
        if externalReferences(record) == 0 {
            buffers[record.id] = nil
            books.uncharge(record.id)
            if let timer = record.revokeTimer { loop.cancelTimer(timer) }
            record.revokeTimer = nil
            logger.debug("buffer freed", metadata: ["id": "\(record.id)"])
        } else {
            scheduleDrain()
        }
    }

    private func beginDraining(_ record: BufferRecord) {
        record.draining = true
        for session in sessionsByID.values where session.fetched.contains(record.id) || session.owned.contains(record.id) {
            session.fetched.remove(record.id)
            session.owned.remove(record.id)
            send(session, .bufferFreed(record.id), requestID: 0)
        }
        for token in record.tokens { dropToken(token) }
        perUID[record.ownerUID, default: UIDCounts()].shares -= record.sharedWith.count
        cleanUID(record.ownerUID)
        // systemd's copy would keep the memory alive and bring the freed buffer back after a crash. Not while
        // shutting down: the store must keep every buffer across the restart.
        if !shuttingDown && fdStore.enabled {
            fdStore.remove(record.id)
            record.stored = false
            retryFDStoreLater()
        }
    }

    private func scheduleDrain() {
        guard drainTimer == nil else { return }
        drainTimer = loop.schedule(after: drainInterval) { [unowned self] in
            self.drainTimer = nil
            for record in self.buffers.values where record.draining { self.maybeFree(record) }
        }
    }

    /// Retries what systemd refused, from one timer at a time (every free or part-failed batch may ask).
    func retryFDStoreLater() {
        guard fdStore.hasPending, !fdStore.retryScheduled else { return }
        fdStore.retryScheduled = true
        loop.schedule(after: .milliseconds(50)) { [unowned self] in
            self.fdStore.retryScheduled = false
            if !self.fdStore.retryPending() { self.retryFDStoreLater() }
        }
    }

    // MARK: - Revocation

    /// The longest revocation deadline a client may ask for (`deadline_ms`): a lease holder gets at most
    /// this long to release, and a revoked buffer's timer lives at most this long.
    static let maximumRevokeDeadline: Duration = .seconds(600)

    /// A client's `deadline_ms`: 0 means `revoke_deadline`; above ``maximumRevokeDeadline`` is refused.
    func revokeDeadline(milliseconds ms: UInt32) throws -> Duration {
        guard ms > 0 else { return config.revokeDeadline }
        let deadline = Duration.milliseconds(Int64(ms))
        guard deadline <= Broker.maximumRevokeDeadline else {
            throw Refusal(.invalidArgument, .invalidArgument,
                          "deadline_ms \(ms) is above the maximum \(Broker.maximumRevokeDeadline.wholeMilliseconds) (10 minutes)",
                          fix: "ask for a shorter deadline, or 0 for the daemon's revoke_deadline")
        }
        return deadline
    }

    /// Revokes a buffer: holders hear `leaseRevoked`, get `deadline` to release, then their leases are
    /// ended for them; the buffer is freed once their fences signal. Its generation is never reused.
    /// One timer serves every lease of the buffer, so revoking n leases costs O(n).
    func revoke(_ record: BufferRecord, deadline: Duration) {
        guard !record.revoked else { return }
        record.revoked = true
        record.restored = false  // a restored buffer nobody adopted is freed like any other
        record.generation &+= 1
        let ms = UInt32(clamping: deadline.wholeMilliseconds)
        logger.info("revoking", metadata: ["id": "\(record.id)", "leases": "\(record.leases.count)", "deadline_ms": "\(ms)"])
        // The owner keeps the id in its `owned` set until the buffer is freed, so it hears `bufferFreed`.
        record.ownerSession = nil
        for leaseID in record.leases {
            guard let lease = leases[leaseID], let session = lease.session.flatMap({ sessionsByID[$0] }) else { continue }
            send(session, .leaseRevoked(lease: lease.id, buffer: record.id, deadlineMilliseconds: ms), requestID: 0)
        }
        if !record.leases.isEmpty {
            // Weak: a buffer freed before the deadline must not be kept (with its fd) by the timer; and
            // freeing cancels it, so no timer outlives its buffer.
            record.revokeTimer = loop.schedule(after: deadline) { [unowned self, weak record] in
                record?.revokeTimer = nil
                record.map(self.endLeases(of:))
            }
        }
        maybeFree(record)
    }

    /// The revocation deadline passed: every lease still open on `record` counts as released.
    private func endLeases(of record: BufferRecord) {
        for leaseID in Array(record.leases) {
            guard let lease = leases[leaseID] else { continue }
            if !lease.released {
                logger.notice("lease holder missed the revocation deadline", metadata: ["lease": "\(leaseID)"])
                lease.released = true
                lease.session.flatMap { sessionsByID[$0] }?.leases.remove(leaseID)
            }
            maybeEndLease(lease)
        }
    }

    // MARK: - Reload

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
        let scan = kernel.rescan()
        resolver = HeapResolver(policies: applied.policies, heapDirectory: applied.heapDirectory, udmabufDevice: applied.udmabufDevice,
                                heaps: scan.heaps, udmabuf: scan.udmabuf)
        pools.configure(applied.pools, maxBytes: applied.poolMaxBytes, charged: kernel.memAccounting())
        var revoked = 0
        for (uid, used) in books.usage {
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

    // MARK: - Restore

    /// Takes back buffers from the fd store. They belong to their uid with no session: the owner fetches
    /// them again by id. A stored fd that is not a dma-buf, or has no metadata, is dropped from the store.
    func restore(_ stored: [BufferID: SharedFD]) {
        guard !stored.isEmpty else { return }
        for (id, fd) in stored.sorted(by: { $0.key < $1.key }) {
            guard kernel.kind(of: fd) == .dmaBuf, let meta = fdStore.readMetadata(id), let facts = try? kernel.facts(fd) else {
                fdStore.remove(id, counted: false)
                continue
            }
            let owner = PeerCredentials(pid: meta.pid, uid: meta.uid, gid: 0)
            let record = BufferRecord(id: id, fd: fd, facts: facts, heap: meta.heap, tag: meta.tag, name: "", owner: owner,
                                      cgroup: meta.cgroup, ownerSession: nil)
            record.generation = meta.generation
            // A store written under a larger max_shares_per_buffer: keep what a reply can still list.
            record.sharedWith = Set(meta.shared.sorted().prefix(WireLimits.maximumListEntries))
            if record.sharedWith.count < meta.shared.count {
                logger.warning("restored buffer was shared with too many uids; kept the lowest", metadata: ["id": "\(id)", "uids": "\(meta.shared.count)"])
            }
            perUID[meta.uid, default: UIDCounts()].shares += record.sharedWith.count
            record.contiguous = resolver.isCMA(meta.heap)
            record.restored = true
            record.stored = true
            fdStore.adopted()
            buffers[id] = record
            books.charge(id, uid: meta.uid, heap: meta.heap, size: facts.size, cgroup: meta.cgroup)
            nextBufferID = max(nextBufferID, id + 1)
        }
        logger.info("restored buffers from the systemd fd store", metadata: ["count": "\(buffers.count)"])
    }
}
