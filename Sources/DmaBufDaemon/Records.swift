import DmaBuf
import DmaBufWire

/// One connected client. Lives on the event loop thread.
final class ClientSession {
    let id: UInt64
    /// The connection; closed when the session is dropped.
    let socket: SharedFD
    let credentials: PeerCredentials
    /// The peer's cgroup path (`/proc/<pid>/cgroup`, unified hierarchy), for logs and listings.
    let cgroup: String
    var version: UInt16?
    var clientName = ""
    var owned: Set<BufferID> = []
    var fetched: Set<BufferID> = []
    var leases: Set<LeaseID> = []
    /// Messages that did not fit the socket buffer; sent on EPOLLOUT.
    var outbox: [(bytes: [UInt8], fds: [SharedFD])] = []
    var closing = false

    init(id: UInt64, socket: SharedFD, credentials: PeerCredentials, cgroup: String) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
        self.cgroup = cgroup
    }
}

/// A buffer the daemon holds a reference to.
final class BufferRecord {
    let id: BufferID
    /// The daemon's own reference. Dropping the record closes it.
    let buffer: DmaBuffer
    let size: UInt64
    let inode: UInt64
    let heap: String
    let tag: String
    let name: String
    let ownerUID: UInt32
    let ownerPID: Int32
    /// The owning session while it is connected and has not released the buffer.
    var ownerSession: UInt64?
    var sharedWith: Set<UInt32> = []
    var generation: UInt32 = 1
    var revoked = false
    var leases: Set<LeaseID> = []
    /// Fences attached to page ranges; values are keys into the broker's fence table.
    var fences = IntervalStore<UInt64>()
    /// The memfd behind a udmabuf, kept to read its page runs.
    var memfd: Memfd?
    /// Page indices of that memfd, in buffer order.
    var memfdRuns: PageRuns?
    /// Physical runs, read once on first authorised request.
    var physicalRuns: PageRuns?
    /// Set once the daemon has no reason left to hold the buffer but others still reference it: kept only
    /// so its memory stays accounted until the last reference outside goes.
    var draining = false
    /// Taken back from the fd store and not yet fetched by its owner: kept until the owner adopts it.
    var restored = false

    init(id: BufferID, buffer: DmaBuffer, size: UInt64, inode: UInt64, heap: String, tag: String, name: String,
         ownerUID: UInt32, ownerPID: Int32, ownerSession: UInt64?) {
        self.id = id; self.buffer = buffer; self.size = size; self.inode = inode; self.heap = heap; self.tag = tag
        self.name = name; self.ownerUID = ownerUID; self.ownerPID = ownerPID; self.ownerSession = ownerSession
    }

    var pages: UInt64 { (size + UInt64(pageSize) - 1) / UInt64(pageSize) }

    /// References to the buffer's file outside the daemon: fdinfo `count` less the daemon's own.
    var externalReferences: Int {
        guard let count = try? buffer.info().count else { return 0 }
        return max(count - 1, 0)
    }
}

/// A published layout's lease: the buffer stays alive until the holder releases it and every fence
/// attached to the release has signalled.
final class Lease {
    let id: LeaseID
    let buffer: BufferID
    /// The holder while connected.
    var session: UInt64?
    let generation: UInt32
    var released = false
    /// Keys of fences that must signal before the lease ends.
    var fences: Set<UInt64> = []
    var deadlineTimer: UInt64?

    init(id: LeaseID, buffer: BufferID, session: UInt64, generation: UInt32) {
        self.id = id; self.buffer = buffer; self.session = session; self.generation = generation
    }
}

/// A sync_file the daemon waits on through the event loop.
struct PendingFence {
    let key: UInt64
    let syncFile: SyncFile
    let buffer: BufferID
    let since: ContinuousClock.Instant
    /// The session that attached it, told when it signals.
    let session: UInt64?
    /// The lease it holds open, if it came with a lease release.
    let lease: LeaseID?
    /// Its entry in the buffer's interval store, if it was attached to a range.
    var interval: IntervalStore<UInt64>.ID?
}

/// Per-uid accounting.
struct Usage {
    var bytes: UInt64 = 0
    var buffers: UInt32 = 0
    var refusals: UInt32 = 0
}
