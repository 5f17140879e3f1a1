import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

private let system: [Requirement] = [.heap("system"), .root]

/// Runs the real `dmabufctl` (next to this binary) against `daemon` and returns its exit status and output.
func dmabufctl(_ daemon: TestDaemon?, _ arguments: String...) throws -> (status: Int32, out: String, err: String) {
    TestDaemon.counter += 1
    let base = "/tmp/dmabufctl-\(getpid())-\(TestDaemon.counter)"
    let out = try FileDescriptor.open(base + ".out", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
    let err = try FileDescriptor.open(base + ".err", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
    let socket = daemon.map { ["--socket", $0.socketPath] } ?? []
    let pid = try Harness.spawn([Harness.binDirectory + "/dmabufctl"] + arguments + socket, stdout: out, stderr: err)
    try? out.close()
    try? err.close()
    let status = Harness.wait(pid)
    return (status, Harness.readFile(base + ".out") ?? "", Harness.readFile(base + ".err") ?? "")
}

func expectOK(_ result: (status: Int32, out: String, err: String), _ parts: String..., file: StaticString = #fileID, line: UInt = #line) throws {
    try expect(result.status == 0, "exit \(result.status), stderr: \(result.err)", file: file, line: line)
    for part in parts where !result.out.contains(part) {
        throw TestFailure(description: "output lacks '\(part)':\n\(result.out) [\(file):\(line)]")
    }
}

/// dmabufctl against a real daemon on real devices: the same binary users run.
enum CLITests {
    static let all: [DeviceTest] = [
        DeviceTest("cli.heaps-text-and-json", requires: system + [.udmabuf]) {
            try withDaemon { daemon in
                try expectOK(try dmabufctl(daemon, "heaps"), "HEAP", "system", "udmabuf", "any")
                try expectOK(try dmabufctl(daemon, "heaps", "--format", "json"), "\"name\" : \"system\"")
            }
        },
        DeviceTest("cli.alloc-hold-ls-info-ranges", requires: system) {
            try withDaemon { daemon in
                let out = try FileDescriptor.open(daemon.directory + "/hold.out", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
                let hold = try Harness.spawn([Harness.binDirectory + "/dmabufctl", "alloc", "2M", "--tag", "held", "--hold", "--socket", daemon.socketPath],
                                             stdout: out, stderr: out)
                try? out.close()
                defer { kill(hold, SIGKILL); _ = Harness.wait(hold) }
                let root = try daemon.connect()
                try eventually(.seconds(20), "dmabufctl alloc --hold to allocate") { try root.list(all: true).contains { $0.tag == "held" } }
                let id = try root.list(all: true).first { $0.tag == "held" }!.id
                try expectOK(try dmabufctl(daemon, "ls", "--all"), "held", "2 MiB")
                try expectOK(try dmabufctl(daemon, "info", String(id), "--format", "json"), "\"size\" : 2097152")
                try expectOK(try dmabufctl(daemon, "ranges", String(id)), "512", "lease")
                kill(hold, SIGTERM)
                try expectEqual(Harness.wait(hold), 0, "alloc --hold exit status after SIGTERM")
                try eventually(.seconds(5), "the held buffer to be released") { !(try root.list(all: true).contains { $0.tag == "held" }) }
            }
        },
        DeviceTest("cli.ranges-physical-udmabuf", requires: [.udmabuf, .root]) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.createUDmabuf(size: 1 << 20)
                try expectOK(try dmabufctl(daemon, "ranges", String(buffer.info.id), "--physical"), "physical")
                try expectOK(try dmabufctl(daemon, "ranges", String(buffer.info.id), "--format", "json"), "\"kind\"")
            }
        },
        DeviceTest("cli.stats-text-json-openmetrics", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                _ = try owner.allocate(size: 1 << 20, heap: "system")
                try expectOK(try dmabufctl(daemon, "stats"), "1 MiB")
                try expectOK(try dmabufctl(daemon, "stats", "--format", "json"), "\"bytes\" : 1048576")
                try expectOK(try dmabufctl(daemon, "stats", "--format", "openmetrics"), "# TYPE dmabufd_", "# EOF")
            }
        },
        DeviceTest("cli.revoke", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.allocate(size: 4096, heap: "system")
                let holder = try daemon.connect()
                let layout = try holder.layout(buffer.info.id)
                try expectOK(try dmabufctl(daemon, "revoke", String(buffer.info.id), "--deadline", "100ms"))
                guard let event = try holder.nextEvent(timeout: .seconds(10)), case .leaseRevoked(let lease, _, _) = event, lease == layout.lease else {
                    throw TestFailure(description: "the lease holder was not told of the revocation")
                }
            }
        },
        DeviceTest("cli.refusal-exits-1-with-errno", requires: system) {
            try withDaemon { daemon in
                let result = try dmabufctl(daemon, "info", "999")
                try expectEqual(result.status, 1, "exit status")
                try expect(result.err.contains("ENOENT"), "stderr names the errno: \(result.err)")
            }
        },
        DeviceTest("cli.unreachable-daemon-exits-3", requires: system) {
            let result = try dmabufctl(nil, "heaps", "--socket", "/tmp/no-such-dmabufd.sock")
            try expectEqual(result.status, 3, "exit status")
            try expect(result.err.contains("cannot connect"), "stderr says why: \(result.err)")
        },
        DeviceTest("cli.selftest-on-real-devices", requires: system + [.udmabuf]) {
            let result = try dmabufctl(nil, "selftest")
            try expectOK(result, "PASS dma-heap/system/alloc", "0 failed")
            try expect(!result.out.contains("SKIP"), "nothing skipped on real devices:\n\(result.out)")
        },
        DeviceTest("cli.dump-shows-holders", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.allocate(size: 1 << 20, heap: "system", tag: "dumped")
                try expectOK(try dmabufctl(nil, "dump"), buffer.info.name)
            }
        },
    ]
}
