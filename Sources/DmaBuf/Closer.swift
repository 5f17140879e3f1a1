#if canImport(Glibc)
import Glibc
#endif

/// Closes descriptors that clients sent, off the caller's thread.
///
/// `close()` can block for as long as a peer likes: a TCP socket with `SO_LINGER` and a full send queue,
/// a FUSE file whose server never answers `flush`. A daemon that closed clients' fds on its event loop
/// could be frozen by any client. So the loop hands its last references to this closer: one pthread
/// drains a bounded queue, and the `SharedFD`s' deinit closes the descriptors on that thread.
///
/// The queue holds at most `capacity` batches. ``retire(_:)`` refuses (returns false and keeps nothing)
/// when it is full; the caller then stops reading from clients until ``hasRoom`` (see the broker), so
/// a stuck close costs at most `capacity` batches of descriptors, never the loop.
public final class FDCloser: @unchecked Sendable {
    public let capacity: Int
    /// The process's closer: one thread for every broker in the process.
    public static let shared = FDCloser()
    private var queue: [[SharedFD]] = []
    private var mutex = pthread_mutex_t()
    private var ready = pthread_cond_t()
    private var started = false

    public init(capacity: Int = 4096) {
        self.capacity = max(capacity, 1)
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&ready, nil)
    }

    private func locked<R>(_ body: () -> R) -> R {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return body()
    }

    /// True while another batch fits.
    public var hasRoom: Bool { locked { queue.count < capacity } }

    /// Batches waiting to be closed.
    public var pending: Int { locked { queue.count } }

    /// Takes the caller's references; the descriptors close on the closer thread once nothing else holds
    /// them. The caller must not keep other references it drops later on its own thread (move them in).
    /// - Returns: false, taking nothing, when the queue is full.
    @discardableResult
    public func retire(_ fds: consuming [SharedFD]) -> Bool {
        if fds.isEmpty { return true }
        let batch = fds
        let accepted = locked { () -> Bool in
            guard queue.count < capacity else { return false }
            queue.append(batch)
            if !started { started = true; startThread() }
            pthread_cond_signal(&ready)
            return true
        }
        return accepted
    }

    private func startThread() {
        let context = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let closer = Unmanaged<FDCloser>.fromOpaque(raw!).takeRetainedValue()
            closer.drain()
            return nil
        }, context)
        if rc == 0 { pthread_detach(thread) } else { Unmanaged<FDCloser>.fromOpaque(context).release(); started = false }
    }

    private func drain() {
        while true {
            pthread_mutex_lock(&mutex)
            while queue.isEmpty { pthread_cond_wait(&ready, &mutex) }
            var batch: [SharedFD]? = queue.removeFirst()
            pthread_mutex_unlock(&mutex)
            batch = nil  // the last references go here, so close() runs on this thread
            _ = batch
        }
    }
}
