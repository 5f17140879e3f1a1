import CDmaBuf
import DmaBuf
import HeapModule
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
    /// Pending timers by deadline. Cancelling removes the action from `actions`; the heap entry is dropped
    /// when it comes due or when cancelled entries outnumber live ones, so cancellation is amortised O(1)
    /// and scheduling O(log n).
    private var timers = Heap<TimerEntry>()
    private var actions: [UInt64: () -> Void] = [:]
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
        timers.insert(TimerEntry(deadline: now + delay, id: id))
        actions[id] = action
        return id
    }

    /// Cancels a timer; a no-op for one that has run or was cancelled.
    public func cancelTimer(_ id: UInt64) {
        guard actions.removeValue(forKey: id) != nil else { return }
        // Cancelled entries wait in the heap until due; once they are most of it, rebuild it from the
        // live ones (O(n), amortised O(1) per cancel), so long timers cancelled early cost no memory.
        if timers.count > 64 && timers.count > 2 * actions.count {
            timers = Heap(timers.unordered.filter { actions[$0.id] != nil })
        }
    }

    /// Timers scheduled and not yet run or cancelled.
    public var pendingTimers: Int { actions.count }

    /// The loop's clock: the real one, plus whatever ``advanceTime(by:)`` added (tests only).
    private var now: ContinuousClock.Instant { ContinuousClock.now + skew }
    private var skew: Duration = .zero

    /// Moves the loop's clock forward by `delay` without waiting, then runs the timers that came due. For
    /// the host tests and the fuzzer, which would otherwise sleep through revocation deadlines, drain
    /// intervals and hello timeouts; the daemon never calls it. Loop thread only.
    func advanceTime(by delay: Duration) {
        skew += max(delay, .zero)
        runDueTimers()
    }

    /// How long until the next live timer is due (zero when overdue); nil when none is scheduled.
    var nextTimerDelay: Duration? {
        while let first = timers.min, actions[first.id] == nil { _ = timers.removeMin() }
        return timers.min.map { max($0.deadline - now, .zero) }
    }

    /// Entries in the timer heap, cancelled ones not yet dropped included (bounded by twice the live ones).
    var timerHeapEntries: Int { timers.count }

    /// One iteration: waits up to `timeoutMilliseconds` (-1: until something happens) for events, runs
    /// their handlers, due timers and queued work. For tests that drive the loop from their own thread.
    /// - Returns: how many readiness events it handled (0: nothing was ready).
    @discardableResult
    public func runOnce(timeoutMilliseconds: CInt) -> Int {
        let timer = nextTimeoutMilliseconds()
        let timeout = timer < 0 ? timeoutMilliseconds : (timeoutMilliseconds < 0 ? timer : min(timer, timeoutMilliseconds))
        var handled = 0
        _ = iterate(&testEvents, timeout: timeout, handled: &handled)
        return handled
    }
    /// runOnce's event buffer, kept: the host tests and the fuzzer call it thousands of times.
    private var testEvents = [epoll_event](repeating: epoll_event(), count: 64)

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
        while iterate(&events, timeout: nextTimeoutMilliseconds()) {}
    }

    /// One pass of the loop; false once it should stop.
    private func iterate(_ events: inout [epoll_event], timeout: CInt) -> Bool {
        var handled = 0
        return iterate(&events, timeout: timeout, handled: &handled)
    }

    private func iterate(_ events: inout [epoll_event], timeout: CInt, handled: inout Int) -> Bool {
        let n = events.withUnsafeMutableBufferPointer { epoll_wait(epoll, $0.baseAddress, 64, timeout) }
        if n < 0 && errno != EINTR { return false }
        handled = max(Int(n), 0)
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
        return !stopping
    }

    private func nextTimeoutMilliseconds() -> CInt {
        while let first = timers.min, actions[first.id] == nil { _ = timers.removeMin() }
        guard let next = timers.min?.deadline else { return -1 }
        let left = next - now
        if left <= .zero { return 0 }
        return CInt(clamping: left.wholeMilliseconds + 1)
    }

    private func runDueTimers() {
        let now = self.now
        while let first = timers.min, first.deadline <= now {
            _ = timers.removeMin()
            // A cancelled timer has no action left: skipped here, which is the lazy half of cancelTimer.
            if let action = actions.removeValue(forKey: first.id) { action() }
        }
    }

    /// Runs the loop on a new thread and returns once it exits (after ``stop()``).
    public func runOnThread() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            if !detachThread({ [self] in
                self.run()
                continuation.resume()
            }) {
                continuation.resume()
            }
        }
    }
}

/// A timer's place in the heap: ordered by deadline, then by id (scheduling order).
private struct TimerEntry: Comparable {
    let deadline: ContinuousClock.Instant
    let id: UInt64
    static func < (a: TimerEntry, b: TimerEntry) -> Bool { a.deadline == b.deadline ? a.id < b.id : a.deadline < b.deadline }
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
    /// Waits on `condition`; call only inside ``withLock(_:)``.
    func wait(_ condition: inout pthread_cond_t) { pthread_cond_wait(&condition, &mutex) }
}
