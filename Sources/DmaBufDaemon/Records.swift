import DequeModule
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
    /// The peer's pidfd, taken at accept (nil for sessions the host tests adopt): the process that
    /// connected, which no reused pid can stand in for.
    var pidfd: PidFD?
    var version: UInt16?
    var clientName = ""
    var owned: Set<BufferID> = []
    var fetched: Set<BufferID> = []
    var leases: Set<LeaseID> = []
    /// Pending fences this connection attached (bounded by `max_fences_per_client`).
    var fences = 0
    /// One-time tokens this connection minted and nobody has used yet.
    var tokens = 0
    /// Messages that did not fit the socket buffer; sent on EPOLLOUT. Bounded by `max_outbox_bytes` and
    /// `max_outbox_fds`: past either, the daemon stops reading this client until it reads its replies.
    var outbox = Deque<(bytes: [UInt8], fds: [SharedFD])>()
    var outboxBytes = 0
    var outboxFDs = 0
    /// EPOLLIN is off: the client's replies are unread (or the fd closer is full).
    var readingPaused = false
    var closing = false
    var helloTimer: UInt64?

    init(id: UInt64, socket: SharedFD, credentials: PeerCredentials, cgroup: String) {
        self.id = id
        self.socket = socket
        self.credentials = credentials
        self.cgroup = cgroup
    }

    var uid: UInt32 { credentials.uid }
}

/// A buffer the daemon holds a reference to.
final class BufferRecord {
    let id: BufferID
    /// The daemon's own reference (a dma-buf). Dropping the record closes it.
    let fd: SharedFD
    let size: UInt64
    let inode: UInt64
    let heap: String
    let tag: String
    let name: String
    let ownerUID: UInt32
    let ownerPID: Int32
    let ownerCgroup: String
    /// The owning session while it is connected and has not released the buffer.
    var ownerSession: UInt64?
    var sharedWith: Set<UInt32> = []
    var generation: UInt32 = 1
    var revoked = false
    var leases: Set<LeaseID> = []
    /// Unused one-time tokens for this buffer.
    var tokens: Set<UInt64> = []
    /// Fences attached to page ranges; values are keys into the broker's fence table.
    var fences = IntervalStore<UInt64>()
    /// The memfd behind a udmabuf, kept to read its page runs.
    var memfd: SharedFD?
    /// True when that memfd was made by dmabufd and never left it: only then are its pages the buffer's
    /// for good (a client can punch holes in its own memfd), so only then are PFNs published.
    var memfdOwnedByDaemon = false
    /// From a CMA heap: physically contiguous by construction (`cma_alloc` returns one run of pages).
    var contiguous = false
    /// Page indices of that memfd, in buffer order.
    var memfdRuns: PageRuns?
    /// Physical runs, read once on first authorised request.
    var physicalRuns: PageRuns?
    /// Set once the daemon has no reason left to hold the buffer but others still reference it: kept only
    /// so its memory stays accounted until the last reference outside goes.
    var draining = false
    /// Taken back from the fd store and not yet fetched by its owner: kept until the owner adopts it.
    var restored = false
    /// systemd's fd store holds a copy (FDSTORE=1 succeeded): one more file reference in fdinfo `count`.
    var stored = false
    /// The revocation deadline's timer, cancelled when the buffer is freed first.
    var revokeTimer: UInt64?

    init(id: BufferID, fd: SharedFD, facts: BufferFacts, heap: String, tag: String, name: String,
         owner: PeerCredentials, cgroup: String, ownerSession: UInt64?) {
        self.id = id; self.fd = fd; self.size = facts.size; self.inode = facts.inode; self.heap = heap; self.tag = tag
        self.name = name; self.ownerUID = owner.uid; self.ownerPID = owner.pid; self.ownerCgroup = cgroup
        self.ownerSession = ownerSession
    }

    /// Whole pages; cannot overflow (size ≤ max_buffer_size, checked at admission, or a kernel's size).
    var pages: UInt64 { size / UInt64(pageSize) + (size % UInt64(pageSize) == 0 ? 0 : 1) }
}

/// A published layout's lease: the buffer stays alive until the holder releases it and every fence
/// attached to the release has signalled.
final class Lease {
    let id: LeaseID
    let buffer: BufferID
    /// The holder while connected.
    var session: UInt64?
    let uid: UInt32
    let generation: UInt32
    var released = false
    /// Keys of fences that must signal before the lease ends.
    var fences: Set<UInt64> = []
    var deadlineTimer: UInt64?

    init(id: LeaseID, buffer: BufferID, session: UInt64, uid: UInt32, generation: UInt32) {
        self.id = id; self.buffer = buffer; self.session = session; self.uid = uid; self.generation = generation
    }
}

/// A sync_file the daemon waits on through the event loop.
struct PendingFence {
    let key: UInt64
    let syncFile: SharedFD
    let buffer: BufferID
    let since: ContinuousClock.Instant
    /// The session that attached it, told when it signals.
    let session: UInt64?
    /// Who attached it: counted against that uid's `max_fences_per_uid`.
    let uid: UInt32
    /// The lease it holds open, if it came with a lease release.
    let lease: LeaseID?
    /// Its entry in the buffer's interval store, if it was attached to a range.
    var interval: IntervalStore<UInt64>.ID?
}

/// Per-uid counts of bounded things other than buffers (those are in ``Accounting``).
struct UIDCounts {
    var connections = 0
    var leases = 0
    var fences = 0
    var tokens = 0
    var shares = 0
    var isEmpty: Bool { connections == 0 && leases == 0 && fences == 0 && tokens == 0 && shares == 0 }
}

/// The broker's buffers by id, with an index by inode so `import` finds a dma-buf the daemon already holds
/// in O(1) instead of scanning every record. Reads and writes look like a dictionary's.
struct BufferTable {
    private var byID: [BufferID: BufferRecord] = [:]
    private var byInode: [UInt64: BufferID] = [:]

    subscript(id: BufferID) -> BufferRecord? {
        get { byID[id] }
        set {
            if let old = byID[id], byInode[old.inode] == id { byInode[old.inode] = nil }
            byID[id] = newValue
            if let newValue { byInode[newValue.inode] = id }
        }
    }

    /// The record of the dma-buf with this inode, if the daemon holds it.
    func holding(inode: UInt64) -> BufferRecord? { byInode[inode].flatMap { byID[$0] } }

    var values: Dictionary<BufferID, BufferRecord>.Values { byID.values }
    var count: Int { byID.count }
    var isEmpty: Bool { byID.isEmpty }
}
