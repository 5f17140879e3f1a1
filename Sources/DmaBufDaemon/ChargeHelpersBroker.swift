import DmaBuf
import DmaBufWire
import Logging
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Allocation through charge helpers: the request is deferred (the client's further requests stay unread
/// until it is answered), the helper answers on the loop, and the answer is registered and sent, or the
/// request fails cleanly (timeout, a dead or lying helper) with a refusal that names the cgroup.
extension Broker {
    /// True when allocations for `session` go through a helper in its cgroup.
    func chargesClient(_ session: ClientSession) -> Bool {
        guard let charger else { return false }
        return charger.needsHelper(cgroup: session.cgroup)
    }

    /// Defers the current request of `session`: `work` gets a completion to call (once, on the loop, maybe
    /// before this returns) with the reply. Returns the "no reply now" answer for ``handle``.
    func deferReply(_ session: ClientSession, _ work: (@escaping (Result<(Response, [SharedFD]), Error>) -> Void) -> Void) -> (Response?, [SharedFD]) {
        let requestID = servingRequestID
        deferredRequests[session.id] = requestID
        work { [unowned self] result in self.finishDeferred(session, requestID, result) }
        return (nil, [])
    }

    /// ``deferReply`` for a request already admitted for `bytes` and `buffers`: until it is answered they
    /// count as in flight for the client's uid quota and its cgroup's headroom (`createsMemory`), so
    /// concurrent deferred requests cannot together overshoot what admission allowed each of them.
    func deferAdmitted(_ session: ClientSession, bytes: UInt64, buffers: UInt32, createsMemory: Bool = true,
                       _ work: (@escaping (Result<(Response, [SharedFD]), Error>) -> Void) -> Void) -> (Response?, [SharedFD]) {
        let flight = Accounting.Flight(uid: session.uid, cgroup: session.cgroup, bytes: bytes, buffers: buffers, createsMemory: createsMemory)
        books.started(flight)
        return deferReply(session) { [unowned self] reply in
            work { result in
                self.books.finished(flight)
                reply(result)
            }
        }
    }

    /// Sends a deferred answer and resumes reading the client. A client that left gets nothing: what the
    /// answer holds is closed with it (buffers made after it left were never registered).
    private func finishDeferred(_ session: ClientSession, _ requestID: UInt32, _ result: Result<(Response, [SharedFD]), Error>) {
        guard isConnected(session), deferredRequests[session.id] == requestID else { return }
        deferredRequests[session.id] = nil
        switch result {
        case .success(let (response, fds)): send(session, response, requestID: requestID, fds: fds)
        case .failure(let error): replyFailure(session, requestID, error)
        }
        if isConnected(session) { loop.modify(session.socket.descriptor, events: wantedEvents(session)) }
    }

    func isConnected(_ session: ClientSession) -> Bool { sessions[session.socket.descriptor.rawValue] === session }

    /// `count` buffers from the heap chain of `heap`, one after another, all or nothing.
    func allocateCharged(_ session: ClientSession, size: UInt64, heap: String, tag: String, fdFlags: UInt32, count: Int,
                         made: [BufferRecord] = [], done: @escaping (Result<[BufferRecord], Error>) -> Void) {
        guard made.count < count else { return done(.success(made)) }
        allocateOneCharged(session, size: size, heap: heap, tag: tag, fdFlags: fdFlags) { [unowned self] result in
            switch result {
            case .success(let record):
                self.allocateCharged(session, size: size, heap: heap, tag: tag, fdFlags: fdFlags, count: count, made: made + [record], done: done)
            case .failure(let error):
                // A client that left already had its buffers released by `disconnect`. The others are
                // released, not discarded: while the batch was deferred another connection of the uid
                // could fetch one, lease it or attach a fence, and it stays charged until those end.
                if self.isConnected(session) { for record in made { try? self.release(session, record.id) } }
                done(.failure(error))
            }
        }
    }

    /// ``allocateOne`` through the helper: each heap of the chain in turn until one succeeds.
    private func allocateOneCharged(_ session: ClientSession, size: UInt64, heap: String, tag: String, fdFlags: UInt32,
                                    done: @escaping (Result<BufferRecord, Error>) -> Void) {
        let chain: [(String, HeapResolver.Target)]
        do { chain = try heapChain(heap) } catch { return done(.failure(error)) }
        func attempt(_ index: Int, _ lastError: Error?) {
            guard index < chain.count else { return done(.failure(lastError!)) }
            // After a helper's answer the client may be gone: make nothing more for it (a buffer
            // registered to a closed connection would have no owner to release it).
            guard isConnected(session) else {
                return done(.failure(Refusal(.connectionAbort, .internal, "the client left while its allocation was made")))
            }
            let (logical, target) = chain[index]
            // A heap the kernel charges to nobody (every heap on 6.12, CMA on every kernel) gains nothing
            // from a helper: it is made here, warm pools included, as for a client in dmabufd's cgroup.
            if !helperCharges(target) {
                do { return done(.success(try make(target, logical: logical, size: size, session: session, tag: tag, fdFlags: fdFlags))) }
                catch let error as DmaBufError {
                    return attempt(index + 1, heapFailed(error, logical: logical, target: target, size: size))
                } catch { return done(.failure(error)) }
            }
            let request: ChargeRequest
            switch target {
            case .heap(let name): request = .heap(name: name, size: size, fdFlags: fdFlags, heapFlags: 0)
            case .udmabuf: request = .udmabuf(size: roundedToPages(size), hugePages: false)
            }
            charge(session, request) { [unowned self] result in
                switch result {
                case .success(let reply):
                    done(Result {
                        let record = try self.registerCharged(reply, session: session, heap: logical, tag: tag, size: size)
                        record.contiguous = self.resolver.isCMA(logical)
                        return record
                    })
                case .failure(let error as DmaBufError):
                    attempt(index + 1, self.heapFailed(error, logical: logical, target: target, size: size))
                case .failure(let error):
                    done(.failure(error))
                }
            }
        }
        attempt(0, nil)
    }

    /// True when the kernel charges what `target` makes to the allocating task's memory cgroup: memfd
    /// pages always, a heap's pages only for the system heap with `dma_heap.mem_accounting` on (7.0+).
    func helperCharges(_ target: HeapResolver.Target) -> Bool {
        switch target {
        case .udmabuf: return true
        case .heap(let name): return name == "system" && kernel.memAccounting()
        }
    }

    /// Registers what a helper made, after checking it is as big as asked.
    func registerCharged(_ reply: ChargeReply, session: ClientSession, heap: String, tag: String, size: UInt64,
                         runs: PageRuns? = nil, clientMemfd: SharedFD? = nil, clientMemory: Bool = false, memfdSize: UInt64? = nil) throws -> BufferRecord {
        guard isConnected(session) else {
            retireClientFDs([reply.buffer] + (reply.memfd.map { [$0] } ?? []), uid: session.uid)
            throw Refusal(.connectionAbort, .internal, "the client left while its allocation was made")
        }
        let facts: BufferFacts
        do { facts = try kernel.facts(reply.buffer) } catch {
            retireClientFDs([reply.buffer] + (reply.memfd.map { [$0] } ?? []), uid: session.uid)
            throw error
        }
        guard facts.size >= size else {
            retireClientFDs([reply.buffer] + (reply.memfd.map { [$0] } ?? []), uid: session.uid)
            throw Refusal(.ioError, .internal, "the charge helper returned a \(facts.size)-byte buffer for \(size) bytes", fix: "retry")
        }
        // Admission counts a buffer against its cgroup's headroom only where memory.current does not
        // already: a helper's memfd pages are always charged to the client's cgroup, its heap pages only
        // where the kernel charges heap memory (dma_heap.mem_accounting).
        if let memfd = reply.memfd {
            return try register(reply.buffer, session: session, heap: heap, tag: tag, memfd: memfd, ownedMemfd: true,
                                runs: PageRuns(memfdRanges: [(0, memfdSize ?? roundedToPages(size))]), facts: facts,
                                clientMemory: reply.inClientCgroup)
        }
        let charged = clientMemory || (reply.inClientCgroup && kernel.memAccounting())
        return try register(reply.buffer, session: session, heap: heap, tag: tag, memfd: clientMemfd, ownedMemfd: false, runs: runs, facts: facts,
                            clientMemory: charged)
    }

    /// Sends `request` to the helper of the client's cgroup. When there can be none (no cgroup v2, the root
    /// cgroup, no permission, too many helpers), `charge_client = required` refuses and `best-effort` makes
    /// the buffer here (charged to dmabufd), logged and counted. A helper that fails later (timeout, death,
    /// a bad reply) fails the request under either mode: falling back then would let a client that froze
    /// its own cgroup escape its charge.
    func charge(_ session: ClientSession, _ request: ChargeRequest, done: @escaping (Result<ChargeReply, Error>) -> Void) {
        let refuse = { (u: ChargeUnavailable) -> Error in Refusal(u.errno, .limit, u.description, fix: u.fix) }
        do {
            try charger!.submit(request, cgroup: session.cgroup) { result in
                done(result.mapError { ($0 as? ChargeUnavailable).map(refuse) ?? $0 })
            }
        } catch let unavailable as ChargeUnavailable where unavailable.placement && config.chargeClient == .bestEffort {
            chargeFallbacks += 1
            logger.notice("allocating in the daemon: no charge helper in the client's cgroup",
                          metadata: ["cgroup": "\(session.cgroup)", "pid": "\(session.credentials.pid)", "reason": "\(unavailable)"])
            done(Result { try makeHere(request) })
        } catch let unavailable as ChargeUnavailable {
            done(.failure(refuse(unavailable)))
        } catch {
            done(.failure(error))
        }
    }

    /// `request`, made by the daemon itself (charged to its own cgroup).
    private func makeHere(_ request: ChargeRequest) throws -> ChargeReply {
        switch request {
        case .heap(let name, let size, let fdFlags, let heapFlags):
            return ChargeReply(buffer: try kernel.allocate(heap: name, size: size, fdFlags: fdFlags, heapFlags: heapFlags))
        case .udmabuf(let size, let huge):
            try admitDaemonMemfd(size)  // dmabufd's own memfd after all
            let made = try kernel.createUDmabuf(size: size, hugePages: huge)
            return ChargeReply(buffer: made.buffer, memfd: made.memfd)
        case .udmabufFromMemfds(let memfds, let ranges):
            return ChargeReply(buffer: try kernel.createUDmabuf(ranges: ranges.map { (memfds[$0.memfd], $0.offset, $0.size) }))
        }
    }

    func roundedToPages(_ size: UInt64, unit: UInt64 = UInt64(pageSize)) -> UInt64 {
        (size + unit - 1) / unit * unit  // sizes are bounded by max_buffer_size: no overflow
    }
}
