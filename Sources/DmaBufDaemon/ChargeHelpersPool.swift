import CDmaBuf
import CDmabufdCharge
import DequeModule
import DmaBuf
import Logging
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// One `dmabufd-charge` process in one client cgroup, and the requests it has been sent (answered in order).
final class ChargeHelper {
    struct Pending {
        var sequence: UInt32
        var request: ChargeRequest
        var timer: UInt64
        var done: (Result<ChargeReply, Error>) -> Void
    }
    let cgroup: String
    let socket: SharedFD
    let pidfd: SharedFD
    let pid: pid_t
    var pending = Deque<Pending>()
    var nextSequence: UInt32 = 1
    var alive = true

    init(cgroup: String, socket: SharedFD, pidfd: SharedFD, pid: pid_t) {
        self.cgroup = cgroup; self.socket = socket; self.pidfd = pidfd; self.pid = pid
    }
}

/// The real ``ChargeService``: one helper process per client cgroup that has connected clients, spawned
/// at its first allocation, moved into the cgroup by writing its pid to `cgroup.procs`, and killed and
/// reaped (through its pidfd, on the loop, never a blocking wait) when the cgroup's last client leaves,
/// when a request times out, or when a reply makes no sense. Bounded by `charge_helpers_max`.
final class ChargeHelpers: ChargeService {
    let loop: EventLoop
    let logger: Logger
    let config: DaemonConfig
    let closer: FDCloser
    let kernel: KernelBackend
    let cgroupRoot: String
    let helperPath: String
    /// The daemon's own cgroup: a client there is charged there anyway, so it needs no helper.
    let ownCgroup: String
    private var helpers: [String: ChargeHelper] = [:]
    private var clients: [String: Int] = [:]
    /// Helpers killed and not yet reaped: pidfd readiness (or a retry timer) reaps them.
    private var dying: [CInt: ChargeHelper] = [:]
    private var devices: [String: SharedFD] = [:]
    /// Cgroups a helper could not be moved into, until their last client leaves: no spawn per request.
    private var unplaceable: [String: ChargeUnavailable] = [:]
    /// Cgroups whose helper timed out, for ``cooldownFactor`` × `charge_timeout` (a timer ends each): no
    /// new helper there meanwhile, so a client that freezes its cgroup cannot make the loop spawn and
    /// kill one helper per timeout. Entries outlive the cgroup's clients (reconnecting does not end one);
    /// at most `charge_helpers_max` helpers can time out per `charge_timeout`, which bounds the count.
    private var coolingDown: [String: ChargeUnavailable] = [:]
    static let cooldownFactor = 5

    init(loop: EventLoop, logger: Logger, config: DaemonConfig, closer: FDCloser, kernel: KernelBackend, ownCgroup: String,
         cgroupRoot: String = "/sys/fs/cgroup") {
        self.loop = loop; self.logger = logger; self.config = config; self.closer = closer; self.kernel = kernel
        self.ownCgroup = ownCgroup
        self.cgroupRoot = cgroupRoot
        if config.chargeHelper.isEmpty {
            var buffer = [CChar](repeating: 0, count: 4096)
            let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
            let exe = n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "/usr/local/bin/dmabufd"
            helperPath = FilePath(exe).removingLastComponent().appending("dmabufd-charge").string
        } else {
            helperPath = config.chargeHelper
        }
    }

    var helperCount: Int { helpers.count + dying.count }

    func needsHelper(cgroup: String) -> Bool { cgroup != ownCgroup }

    func clientConnected(cgroup: String) { clients[cgroup, default: 0] += 1 }

    func clientLeft(cgroup: String) {
        guard let n = clients[cgroup] else { return }
        if n > 1 { clients[cgroup] = n - 1; return }
        clients[cgroup] = nil
        unplaceable[cgroup] = nil
        if let helper = helpers[cgroup] { retire(helper, failing: ChargeUnavailable(errno: .connectionAbort, description: "the cgroup's last client left", fix: "")) }
    }

    func devicesChanged() { devices.removeAll() }

    func submit(_ request: ChargeRequest, cgroup: String, done: @escaping (Result<ChargeReply, Error>) -> Void) throws {
        let device = try self.device(for: request)
        let helper = try helpers[cgroup] ?? start(in: cgroup)
        var fds = [device.descriptor]
        if case .udmabufFromMemfds(let memfds, let ranges) = request {
            guard ranges.count <= ChargeWire.maximumRanges, memfds.count <= ChargeWire.maximumMemfds else {
                throw ChargeUnavailable(errno: .invalidArgument, description: "\(ranges.count) ranges over \(memfds.count) memfds are more than the helper takes",
                                        fix: "send at most \(ChargeWire.maximumRanges) ranges over \(ChargeWire.maximumMemfds) memfds")
            }
            fds.append(contentsOf: memfds.map(\.descriptor))
        }
        let sequence = helper.nextSequence
        helper.nextSequence &+= 1
        do {
            try UnixSocket.send(helper.socket.descriptor, bytes: ChargeWire.encode(request, sequence: sequence), fds: fds,
                                flags: CInt(MSG_DONTWAIT | MSG_NOSIGNAL))
        } catch {
            // Full (a frozen helper with many requests) or gone: this request fails, the helper stays for
            // the timer or the pidfd to settle.
            throw ChargeUnavailable(errno: .resourceTemporarilyUnavailable, description: "the charge helper in \(cgroup) is not taking requests (\(error))",
                                    fix: "thaw the cgroup (cgroup.freeze) or retry")
        }
        let timer = loop.schedule(after: config.chargeTimeout) { [unowned self] in self.timedOut(helper, sequence) }
        helper.pending.append(.init(sequence: sequence, request: request, timer: timer, done: done))
    }

    /// The device for a request: opened once and kept (reopened after a rescan), sent with each request
    /// so the helper holds nothing between requests.
    private func device(for request: ChargeRequest) throws -> SharedFD {
        let path: String
        if case .heap(let name, _, _, _) = request { path = config.heapDirectory + "/" + name } else { path = config.udmabufDevice }
        if let fd = devices[path] { return fd }
        // Heaps are opened read-only (as RealKernel does), /dev/udmabuf read-write.
        let mode: FileDescriptor.AccessMode = path == config.udmabufDevice ? .readWrite : .readOnly
        guard let fd = try? FileDescriptor.open(path, mode, options: [.closeOnExec, .noFollow], retryOnInterrupt: true) else {
            throw DmaBufError("dmabufd", .noSuchFileOrDirectory, "cannot open \(path) for the charge helper")
        }
        let shared = SharedFD(adopting: fd)
        devices[path] = shared
        return shared
    }
}

extension ChargeHelpers {
    // MARK: - Helper processes

    /// Spawns a helper and moves it into `cgroup`; throws ``ChargeUnavailable`` saying why it cannot.
    private func start(in cgroup: String) throws -> ChargeHelper {
        if let known = unplaceable[cgroup] { throw known }
        if let cooling = coolingDown[cgroup] { throw cooling }
        let directory = try placement(cgroup)
        guard helpers.count + dying.count < Int(config.chargeHelpersMax) else {
            throw ChargeUnavailable(errno: .resourceTemporarilyUnavailable,
                                    description: "\(helpers.count + dying.count) charge helpers are running (charge_helpers_max \(config.chargeHelpersMax))",
                                    fix: "raise charge_helpers_max, or retry once clients in other cgroups disconnect", placement: true)
        }
        let (mine, theirs) = try UnixSocket.pair(.seqpacket)
        var pid: pid_t = 0
        var pidfd: CInt = -1
        let spawned = CDmabufdCharge_spawn(helperPath, theirs.descriptor.rawValue, &pid, &pidfd)
        guard spawned == 0 else {
            throw ChargeUnavailable(errno: Errno(rawValue: spawned), description: "cannot start the charge helper \(helperPath): \(Errno(rawValue: spawned))",
                                    fix: "install dmabufd-charge beside dmabufd, or set charge_helper", placement: true)
        }
        let helper = ChargeHelper(cgroup: cgroup, socket: mine, pidfd: SharedFD(adopting: FileDescriptor(rawValue: pidfd)), pid: pid)
        let moved = CDmabufdCharge_write_procs(directory + "/cgroup.procs", "\(pid)")
        if moved != 0 {
            bury(helper)
            let unavailable = ChargeUnavailable(errno: Errno(rawValue: moved), description: "cannot move the charge helper into \(cgroup): cgroup.procs: \(Errno(rawValue: moved))",
                                    fix: moved == EBUSY ? "the cgroup has controllers enabled for its children; run the client in a leaf cgroup"
                                        : "give dmabufd write access to cgroup.procs (CAP_DAC_OVERRIDE, ProtectControlGroups=no: systemd/dmabufd.service)", placement: true)
            if clients[cgroup] != nil { unplaceable[cgroup] = unavailable }
            throw unavailable
        }
        _ = CDmaBuf_fcntl(mine.descriptor.rawValue, F_SETFL, CDmaBuf_fcntl(mine.descriptor.rawValue, F_GETFL, 0) | O_NONBLOCK)
        do {
            try loop.register(mine.descriptor) { [unowned self] _ in self.readable(helper) }
        } catch {
            bury(helper)
            throw ChargeUnavailable(errno: .ioError, description: "cannot watch the charge helper: \(error)", fix: "")
        }
        helpers[cgroup] = helper
        logger.debug("charge helper started", metadata: ["cgroup": "\(cgroup)", "pid": "\(pid)"])
        return helper
    }

    /// The cgroupfs directory of a client's cgroup, when a helper can live there.
    private func placement(_ cgroup: String) throws -> String {
        let components = cgroup.split(separator: "/", omittingEmptySubsequences: false)
        guard cgroup.hasPrefix("/"), cgroup != "/", !cgroup.contains("\n"),
              !components.dropFirst().contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) else {
            throw ChargeUnavailable(errno: .notSupported,
                                    description: cgroup == "/" ? "the client is in the root cgroup, which cannot be charged" : "the client's cgroup '\(cgroup)' is not a cgroup v2 path",
                                    fix: "run the client in a cgroup v2 leaf cgroup (systemd-run --user --scope)", placement: true)
        }
        guard access(cgroupRoot + "/cgroup.controllers", F_OK) == 0 else {
            throw ChargeUnavailable(errno: .notSupported, description: "no cgroup v2 hierarchy at \(cgroupRoot)", fix: "boot with the unified cgroup hierarchy", placement: true)
        }
        return cgroupRoot + cgroup
    }

    /// A reply (or the helper's end of stream). Every reply is checked: the helper lives in a cgroup the
    /// client controls.
    private func readable(_ helper: ChargeHelper) {
        while helper.alive {
            var message: UnixSocket.Message
            do {
                message = try UnixSocket.receive(helper.socket.descriptor, maxBytes: ChargeWire.replySize + 1, maxFDs: 2, flags: CInt(MSG_DONTWAIT))
            } catch let error as DmaBufError where error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable {
                return
            } catch {
                return retire(helper, failing: ChargeUnavailable(errno: .ioError, description: "the charge helper in \(helper.cgroup) failed: \(error)", fix: "retry"))
            }
            if message.isEndOfStream {
                return retire(helper, failing: ChargeUnavailable(errno: .connectionAbort, description: "the charge helper in \(helper.cgroup) died (killed, or out of pids or memory there)",
                                                                 fix: "check the cgroup's pids.max and memory.max, and retry"))
            }
            guard let pending = helper.pending.first, let reply = ChargeWire.decodeReply(message.bytes), reply.sequence == pending.sequence,
                  let result = check(reply, message, pending.request) else {
                // Whatever a helper sent is untrusted (it lives in a cgroup the client controls): the
                // closer takes it, under a key no client uid has.
                // Moved, not copied: the loop keeps no reference that could make it the last closer.
                closer.retire(message.takeDescriptors(), uid: ChargeWire.closerUID)
                return retire(helper, failing: ChargeUnavailable(errno: .badMessage, description: "the charge helper in \(helper.cgroup) sent a reply that makes no sense", fix: "retry"))
            }
            helper.pending.removeFirst()
            loop.cancelTimer(pending.timer)
            pending.done(result)
        }
    }

    /// A well-formed reply's result; nil when it is not well formed (wrong fd count, kind or size).
    private func check(_ reply: (sequence: UInt32, error: Int32, size: UInt64), _ message: UnixSocket.Message, _ request: ChargeRequest) -> Result<ChargeReply, Error>? {
        if reply.error != 0 {
            guard message.fds.isEmpty, (1...4095).contains(reply.error) else { return nil }
            let what: String
            switch request {
            case .heap(let name, let size, _, _): what = "dma-heap '\(name)': DMA_HEAP_IOCTL_ALLOC of \(ByteCount(Int(clamping: size))) failed in the client's cgroup"
            case .udmabuf(let size, _): what = "udmabuf: a \(ByteCount(Int(clamping: size))) memfd udmabuf failed in the client's cgroup"
            case .udmabufFromMemfds: what = "udmabuf: UDMABUF_CREATE_LIST failed in the client's cgroup"
            }
            return .failure(DmaBufError("dma-heap", Errno(rawValue: reply.error), what, fix: "the client's cgroup may be at its memory.max"))
        }
        guard message.fds.count == ChargeWire.replyFDs(request), message.surplusFDs == 0, !message.controlTruncated,
              kernel.kind(of: message.fds[0]) == .dmaBuf else { return nil }
        if case .udmabuf(let size, _) = request {
            guard reply.size == size, kernel.kind(of: message.fds[1]) == .memfd else { return nil }
            return .success(ChargeReply(buffer: message.fds[0], memfd: message.fds[1], inClientCgroup: true))
        }
        return .success(ChargeReply(buffer: message.fds[0], memfd: nil, inClientCgroup: true))
    }

    private func timedOut(_ helper: ChargeHelper, _ sequence: UInt32) {
        guard helper.alive, helper.pending.contains(where: { $0.sequence == sequence }) else { return }
        logger.notice("charge helper timed out; killing it", metadata: ["cgroup": "\(helper.cgroup)", "pid": "\(helper.pid)"])
        coolDown(helper.cgroup)
        retire(helper, failing: ChargeUnavailable(errno: .timedOut,
                                                  description: "the allocation did not finish within charge_timeout (\(config.chargeTimeout)) in the client's cgroup \(helper.cgroup)",
                                                  fix: "the cgroup may be frozen (cgroup.freeze) or starved; thaw it and retry"))
    }

    private func coolDown(_ cgroup: String) {
        guard coolingDown[cgroup] == nil else { return }
        let period = config.chargeTimeout * Self.cooldownFactor
        coolingDown[cgroup] = ChargeUnavailable(errno: .resourceTemporarilyUnavailable,
                                                description: "the charge helper in \(cgroup) timed out; no new one starts there for \(period) after that",
                                                fix: "thaw the cgroup (cgroup.freeze) or give it pids and memory, then retry")
        _ = loop.schedule(after: period) { [weak self] in self?.coolingDown[cgroup] = nil }
    }

    /// Kills `helper`, fails what it still owes, and reaps it once it is gone. Late replies die with its socket.
    private func retire(_ helper: ChargeHelper, failing error: ChargeUnavailable) {
        guard helper.alive else { return }
        if helpers[helper.cgroup] === helper { helpers[helper.cgroup] = nil }
        let owed = helper.pending
        helper.pending.removeAll()
        bury(helper)
        for pending in owed {
            loop.cancelTimer(pending.timer)
            pending.done(.failure(error))
        }
    }

    /// SIGKILL through the pidfd (a frozen process dies too), then reap when the pidfd says it exited.
    private func bury(_ helper: ChargeHelper) {
        helper.alive = false
        loop.unregister(helper.socket.descriptor)
        _ = CDmabufdCharge_kill(helper.pidfd.descriptor.rawValue)
        let fd = helper.pidfd.descriptor.rawValue
        dying[fd] = helper
        if CDmabufdCharge_reap(fd) != 0 {
            dying[fd] = nil
            return
        }
        do {
            try loop.register(helper.pidfd.descriptor) { [unowned self] _ in self.reap(fd) }
        } catch {
            // epoll refused the pidfd (ENOMEM, max_user_watches): poll it instead, or the zombie would
            // keep its charge_helpers_max slot. SIGKILL went out above, so this ends within a few tries.
            retryReap(fd, after: .milliseconds(10))
        }
    }

    private func retryReap(_ fd: CInt, after delay: Duration) {
        _ = loop.schedule(after: delay) { [weak self] in
            guard let self, self.dying[fd] != nil else { return }
            if CDmabufdCharge_reap(fd) != 0 { self.dying[fd] = nil; return }
            self.retryReap(fd, after: min(delay * 2, .seconds(1)))
        }
    }

    private func reap(_ fd: CInt) {
        guard let helper = dying[fd], CDmabufdCharge_reap(fd) != 0 else { return }
        loop.unregister(helper.pidfd.descriptor)
        dying[fd] = nil
        logger.debug("charge helper reaped", metadata: ["cgroup": "\(helper.cgroup)", "pid": "\(helper.pid)"])
    }
}
