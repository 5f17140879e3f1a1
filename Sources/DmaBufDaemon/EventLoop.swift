import CDmaBuf
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A single-threaded epoll reactor. The broker's state lives on its thread only, so it needs no locks:
/// sockets, fences (sync_file fds become readable when they signal), the udev monitor and timers are all
/// readiness events here. ``execute(_:)`` and ``stop()`` are the only calls safe from other threads.
public final class EventLoop: @unchecked Sendable {
    public typealias Handler = (_ events: UInt32) -> Void

    private let epoll: CInt
    private let wakeFD: CInt
    private var handlers: [CInt: Handler] = [:]
    private var timers: [(deadline: ContinuousClock.Instant, id: UInt64, action: () -> Void)] = []
    private var nextTimerID: UInt64 = 1
    private var running = false
    private let lock = Mutex()
    private var queued: [() -> Void] = []
    private var stopRequested = false

    public init() throws {
        epoll = epoll_create1(CInt(EPOLL_CLOEXEC))
        guard epoll >= 0 else { throw DmaBufError("dmabufd", Errno(rawValue: errno), "epoll_create1 failed") }
        wakeFD = eventfd(0, CInt(EFD_CLOEXEC | EFD_NONBLOCK))
        guard wakeFD >= 0 else { throw DmaBufError("dmabufd", Errno(rawValue: errno), "eventfd failed") }
        var event = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(fd: wakeFD))
        _ = epoll_ctl(epoll, EPOLL_CTL_ADD, wakeFD, &event)
    }

    deinit {
        close(wakeFD)
        close(epoll)
    }

    /// Watches `fd` for `events` (EPOLLIN, EPOLLOUT); `handler` runs on the loop thread with what fired.
    /// The fd stays the caller's: unregister it before closing it.
    public func register(_ fd: FileDescriptor, events: UInt32 = EPOLLIN.rawValue, _ handler: @escaping Handler) throws {
        var event = epoll_event(events: events, data: epoll_data_t(fd: fd.rawValue))
        if epoll_ctl(epoll, EPOLL_CTL_ADD, fd.rawValue, &event) != 0 {
            throw DmaBufError("dmabufd", Errno(rawValue: errno), "epoll_ctl ADD fd \(fd.rawValue) failed")
        }
        handlers[fd.rawValue] = handler
    }

    /// Changes the events watched on a registered fd.
    public func modify(_ fd: FileDescriptor, events: UInt32) {
        var event = epoll_event(events: events, data: epoll_data_t(fd: fd.rawValue))
        _ = epoll_ctl(epoll, EPOLL_CTL_MOD, fd.rawValue, &event)
    }

    /// Stops watching `fd`.
    public func unregister(_ fd: FileDescriptor) {
        _ = epoll_ctl(epoll, EPOLL_CTL_DEL, fd.rawValue, nil)
        handlers[fd.rawValue] = nil
    }

    /// Runs `action` on the loop thread once `delay` has passed. Returns an id for ``cancelTimer(_:)``.
    @discardableResult
    public func schedule(after delay: Duration, _ action: @escaping () -> Void) -> UInt64 {
        let id = nextTimerID
        nextTimerID += 1
        timers.append((ContinuousClock.now + delay, id, action))
        return id
    }

    public func cancelTimer(_ id: UInt64) {
        timers.removeAll { $0.id == id }
    }

    /// Queues `action` to run on the loop thread. Safe from any thread.
    public func execute(_ action: @escaping @Sendable () -> Void) {
        lock.withLock { queued.append(action) }
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// Makes ``run()`` return after the current iteration. Safe from any thread.
    public func stop() {
        lock.withLock { stopRequested = true }
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    /// Runs until ``stop()``. Call from one dedicated thread.
    public func run() {
        var events = [epoll_event](repeating: epoll_event(), count: 64)
        while true {
            let timeout = nextTimeoutMilliseconds()
            let n = events.withUnsafeMutableBufferPointer { epoll_wait(epoll, $0.baseAddress, 64, timeout) }
            if n < 0 && errno != EINTR { break }
            for i in 0..<max(Int(n), 0) {
                let fd = events[i].data.fd
                if fd == wakeFD {
                    var value: UInt64 = 0
                    _ = read(wakeFD, &value, 8)
                    continue
                }
                handlers[fd]?(events[i].events)
            }
            runDueTimers()
            let (work, stopping) = lock.withLock { () -> ([() -> Void], Bool) in
                defer { queued.removeAll() }
                return (queued, stopRequested)
            }
            for action in work { action() }
            if stopping { break }
        }
    }

    private func nextTimeoutMilliseconds() -> CInt {
        guard let next = timers.min(by: { $0.deadline < $1.deadline })?.deadline else { return -1 }
        let left = next - ContinuousClock.now
        if left <= .zero { return 0 }
        return CInt(clamping: left.wholeMilliseconds + 1)
    }

    private func runDueTimers() {
        let now = ContinuousClock.now
        let due = timers.filter { $0.deadline <= now }.sorted { $0.deadline < $1.deadline }
        guard !due.isEmpty else { return }
        let ids = Set(due.map(\.id))
        timers.removeAll { ids.contains($0.id) }
        for timer in due { timer.action() }
    }

    /// Runs the loop on a new thread and returns once it exits (after ``stop()``).
    public func runOnThread() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let box = ThreadBody { [self] in
                self.run()
                continuation.resume()
            }
            var thread = pthread_t()
            let context = Unmanaged.passRetained(box).toOpaque()
            let rc = pthread_create(&thread, nil, { raw in
                let body = Unmanaged<ThreadBody>.fromOpaque(raw!).takeRetainedValue()
                body.run()
                return nil
            }, context)
            if rc != 0 {
                Unmanaged<ThreadBody>.fromOpaque(context).release()
                continuation.resume()
            } else {
                pthread_detach(thread)
            }
        }
    }
}

private final class ThreadBody: @unchecked Sendable {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

/// A pthread mutex: the loop's only lock, guarding the cross-thread queue.
final class Mutex: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    deinit { pthread_mutex_destroy(&mutex) }
    func withLock<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}
