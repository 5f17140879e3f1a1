import DmaBuf
import DmaBufWire
import SystemPackage

/// Per-uid usage.
struct Usage {
    var bytes: UInt64 = 0
    var buffers: UInt32 = 0
    var refusals: UInt32 = 0
}

/// The books: who is charged for what, admission against quotas, and the counters `stats` reports.
///
/// Charging is keyed by buffer id, so it is idempotent: a buffer is charged at most once and uncharged at
/// most once, however revocation, disconnects and drain timers interleave.
struct Accounting {
    /// `inCgroup`: the owner cgroup's `memory.current` already counts these pages (the kernel charged
    /// them there: a client's own memfd, or an allocation made in the client's cgroup), or dmabufd made
    /// no memory for them (an import). Otherwise admission counts them against that cgroup's headroom.
    struct Charge { let uid: UInt32; let heap: String; let size: UInt64; let cgroup: String; var inCgroup = false }

    /// Usage per owner cgroup path (`""`: unknown), maintained with the charges.
    struct CgroupUsage: Equatable {
        var bytes: UInt64 = 0
        var buffers: UInt32 = 0
        /// Bytes whose pages are not in the owner cgroup's `memory.current`.
        var outside: UInt64 = 0
    }

    /// Most cgroups whose refusals are counted one by one; the rest go to ``otherCgroups``.
    static let maximumRefusalCgroups = 1024
    static let otherCgroups = "(other cgroups)"

    private(set) var usage: [UInt32: Usage] = [:]
    private(set) var heapUsage: [String: (bytes: UInt64, buffers: UInt32)] = [:]
    private(set) var charges: [BufferID: Charge] = [:]
    private(set) var failures: [String: UInt32] = [:]
    private(set) var failuresByUID: [UInt32: [String: UInt32]] = [:]
    private(set) var heapFailures: [String: UInt32] = [:]
    /// Refusals by the refused client's cgroup (v2 stats).
    /// Bounded: at ``maximumRefusalCgroups`` keys, the counters of cgroups that hold nothing are folded
    /// into ``otherCgroups``; while still full, new cgroups are counted there too.
    private(set) var cgroupRefusals: [String: UInt32] = [:]
    private(set) var cgroupUsage: [String: CgroupUsage] = [:]
    /// Bytes admitted whose allocation has not finished, by cgroup: not yet visible anywhere else.
    private(set) var inFlight: [String: UInt64] = [:]
    /// Limits and rule matches admission reads often (a reference: copies of the books share it).
    let cgroupCache = CgroupCache()

    /// Charges `size` bytes and one buffer to `uid` for buffer `id`. False (and nothing changes) when
    /// `id` is already charged.
    @discardableResult
    mutating func charge(_ id: BufferID, uid: UInt32, heap: String, size: UInt64, cgroup: String = "", inCgroup: Bool = false) -> Bool {
        guard charges[id] == nil else { return false }
        charges[id] = Charge(uid: uid, heap: heap, size: size, cgroup: cgroup, inCgroup: inCgroup)
        cgroupUsage[cgroup, default: CgroupUsage()].bytes &+= size
        cgroupUsage[cgroup, default: CgroupUsage()].buffers &+= 1
        if !inCgroup { cgroupUsage[cgroup, default: CgroupUsage()].outside &+= size }
        usage[uid, default: Usage()].bytes &+= size  // sums of admitted sizes: bounded by quotas far below 2^64
        usage[uid, default: Usage()].buffers &+= 1
        heapUsage[heap, default: (0, 0)].bytes &+= size
        heapUsage[heap, default: (0, 0)].buffers &+= 1
        return true
    }

    /// Undoes the charge for `id`. False when it was not charged (or already uncharged).
    @discardableResult
    mutating func uncharge(_ id: BufferID) -> Bool {
        guard let charge = charges.removeValue(forKey: id) else { return false }
        var used = usage[charge.uid] ?? Usage()
        used.bytes -= min(used.bytes, charge.size)
        used.buffers -= min(used.buffers, 1)
        usage[charge.uid] = used.bytes == 0 && used.buffers == 0 && used.refusals == 0 ? nil : used
        var heap = heapUsage[charge.heap] ?? (0, 0)
        heap.bytes -= min(heap.bytes, charge.size)
        heap.buffers -= min(heap.buffers, 1)
        heapUsage[charge.heap] = heap.buffers == 0 ? nil : heap
        var group = cgroupUsage[charge.cgroup] ?? CgroupUsage()
        group.bytes -= min(group.bytes, charge.size)
        group.buffers -= min(group.buffers, 1)
        if !charge.inCgroup { group.outside -= min(group.outside, charge.size) }
        cgroupUsage[charge.cgroup] = group.buffers == 0 ? nil : group
        return true
    }

    /// Counts one refusal against `cgroup`, within the bound on distinct cgroups.
    mutating func countCgroupRefusal(_ cgroup: String) {
        var key = cgroup
        if cgroupRefusals[key] == nil && cgroupRefusals.count >= Self.maximumRefusalCgroups {
            // Cgroups that hold nothing give up their own counter; their counts move to the shared one,
            // so the total is kept.
            var other: UInt32 = 0
            cgroupRefusals = cgroupRefusals.filter { key, count in
                let keep = cgroupUsage[key] != nil || key == Self.otherCgroups
                if !keep { other &+= count }
                return keep
            }
            if other > 0 { cgroupRefusals[Self.otherCgroups, default: 0] &+= other }
            if cgroupRefusals.count >= Self.maximumRefusalCgroups { key = Self.otherCgroups }
        }
        cgroupRefusals[key, default: 0] &+= 1
    }

    /// An asynchronous allocation admitted for `cgroup` and not finished: ``admit`` counts it against the
    /// cgroup's headroom until ``finished(_:bytes:)``.
    mutating func started(_ cgroup: String, bytes: UInt64) { inFlight[cgroup, default: 0] &+= bytes }

    mutating func finished(_ cgroup: String, bytes: UInt64) {
        let left = (inFlight[cgroup] ?? 0) - min(inFlight[cgroup] ?? 0, bytes)
        inFlight[cgroup] = left == 0 ? nil : left
    }

    /// A deferred request (allocation in a charge helper) between admission and its answer.
    struct Flight { let uid: UInt32; let cgroup: String; let bytes: UInt64; let buffers: UInt32; let createsMemory: Bool }
    /// Bytes and buffers of deferred requests by uid: ``admit`` counts them as held, so requests of one uid
    /// waiting on helpers at once cannot together pass its quota.
    private(set) var inFlightByUID: [UInt32: Usage] = [:]

    mutating func started(_ flight: Flight) {
        if flight.createsMemory { started(flight.cgroup, bytes: flight.bytes) }
        inFlightByUID[flight.uid, default: Usage()].bytes &+= flight.bytes
        inFlightByUID[flight.uid, default: Usage()].buffers &+= flight.buffers
    }

    mutating func finished(_ flight: Flight) {
        if flight.createsMemory { finished(flight.cgroup, bytes: flight.bytes) }
        var pending = inFlightByUID[flight.uid] ?? Usage()
        pending.bytes -= min(pending.bytes, flight.bytes)
        pending.buffers -= min(pending.buffers, flight.buffers)
        inFlightByUID[flight.uid] = pending.bytes == 0 && pending.buffers == 0 ? nil : pending
    }

    /// What dmabufd holds for owners in `path` and every cgroup below it.
    func subtreeUsage(_ path: CgroupPath) -> (usage: CgroupUsage, inFlight: UInt64) {
        var total = CgroupUsage()
        for (key, used) in cgroupUsage where Self.within(key, path) {
            total.bytes &+= used.bytes
            total.buffers &+= used.buffers
            total.outside &+= used.outside
        }
        let pending = inFlight.reduce(UInt64(0)) { Self.within($1.key, path) ? $0 &+ $1.value : $0 }
        return (total, pending)
    }

    /// True when the cgroup path `key` is `path` or below it.
    static func within(_ key: String, _ path: CgroupPath) -> Bool {
        guard !key.isEmpty else { return false }
        if path.isRoot { return true }
        let prefix = path.description
        return key == prefix || (key.hasPrefix(prefix) && key.utf8.dropFirst(prefix.utf8.count).first == UInt8(ascii: "/"))
    }

    mutating func countFailure(_ errno: Errno, uid: UInt32?) {
        failures[errno.name, default: 0] &+= 1
        if let uid { failuresByUID[uid, default: [:]][errno.name, default: 0] &+= 1 }
    }

    mutating func countHeapFailure(_ heap: String) { heapFailures[heap, default: 0] &+= 1 }

    /// Refuses a request for `count` buffers of `size` bytes each that would break a bound, before the
    /// kernel is asked. The product is checked: `max_buffer_size` is the config's, and nothing caps it.
    mutating func admit(uid: UInt32, cgroup: String = "", size: UInt64, count: UInt32 = 1, sessionBuffers: Int, config: DaemonConfig,
                        memAvailable: UInt64?) throws {
        let (total, overflow) = size.multipliedReportingOverflow(by: UInt64(count))
        guard !overflow else {
            throw Refusal(.overflow, .invalidArgument, "\(count) buffers of \(size) bytes overflow 64 bits", fix: "ask for less")
        }
        let quota = config.quota(for: uid)
        var used = usage[uid] ?? Usage()
        if let pending = inFlightByUID[uid] {
            used.bytes &+= pending.bytes  // both bounded by the quota admission already held them to
            used.buffers &+= pending.buffers
        }
        let overBytes = used.bytes > quota.bytes || total > quota.bytes - used.bytes
        let overCount = UInt64(used.buffers) + UInt64(count) > UInt64(quota.buffers)
        if overBytes || overCount {
            usage[uid, default: Usage()].refusals &+= 1
            countCgroupRefusal(cgroup)
            let what = overBytes
                ? "\(ByteCount(Int(clamping: used.bytes))) held + \(ByteCount(Int(clamping: total))) asked > \(ByteCount(Int(clamping: quota.bytes)))"
                : "\(used.buffers) buffers held, limit \(quota.buffers)"
            throw Refusal(.diskQuotaExceeded, .quotaExceeded, "quota exceeded for uid \(uid): \(what)",
                          fix: "release buffers or raise quota.uid.\(uid) in dmabufd.conf")
        }
        guard sessionBuffers + Int(count) <= Int(config.maxBuffersPerClient) else {
            throw Refusal(.diskQuotaExceeded, .quotaExceeded, "this connection holds \(sessionBuffers) buffers, max_buffers_per_client \(config.maxBuffersPerClient)",
                          fix: "release some")
        }
        if let available = memAvailable, total > available / 2 {
            throw Refusal(.noMemory, .limit, "\(ByteCount(Int(clamping: total))) would leave too little memory (\(ByteCount(Int(clamping: available))) available)",
                          fix: "ask for less")
        }
    }

    /// Bytes and buffers per heap, every uid's or only `uid`'s charges.
    func heapTotals(only uid: UInt32?) -> [String: (bytes: UInt64, buffers: UInt32)] {
        guard let uid else { return heapUsage }
        var totals: [String: (bytes: UInt64, buffers: UInt32)] = [:]
        for charge in charges.values where charge.uid == uid {
            totals[charge.heap, default: (0, 0)].bytes &+= charge.size
            totals[charge.heap, default: (0, 0)].buffers &+= 1
        }
        return totals
    }

    /// Per-heap usage, optionally only for `uid`'s charges.
    func heapStats(only uid: UInt32?) -> [HeapStats] {
        let totals = heapTotals(only: uid)
        let names = Set(totals.keys).union(uid == nil ? Set(heapFailures.keys) : [])
        return names.sorted().map {
            HeapStats(heap: $0, bytes: totals[$0]?.bytes ?? 0, buffers: totals[$0]?.buffers ?? 0, failures: uid == nil ? heapFailures[$0] ?? 0 : 0)
        }
    }

    func clientStats(only uid: UInt32?, config: DaemonConfig) -> [ClientStats] {
        usage.keys.filter { uid == nil || $0 == uid }.sorted().map { uid in
            let used = usage[uid]!
            let quota = config.quota(for: uid)
            return ClientStats(uid: uid, bytes: used.bytes, buffers: used.buffers, quotaBytes: quota.bytes, quotaBuffers: quota.buffers, refusals: used.refusals)
        }
    }

    func failureStats(only uid: UInt32?) -> [ErrnoCount] {
        let table = uid.map { failuresByUID[$0] ?? [:] } ?? failures
        return table.keys.sorted().map { ErrnoCount(errno: $0, count: table[$0]!) }
    }

    /// Usage per cgroup (v2 stats), optionally only of `uid`'s charges. Root's view also lists cgroups that
    /// hold nothing but were refused (bounded by ``maximumRefusalCgroups``).
    func cgroupStats(only uid: UInt32?) -> [(cgroup: String, bytes: UInt64, buffers: UInt32, refusals: UInt32)] {
        var totals: [String: (bytes: UInt64, buffers: UInt32)] = [:]
        if uid == nil {
            for (key, used) in cgroupUsage { totals[key] = (used.bytes, used.buffers) }
            for key in cgroupRefusals.keys where totals[key] == nil { totals[key] = (0, 0) }
        } else {
            for charge in charges.values where charge.uid == uid {
                totals[charge.cgroup, default: (0, 0)].bytes &+= charge.size
                totals[charge.cgroup, default: (0, 0)].buffers &+= 1
            }
        }
        return totals.keys.sorted().map { ($0, totals[$0]!.bytes, totals[$0]!.buffers, uid == nil ? cgroupRefusals[$0] ?? 0 : 0) }
    }

    /// Bytes and buffers charged to `uid` (or everyone).
    func totals(only uid: UInt32?) -> (bytes: UInt64, buffers: UInt32) {
        guard let uid else { return heapUsage.values.reduce((0, 0)) { ($0.0 &+ $1.bytes, $0.1 &+ $1.buffers) } }
        let used = usage[uid] ?? Usage()
        return (used.bytes, used.buffers)
    }

    /// True when nothing is charged: the books are back to their baseline.
    var isBalanced: Bool {
        charges.isEmpty && heapUsage.isEmpty && cgroupUsage.isEmpty && inFlight.isEmpty && inFlightByUID.isEmpty && usage.values.allSatisfy { $0.bytes == 0 && $0.buffers == 0 }
    }
}
