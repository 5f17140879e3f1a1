import DmaBuf
import DmaBufWire
import SystemPackage

/// Admission by memory cgroup: per-cgroup quotas from the config, and the headroom of the client's cgroup
/// and every ancestor. See docs/DESIGN.md, "Accounting model".
///
/// The headroom model: on the path from the client's cgroup to the root, every cgroup with a `memory.max`
/// has `memory.max − memory.current` left. What dmabufd holds for owners in that cgroup or below whose
/// pages the kernel did *not* charge to them (heap memory on 6.12, or on 7.x charged to dmabufd; memfds
/// dmabufd made) is not in `memory.current`, so it is taken off the headroom too, and so is whatever is
/// admitted there but still being allocated (``Accounting/inFlight``). A request larger than the smallest
/// remainder is refused with EDQUOT before the kernel is asked: on a kernel that charges heap memory, an
/// allocation past `memory.max` OOM-kills the allocating process instead of failing.
struct CgroupAdmission {
    let fs: CgroupFS
    let rules: [CgroupQuotaRule]
    let headroom: Bool
    let cache: CgroupCache

    init(config: DaemonConfig, cache: CgroupCache = CgroupCache()) {
        fs = CgroupFS(root: config.cgroupRoot)
        rules = config.cgroupQuotas
        headroom = config.cgroupAdmission
        self.cache = cache
        cache.use(rules: rules, root: fs.root)
    }

    /// The first rule whose pattern matches `path`, with its index.
    func rule(for path: String) -> (index: Int, rule: CgroupQuotaRule)? {
        let index = cache.rule(for: path) { rules.firstIndex { $0.matches(path) } }
        return index.map { ($0, rules[$0]) }
    }

    /// A refusal for `total` bytes in `count` buffers asked by a client in `cgroup`, or nil.
    /// `createsMemory`: the request makes new pages (allocations, daemon udmabufs), so headroom applies;
    /// quotas apply to every charge.
    func refusal(cgroup: String, total: UInt64, count: UInt32, createsMemory: Bool, books: Accounting) -> Refusal? {
        guard let path = CgroupPath(cgroup) else { return nil }  // "": unknown (cgroup v1 only, host tests)
        if let refusal = quotaRefusal(path, total: total, count: count, books: books) { return refusal }
        guard headroom, createsMemory else { return nil }
        return headroomRefusal(path, total: total, books: books)
    }

    /// Every cgroup on the path that a rule governs must fit the request within the rule's quota.
    private func quotaRefusal(_ path: CgroupPath, total: UInt64, count: UInt32, books: Accounting) -> Refusal? {
        guard !rules.isEmpty else { return nil }
        for cgroup in path.selfAndAncestors {
            guard let (index, rule) = rule(for: cgroup.description) else { continue }
            let used = rule.together ? usage(governedBy: index, books: books) : books.subtreeUsage(cgroup).usage
            let overBytes = used.bytes > rule.bytes || total > rule.bytes - used.bytes
            let overCount = UInt64(used.buffers) + UInt64(count) > UInt64(rule.buffers)
            guard overBytes || overCount else { continue }
            let scope = rule.together ? "cgroups matching '\(rule.pattern)' together" : "cgroup \(cgroup)"
            let what = overBytes
                ? "\(bytes(used.bytes)) held + \(bytes(total)) asked > \(bytes(rule.bytes))"
                : "\(used.buffers) buffers held + \(count) asked > \(rule.buffers)"
            return Refusal(.diskQuotaExceeded, .quotaExceeded, "cgroup quota exceeded for \(scope): \(what)",
                           fix: "release buffers or raise 'cgroup_quota \(rule.pattern)' in dmabufd.conf")
        }
        return nil
    }

    /// Usage of every cgroup whose nearest governed ancestor-or-self is governed by rule `index`.
    private func usage(governedBy index: Int, books: Accounting) -> Accounting.CgroupUsage {
        var total = Accounting.CgroupUsage()
        for (key, used) in books.cgroupUsage {
            guard let path = CgroupPath(key),
                  path.selfAndAncestors.contains(where: { rule(for: $0.description)?.index == index }) else { continue }
            total.bytes &+= used.bytes
            total.buffers &+= used.buffers
        }
        return total
    }

    /// The smallest headroom on the path, less what dmabufd holds outside `memory.current` and has in flight.
    private func headroomRefusal(_ path: CgroupPath, total: UInt64, books: Accounting) -> Refusal? {
        for cgroup in path.selfAndAncestors {
            let memory = fs.memory(of: cgroup, limit: cache.limit(of: cgroup) { fs.limit(of: cgroup) })
            guard let room = memory.headroom, let max = memory.max else { continue }
            let held = books.subtreeUsage(memory.path)
            let (reserved, overflow) = held.usage.outside.addingReportingOverflow(held.inFlight)
            guard overflow || reserved > room || total > room - reserved else { continue }
            let current = memory.current.map(bytes) ?? "unknown"
            return Refusal(.diskQuotaExceeded, .quotaExceeded,
                           "\(bytes(total)) does not fit cgroup \(memory.path) (memory.max \(bytes(max)), memory.current \(current), "
                               + "dmabufd holds or is allocating \(bytes(reserved)) more for it)",
                           fix: "release buffers, ask for less, or raise memory.max of \(memory.path)")
        }
        return nil
    }

    private func bytes(_ n: UInt64) -> String { "\(ByteCount(Int(clamping: n)))" }
}

extension Broker {
    /// Cgroup quotas and headroom for `session`; counts a refusal against its cgroup and uid.
    func admitCgroup(_ session: ClientSession, total: UInt64, count: UInt32, createsMemory: Bool) throws {
        let admission = CgroupAdmission(config: config, cache: books.cgroupCache)
        guard let refusal = admission.refusal(cgroup: session.cgroup, total: total, count: count, createsMemory: createsMemory, books: books) else { return }
        books.countCgroupRefusal(session.cgroup)
        throw refusal
    }

    /// `max_daemon_memfd_bytes`: memfds dmabufd makes are charged to dmabufd's own cgroup, whoever asked,
    /// so together they are bounded. Memfds a charge helper made (in the client's cgroup, charged there)
    /// are not dmabufd's memory and do not count.
    func admitDaemonMemfd(_ total: UInt64) throws {
        let held = buffers.values.reduce(UInt64(0)) { sum, record in
            record.memfdOwnedByDaemon && books.charges[record.id]?.inCgroup != true ? sum &+ record.size : sum
        }
        guard held > config.maxDaemonMemfdBytes || total > config.maxDaemonMemfdBytes - held else { return }
        throw Refusal(.noMemory, .limit,
                      "dmabufd's own memfds hold \(ByteCount(Int(clamping: held))); \(ByteCount(Int(clamping: total))) more would pass max_daemon_memfd_bytes \(ByteCount(Int(clamping: config.maxDaemonMemfdBytes)))",
                      fix: "use a heap, send your own memfd (create_udmabuf_from_memfd), or raise max_daemon_memfd_bytes in dmabufd.conf")
    }

    /// True when a request for `heap` is served by a memfd dmabufd makes, unless an earlier heap fails.
    func firstTargetIsDaemonMemfd(_ heap: String) -> Bool {
        if case .udmabuf = resolver.chain(for: heap).first?.1 { return true }
        return false
    }
}

/// What admission reads often and what changes rarely, kept between requests: each cgroup's `memory.max`
/// (read again after ``limitLifetime``, so a changed limit counts within a second; `memory.current` is
/// always read fresh) and which quota rule governs a path (until the rules change). Bounded: emptied at
/// ``maximumEntries``.
final class CgroupCache {
    static let limitLifetime: Duration = .seconds(1)
    static let maximumEntries = 4096
    private var limits: [CgroupPath: (max: UInt64?, at: ContinuousClock.Instant)] = [:]
    private var governing: [String: Int?] = [:]
    private var rules: [CgroupQuotaRule] = []
    private var root = ""

    /// Forgets everything when the rules or the cgroup root changed (a reload).
    func use(rules: [CgroupQuotaRule], root: String) {
        guard rules != self.rules || root != self.root else { return }
        (self.rules, self.root, limits, governing) = (rules, root, [:], [:])
    }

    func limit(of path: CgroupPath, read: () -> UInt64?) -> UInt64? {
        let now = ContinuousClock.now
        if let known = limits[path], now - known.at < Self.limitLifetime { return known.max }
        if limits.count >= Self.maximumEntries { limits = [:] }
        let max = read()
        limits[path] = (max, now)
        return max
    }

    func rule(for path: String, find: () -> Int?) -> Int? {
        if let known = governing[path] { return known }
        if governing.count >= Self.maximumEntries { governing = [:] }
        let index = find()
        governing[path] = .some(index)
        return index
    }
}
