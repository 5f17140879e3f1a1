import DmaBuf
import DmaBufWire
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The async client's I/O: one dedicated thread per connection does every socket call (connect, sendmsg,
/// recvmsg, poll), so no task on Swift's cooperative pool ever blocks in the kernel. Tasks hand it requests
/// through a queue and wait on continuations; it matches replies to them by request id, and queues events
/// for ``DmaBufClient/nextEvent(timeout:)``.
///
/// The thread sleeps in `poll` on the socket and a pipe; a task that queues something writes a byte to
/// the pipe. Sends use `MSG_DONTWAIT`: a full socket waits for `POLLOUT` on this thread, not in the task.
final class ClientIO: Sendable {
    typealias Reply = (response: Response, fds: [SharedFD])

    struct State: ~Copyable {
        var outbox: [(bytes: [UInt8], fds: [SharedFD])] = []
        var outboxHead = 0
        var pending: [UInt32: CheckedContinuation<Reply, any Error>] = [:]
        var events: [Response] = []
        var eventsHead = 0
        var waiters: [(id: UInt64, continuation: CheckedContinuation<Response?, any Error>)] = []
        var nextRequestID: UInt32 = 1
        var nextWaiterID: UInt64 = 1
        /// The negotiated version, set by the I/O thread when the hello reply arrives.
        var version: UInt16?
        /// Why the connection is unusable; every later call fails with it at once.
        var failure: DmaBufClientError?

        var hasOutput: Bool { outboxHead < outbox.count }

        mutating func popEvent() -> Response? {
            guard eventsHead < events.count else { return nil }
            defer {
                eventsHead += 1
                if eventsHead == events.count { events.removeAll(keepingCapacity: true); eventsHead = 0 }
            }
            return events[eventsHead]
        }

        mutating func takeRequestID() -> UInt32 {
            defer { nextRequestID = nextRequestID == .max ? 1 : nextRequestID + 1 }
            return nextRequestID
        }
    }

    /// Events kept for ``DmaBufClient/nextEvent(timeout:)`` before the oldest are dropped.
    static let maximumQueuedEvents = 65_536

    let state = Mutex(State())
    /// A non-blocking socket pair used as a pipe: a byte written wakes the thread's `poll`.
    private let wakeRead: SharedFD
    private let wakeWrite: SharedFD

    private init(wakeRead: SharedFD, wakeWrite: SharedFD) { self.wakeRead = wakeRead; self.wakeWrite = wakeWrite }

    /// Starts the I/O thread, which first runs `connect` (blocking there, not here).
    static func start(_ connect: @escaping @Sendable () throws -> SharedFD) async throws -> ClientIO {
        let (wakeRead, wakeWrite) = try UnixSocket.pair(.stream)  // close-on-exec; made non-blocking below
        for end in [wakeRead, wakeWrite] { _ = fcntl(end.descriptor.rawValue, F_SETFL, O_NONBLOCK) }
        let io = ClientIO(wakeRead: wakeRead, wakeWrite: wakeWrite)
        try await withCheckedThrowingContinuation { (started: CheckedContinuation<Void, any Error>) in
            let spawned = spawnThread {
                let socket: SharedFD
                do { socket = try connect() } catch {
                    started.resume(throwing: error)
                    return
                }
                started.resume()
                io.run(socket)
            }
            if !spawned { started.resume(throwing: DmaBufClientError(.disconnected, "cannot start the client's I/O thread")) }
        }
        return io
    }

    // MARK: Called from tasks

    /// Queues `request` and waits for its reply; an error reply is thrown as ``DmaBufClientError``.
    func call(_ request: Request, fds: [SharedFD] = []) async throws -> Reply {
        try await withCheckedThrowingContinuation { continuation in
            let failure = state.withLock { s -> DmaBufClientError? in
                if let failure = s.failure { return failure }
                let id = s.takeRequestID()
                s.pending[id] = continuation
                s.outbox.append((WireMessage.encode(request, requestID: id, descriptors: fds.count,
                                                    version: s.version ?? WireLimits.baseVersion), fds))
                return nil
            }
            if let failure { continuation.resume(throwing: failure) } else { poke() }
        }
    }

    /// Queues a message that gets no reply (`release_quiet`).
    func send(_ request: Request) throws {
        try state.withLock { s in
            if let failure = s.failure { throw failure }
            s.outbox.append((WireMessage.encode(request, requestID: s.takeRequestID(), version: s.version ?? WireLimits.baseVersion), []))
        }
        poke()
    }

    /// The next queued event, waiting up to `timeout` (nil: until one comes or the connection fails).
    func nextEvent(timeout: Duration?) async throws -> Response? {
        try await withCheckedThrowingContinuation { continuation in
            enum Outcome { case event(Response), failed(DmaBufClientError), none, waiting(UInt64) }
            let outcome = state.withLock { s -> Outcome in
                if let event = s.popEvent() { return .event(event) }
                if let failure = s.failure { return .failed(failure) }
                if let timeout, timeout <= .zero { return .none }
                let id = s.nextWaiterID
                s.nextWaiterID += 1
                s.waiters.append((id, continuation))
                return .waiting(id)
            }
            switch outcome {
            case .event(let event): continuation.resume(returning: event)
            case .failed(let failure): continuation.resume(throwing: failure)
            case .none: continuation.resume(returning: nil)
            case .waiting(let id):
                // The timer is a task sleeping on the cooperative pool: no thread waits for it.
                if let timeout { Task { try? await Task.sleep(for: timeout); self.expire(id) } }
            }
        }
    }

    private func expire(_ id: UInt64) {
        let waiter = state.withLock { s -> CheckedContinuation<Response?, any Error>? in
            guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
            return s.waiters.remove(at: i).continuation
        }
        waiter?.resume(returning: nil)
    }

    /// Stops the thread: pending calls and event waits fail, and the socket closes.
    func stop() {
        fail(DmaBufClientError(.disconnected, "the client was closed"))
        poke()
    }

    /// Wakes the thread. A full pipe already means a wake-up is pending, so a failed write is fine.
    private func poke() {
        var byte: UInt8 = 1
        _ = Glibc.write(wakeWrite.descriptor.rawValue, &byte, 1)
    }

    // MARK: The I/O thread

    private func run(_ socket: SharedFD) {
        while true {
            let (wantWrite, failed) = state.withLock { ($0.hasOutput, $0.failure != nil) }
            if failed { return }
            var fds = [pollfd(fd: socket.descriptor.rawValue, events: Int16(POLLIN) | (wantWrite ? Int16(POLLOUT) : 0), revents: 0),
                       pollfd(fd: wakeRead.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
            if poll(&fds, 2, -1) < 0 {
                if errno == EINTR { continue }
                return fail(DmaBufClientError(.disconnected, "poll failed (\(ErrnoNames.name(errno)))"))
            }
            if fds[1].revents != 0 {
                var drain = [UInt8](repeating: 0, count: 64)
                while Glibc.read(wakeRead.descriptor.rawValue, &drain, drain.count) > 0 {}
            }
            if fds[0].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0, !receiveAll(socket) { return }
            if fds[0].revents & Int16(POLLOUT) != 0, !flush(socket) { return }
        }
    }

    /// Sends queued messages until the socket is full. False once the connection failed.
    private func flush(_ socket: SharedFD) -> Bool {
        while let next = state.withLock({ s in s.hasOutput ? s.outbox[s.outboxHead] : nil }) {
            do {
                try UnixSocket.send(socket.descriptor, bytes: next.bytes, fds: next.fds.map(\.descriptor), flags: CInt(MSG_DONTWAIT))
            } catch let error as DmaBufError where error.errno == .resourceTemporarilyUnavailable {
                return true
            } catch {
                fail(DmaBufClientError(.disconnected, "cannot send to the daemon: \(error)"))
                return false
            }
            state.withLock { s in
                s.outbox[s.outboxHead] = ([], [])
                s.outboxHead += 1
                if s.outboxHead == s.outbox.count { s.outbox.removeAll(keepingCapacity: true); s.outboxHead = 0 }
            }
        }
        return true
    }

    /// Receives until the socket is empty, handing each message on. False once the connection failed.
    private func receiveAll(_ socket: SharedFD) -> Bool {
        while true {
            let message: UnixSocket.Message
            do {
                message = try UnixSocket.receive(socket.descriptor, maxBytes: WireLimits.maximumMessageSize,
                                                 maxFDs: WireLimits.maximumDescriptors, flags: CInt(MSG_DONTWAIT))
            } catch let error as DmaBufError where error.errno == .resourceTemporarilyUnavailable {
                return true
            } catch {
                fail(DmaBufClientError(.disconnected, "cannot receive from the daemon: \(error)"))
                return false
            }
            if message.isEndOfStream {
                fail(DmaBufClientError(.disconnected, "the daemon closed the connection"))
                return false
            }
            let version = state.withLock { $0.version }
            do {
                let (header, response) = try WireMessage.decodeResponse(message.bytes, descriptors: message.fds.count, version: version)
                deliver(header, response, message.fds)
            } catch {
                fail(DmaBufClientError(.protocolViolation, "malformed reply from the daemon: \(error)"))
                return false
            }
        }
    }

    private func deliver(_ header: Header, _ response: Response, _ fds: [SharedFD]) {
        if response.isEvent {
            let waiter = state.withLock { s -> CheckedContinuation<Response?, any Error>? in
                if !s.waiters.isEmpty { return s.waiters.removeFirst().continuation }
                if s.events.count - s.eventsHead >= Self.maximumQueuedEvents { _ = s.popEvent() }
                s.events.append(response)
                return nil
            }
            waiter?.resume(returning: response)
            return
        }
        let caller = state.withLock { s -> CheckedContinuation<Reply, any Error>? in
            if case .hello(let reply) = response { s.version = reply.version }
            return s.pending.removeValue(forKey: header.requestID)
        }
        if case .error(let error) = response {
            caller?.resume(throwing: DmaBufClientError(wire: error))
        } else {
            caller?.resume(returning: (response, fds))
        }
    }

    /// Marks the connection failed (once) and fails everything waiting on it.
    private func fail(_ error: DmaBufClientError) {
        let (calls, waiters) = state.withLock { s -> ([CheckedContinuation<Reply, any Error>], [CheckedContinuation<Response?, any Error>]) in
            if s.failure == nil { s.failure = error }
            defer { s.pending = [:]; s.waiters = []; s.outbox = []; s.outboxHead = 0 }
            return (Array(s.pending.values), s.waiters.map(\.continuation))
        }
        for call in calls { call.resume(throwing: error) }
        for waiter in waiters { waiter.resume(throwing: error) }
    }
}

/// Runs `body` on a new detached thread. False when the thread could not be created.
private func spawnThread(_ body: @escaping @Sendable () -> Void) -> Bool {
    final class Box { let body: @Sendable () -> Void; init(_ body: @escaping @Sendable () -> Void) { self.body = body } }
    let context = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { context in
        Unmanaged<Box>.fromOpaque(context!).takeRetainedValue().body()
        return nil
    }, context)
    guard rc == 0 else {
        Unmanaged<Box>.fromOpaque(context).release()
        return false
    }
    pthread_detach(thread)
    return true
}
