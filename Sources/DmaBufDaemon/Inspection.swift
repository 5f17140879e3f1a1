import DmaBuf
import HeapModule
import DmaBufWire
import SystemPackage

extension Broker {
    // MARK: - Inspection family: list_heaps, list, info, stats

    /// v2 adds each heap's total and free bytes (0: unknown) and whether the kernel charges its pages to
    /// a memory cgroup; encoding for a v1 session leaves them out. Usage is every uid's for root and the
    /// asker's own otherwise, as in `stats`.
    func listHeaps(for uid: UInt32) -> HeapsReply {
        // With hotplug monitoring the heap set is current; without it, a listing is when to look again.
        if udev == nil { rescanHeapsIfDue() }
        let memAccounting = kernel.memAccounting()
        let usage = books.heapTotals(only: uid == 0 ? nil : uid)
        let heaps = resolver.heaps.map { heap -> HeapInfo in
            var info = heap
            let used = usage[heap.name] ?? (0, 0)
            info.allocatedBytes = used.bytes
            info.buffers = used.buffers
            let totals = kernel.heapTotals(kind: heap.kind)
            info.totalBytes = totals.total
            info.freeBytes = totals.free
            info.chargesMemcg = heap.kind == "udmabuf" || (heap.kind == "system" && memAccounting)
            return info
        } + drmNodes.sorted().map { HeapInfo(name: "drm:" + ($0.split(separator: "/").last.map(String.init) ?? $0), device: $0, kind: "drm") }
        let policies = resolver.policies.keys.sorted().map { PolicyInfo(name: $0, chain: resolver.policies[$0]!) }
        return HeapsReply(heaps: heaps, policies: policies, memAccounting: memAccounting)
    }

    func list(_ session: ClientSession, all: Bool, after: BufferID) throws -> (Response, [SharedFD]) {
        let uid = session.uid
        if all && uid != 0 {
            throw Refusal(.notPermitted, .permissionDenied, "listing every buffer is for root", fix: "list your own without --all")
        }
        // As many as fit one message, at most `listPageEntries`; the client asks again after the last id
        // while `more` is set. The page is picked first (an entry's size does not depend on its
        // reference count), then its references are read in one call: one fdinfo read per entry.
        var budget = WireLimits.maximumMessageSize - WireLimits.headerSize - 4 - 1
        var picked: [BufferRecord] = []
        var page: [BufferInfo] = []
        var more = false
        for id in candidates(for: session, all: all, after: after) {
            guard let record = buffers[id] else { continue }
            let item = info(record, for: session)
            let size = WireMessage.encodedSize(of: item, version: session.version ?? WireLimits.baseVersion)
            guard size <= budget, page.count < Broker.listPageEntries else {
                more = true
                break
            }
            budget -= size
            picked.append(record)
            page.append(item)
        }
        // One count per buffer, in order; a backend that answered otherwise reports no references.
        let counts = kernel.referenceCounts(picked.map(\.fd))
        for index in page.indices where index < counts.count {
            page[index].externalReferences = UInt32(clamping: external(counts[index], of: picked[index]) ?? 0)
        }
        return (.list(page, more: more), [])
    }

    /// The `listPageEntries + 1` smallest ids above `after` that the session may list, ascending: one pass
    /// over the table with a bounded min-max heap, not a sort of everything (a `list` is 20 bytes).
    private func candidates(for session: ClientSession, all: Bool, after: BufferID) -> [BufferID] {
        var smallest = Heap<BufferID>()
        for record in buffers.values where record.id > after && (all || visibleInList(record, to: session)) {
            smallest.insert(record.id)
            if smallest.count > Broker.listPageEntries + 1 { _ = smallest.removeMax() }
        }
        return smallest.unordered.sorted()
    }

    /// Own buffers, fetched ones, and the uid's orphans.
    private func visibleInList(_ record: BufferRecord, to session: ClientSession) -> Bool {
        record.ownerSession == session.id || session.fetched.contains(record.id)
            || (record.ownerUID == session.uid && record.ownerSession == nil)
    }

    /// Entries in one `list` reply: each costs an fdinfo read on the loop, so a client holding
    /// thousands of buffers gets them a page at a time (docs/SECURITY.md, gap 12).
    static let listPageEntries = 256

    /// Like `fetch`, the reply carries the buffer only while it is not revoked.
    func info(_ session: ClientSession, _ id: BufferID) throws -> (Response, [SharedFD]) {
        let record = try visible(id, to: session)
        try notRevoked(record)
        return (.buffer(info(record, for: session, references: true)), [record.fd])
    }

    /// `external_references` costs an fdinfo read, so only `list` and `info` ask for it; buffers just made
    /// have none but the reply's own (reported as 0).
    func info(_ record: BufferRecord, for session: ClientSession, references: Bool = false) -> BufferInfo {
        BufferInfo(id: record.id, inode: record.inode, size: record.size, heap: record.heap, tag: record.tag, name: record.name,
                   ownerUID: record.ownerUID, ownerPID: record.ownerPID, generation: record.generation,
                   externalReferences: references ? UInt32(clamping: externalReferences(record) ?? 0) : 0,
                   leases: UInt32(clamping: record.leases.count),
                   sharedWith: record.sharedWith.sorted(), revoked: record.revoked, orphaned: record.ownerSession == nil,
                   cgroup: Validate.cgroupField(record.ownerCgroup), memfdOwnedByDaemon: record.memfdOwnedByDaemon,
                   flags: record.contiguous ? BufferFlags.contiguous : 0)
    }

    /// References to the buffer's file outside the daemon: fdinfo's first `count` less the daemon's own
    /// and systemd's stored copy. nil when fdinfo cannot be trusted (the caller keeps the charge).
    func externalReferences(_ record: BufferRecord) -> Int? {
        external(kernel.referenceCount(record.fd), of: record)
    }

    /// A reference count less the daemon's own and systemd's stored copy.
    private func external(_ count: Int?, of record: BufferRecord) -> Int? {
        count.map { max($0 - 1 - (record.stored ? 1 : 0), 0) }
    }

    /// Root sees everything; anyone else sees only its own uid's usage, failures and heap totals. The reply
    /// always fits one message (docs/PROTOCOL.md, `stats`): per-uid and per-cgroup rows are sorted by
    /// bytes, and the rows that do not fit are summed into one last row.
    func stats(for session: ClientSession) -> Stats {
        let only: UInt32? = session.uid == 0 ? nil : session.uid
        let oldest = fences.values.filter { only == nil || $0.uid == only }.map(\.since).min().map { ContinuousClock.now - $0 }
        let totals = books.totals(only: only)
        var stats = Stats(heaps: books.heapStats(only: only), clients: books.clientStats(only: only, config: config),
                          failures: books.failureStats(only: only),
                          connectedClients: UInt32(clamping: only.map { perUID[$0]?.connections ?? 0 } ?? sessions.count),
                          buffers: totals.buffers, bytes: totals.bytes,
                          leases: UInt32(clamping: only.map { perUID[$0]?.leases ?? 0 } ?? leases.count),
                          pendingFences: UInt32(clamping: only.map { perUID[$0]?.fences ?? 0 } ?? fences.count),
                          oldestPendingFenceMilliseconds: oldest.map { UInt64(max($0.wholeMilliseconds, 0)) } ?? 0)
        let version = session.version ?? WireLimits.baseVersion
        var bare = stats
        bare.clients = []
        stats.clients = StatsPage.fit(stats.clients, budget: StatsPage.budget(bare, version: version) / 2, size: { _ in 32 },
                                      bytes: \.bytes, merge: StatsPage.otherClients)
        guard version >= 2 else { return stats }
        let admission = CgroupAdmission(config: config, cache: books.cgroupCache)
        let rows = books.cgroupStats(only: only).map {
            CgroupStats(cgroup: Validate.cgroupField($0.cgroup), bytes: $0.bytes, buffers: $0.buffers,
                        quotaBytes: admission.rule(for: $0.cgroup)?.rule.bytes ?? 0, refusals: $0.refusals)
        }
        stats.cgroups = StatsPage.fit(rows, budget: StatsPage.budget(stats, version: version), size: { 26 + $0.cgroup.utf8.count },
                                      bytes: \.bytes, merge: StatsPage.otherCgroups)
        return stats
    }
}

/// Keeps a `stats` reply within one message (root's rows grow with uids and cgroups).
enum StatsPage {
    /// Bytes left in one message after everything already in `stats`.
    static func budget(_ stats: Stats, version: UInt16) -> Int {
        WireLimits.maximumMessageSize - WireMessage.encode(.stats(stats), requestID: 0, version: version).count
    }

    /// The rows, largest first, as many as fit `budget` (and the list bound) with room for one more row
    /// that sums the rest.
    static func fit<Row>(_ rows: [Row], budget: Int, size: (Row) -> Int, bytes: KeyPath<Row, UInt64>, merge: ([Row]) -> Row) -> [Row] {
        let total = rows.reduce(0) { $0 + size($1) }
        guard total > budget || rows.count > WireLimits.maximumListEntries else { return rows }
        let sorted = rows.sorted { $0[keyPath: bytes] > $1[keyPath: bytes] }
        let reserve = size(merge(sorted))
        var kept: [Row] = []
        var used = reserve
        for row in sorted where used + size(row) <= budget && kept.count < WireLimits.maximumListEntries - 1 {
            kept.append(row)
            used += size(row)
        }
        return kept + [merge(Array(sorted.dropFirst(kept.count)))]
    }

    /// Sums the rows left out under the cgroup name `(N more cgroups)`, which no cgroup path can be
    /// (paths start with `/`, shortened ones with `...`).
    static func otherCgroups(_ rows: [CgroupStats]) -> CgroupStats {
        CgroupStats(cgroup: "(\(rows.count) more cgroups)", bytes: rows.reduce(0) { $0 &+ $1.bytes },
                    buffers: rows.reduce(0) { $0 &+ $1.buffers }, quotaBytes: 0, refusals: rows.reduce(0) { $0 &+ $1.refusals })
    }

    /// Sums the uids left out under uid 4294967295, `(uid_t)-1`, which no process has.
    static func otherClients(_ rows: [ClientStats]) -> ClientStats {
        ClientStats(uid: .max, bytes: rows.reduce(0) { $0 &+ $1.bytes }, buffers: rows.reduce(0) { $0 &+ $1.buffers },
                    quotaBytes: 0, quotaBuffers: 0, refusals: rows.reduce(0) { $0 &+ $1.refusals })
    }
}
