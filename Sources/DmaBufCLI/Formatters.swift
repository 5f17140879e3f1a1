#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DmaBuf
import DmaBufWire

// Pure formatting: every listing's text, JSON and OpenMetrics output is built here from the protocol's
// structs, so that it can be tested without a daemon. Text uses binary units (`ByteCount`); JSON keeps
// exact numbers (bytes, milliseconds) under the documented keys.

// MARK: - Units

/// `4 MiB`, `512 B`: a byte count for people.
public func human(bytes: UInt64) -> String { ByteCount(Int(clamping: bytes)).description }

/// `250 ms`, `1.5 s`, `2 min 5 s`, `1 h 3 min`: a duration for people.
public func human(milliseconds ms: UInt64) -> String {
    switch ms {
    case ..<1000: return "\(ms) ms"
    case ..<60_000:
        let tenths = (ms + 50) / 100
        return tenths % 10 == 0 ? "\(tenths / 10) s" : "\(tenths / 10).\(tenths % 10) s"
    case ..<3_600_000:
        let s = ms / 1000
        return s % 60 == 0 ? "\(s / 60) min" : "\(s / 60) min \(s % 60) s"
    default:
        let m = ms / 60_000
        return m % 60 == 0 ? "\(m / 60) h" : "\(m / 60) h \(m % 60) min"
    }
}

/// A byte count the kernel may not know: `-` for 0 (unknown).
func humanKnown(bytes: UInt64) -> String { bytes == 0 ? "-" : human(bytes: bytes) }

/// A quota for people: `-` for none (0 or the all-ones "unlimited").
func humanQuota(bytes: UInt64) -> String { bytes == 0 || bytes == .max ? "-" : human(bytes: bytes) }
func humanQuota(buffers: UInt32) -> String { buffers == 0 || buffers == .max ? "-" : "\(buffers)" }

// MARK: - JSON

/// Encodes `value` as the JSON every `--format json` prints: sorted keys, pretty-printed, `/` unescaped,
/// with a trailing newline.
public func encodeJSON<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
    return jsonSafe(String(decoding: try encoder.encode(value), as: UTF8.self)) + "\n"
}

/// `ls --format json`: `{"buffers": [BufferInfo...]}`.
public struct BufferListOutput: Codable, Sendable, Equatable {
    public var buffers: [BufferInfo]
    public init(buffers: [BufferInfo]) { self.buffers = buffers }
}

/// `ranges --format json`.
public struct LayoutOutput: Codable, Sendable, Equatable {
    public var buffer: BufferID
    public var lease: LeaseID
    /// True when dmabufctl released the lease after printing (always, unless releasing failed).
    public var leaseReleased: Bool
    public var generation: UInt32
    /// `buffer-pages`, `memfd-pages` or `physical` (runs of PFNs).
    public var kind: String
    public var pageSize: UInt32
    public var firstPage: UInt64
    public var pages: UInt64
    public var runs: [PageRun]
    /// The pages are one physically contiguous run (a CMA buffer, by construction; v2 daemons only).
    public var contiguous: Bool

    public init(_ layout: Layout, leaseReleased: Bool) {
        buffer = layout.buffer
        lease = layout.lease
        self.leaseReleased = leaseReleased
        generation = layout.generation
        kind = layout.kind.name
        pageSize = layout.pageSize
        firstPage = layout.firstPage
        pages = layout.runs.reduce(0) { $0 + $1.pages }
        runs = layout.runs
        contiguous = layout.isContiguous
    }
}

/// `fence wait|status --format json`.
public struct FenceOutput: Codable, Sendable, Equatable {
    public var buffer: BufferID
    public var firstPage: UInt64
    /// 0: to the end of the buffer.
    public var pageCount: UInt64
    /// `read` or `write`.
    public var access: String
    /// Fences the daemon merged into the sync_file; 0 means nothing to wait for.
    public var fences: UInt32
    /// Whether every fence had signalled (after the wait, for `fence wait`).
    public var signaled: Bool
    /// How long `fence wait` waited; absent for `fence status`.
    public var waitedMilliseconds: UInt64?

    public init(buffer: BufferID, firstPage: UInt64, pageCount: UInt64, access: String, fences: UInt32, signaled: Bool,
                waitedMilliseconds: UInt64?) {
        self.buffer = buffer; self.firstPage = firstPage; self.pageCount = pageCount; self.access = access
        self.fences = fences; self.signaled = signaled; self.waitedMilliseconds = waitedMilliseconds
    }
}

extension RunKind {
    /// The name used in output: `buffer-pages`, `memfd-pages`, `physical`.
    public var name: String {
        switch self {
        case .bufferPages: "buffer-pages"
        case .memfdPages: "memfd-pages"
        case .physical: "physical"
        }
    }
}

// MARK: - Text

/// `heaps`: one row per heap (with, from a v2 daemon, its size and free bytes where the kernel reports them,
/// CMA heaps mostly, and whether the kernel charges its allocations to a memory cgroup), then the policies.
public func format(heaps reply: HeapsReply) -> String {
    var table = TextTable([.init("HEAP"), .init("DEVICE"), .init("KIND"), .init("ALLOCATED", .right), .init("BUFFERS", .right),
                           .init("TOTAL", .right), .init("FREE", .right), .init("MEMCG")])
    for heap in reply.heaps {
        table.append([heap.name, heap.device, heap.kind, human(bytes: heap.allocatedBytes), "\(heap.buffers)",
                      humanKnown(bytes: heap.totalBytes), humanKnown(bytes: heap.freeBytes), heap.chargesMemcg ? "charged" : "-"])
    }
    var text = table.render()
    if reply.memAccounting { text += "dma_heap.mem_accounting=1: system heap allocations are charged to memory cgroups\n" }
    if !reply.policies.isEmpty {
        var policies = TextTable([.init("POLICY"), .init("HEAPS, IN ORDER OF PREFERENCE")])
        for policy in reply.policies { policies.append([policy.name, policy.chain.joined(separator: ", ")]) }
        text += "\n" + policies.render()
    }
    return text
}

/// The STATE column / `state` line: `revoked`, `orphaned`, `shared`, or `active`.
func state(of buffer: BufferInfo) -> String {
    var flags: [String] = []
    if buffer.revoked { flags.append("revoked") }
    if buffer.orphaned { flags.append("orphaned") }
    if !buffer.sharedWith.isEmpty { flags.append("shared") }
    return flags.isEmpty ? "active" : flags.joined(separator: ",")
}

/// `ls`: one row per buffer.
public func format(buffers: [BufferInfo]) -> String {
    var table = TextTable([
        .init("ID", .right), .init("OWNER"), .init("HEAP"), .init("SIZE", .right), .init("HOLDERS", .right),
        .init("LEASES", .right), .init("STATE"), .init("CGROUP"), .init("NAME"),
    ])
    for b in buffers {
        table.append([
            "\(b.id)", "\(b.ownerUID)/\(b.ownerPID)", b.heap, human(bytes: b.size), "\(b.externalReferences)",
            "\(b.leases)", state(of: b), b.cgroup.isEmpty ? "-" : b.cgroup, b.name,
        ])
    }
    return table.render()
}

/// `info` and `alloc`: one buffer, a field per line.
public func format(info b: BufferInfo) -> String {
    let fields: [(String, String)] = [
        ("inode", "\(b.inode)"),
        ("size", "\(human(bytes: b.size)) (\(b.size) bytes)"),
        ("heap", b.heap),
        ("tag", b.tag.isEmpty ? "-" : b.tag),
        ("name", b.name),
        ("owner", "uid \(b.ownerUID), pid \(b.ownerPID)"),
        ("cgroup", b.cgroup.isEmpty ? "-" : b.cgroup),
        ("generation", "\(b.generation)"),
        ("holders", "\(b.externalReferences)"),
        ("leases", "\(b.leases)"),
        ("shared with", b.sharedWith.isEmpty ? "-" : b.sharedWith.map { "uid \($0)" }.joined(separator: ", ")),
        ("state", state(of: b)),
    ] + (b.heap == "udmabuf" ? [("memfd", b.memfdOwnedByDaemon ? "dmabufd's own" : "the client's")] : [])
        + (b.isContiguous ? [("memory", "physically contiguous (CMA heap, by construction)")] : [])
    let width = fields.map(\.0.count).max()! + 1
    return "buffer \(b.id)\n" + fields.map { name, value in
        "  " + (name + ":").padding(to: width) + " " + printable(value) + "\n"
    }.joined()
}

/// `ranges`: a summary line and one row per run. Physical runs also show the physical address.
public func format(layout: Layout, leaseReleased: Bool) -> String {
    let pages = layout.runs.reduce(0) { $0 + $1.pages }
    let page = UInt64(layout.pageSize)
    var text = "buffer \(layout.buffer) generation \(layout.generation): \(pages) pages from page \(layout.firstPage)"
        + " in \(layout.runs.count) run\(layout.runs.count == 1 ? "" : "s") of \(layout.kind.name)"
        + " (page size \(human(bytes: page)))" + (layout.isContiguous ? ", physically contiguous" : "") + "\n"
    var columns: [TextTable.Column] = [.init("RUN", .right), .init("START", .right), .init("PAGES", .right), .init("BYTES", .right)]
    if layout.kind == .physical { columns.append(.init("ADDRESS")) }
    var table = TextTable(columns)
    for (i, run) in layout.runs.enumerated() {
        var row = ["\(i)", "\(run.start)", "\(run.pages)", human(bytes: run.pages &* page)]
        if layout.kind == .physical { row.append("0x" + String(run.start &* page, radix: 16)) }
        table.append(row)
    }
    text += table.render()
    text += "lease \(layout.lease) " + (leaseReleased ? "released" : "NOT released") + "\n"
    return text
}

/// `stats`: totals, then tables per heap, per client and per errno.
/// `memAccounting`: whether the kernel charges heap memory to memory cgroups (from `heaps`); nil leaves
/// the line out.
public func format(stats: Stats, memAccounting: Bool? = nil) -> String {
    var text = ""
    text += "buffers:         \(stats.buffers) (\(human(bytes: stats.bytes)))\n"
    text += "leases:          \(stats.leases)\n"
    text += "clients:         \(stats.connectedClients) connected\n"
    text += "pending fences:  \(stats.pendingFences)"
    if stats.pendingFences > 0 { text += ", oldest waiting \(human(milliseconds: stats.oldestPendingFenceMilliseconds))" }
    text += "\n"
    let failures = stats.failures.reduce(0) { $0 + UInt64($1.count) }
    text += "failures:        \(failures)\n"
    if let memAccounting {
        text += memAccounting
            ? "memory cgroups:  the kernel charges heap memory (dma_heap.mem_accounting=1)\n"
            : "memory cgroups:  the kernel does not charge heap memory; dmabufd counts what it holds against each cgroup\n"
    }
    if !stats.heaps.isEmpty {
        var table = TextTable([.init("HEAP"), .init("ALLOCATED", .right), .init("BUFFERS", .right), .init("FAILURES", .right)])
        for heap in stats.heaps { table.append([heap.heap, human(bytes: heap.bytes), "\(heap.buffers)", "\(heap.failures)"]) }
        text += "\n" + table.render()
    }
    if !stats.clients.isEmpty {
        var table = TextTable([
            .init("UID", .right), .init("ALLOCATED", .right), .init("BUFFERS", .right), .init("QUOTA BYTES", .right),
            .init("QUOTA BUFFERS", .right), .init("REFUSALS", .right),
        ])
        for c in stats.clients {
            table.append([
                c.uid == .max ? "others" : "\(c.uid)", human(bytes: c.bytes), "\(c.buffers)", humanQuota(bytes: c.quotaBytes), humanQuota(buffers: c.quotaBuffers),
                "\(c.refusals)",
            ])
        }
        text += "\n" + table.render()
    }
    if !stats.cgroups.isEmpty {
        var table = TextTable([
            .init("CGROUP"), .init("ALLOCATED", .right), .init("BUFFERS", .right), .init("QUOTA BYTES", .right), .init("REFUSALS", .right),
        ])
        for c in stats.cgroups {
            table.append([c.cgroup.isEmpty ? "-" : c.cgroup, human(bytes: c.bytes), "\(c.buffers)", humanQuota(bytes: c.quotaBytes), "\(c.refusals)"])
        }
        text += "\n" + table.render()
    }
    if !stats.failures.isEmpty {
        var table = TextTable([.init("ERRNO"), .init("FAILURES", .right)])
        for f in stats.failures { table.append([f.errno, "\(f.count)"]) }
        text += "\n" + table.render()
    }
    return text
}

// MARK: - OpenMetrics

/// `stats --format openmetrics`: the OpenMetrics 1.0 text exposition format (which Prometheus scrapes),
/// every metric named `dmabufd_...`, ending with `# EOF`.
///
/// Gauges: `dmabufd_buffers`, `dmabufd_allocated_bytes`, `dmabufd_leases`, `dmabufd_connected_clients`,
/// `dmabufd_pending_fences`, `dmabufd_oldest_pending_fence_seconds`, `dmabufd_heap_allocated_bytes{heap}`,
/// `dmabufd_heap_buffers{heap}`, `dmabufd_client_allocated_bytes{uid}`, `dmabufd_client_buffers{uid}`,
/// `dmabufd_client_quota_bytes{uid}` and `dmabufd_client_quota_buffers{uid}` (only where a quota is set).
/// Per owner cgroup (v2): gauges `dmabufd_cgroup_allocated_bytes{cgroup}`, `dmabufd_cgroup_buffers{cgroup}`,
/// `dmabufd_cgroup_quota_bytes{cgroup}` (only where a quota is set), counter `dmabufd_cgroup_refusals_total{cgroup}`.
/// Counters: `dmabufd_heap_allocation_failures_total{heap}`, `dmabufd_client_refusals_total{uid}`,
/// `dmabufd_failures_total{errno}`. Label values are escaped for OpenMetrics after ``printable(_:)``.
/// With `memAccounting` (from `heaps`), also the gauge `dmabufd_kernel_charges_heap_memcg` (1: the kernel
/// charges heap memory to memory cgroups). The daemon's summed rows keep their labels: `uid="4294967295"`,
/// `cgroup="(N more cgroups)"`.
public func openMetrics(stats: Stats, memAccounting: Bool? = nil) -> String {
    var out = ""
    func family(_ name: String, _ type: String, _ help: String, unit: String? = nil, _ samples: [(labels: String, value: String)]) {
        out += "# TYPE \(name) \(type)\n"
        if let unit { out += "# UNIT \(name) \(unit)\n" }
        out += "# HELP \(name) \(escapeHelp(help))\n"
        let sampleName = type == "counter" ? name + "_total" : name
        for sample in samples { out += "\(sampleName)\(sample.labels) \(sample.value)\n" }
    }
    func one(_ value: some BinaryInteger) -> [(labels: String, value: String)] { [("", "\(value)")] }
    func heap(_ h: HeapStats) -> String { "{heap=\"\(escapeLabel(h.heap))\"}" }
    func uid(_ c: ClientStats) -> String { "{uid=\"\(c.uid)\"}" }
    func cgroup(_ c: CgroupStats) -> String { "{cgroup=\"\(escapeLabel(c.cgroup))\"}" }

    family("dmabufd_buffers", "gauge", "Buffers the daemon accounts for.", one(stats.buffers))
    family("dmabufd_allocated_bytes", "gauge", "Bytes in the buffers the daemon accounts for.", unit: "bytes", one(stats.bytes))
    family("dmabufd_leases", "gauge", "Layout leases outstanding.", one(stats.leases))
    family("dmabufd_connected_clients", "gauge", "Clients connected to the daemon.", one(stats.connectedClients))
    family("dmabufd_pending_fences", "gauge", "Fences attached to buffers that have not signalled.", one(stats.pendingFences))
    family("dmabufd_oldest_pending_fence_seconds", "gauge", "How long the oldest unsignalled fence has waited; 0 when none.",
           unit: "seconds", [("", seconds(milliseconds: stats.oldestPendingFenceMilliseconds))])
    if let memAccounting {
        family("dmabufd_kernel_charges_heap_memcg", "gauge", "1 when the kernel charges heap allocations to memory cgroups (dma_heap.mem_accounting=1).",
               one(memAccounting ? 1 : 0))
    }
    family("dmabufd_heap_allocated_bytes", "gauge", "Bytes allocated from each heap through the daemon.", unit: "bytes",
           stats.heaps.map { (heap($0), "\($0.bytes)") })
    family("dmabufd_heap_buffers", "gauge", "Buffers allocated from each heap through the daemon.",
           stats.heaps.map { (heap($0), "\($0.buffers)") })
    family("dmabufd_heap_allocation_failures", "counter", "Allocations each heap failed.",
           stats.heaps.map { (heap($0), "\($0.failures)") })
    /// The families of one usage table (per uid, per cgroup): bytes, buffers, byte quota where set, refusals.
    func usage(_ prefix: String, _ whose: String, _ rows: [(labels: String, bytes: UInt64, buffers: UInt32, quota: UInt64, refusals: UInt32)]) {
        family("dmabufd_\(prefix)_allocated_bytes", "gauge", "Bytes held by \(whose).", unit: "bytes", rows.map { ($0.labels, "\($0.bytes)") })
        family("dmabufd_\(prefix)_buffers", "gauge", "Buffers held by \(whose).", rows.map { ($0.labels, "\($0.buffers)") })
        family("dmabufd_\(prefix)_quota_bytes", "gauge", "The byte quota of \(whose), where one is set.", unit: "bytes",
               rows.filter { $0.quota != 0 && $0.quota != .max }.map { ($0.labels, "\($0.quota)") })
        family("dmabufd_\(prefix)_refusals", "counter", "Requests refused for \(whose) (quota, permission).",
               rows.map { ($0.labels, "\($0.refusals)") })
    }
    usage("client", "each client uid", stats.clients.map { (uid($0), $0.bytes, $0.buffers, $0.quotaBytes, $0.refusals) })
    family("dmabufd_client_quota_buffers", "gauge", "Each client uid's buffer quota, where one is set.",
           stats.clients.filter { $0.quotaBuffers != 0 && $0.quotaBuffers != .max }.map { (uid($0), "\($0.quotaBuffers)") })
    usage("cgroup", "owners in each cgroup", stats.cgroups.map { (cgroup($0), $0.bytes, $0.buffers, $0.quotaBytes, $0.refusals) })
    family("dmabufd_failures", "counter", "Failed requests by errno.",
           stats.failures.map { ("{errno=\"\(escapeLabel($0.errno))\"}", "\($0.count)") })
    out += "# EOF\n"
    return out
}

/// Milliseconds as decimal seconds without a float's rounding noise: `1500` → `1.5`, `0` → `0`.
func seconds(milliseconds ms: UInt64) -> String {
    let whole = ms / 1000, fraction = ms % 1000
    if fraction == 0 { return "\(whole)" }
    var digits = String(fraction)
    digits = String(repeating: "0", count: 3 - digits.count) + digits
    while digits.hasSuffix("0") { digits.removeLast() }
    return "\(whole).\(digits)"
}

/// OpenMetrics label values escape `\`, `"` and newlines; any other unprintable scalar is written as the
/// visible escape ``printable(_:)`` uses, its backslash escaped as OpenMetrics requires (`\\x1b`).
func escapeLabel(_ value: String) -> String {
    var out = ""
    for scalar in value.unicodeScalars {
        switch scalar {
        case "\\": out += "\\\\"
        case "\"": out += "\\\""
        case "\n": out += "\\n"
        default:
            if isPrintable(scalar) { out.unicodeScalars.append(scalar) } else { out += "\\" + escaped(scalar) }
        }
    }
    return out
}

/// HELP text escapes `\` and newlines (and, in OpenMetrics, `"`).
func escapeHelp(_ value: String) -> String { escapeLabel(value) }

extension String {
    /// Pads with spaces on the right to `width` characters (never truncates).
    func padding(to width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }
}
