import CDmaBuf
import DmaBuf
import DmaBufWire
import Logging
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The broker: accepts clients, serves their requests, and keeps every buffer, lease and fence.
///
/// All state is confined to the ``EventLoop`` thread; nothing here is called from elsewhere except
/// through `loop.execute`. No request blocks on another client: kernel calls are short, fences are waited
/// on as readiness events, and descriptors clients sent are closed on the ``FDCloser`` thread.
///
/// Split by concern: sessions, outbox and dispatch here and in `Sessions.swift`; request families in
/// `Allocation.swift`, `Sharing.swift`, `Leases.swift`, `Inspection.swift`; freeing and revocation in
/// `Lifetimes.swift`; the books in ``Accounting``; the fd store in `FDStore.swift`.
public final class Broker: @unchecked Sendable {
    let loop: EventLoop
    var config: DaemonConfig
    let logger: Logger
    let kernel: KernelBackend
    let closer: FDCloser
    var resolver: HeapResolver
    var books = Accounting()
    /// Warm pools of fresh buffers (`pool` in dmabufd.conf).
    let pools: Pools

    var listener: SharedFD?
    /// Opened at start and closed to make room when accept hits EMFILE/ENFILE, so the listener can still
    /// accept (and drop) a connection instead of spinning on a level-triggered readiness it cannot clear.
    var reserveFD: CInt = -1
    var listenerBackoff: UInt64?
    /// The pidfd_open fallback (no SO_PEERPIDFD) has been logged once.
    var warnedPidfdOpen = false
    var sessions: [CInt: ClientSession] = [:]
    var sessionsByID: [UInt64: ClientSession] = [:]
    var perUID: [UInt32: UIDCounts] = [:]
    var buffers = BufferTable()
    var leases: [LeaseID: Lease] = [:]
    var fences: [UInt64: PendingFence] = [:]
    var tokens: [UInt64: (buffer: BufferID, session: UInt64, uid: UInt32)] = [:]
    var udev: UdevMonitor?
    let fdStore: FDStore
    /// DRM nodes seen (by udev or at start), for listings.
    public private(set) var drmNodes: Set<String> = []
    var nextSessionID: UInt64 = 1
    var nextBufferID: BufferID = 1
    var nextLeaseID: LeaseID = 1
    var nextFenceKey: UInt64 = 1
    var drainTimer: UInt64?
    /// How often buffers still referenced outside the daemon are re-checked (fdinfo `count`).
    var drainInterval: Duration = .milliseconds(200)
    var shuttingDown = false
    /// Called on the loop thread once shutdown has finished.
    var onStopped: () -> Void = {}
    /// Allocates in helpers inside clients' cgroups (`charge_client`); nil with `off`. Host tests put a fake here.
    var charger: ChargeService?
    /// Sessions whose request is waiting on a charge helper, by session id: the request id to answer.
    /// Their further requests stay unread in their sockets until the answer goes out, so replies keep
    /// their order.
    var deferredRequests: [UInt64: UInt32] = [:]
    /// The request being handled now (its id answers a deferred reply).
    var servingRequestID: UInt32 = 0
    /// Allocations that ran in the daemon because no helper could (`charge_client = best-effort`).
    var chargeFallbacks = 0

    public init(config: DaemonConfig, loop: EventLoop, logger: Logger, kernel: KernelBackend? = nil, closer: FDCloser = .shared,
                fdStore: FDStore? = nil) {
        self.config = config
        self.loop = loop
        self.logger = logger
        self.kernel = kernel ?? RealKernel(heapDirectory: config.heapDirectory, udmabufDevice: config.udmabufDevice)
        self.closer = closer
        self.fdStore = fdStore ?? FDStore(enabled: config.fdStore && Systemd.isSupervised, directory: config.stateDirectory)
        let scan = self.kernel.rescan()
        self.resolver = HeapResolver(policies: config.policies, heapDirectory: config.heapDirectory, udmabufDevice: config.udmabufDevice,
                                     heaps: scan.heaps, udmabuf: scan.udmabuf)
        // Helpers touch real devices and cgroups: only with the real kernel.
        if kernel == nil && config.chargeClient != .off {
            self.charger = ChargeHelpers(loop: loop, logger: logger, config: config, closer: closer, kernel: self.kernel,
                                         ownCgroup: Broker.cgroupOf(pid: getpid()))
        }
        // The allocator opens nothing until a refill needs it, so pools added by a reload work too.
        pools = Pools(loop: loop, logger: logger, allocator: self.kernel.heapAllocator())
        pools.configure(config.pools, maxBytes: config.poolMaxBytes, charged: self.kernel.memAccounting())
    }

    // MARK: - Start and stop

    /// Starts serving on `listener` (from systemd) or on a socket bound at the configured path, restores
    /// buffers handed back from systemd's fd store, and starts hotplug monitoring. Loop thread only.
    public func start(inherited: [(fd: CInt, name: String)]) throws {
        var listenFD: SharedFD?
        var stored: [BufferID: SharedFD] = [:]
        for (fd, name) in inherited {
            if name.hasPrefix("buf-"), let id = BufferID(name.dropFirst(4)) {
                stored[id] = SharedFD(adopting: fd)
            } else if listenFD == nil && Systemd.isUnixListener(fd) {
                listenFD = SharedFD(adopting: fd)
            } else {
                _ = close(fd)  // neither our listener nor a stored buffer
            }
        }
        try listen(on: listenFD ?? bindSocket())
        restore(stored)
        startHotplug()
        fdStore.notify("READY=1\nSTATUS=serving \(resolver.heaps.count) heaps")
    }

    private func bindSocket() throws -> SharedFD {
        let directory = String(config.socketPath[..<(config.socketPath.lastIndex(of: "/") ?? config.socketPath.endIndex)])
        if !directory.isEmpty { _ = mkdir(directory, 0o755) }
        let fd = try UnixSocket.listen(path: config.socketPath, kind: .seqpacket).shared()
        _ = chmod(config.socketPath, mode_t(config.socketMode))
        logger.info("listening", metadata: ["socket": "\(config.socketPath)", "mode": "\(String(config.socketMode, radix: 8))"])
        return fd
    }

    /// Serves connections arriving on `fd` (a listening SOCK_SEQPACKET socket).
    public func listen(on fd: SharedFD) throws {
        listener = fd
        setNonBlocking(fd.descriptor)
        reserveFD = open("/dev/null", O_RDONLY | O_CLOEXEC)
        try loop.register(fd.descriptor) { [unowned self] _ in self.acceptClients() }
    }

    private func startHotplug() {
        if let monitor = UdevMonitor() {
            udev = monitor
            try? loop.register(monitor.descriptor) { [unowned self] _ in self.udevEvent() }
            logger.info("hotplug monitoring", metadata: ["source": "\(monitor.source)"])
        } else {
            logger.warning("libudev monitor unavailable: heaps are rescanned only per request")
        }
        drmNodes = Set(DRMDevice.nodes(driver: "vgem") + scanRenderNodes())
        logger.info("heaps", metadata: ["available": "\(resolver.heaps.map(\.name).joined(separator: ", "))"])
    }

    /// Stops accepting, then revokes every lease and waits for holders and fences, bounded by
    /// `revoke_deadline`, before calling `onStopped`. Buffers are already in systemd's fd store (each is
    /// stored when made), so with `fd_store = yes` under systemd the daemon stops at once instead.
    public func beginShutdown() {
        guard !shuttingDown else { return }
        shuttingDown = true
        fdStore.notify("STOPPING=1")
        if let listener {
            loop.unregister(listener.descriptor)
            self.listener = nil
        }
        if fdStore.enabled {
            fdStore.writeAll(buffers.values)
            finishShutdown()
            return
        }
        logger.info("shutting down", metadata: ["buffers": "\(buffers.count)", "leases": "\(leases.count)"])
        for record in buffers.values where !record.leases.isEmpty {
            revoke(record, deadline: config.revokeDeadline)
        }
        let giveUp = ContinuousClock.now + config.revokeDeadline * 2
        func check() {
            if leases.isEmpty && fences.isEmpty || ContinuousClock.now >= giveUp {
                finishShutdown()
            } else {
                loop.schedule(after: .milliseconds(20), check)
            }
        }
        check()
    }

    private func finishShutdown() {
        pools.stop()
        for session in Array(sessions.values) { disconnect(session, reason: "daemon stopping") }
        logger.info("stopped")
        onStopped()
    }

    /// Runs on the loop: tells systemd the daemon is alive. A hung loop never gets here, so the watchdog
    /// restarts it.
    public func pingWatchdog() {
        // Charge helpers and the allocations that could not be charged to their client (best-effort
        // fallbacks) show in `systemctl status`.
        let charging = charger.map { ", \($0.helperCount) charge helpers, \(chargeFallbacks) allocations charged to dmabufd" } ?? ""
        fdStore.notify("WATCHDOG=1\nSTATUS=\(sessions.count) clients, \(buffers.count) buffers, \(leases.count) leases\(charging)")
    }

    // MARK: - Dispatch

    /// Serves one decoded request. Throws ``WireError`` for refusals and ``DmaBufError`` for kernel errors;
    /// both become error replies.
    /// A nil response means no reply at all (`release_quiet`).
    func handle(_ session: ClientSession, _ request: Request, fds: [SharedFD]) throws -> (Response?, [SharedFD]) {
        switch request {
        case .hello(let h): return (.hello(try negotiate(session, h)), [])
        case .listHeaps: return (.heaps(listHeaps(for: session.uid)), [])
        case .allocate(let a): return try allocate(session, a)
        case .allocateBatch(let b): return try allocateBatch(session, b)
        case .releaseQuiet(let ids): releaseQuiet(session, ids); return (nil, [])
        case .createUDmabuf(let u): return try createUDmabuf(session, u)
        case .createUDmabufFromMemfd(let u): return try createUDmabuf(session, u, memfds: fds)
        case .importBuffer(let tag): return try importBuffer(session, tag: tag, fd: fds[0])
        case .share(let s): return (.share(try share(session, s)), [])
        case .fetch(let f): return try fetch(session, f)
        case .release(let id): try release(session, id); return (.ok, [])
        case .list(let all, let after): return try list(session, all: all, after: after)
        case .info(let id): return try info(session, id)
        case .stats: return (.stats(stats(for: session)), [])
        case .layout(let l): return (.layout(try layout(l, session: session)), [])
        case .releaseLease(let id): try releaseLease(session, id, fence: fds.first); return (.ok, [])
        case .attachFence(let f): try attachFence(session, f, fence: fds[0]); return (.ok, [])
        case .beginAccess(let a): return try beginAccess(session, a)
        case .revoke(let r): try revoke(session, r); return (.ok, [])
        }
    }

    func negotiate(_ session: ClientSession, _ hello: Hello) throws -> HelloReply {
        let version = min(hello.maximumVersion, WireLimits.supportedVersions.upperBound)
        guard version >= max(hello.minimumVersion, WireLimits.supportedVersions.lowerBound) else {
            throw Refusal(.protocolNotSupported, .unsupportedVersion,
                          "no common protocol version: client speaks \(hello.minimumVersion)...\(hello.maximumVersion), dmabufd \(WireLimits.supportedVersions)",
                          fix: "update the client or the daemon")
        }
        session.version = version
        session.clientName = hello.client
        if let timer = session.helloTimer { loop.cancelTimer(timer) }
        session.helloTimer = nil
        return HelloReply(version: version, server: "dmabufd", maximumMessageSize: UInt32(WireLimits.maximumMessageSize),
                          maximumDescriptors: UInt16(WireLimits.maximumDescriptors), pageSize: UInt32(pageSize),
                          uid: session.uid, gid: session.credentials.gid, pid: session.credentials.pid)
    }

    // MARK: - Hotplug

    private func udevEvent() {
        guard let event = udev?.receive() else { return }
        logger.info("hotplug", metadata: ["action": "\(event.action)", "subsystem": "\(event.subsystem)", "device": "\(event.devnode ?? event.sysname)"])
        if event.subsystem == "drm", let node = event.devnode {
            if event.action == "remove" { drmNodes.remove(node) } else { drmNodes.insert(node) }
        }
        if rescanHeaps() {
            logger.info("heaps changed", metadata: ["available": "\(resolver.heaps.map(\.name).joined(separator: ", "))"])
        }
    }

    /// Re-reads heaps and reopens devices. True when the set changed.
    @discardableResult
    func rescanHeaps() -> Bool {
        let scan = kernel.rescan()
        charger?.devicesChanged()
        return resolver.update(heaps: scan.heaps, udmabuf: scan.udmabuf)
    }

    private func scanRenderNodes() -> [String] {
        ((try? SmallFiles.entries(of: "/dev/dri")) ?? []).filter { $0.hasPrefix("renderD") || $0.hasPrefix("card") }.map { "/dev/dri/" + $0 }
    }

    // MARK: - Helpers

    func setNonBlocking(_ fd: FileDescriptor) {
        let flags = CDmaBuf_fcntl(fd.rawValue, F_GETFL, 0)
        _ = CDmaBuf_fcntl(fd.rawValue, F_SETFL, flags | O_NONBLOCK)
    }

    /// True when every book is at its baseline: nothing charged, held, leased, fenced or connected.
    public var isIdle: Bool {
        books.isBalanced && buffers.isEmpty && leases.isEmpty && fences.isEmpty && tokens.isEmpty && sessions.isEmpty
            && perUID.values.allSatisfy(\.isEmpty)
    }
}

extension WireDecodingError {
    /// A version the daemon does not speak (EPROTONOSUPPORT). A spoken version other than the negotiated
    /// one is merely malformed (EBADMSG).
    var isVersion: Bool {
        switch self {
        case .unsupportedVersion: return true
        case .versionMismatch(_, let header): return !WireLimits.supportedVersions.contains(header)
        default: return false
        }
    }
}
