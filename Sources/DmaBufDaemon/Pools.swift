import DmaBuf
import DmaBufWire
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// One configured warm pool: `pool = <heap> <size> <count>` in dmabufd.conf.
public struct PoolSpec: Sendable, Equatable, Hashable {
    /// A dma-heap device name (`system`), not a policy.
    public var heap: String
    /// Page-rounded bytes: the pool serves requests whose page-rounded size is this.
    public var size: UInt64
    /// Fresh buffers kept ready.
    public var count: UInt32
    public init(heap: String, size: UInt64, count: UInt32) { self.heap = heap; self.size = size; self.count = count }

    /// Parses the value of a `pool` line: `system 16M 4`.
    static func parse(_ value: String) -> PoolSpec? {
        let words = value.split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard words.count == 3, !words[0].contains("/"), let bytes = ByteCount.parse(String(words[1])), bytes > 0,
              let count = UInt32(words[2]), count > 0, count <= 4096 else { return nil }
        let page = UInt64(pageSize)
        let (sum, overflow) = UInt64(bytes).addingReportingOverflow(page - 1)
        guard !overflow else { return nil }
        return PoolSpec(heap: String(words[0]), size: sum / page * page, count: count)
    }
}

/// Warm pools of fresh heap buffers, so an allocation of a configured size costs a round trip instead of
/// the kernel's page allocation and zeroing on the request path.
///
/// - A pooled buffer has never been handed to anyone: pools are filled only by fresh `DMA_HEAP_IOCTL_ALLOC`s,
///   and a released buffer is never put back (it may still be mapped or imported elsewhere).
/// - Pooled buffers count against no client until handed out (then ``Broker/register`` charges the
///   client as for any allocation); together they stay within `pool_max_bytes`.
/// - Refills run on a worker thread that only calls the kernel (``KernelBackend/heapAllocator()``), under
///   SCHED_IDLE; the result comes back to the loop with `loop.execute`, so the request path never waits
///   for one and never competes with one for a CPU.
/// - Not served while the kernel charges heap memory to cgroups (`dma_heap.mem_accounting=1`): a pooled
///   buffer would stay charged to dmabufd's cgroup instead of the client's. Requests then allocate as if
///   no pool were configured (or through the client's charge helper where that exists).
///
/// Loop thread only, except the worker.
final class Pools: @unchecked Sendable {  // loop-confined; the worker reaches it only through loop.execute
    private var specs: [PoolSpec] = []
    private var maxBytes: UInt64 = 0
    private var ready: [PoolSpec: [SharedFD]] = [:]
    private var filling: [PoolSpec: Int] = [:]
    /// Bytes ready or being allocated: never above `maxBytes`.
    private(set) var bytes: UInt64 = 0
    private(set) var served = 0
    private var suspended = false
    /// Set by stop(): refills that come back later are dropped, never counted.
    private var stopped = false
    private var lastServed = ContinuousClock.now
    private var quietTimer: UInt64?
    /// How long no pooled buffer must have been handed out before refills start. A refill is the kernel
    /// zeroing pages, which the kernel may not preempt; started in the middle of a burst it would delay
    /// the burst's next requests (on one CPU, the reply to the very request that emptied the slot).
    static let quiet: Duration = .milliseconds(20)
    private let worker: PoolWorker?
    private let loop: EventLoop
    private let logger: Logger

    init(loop: EventLoop, logger: Logger, allocator: HeapAllocator?) {
        self.loop = loop
        self.logger = logger
        worker = allocator.map(PoolWorker.init)
    }

    /// Applies a configuration (at start and on reload). Buffers of pools no longer configured are closed.
    /// `charged`: the kernel charges heap pages to the allocating process's cgroup.
    func configure(_ specs: [PoolSpec], maxBytes: UInt64, charged: Bool) {
        self.specs = specs
        self.maxBytes = maxBytes
        suspended = charged
        for (spec, fds) in ready where suspended || !specs.contains(spec) {
            bytes -= spec.size * UInt64(fds.count)
            ready[spec] = nil
        }
        if suspended && !specs.isEmpty {
            logger.notice("warm pools are off: this kernel charges heap memory to cgroups (dma_heap.mem_accounting), and pooled buffers would be charged to dmabufd")
        }
        refill()
    }

    /// A fresh buffer for a request of `size` bytes from `heap` with `fdFlags`, or nil (allocate as usual).
    /// Pooled buffers are read-write, so only read-write requests are served.
    func take(heap: String, size: UInt64, fdFlags: UInt32) -> SharedFD? {
        guard !suspended, !ready.isEmpty, fdFlags & FDFlags.accessModeMask == FDFlags.readWrite else { return nil }
        let page = UInt64(pageSize)
        guard size <= UInt64.max - page else { return nil }
        let rounded = (size + page - 1) / page * page
        guard let spec = specs.first(where: { $0.heap == heap && $0.size == rounded }), let fd = ready[spec]?.popLast() else { return nil }
        bytes -= spec.size
        served += 1
        logger.debug("served from a warm pool", metadata: ["heap": "\(heap)", "size": "\(spec.size)"])
        lastServed = .now
        refillWhenQuiet()
        return fd
    }

    /// Refills once nothing was taken for ``quiet``.
    private func refillWhenQuiet() {
        guard quietTimer == nil else { return }
        quietTimer = loop.schedule(after: Self.quiet) { [weak self] in
            guard let self else { return }
            self.quietTimer = nil
            if ContinuousClock.now - self.lastServed < Self.quiet { self.refillWhenQuiet() } else { self.refill() }
        }
    }

    /// Buffers ready in each pool, for listings and tests.
    var readyCounts: [PoolSpec: Int] { ready.mapValues(\.count) }

    /// Starts allocations for every pool below its count, within `pool_max_bytes`.
    private func refill() {
        guard let worker, !suspended else { return }
        for spec in specs {
            while (ready[spec]?.count ?? 0) + (filling[spec] ?? 0) < Int(spec.count), spec.size <= maxBytes - min(bytes, maxBytes) {
                bytes += spec.size
                filling[spec, default: 0] += 1
                worker.submit(spec) { [weak self] result in
                    self?.loop.execute { [weak self] in self?.filled(spec, result) }
                }
            }
        }
    }

    /// A refill came back (on the loop). Kept only while its pool is still configured and serving.
    private func filled(_ spec: PoolSpec, _ result: Result<SharedFD, any Error>) {
        // After stop() (the loop's last turns at shutdown) the books are gone: the buffer, if any, closes here.
        guard !stopped else { return }
        filling[spec, default: 1] -= 1
        switch result {
        case .success(let fd) where specs.contains(spec) && !suspended:
            ready[spec, default: []].append(fd)
            logger.debug("warm pool refilled", metadata: ["heap": "\(spec.heap)", "size": "\(spec.size)", "ready": "\(ready[spec]?.count ?? 0)"])
        case .success:
            bytes -= spec.size
        case .failure(let error):
            bytes -= spec.size
            // Not retried at once: a heap that fails now (ENOMEM) would spin. The next take refills.
            logger.notice("warm pool refill failed", metadata: ["heap": "\(spec.heap)", "size": "\(spec.size)", "error": "\(error)"])
        }
    }

    /// Closes every pooled buffer and stops the worker.
    func stop() {
        if let quietTimer { loop.cancelTimer(quietTimer) }
        quietTimer = nil
        specs = []
        ready = [:]
        filling = [:]
        bytes = 0
        stopped = true
        worker?.stop()
    }
}

/// The refill thread: takes jobs, calls the kernel, hands results back. Touches no broker state.
private final class PoolWorker: @unchecked Sendable {
    /// SCHED_IDLE (linux/sched.h), which Glibc's module does not export without _GNU_SOURCE.
    static let schedIdle: CInt = 5
    private let allocate: HeapAllocator
    private let lock = Mutex()
    private var condition = pthread_cond_t()
    private var jobs: [(PoolSpec, @Sendable (Result<SharedFD, any Error>) -> Void)] = []
    private var started = false
    private var stopping = false

    init(_ allocate: @escaping HeapAllocator) {
        self.allocate = allocate
        pthread_cond_init(&condition, nil)
    }

    func submit(_ spec: PoolSpec, _ done: @escaping @Sendable (Result<SharedFD, any Error>) -> Void) {
        lock.withLock {
            jobs.append((spec, done))
            if !started {
                started = true
                start()
            }
            pthread_cond_signal(&condition)
        }
    }

    func stop() {
        lock.withLock {
            stopping = true
            jobs = []
            pthread_cond_signal(&condition)
        }
    }

    private func start() {
        if !detachThread({ [self] in run() }) { started = false }
    }

    private func run() {
        // SCHED_IDLE: the refill runs only on a CPU nothing else wants, so it never delays a request (on
        // one CPU, a woken refill thread preempted the loop before it sent the reply and a pooled 16 MiB
        // allocation cost as much as an unpooled one). Lowering its own policy needs no privilege.
        var parameters = sched_param()
        _ = pthread_setschedparam(pthread_self(), Self.schedIdle, &parameters)
        while let (spec, done) = next() {
            done(Result { try allocate(spec.heap, spec.size) })
        }
    }

    private func next() -> (PoolSpec, @Sendable (Result<SharedFD, any Error>) -> Void)? {
        lock.withLock {
            while jobs.isEmpty && !stopping { lock.wait(&condition) }
            return stopping ? nil : jobs.removeFirst()
        }
    }
}
