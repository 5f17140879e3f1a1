import DmaBuf
import DmaBufTypes

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

    private mutating func apply(key: String, value: String) throws {
        func size() throws -> UInt64 {
            guard let n = ByteCount.parse(value) else { throw ConfigValueError(text: "'\(value)' is not a size (like 4096, 64K, 512M, 1G)") }
            return UInt64(n)
        }
        func count() throws -> UInt32 {
            guard let n = UInt32(value) else { throw ConfigValueError(text: "'\(value)' is not a count") }
            return n
        }
        func list() -> [String] { value.split(separator: ",").map { $0.trimmingSpaces() }.filter { !$0.isEmpty } }
        let parts = key.split(separator: ".").map(String.init)
        switch parts.first {
        case "socket" where parts.count == 1:
            guard value.hasPrefix("/") else { throw ConfigValueError(text: "'\(value)' must be an absolute path") }
            guard value.utf8.count < 108 else { throw ConfigValueError(text: "path longer than 107 bytes (sun_path)") }
            socketPath = value
        case "socket_mode" where parts.count == 1:
            guard let mode = UInt32(value, radix: 8), mode <= 0o777 else { throw ConfigValueError(text: "'\(value)' is not an octal mode like 0660") }
            socketMode = mode
        case "max_buffer_size" where parts.count == 1:
            let bytes = try size()
            guard bytes > 0 else { throw ConfigValueError(text: "'\(value)' must be positive") }
            maxBufferSize = bytes
        case "max_buffers_per_client" where parts.count == 1:
            maxBuffersPerClient = try count()
        case "quota" where parts.count == 3 && parts[1] == "default":
            try setQuota(&defaultQuota, field: parts[2], size: size, count: count)
        case "quota" where parts.count == 4 && parts[1] == "uid":
            guard let uid = UInt32(parts[2]) else { throw ConfigValueError(text: "'\(parts[2])' is not a uid") }
            var quota = quotas[uid] ?? defaultQuota
            try setQuota(&quota, field: parts[3], size: size, count: count)
            quotas[uid] = quota
        case "policy" where parts.count == 2:
            let chain = list()
            guard !chain.isEmpty else { throw ConfigValueError(text: "a policy needs at least one heap") }
            policies[parts[1]] = chain
        case "physical_addresses" where parts.count == 1:
            var uids: Set<UInt32> = [0]
            for item in list() where item != "root" {
                guard let uid = UInt32(item) else { throw ConfigValueError(text: "'\(item)' is neither 'root' nor a uid") }
                uids.insert(uid)
            }
            physicalAddressUIDs = uids
        case "revoke_deadline" where parts.count == 1:
            guard let d = parseDuration(value) else { throw ConfigValueError(text: "'\(value)' is not a duration (like 500ms, 5s, 1m)") }
            revokeDeadline = d
        case "heap_directory" where parts.count == 1:
            heapDirectory = value
        case "udmabuf_device" where parts.count == 1:
            udmabufDevice = value
        case "fd_store" where parts.count == 1:
            guard let b = parseBool(value) else { throw ConfigValueError(text: "'\(value)' is not yes/no") }
            fdStore = b
        case "state_directory" where parts.count == 1:
            stateDirectory = value
        case "log_level" where parts.count == 1:
            let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
            guard levels.contains(value) else { throw ConfigValueError(text: "'\(value)' is not one of \(levels.joined(separator: ", "))") }
            logLevel = value
        default:
            try applyBound(key: key, value: value, size: size, count: count)
        }
    }

    /// The bounds on what clients can make the daemon hold, and the warm pools (which the daemon holds).
    private mutating func applyBound(key: String, value: String, size: () throws -> UInt64, count: () throws -> UInt32) throws {
        switch key {
        case "hello_timeout":
            guard let d = parseDuration(value), d > .zero else { throw ConfigValueError(text: "'\(value)' is not a positive duration (like 500ms, 5s)") }
            helloTimeout = d
        case "max_outbox_bytes":
            let bytes = try size()
            guard bytes > 0, bytes <= UInt64(UInt32.max) else { throw ConfigValueError(text: "'\(value)' must be between 1 and 4G") }
            maxOutboxBytes = UInt32(bytes)
        case "pool":
            guard let spec = PoolSpec.parse(value) else { throw ConfigValueError(text: "'\(value)' is not '<heap> <size> <count>' (like 'system 16M 4')") }
            pools.append(spec)
        case "pool_max_bytes":
            poolMaxBytes = try size()
        case let name where Self.boundKeys[name] != nil:
            let n = try count()
            guard n > 0 else { throw ConfigValueError(text: "'\(value)' must be positive") }
            self[keyPath: Self.boundKeys[name]!] = n
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
        "fd_store_max": \.fdStoreMax,
    ] }

    private func setQuota(_ quota: inout Quota, field: String, size: () throws -> UInt64, count: () throws -> UInt32) throws {
        switch field {
        case "bytes": quota.bytes = try size()
        case "buffers": quota.buffers = try count()
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
