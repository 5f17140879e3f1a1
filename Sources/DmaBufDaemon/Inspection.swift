import DmaBuf
import DmaBufWire
import SystemPackage

extension Broker {
    // MARK: - Inspection family: list_heaps, list, info, stats

    /// v2 adds each heap's total and free bytes (0: unknown) and whether the kernel charges its pages to
    /// a memory cgroup; encoding for a v1 session leaves them out.
    func listHeaps() -> HeapsReply {
        // With hotplug monitoring the heap set is current; without it, a listing is when to look again.
        if udev == nil { rescanHeapsIfDue() }
        let memAccounting = kernel.memAccounting()
        let heaps = resolver.heaps.map { heap -> HeapInfo in
            var info = heap
            let used = books.heapUsage[heap.name] ?? (0, 0)
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
        let records = buffers.values.filter {
            $0.id > after
                && (all || $0.ownerSession == session.id || session.fetched.contains($0.id) || ($0.ownerUID == uid && $0.ownerSession == nil))
        }
        // As many as fit one message; the client asks again after the last id while `more` is set.
        var budget = WireLimits.maximumMessageSize - WireLimits.headerSize - 4 - 1
        var page: [BufferInfo] = []
        var more = false
        for record in records.sorted(by: { $0.id < $1.id }) {
            let item = info(record, for: session, references: true)
            let size = WireMessage.encodedSize(of: item, version: session.version ?? WireLimits.baseVersion)
            guard size <= budget, page.count < WireLimits.maximumListEntries else {
                more = true
                break
            }
            budget -= size
            page.append(item)
        }
        return (.list(page, more: more), [])
    }

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
                   cgroup: Validate.cgroupField(record.ownerCgroup), memfdOwnedByDaemon: record.memfdOwnedByDaemon)
    }

    /// References to the buffer's file outside the daemon: fdinfo's first `count` less the daemon's own
    /// and systemd's stored copy. nil when fdinfo cannot be trusted (the caller keeps the charge).
    func externalReferences(_ record: BufferRecord) -> Int? {
        guard let count = kernel.referenceCount(record.fd) else { return nil }
        return max(count - 1 - (record.stored ? 1 : 0), 0)
    }

    /// Root sees everything; anyone else sees only its own uid's usage, failures and heap totals.
    func stats(for session: ClientSession) -> Stats {
        let only: UInt32? = session.uid == 0 ? nil : session.uid
        let oldest = fences.values.filter { only == nil || $0.uid == only }.map(\.since).min().map { ContinuousClock.now - $0 }
        let totals = books.totals(only: only)
        return Stats(heaps: books.heapStats(only: only), clients: books.clientStats(only: only, config: config),
                     failures: books.failureStats(only: only),
                     connectedClients: UInt32(clamping: only.map { perUID[$0]?.connections ?? 0 } ?? sessions.count),
                     buffers: totals.buffers, bytes: totals.bytes,
                     leases: UInt32(clamping: only.map { perUID[$0]?.leases ?? 0 } ?? leases.count),
                     pendingFences: UInt32(clamping: only.map { perUID[$0]?.fences ?? 0 } ?? fences.count),
                     oldestPendingFenceMilliseconds: oldest.map { UInt64(max($0.wholeMilliseconds, 0)) } ?? 0,
                     cgroups: books.cgroupStats(only: only).map {
                         CgroupStats(cgroup: Validate.cgroupField($0.cgroup), bytes: $0.bytes, buffers: $0.buffers, quotaBytes: 0, refusals: $0.refusals)
                     })
    }
}
