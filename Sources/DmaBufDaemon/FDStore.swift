import DequeModule
import DmaBuf
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// systemd's fd store, kept current: every buffer is stored when it is made (`FDSTORE=1`,
/// `FDNAME=buf-<id>`) and removed when it is freed, so a crash, SIGKILL or watchdog abort loses none.
///
/// Metadata goes in one file per buffer, `<state_directory>/buffers/<id>`, as `key=value` lines whose
/// string values are hex-encoded: no tag, heap or cgroup text can add a line or a field.
///
/// Notifications never block the loop (``NotifySocket``). A store refused with EAGAIN is retried from
/// ``retryPending()``; while it waits, systemd does not hold the buffer, and the broker's reference count
/// does not count a stored copy (`stored` stays false until it succeeds).
public final class FDStore {
    let enabled: Bool
    let directory: String
    private let socket: NotifySocket?
    /// Buffers in the store (or on their way there).
    private(set) var count = 0
    /// Notifications systemd refused with EAGAIN, in order; `store` names the buffer of a queued FDSTORE=1.
    private var pending = Deque<(state: String, fd: SharedFD?, store: BufferID?)>()
    /// A retry of `pending` is scheduled on the loop: one timer at a time, however many frees queue more.
    var retryScheduled = false

    init(enabled: Bool, directory: String, socket: NotifySocket? = NotifySocket()) {
        self.enabled = enabled && socket != nil
        self.directory = directory + "/buffers"
        self.socket = socket
        if self.enabled { _ = mkdir(self.directory, 0o700) }
    }

    /// `READY=1`, `WATCHDOG=1`, `STATUS=...`: dropped rather than waited for when systemd's queue is full.
    func notify(_ state: String) {
        _ = socket?.send(state)
    }

    /// Stores the buffer and writes its metadata. True when systemd took it now.
    func store(_ record: BufferRecord) -> Bool {
        guard enabled else { return false }
        writeMetadata(record)
        count += 1
        let state = "FDSTORE=1\nFDNAME=buf-\(record.id)"
        if pending.isEmpty, socket?.send(state, fds: [record.fd.descriptor.rawValue]) == nil { return true }
        pending.append((state, record.fd, record.id))
        return false
    }

    /// Counts a buffer that came back from the store (systemd still holds it).
    func adopted() { count += 1 }

    /// Takes a freed buffer out of the store and deletes its metadata.
    /// `counted`: false for an entry this store never counted (an unusable one found at restore).
    func remove(_ id: BufferID, counted: Bool = true) {
        guard enabled else { return }
        if counted { count -= 1 }
        _ = unlink("\(directory)/\(id)")
        // Still waiting to be stored: systemd never got it, so the store is simply not sent (a removal
        // queued behind it would do, but would keep the buffer's fd open until systemd takes both).
        if let queued = pending.firstIndex(where: { $0.store == id }) {
            pending.remove(at: queued)
            return
        }
        let state = "FDSTOREREMOVE=1\nFDNAME=buf-\(id)"
        if pending.isEmpty, socket?.send(state) == nil { return }
        pending.append((state, nil, nil))
    }

    /// Sends what systemd refused with EAGAIN, in order. True when nothing is left.
    @discardableResult
    func retryPending() -> Bool {
        while let (state, fd, _) = pending.first {
            guard socket?.send(state, fds: fd.map { [$0.descriptor.rawValue] } ?? []) == nil else { return false }
            pending.removeFirst()
        }
        return true
    }

    var hasPending: Bool { !pending.isEmpty }

    /// Rewrites every buffer's metadata (its sharing or generation may have changed since it was stored).
    func writeAll<S: Sequence>(_ records: S) where S.Element == BufferRecord {
        guard enabled else { return }
        for record in records where !record.draining { writeMetadata(record) }
    }

    func writeMetadata(_ record: BufferRecord) {
        let lines = [
            "uid=\(record.ownerUID)", "pid=\(record.ownerPID)", "generation=\(record.generation)",
            "shared=\(record.sharedWith.sorted().map(String.init).joined(separator: ","))",
            "heap=\(hex(record.heap))", "tag=\(hex(record.tag))", "cgroup=\(hex(record.ownerCgroup))",
        ]
        try? writeText("\(directory)/\(record.id)", lines.joined(separator: "\n") + "\n")
    }

    /// Reads one buffer's metadata; nil when missing or malformed.
    func readMetadata(_ id: BufferID) -> StoredBuffer? {
        guard let text = try? SmallFiles.read("\(directory)/\(id)") else { return nil }
        var fields: [Substring: Substring] = [:]
        for line in text.split(separator: "\n") {
            guard let eq = line.firstIndex(of: "=") else { return nil }
            fields[line[..<eq]] = line[line.index(after: eq)...]
        }
        guard let uid = fields["uid"].flatMap({ UInt32($0) }), let pid = fields["pid"].flatMap({ Int32($0) }),
              let generation = fields["generation"].flatMap({ UInt32($0) }),
              let heap = fields["heap"].flatMap(unhex), let tag = fields["tag"].flatMap(unhex) else { return nil }
        let shared = Set((fields["shared"] ?? "").split(separator: ",").compactMap { UInt32($0) })
        return StoredBuffer(uid: uid, pid: pid, generation: generation, shared: shared, heap: heap, tag: tag,
                            cgroup: fields["cgroup"].flatMap(unhex) ?? "")
    }
}

/// What the fd store's metadata says about a buffer.
struct StoredBuffer {
    var uid: UInt32
    var pid: Int32
    var generation: UInt32
    var shared: Set<UInt32>
    var heap: String
    var tag: String
    var cgroup: String
}

func hex(_ text: String) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    for byte in text.utf8 { out.append(digits[Int(byte >> 4)]); out.append(digits[Int(byte & 15)]) }
    return String(decoding: out, as: UTF8.self)
}

func unhex<S: StringProtocol>(_ text: S) -> String? {
    let bytes = Array(text.utf8)
    guard bytes.count % 2 == 0 else { return nil }
    func value(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: c - 0x30
        case 0x61...0x66: c - 0x61 + 10
        default: nil
        }
    }
    var out: [UInt8] = []
    var i = 0
    while i < bytes.count {
        guard let high = value(bytes[i]), let low = value(bytes[i + 1]) else { return nil }
        out.append(high << 4 | low)
        i += 2
    }
    return String(validating: out, as: UTF8.self)
}

func writeText(_ path: String, _ text: String) throws {
    let fd = try FileDescriptor.open(path, .writeOnly, options: [.create, .truncate, .closeOnExec], permissions: [.ownerReadWrite])
    defer { try? fd.close() }
    try fd.writeAll(Array(text.utf8))
}
