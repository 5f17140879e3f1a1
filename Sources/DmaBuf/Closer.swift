#if canImport(Glibc)
import Glibc
#endif

/// Closes descriptors that clients sent, off the caller's thread, one uid's blocking closes never
/// holding up another uid's.
///
/// `close()` can block for as long as a peer likes: a TCP socket with `SO_LINGER` and a full send queue,
/// a FUSE file whose server never answers `flush`. The broker closes the kinds it identified without
/// blocking (dma-buf, sync_file, memfd: their release runs only kernel code) on its loop at once, and
/// hands every other fd here, tagged with the uid that sent it:
///
/// - each uid has its own queue, served by one thread at a time, so a uid's stuck close stalls only
///   that uid's later closes;
/// - threads are started on demand, one per uid with work, up to `maximumThreads`; a thread whose uid's
///   queue is empty takes the next waiting uid, or waits up to a second for one, then exits. Beyond
///   `maximumThreads` stuck uids the rest wait for a thread: that takes as many distinct uids, each in
///   the `dmabuf` group;
/// - ``inFlight(uid:)`` counts a uid's fds not yet closed. The broker stops reading a uid's
///   connections while the next message could take it past `max_closing_fds_per_uid`; other uids are
///   read as before. ``retire(_:uid:)`` never refuses, so the bound is the broker's and exact.
public final class FDCloser: @unchecked Sendable {
    public let maximumThreads: Int
    /// The process's closer, shared by every broker in the process.
    public static let shared = FDCloser()
    private var queues: [UInt32: [[SharedFD]]] = [:]
    private var counts: [UInt32: Int] = [:]
    private var handed: [UInt32: Int] = [:]
    /// uids with queued work and no thread (a thread takes them in order).
    private var waiting: [UInt32] = []
    /// uids a thread is serving now.
    private var serving: Set<UInt32> = []
    private var threads = 0
    /// Threads with nothing to do, waiting (up to `idleSeconds`) for a uid to serve before they exit.
    private var idleThreads = 0
    private let idleSeconds = 1
    private var work = pthread_cond_t()
    private var total = 0
    private var mutex = pthread_mutex_t()
    private var idle = pthread_cond_t()

    public init(maximumThreads: Int = 16) {
        self.maximumThreads = max(maximumThreads, 1)
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&idle, nil)
        pthread_cond_init(&work, nil)
    }

    private func locked<R>(_ body: () -> R) -> R {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return body()
    }

    /// Descriptors `uid` sent that are not closed yet.
    public func inFlight(uid: UInt32) -> Int { locked { counts[uid] ?? 0 } }

    /// Descriptors `uid` sent that were ever handed to the closer (for tests: what the loop closed itself
    /// never shows here).
    public func retired(uid: UInt32) -> Int { locked { handed[uid] ?? 0 } }

    /// Descriptors not closed yet, every uid together.
    public var pending: Int { locked { total } }

    /// Closer threads running now.
    public var runningThreads: Int { locked { threads } }

    /// Takes the caller's references; the descriptors close on a closer thread once nothing else holds
    /// them. The caller must not keep other references it drops later on its own thread (move them in).
    public func retire(_ fds: consuming [SharedFD], uid: UInt32) {
        if fds.isEmpty { return }
        let batch = fds
        locked {
            queues[uid, default: []].append(batch)
            counts[uid, default: 0] += batch.count
            handed[uid, default: 0] &+= batch.count
            total += batch.count
            if !serving.contains(uid) && !waiting.contains(uid) {
                waiting.append(uid)
                pthread_cond_signal(&work)
            }
            startThreadsForWaiting()
        }
    }

    /// Starts threads (mutex held) for the waiting uids that no idle thread will take: an idle thread is
    /// counted as idle until it wakes, so each signalled one takes one waiting uid. A start that failed
    /// (EAGAIN at TasksMax) is retried on the next retire.
    private func startThreadsForWaiting() {
        while waiting.count > idleThreads, threads < maximumThreads, let next = waiting.last, startThread(serving: next) {
            waiting.removeLast()
            serving.insert(next)
            threads += 1
        }
    }

    /// Blocks until every retired descriptor is closed. For tests and the fuzzer, never the loop.
    public func waitUntilIdle() {
        pthread_mutex_lock(&mutex)
        while total > 0 { pthread_cond_wait(&idle, &mutex) }
        pthread_mutex_unlock(&mutex)
    }

    private func startThread(serving uid: UInt32) -> Bool {
        let context = Unmanaged.passRetained(Work(closer: self, uid: uid)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let work = Unmanaged<Work>.fromOpaque(raw!).takeRetainedValue()
            work.closer.serve(work.uid)
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<Work>.fromOpaque(context).release()
            return false
        }
        pthread_detach(thread)
        return true
    }

    /// A thread's life: drain `uid`'s queue, then take the next waiting uid; with none for `idleSeconds`,
    /// exit. (Lingering saves a thread start per message for a client that keeps sending such fds.)
    private func serve(_ first: UInt32) {
        var uid = first
        while true {
            pthread_mutex_lock(&mutex)
            guard var batch = queues[uid]?.first else {
                queues[uid] = nil
                serving.remove(uid)
                if waiting.isEmpty { waitForWork() }
                if !waiting.isEmpty {
                    let next = waiting.removeFirst()
                    serving.insert(next)
                    uid = next
                    pthread_mutex_unlock(&mutex)
                    continue
                }
                threads -= 1
                pthread_mutex_unlock(&mutex)
                return
            }
            queues[uid]!.removeFirst()
            pthread_mutex_unlock(&mutex)
            let count = batch.count
            batch.removeAll()  // the last references go here, so close() runs on this thread
            locked {
                counts[uid, default: 0] -= count
                if counts[uid] == 0 { counts[uid] = nil }
                total -= count
                if total == 0 { pthread_cond_broadcast(&idle) }
            }
        }
    }
}

extension FDCloser {
    /// Waits on `work` (mutex held) until a uid is waiting or `idleSeconds` passed.
    private func waitForWork() {
        var deadline = timespec()
        clock_gettime(CLOCK_REALTIME, &deadline)
        deadline.tv_sec += idleSeconds
        idleThreads += 1
        while waiting.isEmpty {
            if pthread_cond_timedwait(&work, &mutex, &deadline) == ETIMEDOUT { break }
        }
        idleThreads -= 1
    }
}

private final class Work {
    let closer: FDCloser
    let uid: UInt32
    init(closer: FDCloser, uid: UInt32) {
        self.closer = closer
        self.uid = uid
    }
}
