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
/// through `loop.execute`. No request blocks on another client: kernel calls are short, and fences are
/// waited on as readiness events.
public final class Broker: @unchecked Sendable {
    let loop: EventLoop
    var config: DaemonConfig
    let logger: Logger
    var resolver: HeapResolver

    var listener: SharedFD?
    var sessions: [CInt: ClientSession] = [:]
    var sessionsByID: [UInt64: ClientSession] = [:]
    var buffers: [BufferID: BufferRecord] = [:]
    var leases: [LeaseID: Lease] = [:]
    var fences: [UInt64: PendingFence] = [:]
    var fenceKeysByFD: [CInt: UInt64] = [:]
    var usage: [UInt32: Usage] = [:]
    var failures: [String: UInt32] = [:]
    var heapFailures: [String: UInt32] = [:]
    var heapUsage: [String: (bytes: UInt64, buffers: UInt32)] = [:]
    var tokens: [UInt64: BufferID] = [:]
    var udev: UdevMonitor?
    /// DRM nodes seen (by udev or at start), for listings.
    public private(set) var drmNodes: Set<String> = []
    var nextSessionID: UInt64 = 1
    var nextBufferID: BufferID = 1
    var nextLeaseID: LeaseID = 1
    var nextFenceKey: UInt64 = 1
    var drainTimer: UInt64?
    var shuttingDown = false
    /// Called on the loop thread once shutdown has finished.
    var onStopped: () -> Void = {}

    public init(config: DaemonConfig, loop: EventLoop, logger: Logger) {
        self.config = config
        self.loop = loop
        self.logger = logger
        self.resolver = HeapResolver(policies: config.policies, heapDirectory: config.heapDirectory, udmabufDevice: config.udmabufDevice)
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
        if let listenFD {
            logger.info("listening on the socket systemd passed in")
            listener = listenFD
        } else {
            let directory = String(config.socketPath[..<(config.socketPath.lastIndex(of: "/") ?? config.socketPath.endIndex)])
            if !directory.isEmpty { _ = mkdir(directory, 0o755) }
            let fd = try UnixSocket.listen(path: config.socketPath, kind: .seqpacket).shared()
            _ = chmod(config.socketPath, mode_t(config.socketMode))
            logger.info("listening", metadata: ["socket": "\(config.socketPath)", "mode": "\(String(config.socketMode, radix: 8))"])
            listener = fd
        }
        setNonBlocking(listener!.descriptor)
        try loop.register(listener!.descriptor) { [unowned self] _ in self.acceptClients() }
        restore(stored)
        if let monitor = UdevMonitor() {
            udev = monitor
            try loop.register(monitor.descriptor) { [unowned self] _ in self.udevEvent() }
            logger.info("hotplug monitoring", metadata: ["source": "\(monitor.source)"])
        } else {
            logger.warning("libudev monitor unavailable: heaps are rescanned only per request")
        }
        drmNodes = Set(DRMDevice.nodes(driver: "vgem") + scanRenderNodes())
        logger.info("heaps", metadata: ["available": "\(resolver.heaps.map(\.name).joined(separator: ", "))"])
        Systemd.notify("READY=1\nSTATUS=serving \(resolver.heaps.count) heaps")
    }

    /// Stops accepting, then either hands every buffer to systemd's fd store (when supervised with
    /// `fd_store = yes`) or revokes every lease and waits for holders and fences, bounded by
    /// `revoke_deadline`, before calling `onStopped`. Loop thread only.
    public func beginShutdown() {
        guard !shuttingDown else { return }
        shuttingDown = true
        Systemd.notify("STOPPING=1")
        if let listener {
            loop.unregister(listener.descriptor)
            self.listener = nil
        }
        if config.fdStore && Systemd.isSupervised {
            persistToFDStore()
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
        for session in Array(sessions.values) { disconnect(session, reason: "daemon stopping") }
        logger.info("stopped")
        onStopped()
    }

    /// Runs on the loop: tells systemd the daemon is alive. A hung loop never gets here, so the watchdog
    /// restarts it.
    public func pingWatchdog() {
        Systemd.notify("WATCHDOG=1\nSTATUS=\(sessions.count) clients, \(buffers.count) buffers, \(leases.count) leases")
    }

    // MARK: - Connections

    private func acceptClients() {
        guard let listener else { return }
        while true {
            let fd: SharedFD
            do {
                fd = try UnixSocket.accept(listener.descriptor).shared()
            } catch {
                return  // EAGAIN: drained; anything else is logged by the next accept
            }
            guard let credentials = try? UnixSocket.peerCredentials(fd.descriptor) else { continue }
            setNonBlocking(fd.descriptor)
            let session = ClientSession(id: nextSessionID, socket: fd, credentials: credentials, cgroup: cgroupOf(pid: credentials.pid))
            nextSessionID += 1
            do {
                try loop.register(fd.descriptor) { [unowned self] events in self.sessionEvent(session, events) }
            } catch {
                continue
            }
            sessions[fd.descriptor.rawValue] = session
            sessionsByID[session.id] = session
            logger.debug("client connected", metadata: ["uid": "\(credentials.uid)", "pid": "\(credentials.pid)", "cgroup": "\(session.cgroup)"])
        }
    }

    private func sessionEvent(_ session: ClientSession, _ events: UInt32) {
        if events & EPOLLOUT.rawValue != 0 { flush(session) }
        if events & EPOLLIN.rawValue != 0 {
            // A bounded batch per wake-up, so one busy client cannot starve the others.
            for _ in 0..<16 {
                guard sessions[session.socket.descriptor.rawValue] === session, !session.closing else { return }
                let message: UnixSocket.Message
                do {
                    message = try UnixSocket.receive(session.socket.descriptor, maxBytes: WireLimits.maximumMessageSize + 1,
                                                     maxFDs: WireLimits.maximumDescriptors, flags: CInt(MSG_DONTWAIT))
                } catch let error as DmaBufError where error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable {
                    break
                } catch {
                    disconnect(session, reason: "receive failed: \(error)")
                    return
                }
                if message.isEndOfStream {
                    disconnect(session, reason: "closed by client")
                    return
                }
                receive(session, message)
            }
        } else if events & (EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
            disconnect(session, reason: "hung up")
        }
    }

    private func receive(_ session: ClientSession, _ message: UnixSocket.Message) {
        let decoded: (Header, Request)
        do {
            if message.dataTruncated || message.bytes.count > WireLimits.maximumMessageSize {
                throw WireDecodingError.oversize(message.bytes.count)
            }
            if message.surplusFDs > 0 || message.controlTruncated {
                throw WireDecodingError.wrongDescriptorCount(type: "message", expected: 0...WireLimits.maximumDescriptors,
                                                             actual: message.fds.count + message.surplusFDs)
            }
            decoded = try WireMessage.decodeRequest(message.bytes, descriptors: message.fds.count, version: session.version)
        } catch let error as WireDecodingError {
            let requestID = message.bytes.count >= 12 ? message.bytes[8..<12].enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * $1.offset) } : 0
            let errno: Errno
            switch error {
            case .oversize: errno = .messageTooLong
            case .unsupportedVersion: errno = .protocolNotSupported
            default: errno = .badMessage
            }
            logger.notice("malformed message; disconnecting", metadata: ["pid": "\(session.credentials.pid)", "error": "\(error)"])
            count(errno)
            send(session, .error(WireError(errno: errno.rawValue, code: error.isVersion ? .unsupportedVersion : .malformed,
                                           message: "malformed message: \(error) (\(errno.name)); fix the client or update it to protocol v\(WireLimits.currentVersion)")),
                 requestID: requestID)
            session.closing = true
            disconnect(session, reason: "malformed message")
            return
        } catch {
            return
        }
        let (header, request) = decoded
        if case .hello = request {} else if session.version == nil {
            count(.protocolError)
            send(session, .error(WireError(errno: Errno.protocolError.rawValue, code: .malformed,
                                           message: "the first message must be hello (EPROTO); negotiate the version first")),
                 requestID: header.requestID)
            disconnect(session, reason: "no hello")
            return
        }
        do {
            let (response, fds) = try handle(session, request, fds: message.fds)
            send(session, response, requestID: header.requestID, fds: fds)
        } catch let error as WireError {
            count(Errno(rawValue: error.errno))
            send(session, .error(error), requestID: header.requestID)
            if error.code == .unsupportedVersion { disconnect(session, reason: "no common protocol version") }
        } catch let error as DmaBufError {
            let errno = error.errno ?? .ioError
            count(errno)
            send(session, .error(WireError(errno: errno.rawValue, code: .kernel, message: error.description)), requestID: header.requestID)
        } catch {
            count(.ioError)
            send(session, .error(WireError(errno: Errno.ioError.rawValue, code: .internal, message: "internal error: \(error)")),
                 requestID: header.requestID)
        }
    }

    /// Sends now, or queues behind earlier messages when the socket is full.
    func send(_ session: ClientSession, _ response: Response, requestID: UInt32, fds: [SharedFD] = []) {
        let bytes = WireMessage.encode(response, requestID: requestID, descriptors: fds.count, version: session.version ?? WireLimits.baseVersion)
        if session.outbox.isEmpty, trySend(session, bytes, fds) { return }
        guard session.outbox.count < 1024 else {
            disconnect(session, reason: "client stopped reading")
            return
        }
        session.outbox.append((bytes, fds))
        loop.modify(session.socket.descriptor, events: EPOLLIN.rawValue | EPOLLOUT.rawValue)
    }

    private func trySend(_ session: ClientSession, _ bytes: [UInt8], _ fds: [SharedFD]) -> Bool {
        do {
            try UnixSocket.send(session.socket.descriptor, bytes: bytes, fds: fds.map(\.descriptor), flags: CInt(MSG_DONTWAIT))
            return true
        } catch let error as DmaBufError where error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable {
            return false
        } catch {
            // The peer is gone; the EPOLLHUP that follows cleans up.
            return true
        }
    }

    private func flush(_ session: ClientSession) {
        while let (bytes, fds) = session.outbox.first {
            guard trySend(session, bytes, fds) else { return }
            session.outbox.removeFirst()
        }
        loop.modify(session.socket.descriptor, events: EPOLLIN.rawValue)
    }

    /// Drops a client: its buffers lose their owner (and are freed unless leases or fences keep them),
    /// its leases count as released (their fences still hold them).
    func disconnect(_ session: ClientSession, reason: String) {
        guard sessions[session.socket.descriptor.rawValue] === session else { return }
        if !session.outbox.isEmpty { flush(session) }
        loop.unregister(session.socket.descriptor)
        sessions[session.socket.descriptor.rawValue] = nil
        sessionsByID[session.id] = nil
        logger.debug("client gone", metadata: ["pid": "\(session.credentials.pid)", "reason": "\(reason)",
                                               "buffers": "\(session.owned.count)", "leases": "\(session.leases.count)"])
        for id in session.owned {
            guard let record = buffers[id] else { continue }
            record.ownerSession = nil
            maybeFree(record)
        }
        for leaseID in session.leases {
            guard let lease = leases[leaseID] else { continue }
            lease.session = nil
            lease.released = true
            maybeEndLease(lease)
        }
        session.owned.removeAll()
        session.leases.removeAll()
    }

    // MARK: - Hotplug

    private func udevEvent() {
        guard let event = udev?.receive() else { return }
        logger.info("hotplug", metadata: ["action": "\(event.action)", "subsystem": "\(event.subsystem)", "device": "\(event.devnode ?? event.sysname)"])
        if event.subsystem == "drm", let node = event.devnode {
            if event.action == "remove" { drmNodes.remove(node) } else { drmNodes.insert(node) }
        }
        if resolver.rescan() {
            logger.info("heaps changed", metadata: ["available": "\(resolver.heaps.map(\.name).joined(separator: ", "))"])
        }
    }

    private func scanRenderNodes() -> [String] {
        ((try? SmallFiles.entries(of: "/dev/dri")) ?? []).filter { $0.hasPrefix("renderD") || $0.hasPrefix("card") }.map { "/dev/dri/" + $0 }
    }

    // MARK: - Helpers

    func count(_ errno: Errno) {
        failures[errno.name, default: 0] += 1
    }

    func setNonBlocking(_ fd: FileDescriptor) {
        let flags = CDmaBuf_fcntl(fd.rawValue, F_GETFL, 0)
        _ = CDmaBuf_fcntl(fd.rawValue, F_SETFL, flags | O_NONBLOCK)
    }

    func cgroupOf(pid: Int32) -> String {
        guard let text = try? SmallFiles.read("/proc/\(pid)/cgroup") else { return "" }
        for line in text.split(separator: "\n") where line.hasPrefix("0::") {
            return String(line.dropFirst(3))
        }
        return text.split(separator: "\n").first.map(String.init) ?? ""
    }
}

extension WireDecodingError {
    var isVersion: Bool {
        if case .unsupportedVersion = self { return true }
        return false
    }
}

