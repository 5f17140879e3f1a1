import CDmaBuf
import DmaBuf
import DmaBufWire
import Logging
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

extension Broker {
    // MARK: - Connections

    func acceptClients() {
        guard let listener else { return }
        while true {
            let fd: SharedFD
            do {
                fd = try UnixSocket.accept(listener.descriptor).shared()
            } catch let error as DmaBufError where error.errno == .tooManyOpenFiles || error.errno == .tooManyOpenFilesInSystem {
                shedConnection(listener)
                return
            } catch {
                return  // EAGAIN: drained
            }
            guard let credentials = try? UnixSocket.peerCredentials(fd.descriptor) else { continue }
            switch identify(fd, credentials) {
            case .success(let (pidfd, cgroup)): adopt(fd, credentials: credentials, cgroup: cgroup, pidfd: pidfd)
            case .failure(let refusal):
                refuseConnection(fd, refusal, uid: credentials.uid)
                // Out of descriptors for the peer's pidfd or /proc read: every queued connection would be
                // accepted and refused the same way, so pause the listener as accept's own EMFILE does.
                if refusal.errno == Errno.tooManyOpenFiles.rawValue {
                    pauseListener()
                    return
                }
            }
        }
    }

    /// Out of descriptors: accept into the reserve fd's slot and drop that connection at once, then stop
    /// polling the listener for a while. A level-triggered listener that cannot accept would spin.
    private func shedConnection(_ listener: SharedFD) {
        logger.warning("out of file descriptors: refusing connections for 100 ms")
        if reserveFD >= 0 {
            _ = close(reserveFD)
            if let extra = try? UnixSocket.accept(listener.descriptor) { _ = consume extra }
            reserveFD = open("/dev/null", O_RDONLY | O_CLOEXEC)
        }
        pauseListener()
    }

    /// Stops polling the listener for 100 ms (queued connections wait in its backlog).
    private func pauseListener() {
        guard listenerBackoff == nil, let listener else { return }
        loop.unregister(listener.descriptor)
        listenerBackoff = loop.schedule(after: .milliseconds(100)) { [unowned self] in
            self.listenerBackoff = nil
            guard let listener = self.listener else { return }
            try? self.loop.register(listener.descriptor) { [unowned self] _ in self.acceptClients() }
        }
    }

    /// Serves a connected socket as a client with these credentials. Refused (closed at once) beyond
    /// `max_connections` or `max_connections_per_uid`. Host tests call this with socket pairs.
    @discardableResult
    func adopt(_ fd: SharedFD, credentials: PeerCredentials, cgroup: String = "", pidfd: PidFD? = nil) -> ClientSession? {
        let uid = credentials.uid
        guard sessions.count < Int(config.maxConnections), perUID[uid, default: UIDCounts()].connections < Int(config.maxConnectionsPerUID) else {
            refuseConnection(fd, Refusal(.tooManyOpenFiles, .limit, "too many connections (max_connections \(config.maxConnections), per uid \(config.maxConnectionsPerUID))",
                                         fix: "close other connections of this uid"), uid: uid)
            return nil
        }
        setNonBlocking(fd.descriptor)
        let session = ClientSession(id: nextSessionID, socket: fd, credentials: credentials, cgroup: cgroup)
        session.pidfd = pidfd
        nextSessionID += 1
        do {
            try loop.register(fd.descriptor) { [unowned self] events in self.sessionEvent(session, events) }
        } catch {
            return nil
        }
        sessions[fd.descriptor.rawValue] = session
        sessionsByID[session.id] = session
        perUID[uid, default: UIDCounts()].connections += 1
        charger?.clientConnected(cgroup: cgroup)
        session.helloTimer = loop.schedule(after: config.helloTimeout) { [unowned self] in
            session.helloTimer = nil
            if session.version == nil { self.disconnect(session, reason: "no hello within hello_timeout") }
        }
        logger.debug("client connected", metadata: ["uid": "\(uid)", "pid": "\(credentials.pid)", "cgroup": "\(cgroup)"])
        return session
    }

    private func sessionEvent(_ session: ClientSession, _ events: UInt32) {
        if events & EPOLLOUT.rawValue != 0 { flush(session) }
        if events & EPOLLIN.rawValue != 0 && !session.readingPaused {
            readMessages(session)
        } else if events & (EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
            disconnect(session, reason: "hung up")
        }
    }

    /// One message per wake-up. The socket is level-triggered, so a client with more queued is woken again
    /// by the next `epoll_wait`, after every other ready client had its turn; and a client that sent one
    /// request costs one `recvmsg`, not a second one that says EAGAIN (measured: one syscall of about ten
    /// per allocation under TCG).
    private func readMessages(_ session: ClientSession) {
        guard sessions[session.socket.descriptor.rawValue] === session, !session.closing, !session.readingPaused,
              deferredRequests[session.id] == nil else { return }
        guard closerHasRoom(for: session.uid) else {
            pauseReading(session, retry: true)
            return
        }
        var message: UnixSocket.Message
        do {
            // Every descriptor the kernel delivered comes back open (the most a message may carry in
            // `fds`, up to SCM_MAX_FD more in `surplus`): none is closed here, on the loop, before its
            // kind is known. A surplus makes the message malformed.
            message = try UnixSocket.receive(session.socket.descriptor, maxBytes: WireLimits.maximumMessageSize + 1,
                                             maxFDs: WireLimits.maximumDescriptors + 1, flags: CInt(MSG_DONTWAIT))
        } catch let error as DmaBufError where error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable {
            return
        } catch {
            disconnect(session, reason: "receive failed: \(error)")
            return
        }
        if message.isEndOfStream {
            disconnect(session, reason: "closed by client")
            return
        }
        var fds: [SharedFD] = []
        swap(&fds, &message.fds)
        var surplus: [SharedFD] = []
        swap(&surplus, &message.surplus)
        retireClientFDs(consume surplus, uid: session.uid)
        receive(session, message, fds: fds)
        // Whatever the request kept stays open; unidentified kinds are closed off the loop.
        retireClientFDs(consume fds, uid: session.uid)
    }

    func receive(_ session: ClientSession, _ message: UnixSocket.Message, fds: [SharedFD]) {
        guard let (header, request) = decode(session, message, fds: fds) else { return }
        if case .hello = request {} else if session.version == nil {
            reply(session, header.requestID, error: Refusal(.protocolError, .malformed, "the first message must be hello",
                                                            fix: "negotiate the version first"))
            disconnect(session, reason: "no hello")
            return
        }
        servingRequestID = header.requestID
        do {
            let (response, replyFDs) = try handle(session, request, fds: fds)
            if let response { send(session, response, requestID: header.requestID, fds: replyFDs) }
        } catch {
            replyFailure(session, header.requestID, error)
        }
        // Deferred to a charge helper: stop reading this client until the answer is sent.
        if deferredRequests[session.id] != nil { loop.modify(session.socket.descriptor, events: wantedEvents(session)) }
    }

    /// The error reply for a request that threw.
    func replyFailure(_ session: ClientSession, _ requestID: UInt32, _ error: Error) {
        switch error {
        case let error as WireError:
            reply(session, requestID, error: error)
            if error.code == .unsupportedVersion { disconnect(session, reason: "no common protocol version") }
        case let error as DmaBufError:
            let errno = error.errno ?? .ioError
            reply(session, requestID, error: WireError(errno: errno.rawValue, code: .kernel, message: error.description))
        default:
            reply(session, requestID, error: Refusal(.ioError, .internal, "internal error: \(error)"))
        }
    }

    /// EPOLLIN unless reading is paused (backpressure) or a request is deferred; EPOLLOUT while replies queue.
    func wantedEvents(_ session: ClientSession) -> UInt32 {
        (session.readingPaused || deferredRequests[session.id] != nil ? 0 : EPOLLIN.rawValue) | (session.outbox.isEmpty ? 0 : EPOLLOUT.rawValue)
    }

    private func reply(_ session: ClientSession, _ requestID: UInt32, error: WireError) {
        books.countFailure(Errno(rawValue: error.errno), uid: session.uid)
        send(session, .error(error), requestID: requestID)
    }

    /// Decodes a message; on a malformed one, replies, disconnects and returns nil.
    private func decode(_ session: ClientSession, _ message: UnixSocket.Message, fds: [SharedFD]) -> (Header, Request)? {
        do {
            if message.dataTruncated || message.bytes.count > WireLimits.maximumMessageSize {
                throw WireDecodingError.oversize(message.bytes.count)
            }
            if message.surplusFDs > 0 || message.controlTruncated {
                throw WireDecodingError.wrongDescriptorCount(type: "message", expected: 0...WireLimits.maximumDescriptors,
                                                             actual: fds.count + message.surplusFDs)
            }
            return try WireMessage.decodeRequest(message.bytes, descriptors: fds.count, version: session.version)
        } catch let error as WireDecodingError {
            let requestID = message.bytes.count >= 12 ? message.bytes[8..<12].enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * $1.offset) } : 0
            let errno: Errno
            switch error {
            case .oversize: errno = .messageTooLong
            case _ where error.isVersion: errno = .protocolNotSupported
            default: errno = .badMessage
            }
            logger.notice("malformed message; disconnecting", metadata: ["pid": "\(session.credentials.pid)", "error": "\(error)"])
            reply(session, requestID, error: Refusal(errno, error.isVersion ? .unsupportedVersion : .malformed, "malformed message: \(error)",
                                                     fix: "fix the client or update it to protocol v\(WireLimits.currentVersion)"))
            session.closing = true
            disconnect(session, reason: "malformed message")
            return nil
        } catch {
            return nil
        }
    }

    // MARK: - Outbox

    /// Sends now, or queues behind earlier messages when the socket is full. Never disconnects and never
    /// touches the books: a client whose outbox passes `max_outbox_bytes`/`max_outbox_fds` stops being read
    /// (its requests wait in its socket) until it reads its replies. Events still queue past the bound;
    /// they are bounded by the client's leases and buffers. Past four times the bound the client is
    /// dropped, from a timer, never from inside `send`.
    func send(_ session: ClientSession, _ response: Response, requestID: UInt32, fds: [SharedFD] = []) {
        guard sessions[session.socket.descriptor.rawValue] === session else { return }
        let bytes = WireMessage.encode(response, requestID: requestID, descriptors: fds.count, version: session.version ?? WireLimits.baseVersion)
        if session.outbox.isEmpty, trySend(session, bytes, fds) { return }
        // A queued reply holds its own duplicate of each fd: a buffer whose only outside holder is a reply
        // still waiting in an outbox must show that holder in fdinfo `count`, or freeing would uncharge
        // a buffer the client is about to receive (found in review). Bounded by max_outbox_fds.
        session.outbox.append((bytes, fds.map { (try? $0.duplicate().shared()) ?? $0 }))
        session.outboxBytes += bytes.count
        session.outboxFDs += fds.count
        if session.outboxBytes > Int(config.maxOutboxBytes) || session.outboxFDs > Int(config.maxOutboxFDs) {
            pauseReading(session, retry: false)
            if session.outboxBytes > 4 * Int(config.maxOutboxBytes) || session.outboxFDs > 4 * Int(config.maxOutboxFDs), !session.closing {
                session.closing = true
                loop.schedule(after: .zero) { [unowned self] in self.disconnect(session, reason: "client stopped reading its replies") }
            }
        } else {
            loop.modify(session.socket.descriptor, events: wantedEvents(session) | EPOLLOUT.rawValue)
        }
    }

    private func trySend(_ session: ClientSession, _ bytes: [UInt8], _ fds: [SharedFD]) -> Bool {
        do {
            try UnixSocket.send(session.socket.descriptor, bytes: bytes, fds: fds.map(\.descriptor), flags: CInt(MSG_DONTWAIT | MSG_NOSIGNAL))
            return true
        } catch let error as DmaBufError where error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable {
            return false
        } catch {
            // The peer is gone; the EPOLLHUP that follows cleans up.
            return true
        }
    }

    func flush(_ session: ClientSession) {
        while let (bytes, fds) = session.outbox.first {
            guard trySend(session, bytes, fds) else { return }
            session.outbox.removeFirst()
            session.outboxBytes -= bytes.count
            session.outboxFDs -= fds.count
        }
        session.readingPaused = false
        loop.modify(session.socket.descriptor, events: wantedEvents(session))
    }

    /// Stops reading `session` (keeping EPOLLOUT while its outbox has messages). With `retry`, reading
    /// resumes from a timer (the fd closer was full); otherwise when the outbox drains.
    func pauseReading(_ session: ClientSession, retry: Bool) {
        session.readingPaused = true
        loop.modify(session.socket.descriptor, events: session.outbox.isEmpty ? 0 : EPOLLOUT.rawValue)
        guard retry else { return }
        loop.schedule(after: .milliseconds(10)) { [unowned self] in
            guard self.sessions[session.socket.descriptor.rawValue] === session, session.outbox.isEmpty else { return }
            session.readingPaused = false
            self.loop.modify(session.socket.descriptor, events: self.wantedEvents(session))
        }
    }

    /// Drops a client: its buffers lose their owner (and are freed unless leases or fences keep them),
    /// its leases count as released (their fences still hold them).
    func disconnect(_ session: ClientSession, reason: String) {
        guard sessions[session.socket.descriptor.rawValue] === session else { return }
        if !session.outbox.isEmpty { flush(session) }
        loop.unregister(session.socket.descriptor)
        sessions[session.socket.descriptor.rawValue] = nil
        sessionsByID[session.id] = nil
        perUID[session.uid, default: UIDCounts()].connections -= 1
        if let timer = session.helloTimer { loop.cancelTimer(timer) }
        // A deferred request's answer is dropped when it comes (``finishDeferred``): its fds are closed.
        deferredRequests[session.id] = nil
        charger?.clientLeft(cgroup: session.cgroup)
        logger.debug("client gone", metadata: ["pid": "\(session.credentials.pid)", "reason": "\(reason)",
                                               "buffers": "\(session.owned.count)", "leases": "\(session.leases.count)"])
        let owned = session.owned, held = session.leases
        session.owned.removeAll()
        session.leases.removeAll()
        session.outbox.removeAll()
        for id in owned {
            guard let record = buffers[id] else { continue }
            record.ownerSession = nil
            maybeFree(record)
        }
        for leaseID in held {
            guard let lease = leases[leaseID] else { continue }
            lease.session = nil
            lease.released = true
            maybeEndLease(lease)
        }
        cleanUID(session.uid)
    }

    func cleanUID(_ uid: UInt32) {
        if perUID[uid]?.isEmpty == true { perUID[uid] = nil }
    }

    /// The refusal when dmabufd itself has no descriptor left to identify a peer (always EMFILE, which
    /// ``acceptClients()`` takes as its cue to pause the listener).
    static func outOfDescriptors(_ error: any Error) -> Refusal {
        Refusal(.tooManyOpenFiles, .limit, "dmabufd is out of file descriptors: \(error)", fix: "try again later")
    }

    /// Answers a connection that is not served with one error (request id 0) and drops it.
    private func refuseConnection(_ fd: SharedFD, _ refusal: Refusal, uid: UInt32) {
        logger.notice("connection refused", metadata: ["uid": "\(uid)", "why": "\(refusal.message)"])
        _ = try? UnixSocket.send(fd.descriptor, bytes: WireMessage.encode(.error(refusal), requestID: 0), flags: CInt(MSG_DONTWAIT))
    }

    /// The peer's pidfd and cgroup v2 path. The pidfd is taken first (`SO_PEERPIDFD`, else `pidfd_open` of
    /// the `SO_PEERCRED` pid), then `/proc/<pid>/cgroup` is read, then the pidfd must still name a live
    /// process: so the pid cannot have been reused by another process while it was read. A peer that is
    /// gone, or whose path dmabufd refuses (see ``CgroupPath``), is not served: it could otherwise escape
    /// admission by cgroup. No unified hierarchy (cgroup v1 only): the path is "" and only the uid quotas
    /// apply.
    /// `procDirectory` is for host tests.
    func identify(_ fd: SharedFD, _ credentials: PeerCredentials, procDirectory: String = "/proc") -> Result<(PidFD?, String), Refusal> {
        let pid = credentials.pid
        let pidfd: PidFD
        do {
            pidfd = try PidFD.ofPeer(fd.descriptor, pid: pid)
        } catch let error as DmaBufError where error.errno == .tooManyOpenFiles || error.errno == .tooManyOpenFilesInSystem {
            return .failure(Self.outOfDescriptors(error))
        } catch {
            return .failure(Refusal(.noSuchProcess, .permissionDenied, "cannot identify the connecting process (pid \(pid)): \(error)",
                                    fix: "connect from a live process; the kernel needs pidfds (Linux 5.3)"))
        }
        if pidfd.source == .pidfdOpen, !warnedPidfdOpen {
            warnedPidfdOpen = true
            logger.warning("SO_PEERPIDFD is not available (Linux < 6.5): identifying clients by pidfd_open of their pid, which a pid reused right after connect could mislead")
        }
        let membership: CgroupMembership
        do {
            membership = try CgroupMembership.of(pid: pid, procDirectory: procDirectory)
        } catch let error as Errno where error == .tooManyOpenFiles || error == .tooManyOpenFilesInSystem {
            return .failure(Self.outOfDescriptors(error))  // dmabufd's own limit, not the peer's fault
        } catch {
            return .failure(Refusal(.noSuchProcess, .permissionDenied, "cannot read /proc/\(pid)/cgroup of the connecting process: \(error)",
                                    fix: "connect from a live process; dmabufd must see /proc/<pid> (no ProtectProc=invisible)"))
        }
        guard pidfd.isAlive() else {
            return .failure(Refusal(.noSuchProcess, .permissionDenied, "the connecting process (pid \(pid)) exited before it was identified",
                                    fix: "keep the connecting process alive"))
        }
        switch membership {
        case .unified(let path): return .success((pidfd, path.description))
        case .none: return .success((pidfd, ""))
        case .refused(let path, let reason):
            return .failure(Refusal(.permissionDenied, .permissionDenied,
                                    "the connecting process's cgroup '\(Validate.cgroupField(path))' is not accepted: \(reason)",
                                    fix: "connect from a cgroup with a plain path (no '..', control characters, at most \(CgroupPath.maximumLength) bytes, \(CgroupPath.maximumDepth) levels)"))
        }
    }

    /// The cgroup v2 path of `pid` ("" without one): for the daemon's own process, which needs no pidfd.
    static func cgroupOf(pid: Int32) -> String {
        if case .unified(let path)? = try? CgroupMembership.of(pid: pid) { return path.description }
        return ""
    }
}
