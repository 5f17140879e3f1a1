import DmaBuf
import DmaBufTypes
import DmaBufWire

#if canImport(Glibc)
import Glibc
#endif

/// dmabufd's configuration: `key = value` lines, `#` comments. Every key, its default and its meaning are
/// listed in `docs/DESIGN.md` and in `systemd/dmabufd.conf`. Unknown keys and bad values are errors that
/// name the line, so a typo never silently falls back to a default.
public struct DaemonConfig: Sendable, Equatable {
    /// `socket`: where to listen when systemd hands over no socket.
    public var socketPath = "/run/dmabufd/dmabufd.sock"
    /// `socket_mode`: permission bits of the socket file (octal).
    public var socketMode: UInt32 = 0o660
    /// `max_buffer_size`: the largest single request, in bytes. Heaps do not fail large allocations
    /// with ENOMEM (the OOM killer fires first), so every request is bounded.
    public var maxBufferSize: UInt64 = 1 << 30
    /// `max_buffers_per_client`: buffers one connection may hold, whatever its uid's quota.
    public var maxBuffersPerClient: UInt32 = 4096
    /// `quota.default.bytes` / `.buffers`: per-uid limits for uids without their own entry.
    public var defaultQuota = Quota(bytes: 1 << 30, buffers: 1024)
    /// `quota.uid.<UID>.bytes` / `.buffers`.
    public var quotas: [UInt32: Quota] = [:]
    /// `policy.<name> = heap, heap, ...`: fallback chains. `any` always exists.
    public var policies: [String: [String]] = ["any": ["system", "cma", "udmabuf"]]
    /// `physical_addresses = root | uid, uid, ...`: who may see PFNs. Root always may.
    public var physicalAddressUIDs: Set<UInt32> = [0]
    /// `revoke_deadline`: how long holders get to release a revoked lease.
    public var revokeDeadline: Duration = .seconds(5)
    /// `heap_directory`: where dma-heaps live (for tests).
    public var heapDirectory = DmaHeap.defaultDirectory
    /// `udmabuf_device`.
    public var udmabufDevice = UDmabuf.defaultDevicePath
    /// `fd_store = yes|no`: keep buffers in systemd's fd store across restarts (needs NOTIFY_SOCKET).
    public var fdStore = true
    /// `state_directory`: where buffer metadata for the fd store is written (the runtime dir).
    public var stateDirectory = "/run/dmabufd/state"
    /// `log_level`: trace, debug, info, notice, warning, error, critical.
    public var logLevel = "info"

    // Bounds on what clients can make the daemon hold. Every one refuses with an error naming the key.
    /// `max_connections`: connections in total; more are answered with EMFILE and closed.
    public var maxConnections: UInt32 = 1024
    /// `max_connections_per_uid`.
    public var maxConnectionsPerUID: UInt32 = 64
    /// `hello_timeout`: a connection that has not sent hello by then is closed.
    public var helloTimeout: Duration = .seconds(5)
    /// `max_outbox_bytes` / `max_outbox_fds`: unread replies queued per connection before the daemon stops
    /// reading that client (backpressure); past four times either, the client is dropped.
    public var maxOutboxBytes: UInt32 = 256 << 10
    public var maxOutboxFDs: UInt32 = 256
    /// `max_leases_per_client` / `max_leases_per_uid`: open leases.
    public var maxLeasesPerClient: UInt32 = 1024
    public var maxLeasesPerUID: UInt32 = 4096
    /// `max_tokens_per_client` / `max_tokens_per_uid`: unused one-time tokens.
    public var maxTokensPerClient: UInt32 = 256
    public var maxTokensPerUID: UInt32 = 1024
    /// `max_fences_per_client` / `max_fences_per_uid`: pending fences (attached or on a lease release).
    public var maxFencesPerClient: UInt32 = 1024
    public var maxFencesPerUID: UInt32 = 4096
    /// `max_shares_per_buffer` / `max_shares_per_uid`: uids a buffer is shared with, and the sum over a
    /// uid's buffers.
    public var maxSharesPerBuffer: UInt32 = 64
    public var maxSharesPerUID: UInt32 = 4096
    /// `fd_store_max`: buffers kept in systemd's fd store; must not exceed the unit's
    /// `FileDescriptorStoreMax=`. Allocations beyond it are refused (EMFILE) rather than silently not stored.
    public var fdStoreMax: UInt32 = 16384
    /// `max_closing_fds_per_uid`: fds of kinds dmabufd cannot close without blocking (anything but a
    /// dma-buf, sync_file or memfd) that one uid sent and a closer thread has not closed yet. At the
    /// bound that uid's connections are not read until its closes finish.
    public var maxClosingFDsPerUID: UInt32 = 256
    /// `max_merge_fences`: conflicting fences `begin_access` merges into one sync_file per request;
    /// more are refused with EBUSY.
    public var maxMergeFences: UInt32 = 64

    // Memory cgroups (docs/DESIGN.md, "Accounting model").
    /// `max_daemon_memfd_bytes`: bytes in all memfds dmabufd itself creates for udmabufs, together. Those
    /// pages are charged to dmabufd's own cgroup, whatever the client's, so they are bounded below the
    /// unit's `MemoryMax=` (4G) less the daemon's own budget. Refused with ENOMEM beyond it.
    public var maxDaemonMemfdBytes: UInt64 = 2 << 30
    /// `cgroup_admission = yes|no`: refuse requests that do not fit the client's cgroup's memory headroom
    /// (every ancestor's `memory.max − memory.current`). `no` leaves only the uid quotas and MemAvailable.
    public var cgroupAdmission = true
    /// `cgroup_root`: where the cgroup v2 file system is mounted (host tests use a tree of their own).
    public var cgroupRoot = "/sys/fs/cgroup"
    /// `cgroup_quota PATTERN = BYTES [BUFFERS] [each|together]`, in file order: the first matching rule
    /// applies.
    public var cgroupQuotas: [CgroupQuotaRule] = []

    // Charging the client's cgroup (docs/DESIGN.md, "Charging the client's cgroup").
    /// `charge_client = required | best-effort | off`: allocate in a helper in the client's cgroup.
    public var chargeClient = ChargeMode.bestEffort
    /// `charge_helpers_max`: helpers (one per client cgroup with connected clients) alive at once.
    public var chargeHelpersMax: UInt32 = 256
    /// `charge_timeout`: how long one allocation may take in a helper before it is refused and the helper killed.
    public var chargeTimeout: Duration = .seconds(2)
    /// `charge_helper`: the helper executable; empty means `dmabufd-charge` beside the running executable.
    public var chargeHelper = ""

    /// What to do when a client's allocation cannot run in its own cgroup.
    public enum ChargeMode: String, Sendable, Equatable {
        /// Refuse the allocation.
        case required
        /// Allocate in the daemon instead (charged to the daemon's cgroup), logged and counted.
        case bestEffort = "best-effort"
        /// Always allocate in the daemon: no helpers.
        case off
    }

    /// `pool = <heap> <size> <count>` (repeatable) and `pool_max_bytes`: warm pools (`Pools.swift`).
    public var pools: [PoolSpec] = []
    public var poolMaxBytes: UInt64 = 256 << 20

    public struct Quota: Sendable, Equatable {
        public var bytes: UInt64
        public var buffers: UInt32
        public init(bytes: UInt64, buffers: UInt32) { self.bytes = bytes; self.buffers = buffers }
    }

    public init() {}

    /// The quota that applies to `uid`.
    public func quota(for uid: UInt32) -> Quota { quotas[uid] ?? defaultQuota }

    /// A configuration error, naming the file and line.
    public struct ParseError: Error, Equatable, CustomStringConvertible {
        public var line: Int
        public var message: String
        public var description: String { "line \(line): \(message)" }
    }

    /// Parses configuration text over the defaults.
    /// - Throws: ``ParseError`` for the first bad line.
    public init(parsing text: String) throws {
        self.init()
        var lineNumber = 0
        // Split on every line break: "\r\n" is one Character in Swift, so splitting on "\n" alone would
        // read a file with CRLF endings as a single line.
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline) {
            lineNumber += 1
            let line = rawLine.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            let trimmed = line.trimmingSpaces()
            if trimmed.isEmpty { continue }
            guard let eq = trimmed.firstIndex(of: "=") else {
                throw ParseError(line: lineNumber, message: "expected 'key = value', got '\(trimmed)'")
            }
            let key = trimmed[..<eq].trimmingSpaces()
            let value = trimmed[trimmed.index(after: eq)...].trimmingSpaces()
            do {
                try apply(key: key, value: value)
            } catch let message as ConfigValueError {
                throw ParseError(line: lineNumber, message: "\(key): \(message.text)")
            }
        }
    }

    struct ConfigValueError: Error { var text: String }

    /// A value's text and the ways to read it; each failure says what was expected.
    struct Value {
        let text: String
        func size() throws -> UInt64 {
            guard let n = ByteCount.parse(text) else { throw ConfigValueError(text: "'\(text)' is not a size (like 4096, 64K, 512M, 1G)") }
            return UInt64(n)
        }
        func count() throws -> UInt32 {
            guard let n = UInt32(text) else { throw ConfigValueError(text: "'\(text)' is not a count") }
            return n
        }
        func positiveCount() throws -> UInt32 {
            let n = try count()
            guard n > 0 else { throw ConfigValueError(text: "'\(text)' must be positive") }
            return n
        }
        func list() -> [String] { text.split(separator: ",").map { $0.trimmingSpaces() }.filter { !$0.isEmpty } }
        func bool() throws -> Bool {
            guard let b = parseBool(text) else { throw ConfigValueError(text: "'\(text)' is not yes/no") }
            return b
        }
        func absolutePath() throws -> String {
            guard text.hasPrefix("/") else { throw ConfigValueError(text: "'\(text)' must be an absolute path") }
            return text
        }
    }

    private mutating func apply(key: String, value: String) throws {
        let v = Value(text: value)
        // A cgroup quota's key holds a path pattern, whose dots are not key separators.
        if key == "cgroup_quota" || key.hasPrefix("cgroup_quota ") || key.hasPrefix("cgroup_quota\t") {
            return try addCgroupQuota(pattern: key.dropFirst("cgroup_quota".count).trimmingSpaces(), v)
        }
        let parts = key.split(separator: ".").map(String.init)
        if parts.count == 1, try applyService(key, v) { return }
        if parts.count == 1, try applyMemory(key, v) { return }
        if parts.first == "quota" || parts.first == "policy" { return try applyQuotaOrPolicy(parts, v) }
        try applyBound(key: key, v)
    }

    /// Where the daemon listens and keeps its state, devices, logging.
    private mutating func applyService(_ key: String, _ v: Value) throws -> Bool {
        switch key {
        case "socket":
            guard v.text.utf8.count < 108 else { throw ConfigValueError(text: "path longer than 107 bytes (sun_path)") }
            socketPath = try v.absolutePath()
        case "socket_mode":
            guard let mode = UInt32(v.text, radix: 8), mode <= 0o777 else { throw ConfigValueError(text: "'\(v.text)' is not an octal mode like 0660") }
            socketMode = mode
        case "physical_addresses":
            var uids: Set<UInt32> = [0]
            for item in v.list() where item != "root" {
                guard let uid = UInt32(item) else { throw ConfigValueError(text: "'\(item)' is neither 'root' nor a uid") }
                uids.insert(uid)
            }
            physicalAddressUIDs = uids
        case "revoke_deadline":
            guard let d = parseDuration(v.text) else { throw ConfigValueError(text: "'\(v.text)' is not a duration (like 500ms, 5s, 1m)") }
            revokeDeadline = d
        case "heap_directory": heapDirectory = v.text
        case "udmabuf_device": udmabufDevice = v.text
        case "fd_store": fdStore = try v.bool()
        case "state_directory": stateDirectory = v.text
        case "log_level":
            let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
            guard levels.contains(v.text) else { throw ConfigValueError(text: "'\(v.text)' is not one of \(levels.joined(separator: ", "))") }
            logLevel = v.text
        default: return false
        }
        return true
    }

    /// Sizes of requests, memory the daemon itself creates, and cgroup admission.
    private mutating func applyMemory(_ key: String, _ v: Value) throws -> Bool {
        switch key {
        case "max_buffer_size":
            let bytes = try v.size()
            guard bytes > 0 else { throw ConfigValueError(text: "'\(v.text)' must be positive") }
            maxBufferSize = bytes
        case "max_buffers_per_client": maxBuffersPerClient = try v.count()
        case "max_daemon_memfd_bytes": maxDaemonMemfdBytes = try v.size()
        case "cgroup_admission": cgroupAdmission = try v.bool()
        case "cgroup_root": cgroupRoot = try v.absolutePath()
        case "charge_client":
            guard let mode = ChargeMode(rawValue: v.text) else { throw ConfigValueError(text: "'\(v.text)' is not required, best-effort or off") }
            chargeClient = mode
        case "charge_timeout":
            guard let d = parseDuration(v.text), d > .zero else { throw ConfigValueError(text: "'\(v.text)' is not a positive duration (like 500ms, 5s)") }
            chargeTimeout = d
        case "charge_helper": chargeHelper = try v.absolutePath()
        default: return false
        }
        return true
    }

    private mutating func applyQuotaOrPolicy(_ parts: [String], _ v: Value) throws {
        switch parts[0] {
        case "quota" where parts.count == 3 && parts[1] == "default":
            try setQuota(&defaultQuota, field: parts[2], v)
        case "quota" where parts.count == 4 && parts[1] == "uid":
            guard let uid = UInt32(parts[2]) else { throw ConfigValueError(text: "'\(parts[2])' is not a uid") }
            var quota = quotas[uid] ?? defaultQuota
            try setQuota(&quota, field: parts[3], v)
            quotas[uid] = quota
        case "policy" where parts.count == 2:
            let chain = v.list()
            guard !chain.isEmpty else { throw ConfigValueError(text: "a policy needs at least one heap") }
            policies[parts[1]] = chain
        default:
            throw ConfigValueError(text: "unknown key")
        }
    }

    /// `cgroup_quota PATTERN = BYTES [BUFFERS] [each|together]`.
    private mutating func addCgroupQuota(pattern: String, _ v: Value) throws {
        guard cgroupQuotas.count < CgroupQuotaRule.maximumRules else {
            throw ConfigValueError(text: "more than \(CgroupQuotaRule.maximumRules) cgroup_quota lines")
        }
        if let problem = CgroupQuotaRule.problem(with: pattern) { throw ConfigValueError(text: problem) }
        let words = v.text.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        guard (1...3).contains(words.count) else { throw ConfigValueError(text: "expected 'BYTES [BUFFERS] [each|together]', got '\(v.text)'") }
        var rule = CgroupQuotaRule(pattern: pattern, bytes: try Value(text: words[0]).size())
        for word in words.dropFirst() {
            switch word {
            case "each": rule.together = false
            case "together": rule.together = true
            default: rule.buffers = try Value(text: word).count()
            }
        }
        cgroupQuotas.append(rule)
    }

    /// The bounds on what clients can make the daemon hold, and the warm pools (which the daemon holds).
    private mutating func applyBound(key: String, _ v: Value) throws {
        switch key {
        case "hello_timeout":
            guard let d = parseDuration(v.text), d > .zero else { throw ConfigValueError(text: "'\(v.text)' is not a positive duration (like 500ms, 5s)") }
            helloTimeout = d
        case "max_outbox_bytes":
            let bytes = try v.size()
            guard bytes > 0, bytes <= UInt64(UInt32.max) else { throw ConfigValueError(text: "'\(v.text)' must be between 1 and 4G") }
            maxOutboxBytes = UInt32(bytes)
        case "pool":
            guard let spec = PoolSpec.parse(v.text) else { throw ConfigValueError(text: "'\(v.text)' is not '<heap> <size> <count>' (like 'system 16M 4')") }
            pools.append(spec)
        case "pool_max_bytes":
            poolMaxBytes = try v.size()
        case "max_shares_per_buffer":
            // Every buffer_info lists the uids its buffer is shared with, and a decoder takes at most
            // 4,000 entries in a list: a larger bound would make list and info replies undecodable.
            let n = try v.positiveCount()
            guard n <= WireLimits.maximumListEntries else {
                throw ConfigValueError(text: "'\(v.text)' must be at most \(WireLimits.maximumListEntries) (a buffer's info lists every uid)")
            }
            maxSharesPerBuffer = n
        case let name where Self.boundKeys[name] != nil:
            self[keyPath: Self.boundKeys[name]!] = try v.positiveCount()
        default:
            throw ConfigValueError(text: "unknown key")
        }
    }

    /// Count-valued bounds by key.
    static var boundKeys: [String: WritableKeyPath<DaemonConfig, UInt32>] { [
        "max_connections": \.maxConnections, "max_connections_per_uid": \.maxConnectionsPerUID,
        "max_outbox_fds": \.maxOutboxFDs,
        "max_leases_per_client": \.maxLeasesPerClient, "max_leases_per_uid": \.maxLeasesPerUID,
        "max_tokens_per_client": \.maxTokensPerClient, "max_tokens_per_uid": \.maxTokensPerUID,
        "max_fences_per_client": \.maxFencesPerClient, "max_fences_per_uid": \.maxFencesPerUID,
        "max_shares_per_buffer": \.maxSharesPerBuffer, "max_shares_per_uid": \.maxSharesPerUID,
        "fd_store_max": \.fdStoreMax, "charge_helpers_max": \.chargeHelpersMax,
        "max_closing_fds_per_uid": \.maxClosingFDsPerUID, "max_merge_fences": \.maxMergeFences,
    ] }

    private func setQuota(_ quota: inout Quota, field: String, _ v: Value) throws {
        switch field {
        case "bytes": quota.bytes = try v.size()
        case "buffers": quota.buffers = try v.count()
        default: throw ConfigValueError(text: "quota field must be 'bytes' or 'buffers'")
        }
    }
}

/// The one duration grammar (``DurationText/parse(_:)``): `500ms`, `5s`, `2m`, `1h`, or bare seconds.
public func parseDuration(_ text: String) -> Duration? { DurationText.parse(text) }

func parseBool(_ text: String) -> Bool? {
    switch text.lowercased() {
    case "yes", "true", "on", "1": true
    case "no", "false", "off", "0": false
    default: nil
    }
}

extension StringProtocol {
    /// The one trimming helper (``trimmingWhitespace()``), under the name the config parser uses.
    func trimmingSpaces() -> String { trimmingWhitespace() }
}

/// A per-cgroup quota: `cgroup_quota PATTERN = BYTES [BUFFERS] [each|together]`.
///
/// `PATTERN` is matched against a cgroup's path without its leading `/` (`user.slice/user-1000.slice/...`)
/// with fnmatch(3) and `FNM_PATHNAME`: `*`, `?` and `[...]` never match a `/`. The first rule in the file
/// that matches a cgroup governs it. A governed cgroup's quota covers what dmabufd holds for owners in it
/// and every cgroup below it. `each` (the default): every matching cgroup has the whole quota to itself.
/// `together`: all cgroups the rule governs share one quota. A uid's own quota still caps its total.
public struct CgroupQuotaRule: Sendable, Equatable {
    public static let maximumRules = 256
    public static let maximumPatternLength = 512

    public var pattern: String
    public var bytes: UInt64
    /// `UInt32.max`: no buffer limit.
    public var buffers: UInt32 = .max
    public var together = false

    public init(pattern: String, bytes: UInt64, buffers: UInt32 = .max, together: Bool = false) {
        self.pattern = pattern.hasPrefix("/") ? String(pattern.dropFirst()) : pattern
        self.bytes = bytes; self.buffers = buffers; self.together = together
    }

    /// Why a pattern is refused at load; nil when acceptable.
    static func problem(with pattern: String) -> String? {
        if pattern.isEmpty { return "cgroup_quota needs a cgroup path pattern: 'cgroup_quota PATTERN = BYTES [BUFFERS]'" }
        if pattern.utf8.count > maximumPatternLength { return "pattern longer than \(maximumPatternLength) bytes" }
        if pattern.utf8.contains(where: { $0 < 0x20 || $0 == 0x7F || $0 == UInt8(ascii: " ") }) { return "pattern holds a space or control character" }
        let body = pattern.hasPrefix("/") ? pattern.dropFirst() : Substring(pattern)
        if body.split(separator: "/", omittingEmptySubsequences: false).contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) {
            return "pattern has an empty, '.' or '..' component"
        }
        return nil
    }

    /// True when the rule's pattern matches `path` (the whole path, component by component).
    public func matches(_ path: String) -> Bool {
        let subject = path.hasPrefix("/") ? String(path.dropFirst()) : path
        return fnmatch(pattern, subject, FNM_PATHNAME) == 0
    }
}
