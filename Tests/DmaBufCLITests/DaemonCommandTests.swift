import DmaBuf
@testable import DmaBufCLI
import DmaBufClient
import DmaBufWire
import Foundation
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Whole commands against a fake daemon: what they ask, what they print, and the exit status.
@Suite("Commands against a daemon", .serialized)
struct DaemonCommandTests {
    static let notFound = WireError.refusal(ENOENT, code: .notFound, cause: "no buffer 99", fix: "it was released or never existed")

    @Test func heaps() throws {
        let daemon = try FakeDaemon { _ in FakeReply(response: .heaps(Fixtures.heaps)) }
        defer { daemon.stop() }
        let text = run(["heaps", "--socket", daemon.path])
        #expect(text.status == 0)
        #expect(text.stdout == format(heaps: Fixtures.heaps))
        #expect(text.stderr.isEmpty)
        let json = run(["heaps", "--socket", daemon.path, "--format", "json"])
        #expect(json.status == 0)
        #expect((try jsonObject(json.stdout))["policies"] != nil)
        #expect(daemon.requests == [.listHeaps, .listHeaps])
    }

    @Test func listAsksForAll() throws {
        let daemon = try FakeDaemon { _ in FakeReply(response: .list([Fixtures.buffer, Fixtures.sharedOrphan])) }
        defer { daemon.stop() }
        let result = run(["ls", "--all", "--socket", daemon.path])
        #expect(result.status == 0)
        #expect(result.stdout == format(buffers: [Fixtures.buffer, Fixtures.sharedOrphan]))
        #expect(run(["ls", "--socket", daemon.path]).status == 0)
        #expect(daemon.requests == [.list(all: true), .list(all: false)])
    }

    @Test func listFollowsPages() throws {
        let daemon = try FakeDaemon { request in
            guard case .list(_, let after) = request else { return FakeReply(response: .ok) }
            return after == 0 ? FakeReply(response: .list([Fixtures.buffer], more: true))
                : FakeReply(response: .list([Fixtures.sharedOrphan], more: false))
        }
        defer { daemon.stop() }
        let result = run(["ls", "--all", "--socket", daemon.path, "--format", "json"])
        #expect(result.status == 0)
        #expect(((try jsonObject(result.stdout))["buffers"] as? [[String: Any]])?.map { $0["id"] as? Int } == [7, 12])
        #expect(daemon.requests == [.list(all: true, after: 0), .list(all: true, after: 7)])
    }

    @Test func refusalExitsOneWithTheDaemonsMessageAndErrno() throws {
        let daemon = try FakeDaemon { _ in FakeReply(response: .error(Self.notFound)) }
        defer { daemon.stop() }
        let result = run(["info", "99", "--socket", daemon.path])
        #expect(result.status == ExitStatus.refused.rawValue)
        #expect(result.stdout.isEmpty)
        #expect(result.stderr == "error: no buffer 99 (ENOENT); it was released or never existed\n")
        #expect(daemon.requests == [.info(99)])
    }

    @Test func errnoIsNotRepeatedWhenTheMessageNamesIt() throws {
        let error = WireError(errno: EDQUOT, code: .quotaExceeded, message: "uid 1000 is over its quota of 1 GiB (EDQUOT)")
        let daemon = try FakeDaemon { _ in FakeReply(response: .error(error)) }
        defer { daemon.stop() }
        let result = run(["alloc", "2G", "--socket", daemon.path])
        #expect(result.status == 1)
        #expect(result.stderr == "error: uid 1000 is over its quota of 1 GiB (EDQUOT)\n")
    }

    @Test func unreachableDaemonExitsThree() {
        let result = run(["stats", "--socket", "/tmp/dmabufctl-test-nobody-listens.sock"])
        #expect(result.status == ExitStatus.unreachable.rawValue)
        #expect(result.stderr.hasPrefix("error: cannot reach dmabufd at /tmp/dmabufctl-test-nobody-listens.sock: "))
        #expect(result.stderr.contains("ENOENT"))
        #expect(result.stdout.isEmpty)
    }

    @Test func socketThatIsNotASocketExitsThree() throws {
        let path = "/tmp/dmabufctl-test-plain-file-\(getpid())"
        _ = FileManager.default.createFile(atPath: path, contents: Data())
        defer { unlink(path) }
        #expect(run(["heaps", "--socket", path]).status == ExitStatus.unreachable.rawValue)
    }

    @Test func allocSendsTheRequestAndPrintsTheBuffer() throws {
        let pipe = try Pipe()
        let daemon = try FakeDaemon { _ in FakeReply(response: .buffer(Fixtures.buffer), fds: [pipe.read.descriptor]) }
        defer { daemon.stop() }
        let result = run(["alloc", "4M", "--heap", "system", "--tag", "frame", "--socket", daemon.path])
        #expect(result.status == 0)
        #expect(result.stdout == "allocated " + format(info: Fixtures.buffer))
        #expect(daemon.requests == [.allocate(AllocateRequest(size: 4 << 20, heap: "system", tag: "frame"))])
        let json = run(["alloc", "64K", "--socket", daemon.path, "--format", "json"])
        #expect((try jsonObject(json.stdout))["id"] as? Int == 7)
        #expect(daemon.requests.last == .allocate(AllocateRequest(size: 64 << 10, heap: "any", tag: "")))
    }

    @Test func rangesReleasesTheLease() throws {
        let daemon = try FakeDaemon { request in
            switch request {
            case .layout: FakeReply(response: .layout(Fixtures.layout))
            default: FakeReply(response: .ok)
            }
        }
        defer { daemon.stop() }
        let result = run(["ranges", "7", "--first-page", "0", "--pages", "272", "--socket", daemon.path])
        #expect(result.status == 0)
        #expect(result.stdout == format(layout: Fixtures.layout, leaseReleased: true))
        #expect(daemon.requests == [.layout(LayoutRequest(buffer: 7, firstPage: 0, pageCount: 272, physical: false)), .releaseLease(31)])
    }

    @Test func physicalRangesRefused() throws {
        let refusal = WireError.refusal(EPERM, code: .permissionDenied, cause: "physical addresses are for the uids in physical_addresses")
        let daemon = try FakeDaemon { _ in FakeReply(response: .error(refusal)) }
        defer { daemon.stop() }
        let result = run(["ranges", "7", "--physical", "--socket", daemon.path])
        #expect(result.status == 1)
        #expect(result.stderr.contains("(EPERM)"))
        #expect(daemon.requests == [.layout(LayoutRequest(buffer: 7, physical: true))])
    }

    @Test func rangesWhoseLeaseCannotBeReleasedPrintsAndFails() throws {
        let daemon = try FakeDaemon { request in
            switch request {
            case .layout: FakeReply(response: .layout(Fixtures.layout))
            default: FakeReply(response: .error(WireError(errno: ENOENT, code: .notFound, message: "no lease 31")))
            }
        }
        defer { daemon.stop() }
        let result = run(["ranges", "7", "--socket", daemon.path, "--format", "json"])
        #expect(result.status == 1)
        #expect((try jsonObject(result.stdout))["leaseReleased"] as? Bool == false)
        #expect(result.stderr.contains("no lease 31"))
    }

    @Test func fenceWaitWithNothingToWaitFor() throws {
        let daemon = try FakeDaemon { _ in FakeReply(response: .access(AccessReply(fences: 0))) }
        defer { daemon.stop() }
        let result = run(["fence", "wait", "7", "--pages", "0:16", "--access", "write", "--socket", daemon.path])
        #expect(result.status == 0)
        #expect(result.stdout == "buffer 7 pages 0:16 write: no fences, nothing to wait for\n")
        #expect(daemon.requests == [.beginAccess(AccessRequest(buffer: 7, firstPage: 0, pageCount: 16, access: .write))])
    }

    @Test func fenceWaitReturnsOnceSignalled() throws {
        let pipe = try Pipe()
        _ = write(pipe.write.descriptor.rawValue, "x", 1)  // readable: "signalled"
        let daemon = try FakeDaemon { _ in FakeReply(response: .access(AccessReply(fences: 2)), fds: [pipe.read.descriptor]) }
        defer { daemon.stop() }
        let result = run(["fence", "wait", "7", "--access", "read", "--timeout", "5s", "--socket", daemon.path, "--format", "json"])
        #expect(result.status == 0)
        let object = try jsonObject(result.stdout)
        #expect(object["fences"] as? Int == 2)
        #expect(object["signaled"] as? Bool == true)
        #expect(object["waitedMilliseconds"] is Int)
    }

    @Test func fenceWaitTimesOut() throws {
        let pipe = try Pipe()  // never readable: "never signals"
        let daemon = try FakeDaemon { _ in FakeReply(response: .access(AccessReply(fences: 1)), fds: [pipe.read.descriptor]) }
        defer { daemon.stop() }
        let result = run(["fence", "wait", "7", "--pages", "3", "--access", "write", "--timeout", "50ms", "--socket", daemon.path])
        #expect(result.status == 1)
        #expect(result.stdout.isEmpty)
        #expect(result.stderr == "error: 1 fence(s) on buffer 7 pages 3:4 did not signal within 50 ms\n")
    }

    @Test func fenceStatusDoesNotWait() throws {
        let pipe = try Pipe()
        let daemon = try FakeDaemon { _ in FakeReply(response: .access(AccessReply(fences: 3)), fds: [pipe.read.descriptor]) }
        defer { daemon.stop() }
        let result = run(["fence", "status", "7", "--pages", "4:", "--access", "read", "--socket", daemon.path])
        #expect(result.status == 0)
        #expect(result.stdout == "buffer 7 pages 4: read: 3 fences, pending\n")
        #expect(daemon.requests == [.beginAccess(AccessRequest(buffer: 7, firstPage: 4, pageCount: 0, access: .read))])
    }

    @Test func revokeSendsTheDeadline() throws {
        let daemon = try FakeDaemon { _ in FakeReply(response: .ok) }
        defer { daemon.stop() }
        let result = run(["revoke", "7", "--deadline", "2s", "--socket", daemon.path])
        #expect(result.status == 0)
        #expect(result.stdout == "revoked buffer 7; holders have 2 s to release\n")
        #expect(run(["revoke", "8", "--socket", daemon.path]).stdout == "revoked buffer 8; holders have the configured deadline to release\n")
        #expect(daemon.requests == [.revoke(RevokeRequest(buffer: 7, deadlineMilliseconds: 2000)), .revoke(RevokeRequest(buffer: 8))])
    }

    @Test func statsInEveryFormat() throws {
        let daemon = try FakeDaemon { _ in FakeReply(response: .stats(Fixtures.stats)) }
        defer { daemon.stop() }
        #expect(run(["stats", "--socket", daemon.path]).stdout == format(stats: Fixtures.stats))
        #expect(run(["stats", "--socket", daemon.path, "--format", "openmetrics"]).stdout == openMetrics(stats: Fixtures.stats))
        let json = run(["stats", "--socket", daemon.path, "--format", "json"])
        #expect(try JSONDecoder().decode(Stats.self, from: Data(json.stdout.utf8)) == Fixtures.stats)
    }

    @Test func statsSayWhetherTheKernelChargesHeapMemory() throws {
        for accounting in [true, false] {
            let daemon = try FakeDaemon { request in
                if case .listHeaps = request { return FakeReply(response: .heaps(HeapsReply(heaps: [], policies: [], memAccounting: accounting))) }
                return FakeReply(response: .stats(Fixtures.stats))
            }
            defer { daemon.stop() }
            let text = run(["stats", "--socket", daemon.path]).stdout
            #expect(text == format(stats: Fixtures.stats, memAccounting: accounting))
            #expect(text.contains(accounting ? "the kernel charges heap memory" : "the kernel does not charge heap memory"))
            let metrics = run(["stats", "--socket", daemon.path, "--format", "openmetrics"]).stdout
            #expect(metrics.contains("dmabufd_kernel_charges_heap_memcg \(accounting ? 1 : 0)\n"))
        }
    }

    @Test func environmentSocketIsTheDefault() throws {
        #expect(try ConnectionOptions.parse([]).socket == DmaBufConnection.defaultSocketPath)
    }

    // MARK: alloc --hold

    @Test func holdEndsAtEndOfInput() throws {
        let buffer = try Pipe()
        let daemon = try FakeDaemon { _ in FakeReply(response: .buffer(Fixtures.buffer), fds: [buffer.read.descriptor]) }
        defer { daemon.stop() }
        let connection = try DmaBufConnection(path: daemon.path)
        _ = try connection.allocate(size: 4096)
        // A line, then the end: the line is read and ignored, the end stops the hold.
        var fds: [CInt] = [-1, -1]
        #expect(pipe(&fds) == 0)
        _ = write(fds[1], "line\n", 5)
        Glibc.close(fds[1])
        defer { Glibc.close(fds[0]) }
        #expect(try holdBuffer(7, connection: connection, input: fds[0]) == .endOfInput)
    }

    @Test func holdEndsWhenTheDaemonFreesTheBuffer() throws {
        let buffer = try Pipe()
        let daemon = try FakeDaemon { _ in
            FakeReply(response: .buffer(Fixtures.buffer), fds: [buffer.read.descriptor], events: [.leaseRevoked(lease: 1, buffer: 7, deadlineMilliseconds: 100), .bufferFreed(7)])
        }
        defer { daemon.stop() }
        let connection = try DmaBufConnection(path: daemon.path)
        _ = try connection.allocate(size: 4096)
        let input = try Pipe()  // open, silent
        let capture = CapturingConsole()
        let end = try Console.$current.withValue(capture.console) { try holdBuffer(7, connection: connection, input: input.read.descriptor.rawValue) }
        #expect(end == .freed)
        #expect(capture.stderr.contains("dmabufd: lease 1 on buffer 7 revoked, 100 ms to release\n"))
    }

    @Test func holdEndsOnASignal() throws {
        let buffer = try Pipe()
        let daemon = try FakeDaemon { _ in FakeReply(response: .buffer(Fixtures.buffer), fds: [buffer.read.descriptor]) }
        defer { daemon.stop() }
        let connection = try DmaBufConnection(path: daemon.path)
        _ = try connection.allocate(size: 4096)
        let input = try Pipe()
        // Block SIGTERM on this thread and send it to this thread only: it stays pending until holdBuffer
        // collects it, and no other thread of the test process can receive it.
        var set = sigset_t(), previous = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &set, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        pthread_kill(pthread_self(), SIGTERM)
        let end = try holdBuffer(7, connection: connection, input: input.read.descriptor.rawValue)
        #expect(end == .signal(SIGTERM))
    }

    @Test func holdEndsWithAnErrorWhenTheDaemonGoes() throws {
        let buffer = try Pipe()
        let daemon = try FakeDaemon { _ in FakeReply(response: .buffer(Fixtures.buffer), fds: [buffer.read.descriptor]) }
        let connection = try DmaBufConnection(path: daemon.path)
        _ = try connection.allocate(size: 4096)
        daemon.stop()  // closes its end of the connection
        let input = try Pipe()
        #expect(throws: DmaBufClientError.self) { try holdBuffer(7, connection: connection, input: input.read.descriptor.rawValue) }
    }

    @Test func onlyTerminalsPipesAndSocketsAreWatched() throws {
        let pipe = try Pipe()
        #expect(isWatchableInput(pipe.read.descriptor.rawValue))
        let null = open("/dev/null", O_RDONLY)
        defer { Glibc.close(null) }
        #expect(!isWatchableInput(null))
        #expect(!isWatchableInput(-1))
    }
}
