import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A real `dmabufd` process for one test: its own socket and config under /tmp, stopped with SIGTERM.
final class TestDaemon {
    let directory: String
    let socketPath: String
    let pid: pid_t
    private var stopped = false
    nonisolated(unsafe) static var counter = 0

    /// Starts dmabufd (the binary next to this one) with `config` appended to the test defaults, and waits
    /// until it accepts connections.
    init(config: String = "") throws {
        TestDaemon.counter += 1
        directory = "/tmp/dmabufd-test-\(getpid())-\(TestDaemon.counter)"
        _ = mkdir(directory, 0o755)
        _ = chmod(directory, 0o755)
        socketPath = directory + "/dmabufd.sock"
        let text = """
            socket_mode = 0666
            fd_store = no
            state_directory = \(directory)
            revoke_deadline = 500ms
            \(config)
            """
        Harness.writeFileCreating(directory + "/dmabufd.conf", text)
        let log = try FileDescriptor.open(directory + "/log", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        defer { try? log.close() }
        pid = try Harness.spawn(
            [Harness.binDirectory + "/dmabufd", "--config", directory + "/dmabufd.conf", "--socket", socketPath, "--log-level", "debug"],
            stdout: log, stderr: log)
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            if let fd = try? UnixSocket.connect(path: socketPath) {
                _ = fd
                return
            }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                stopped = true
                throw TestFailure(description: "dmabufd exited at start (\(describeWaitStatus(status))): \(logTail())")
            }
            usleep(20_000)
        }
        throw TestFailure(description: "dmabufd did not start listening in 30 s: \(logTail())")
    }

    func connect(_ name: String = "device-test") throws -> DmaBufConnection {
        try DmaBufConnection(path: socketPath, clientName: name)
    }

    /// Stops with SIGTERM and returns the exit status.
    @discardableResult
    func stop() -> Int32 {
        guard !stopped else { return 0 }
        stopped = true
        kill(pid, SIGTERM)
        return Harness.wait(pid)
    }

    /// True while the process runs (a zombie counts as exited, and is reaped).
    var isRunning: Bool {
        guard !stopped else { return false }
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == pid {
            stopped = true
            return false
        }
        return true
    }

    /// The log's last 1,500 characters; after a crash, the Swift runtime's report from its head (signal,
    /// crashed thread's frames, registers) instead, which a plain tail cut off, with the 600 characters
    /// before it: a trap's "file:line: Fatal error: ..." line and the daemon's last words.
    func logTail() -> String {
        let text = Harness.readFile(directory + "/log") ?? ""
        if let report = text.firstRange(of: "*** Signal ") ?? text.firstRange(of: "*** Program crashed") {
            let start = text.index(report.lowerBound, offsetBy: -600, limitedBy: text.startIndex) ?? text.startIndex
            return String(text[start...].prefix(8600))
        }
        return String(text.suffix(1500))
    }

    deinit {
        if !stopped {
            kill(pid, SIGKILL)
            _ = Harness.wait(pid)
        }
    }
}

/// `waitpid`'s status in words, "exit status N" or "killed by signal N, Name" (Glibc's module lacks the W* macros).
func describeWaitStatus(_ status: Int32) -> String {
    let signal = status & 0x7f
    if signal == 0 { return "exit status \((status >> 8) & 0xff)" }
    let name = strsignal(signal).map { String(cString: $0) } ?? "signal"
    return "killed by signal \(signal), \(name)\(status & 0x80 != 0 ? ", core dumped" : "")"
}

/// Runs `body` against a fresh daemon and stops it after, adding the daemon's log to any failure.
func withDaemon(config: String = "", _ body: (TestDaemon) throws -> Void) throws {
    let daemon = try TestDaemon(config: config)
    do {
        try body(daemon)
    } catch {
        let tail = daemon.logTail()
        daemon.stop()
        throw TestFailure(description: "\(error)\n--- dmabufd log tail ---\n\(tail)")
    }
    let status = daemon.stop()
    if status != 0 { throw TestFailure(description: "dmabufd exited with \(status) on SIGTERM: \(daemon.logTail())") }
}

/// Expects a daemon refusal with `errno` whose message contains each of `parts`.
@discardableResult
func expectRefusal<T>(_ errno: Errno, _ parts: String..., file: StaticString = #fileID, line: UInt = #line, _ body: () throws -> T) throws -> DmaBufClientError {
    do {
        _ = try body()
    } catch let error as DmaBufClientError {
        guard error.errno == errno else { throw TestFailure(description: "expected \(errno.name), got: \(error) [\(file):\(line)]") }
        for part in parts where !error.description.contains(part) {
            throw TestFailure(description: "refusal lacks '\(part)': \(error) [\(file):\(line)]")
        }
        return error
    }
    throw TestFailure(description: "expected a refusal with \(errno.name), but it succeeded [\(file):\(line)]")
}

/// Polls `condition` every 10 ms for up to `timeout`.
func eventually(_ timeout: Duration = .seconds(5), _ what: String, _ condition: () throws -> Bool) throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try condition() { return }
        usleep(10_000)
    }
    throw TestFailure(description: "timed out after \(timeout) waiting for: \(what)")
}

/// A pending vgem fence exported as a sync_file, and how to signal it.
struct VgemFence {
    let device: DRMDeviceBox
    let fence: UInt32
    let syncFile: SyncFile

    static func make(write: Bool = true) throws -> VgemFence {
        let device = DRMDeviceBox(try DRMDevice.vgem())
        let (handle, _) = try device.device.createDumb(width: 64, height: 64)
        let dumb = try device.device.exportBuffer(handle)
        let fence = try device.device.vgemAttachFence(handle, write: write)
        let syncFile = try dumb.exportSyncFile(.write)
        return VgemFence(device: device, fence: fence, syncFile: syncFile)
    }

    func signal() throws { try device.device.vgemSignalFence(fence) }
}

/// A fence that signals exactly when the test says: a sw_sync fence where the kernel has sw_sync (its own
/// timeline, fence at 1, signalled by advancing to 1), else a vgem fence, which vgem also signals by itself
/// after about 10 s — under TCG a slow test can see that happen first, and `signal()` then fails ETIMEDOUT.
struct TestFence {
    let syncFile: SyncFile
    /// "sw_sync" or "vgem": the fence's driver as SYNC_IOC_FILE_INFO reports it.
    let driver: String
    private let signalBody: () throws -> Void

    /// True when this kernel gives exact fences (sw_sync); the vgem path is used otherwise, or when
    /// DMABUFD_TEST_FENCES=vgem asks for it (to compare the two on one kernel).
    static var exact: Bool {
        getenv("DMABUFD_TEST_FENCES").map { String(cString: $0) } != "vgem" && SwSyncTimeline.isAvailable()
    }

    static func make(write: Bool = true) throws -> TestFence {
        if exact {
            let timeline = SwSyncTimelineBox(try SwSyncTimeline())
            let syncFile = try timeline.timeline.fence(at: 1)
            return TestFence(syncFile: syncFile, driver: "sw_sync") { try timeline.advance() }
        }
        let fence = try VgemFence.make(write: write)
        return TestFence(syncFile: fence.syncFile, driver: "vgem") { try fence.signal() }
    }

    func signal() throws { try signalBody() }
}

/// Keeps a noncopyable timeline open for as long as a fence on it may still be signalled (closing it would
/// signal the fence with ENOENT).
final class SwSyncTimelineBox: @unchecked Sendable {
    var timeline: SwSyncTimeline
    init(_ timeline: consuming SwSyncTimeline) { self.timeline = timeline }
    func advance() throws { try timeline.advance(by: 1) }
}

/// Lets a noncopyable DRMDevice live in a copyable value.
final class DRMDeviceBox {
    let device: DRMDevice
    init(_ device: consuming DRMDevice) { self.device = device }
}

extension Harness {
    static func writeFileCreating(_ path: String, _ text: String) {
        guard let fd = try? FileDescriptor.open(path, .writeOnly, options: [.create, .truncate], permissions: [.ownerReadWrite, .groupRead, .otherRead]) else { return }
        defer { try? fd.close() }
        _ = try? fd.writeAll(Array(text.utf8))
    }

    /// Starts a program with stdout/stderr redirected.
    static func spawn(_ argv: [String], stdout: FileDescriptor, stderr: FileDescriptor) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, stdout.rawValue, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr.rawValue, 2)
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = ProcessEnvironment.current.filter { $0.key != "NOTIFY_SOCKET" && $0.key != "LISTEN_FDS" }
            .map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { cArgs.forEach { free($0) }; cEnv.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, nil, cArgs, cEnv)
        if rc != 0 { throw TestFailure(description: "posix_spawn \(argv[0]) failed: \(Errno(rawValue: rc).name)") }
        return pid
    }

    /// Spawns this binary as `--child ROLE` with `fds` at 3, 4, ...
    static func child(_ role: String, _ arguments: [String] = [], fds: [FileDescriptor] = []) throws -> pid_t {
        try spawn([executablePath, "--child", role] + arguments, fds: fds)
    }
}

/// A line-based pipe between parent and child over a socketpair.
struct Channel {
    let socket: SharedFD

    func send(_ text: String, fds: [FileDescriptor] = []) throws {
        try UnixSocket.send(socket.descriptor, bytes: Array(text.utf8), fds: fds)
    }

    /// Waits up to `timeout` for one message.
    func receive(timeout: Duration = .seconds(30)) throws -> (text: String, fds: [SharedFD]) {
        var p = [pollfd(fd: socket.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
        let ms = CInt(timeout.components.seconds * 1000)
        guard poll(&p, 1, ms) == 1 else { throw TestFailure(description: "no message from the child within \(timeout)") }
        let message = try UnixSocket.receive(socket.descriptor, maxBytes: 4096, maxFDs: 4)
        return (String(decoding: message.bytes, as: UTF8.self), message.fds)
    }
}
