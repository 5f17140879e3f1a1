import ArgumentParser
import DmaBuf
import SystemPackage

// `dmabufctl selftest`: the checks of the kernel's dma-buf selftests (tools/testing/selftests/dmabuf-heaps,
// drivers/dma-buf), run against this machine's devices directly through the DmaBuf layer — no daemon.
// A missing device or missing permission is a SKIP with the reason; a kernel that answers wrongly is a FAIL.

/// A check's outcome.
public enum CheckStatus: String, Codable, Sendable, CaseIterable {
    case pass = "PASS", skip = "SKIP", fail = "FAIL"
}

/// One selftest line: `PASS dma-heap/system/alloc: 1 MiB, exporter system`.
public struct CheckResult: Codable, Sendable, Equatable, CustomStringConvertible {
    public var status: CheckStatus
    public var name: String
    public var detail: String

    public init(_ status: CheckStatus, _ name: String, _ detail: String) {
        self.status = status
        self.name = name
        self.detail = detail
    }

    public var description: String { "\(status.rawValue) \(name): \(detail)" }
}

/// Thrown by a check that cannot run here.
struct Skip: Error {
    var reason: String
}

/// Thrown by a check whose expectation failed.
struct CheckFailure: Error, CustomStringConvertible {
    var description: String
}

func expect(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw CheckFailure(description: message()) }
}

/// Expects `body` to fail with `errno`.
func expectFailure(_ errno: Errno, _ what: String, _ body: () throws -> Void) throws {
    do {
        try body()
    } catch let error as DmaBufError {
        try expect(error.errno == errno, "\(what): expected \(errno.name), got \(error)")
        return
    }
    throw CheckFailure(description: "\(what) succeeded; expected \(errno.name)")
}

/// The checks, in order. Each device's checks skip together when the device is absent or not accessible.
public struct Selftest {
    public var heapDirectory: String
    public var udmabufPath: String
    /// Bytes allocated from each heap.
    public var heapAllocation = 1 << 20

    public init(heapDirectory: String = DmaHeap.defaultDirectory, udmabufPath: String = UDmabuf.defaultDevicePath) {
        self.heapDirectory = heapDirectory
        self.udmabufPath = udmabufPath
    }

    /// Runs every check, calling `report` with each result as it comes, and returns them all.
    public func run(report: @escaping (CheckResult) -> Void = { _ in }) -> [CheckResult] {
        let runner = CheckRunner(report: report)

        let heaps = DmaHeap.available(in: heapDirectory)
        if heaps.isEmpty {
            runner.check("dma-heap") { throw Skip(reason: "no heaps in \(heapDirectory) (kernel lacks CONFIG_DMABUF_HEAPS_SYSTEM/CMA)") }
        }
        for name in heaps {
            do {
                let heap = try DmaHeap(named: name, directory: heapDirectory)
                heapChecks(heap, runner)
            } catch {
                runner.check("dma-heap/\(name)") { throw skipOrFail(error) }
            }
        }

        do {
            let device = try UDmabuf(devicePath: udmabufPath)
            udmabufChecks(device, runner)
        } catch {
            runner.check("udmabuf") { throw skipOrFail(error) }
        }

        dmaBufChecks(runner)
        return runner.results
    }

    func heapChecks(_ heap: borrowing DmaHeap, _ runner: CheckRunner) {
        let prefix = "dma-heap/\(heap.name)"
        let length = heapAllocation
        var buffer: DmaBuffer?
        runner.check(prefix + "/alloc") {
            let b = try heap.allocate(length: length)
            let size = try b.size()
            try expect(size >= length, "size \(size) is less than the \(length) bytes asked for")
            let info = try b.info()
            try expect(info.exporter != nil, "fdinfo names no exporter")
            buffer = b
            if runner.sample == nil { runner.sample = b }
            return "\(ByteCount(size)), exporter \(info.exporter ?? "?"), inode \(try b.inode())"
        }
        runner.check(prefix + "/map-sync") {
            guard let b = buffer else { throw Skip(reason: "no buffer (alloc failed)") }
            return try mapAndSync(b)
        }
        runner.check(prefix + "/zero-size") {
            try expectFailure(.invalidArgument, "allocating 0 bytes") { _ = try heap.allocate(length: 0) }
            return "a 0-byte allocation is refused with EINVAL"
        }
        runner.check(prefix + "/invalid-flags") {
            try expectFailure(.invalidArgument, "fd flags 0xffffffff") {
                _ = try heap.allocate(length: 4096, fdFlags: DmaHeap.FDFlags(rawValue: 0xFFFF_FFFF))
            }
            try expectFailure(.invalidArgument, "heap flags 0x1") {
                _ = try heap.allocate(length: 4096, heapFlags: DmaHeap.HeapFlags(rawValue: 1))
            }
            return "invalid fd flags and heap flags are refused with EINVAL"
        }
    }

    func udmabufChecks(_ device: borrowing UDmabuf, _ runner: CheckRunner) {
        let page = pageSize
        runner.check("udmabuf/create") {
            let memfd = try Memfd(name: "dmabufctl-selftest", size: 4 * page)
            let b = try device.create(memfd: memfd.fd.descriptor, offset: 0, size: UInt64(4 * page))
            let size = try b.size()
            try expect(size == 4 * page, "size \(size), expected \(4 * page)")
            let exporter = try b.info().exporter
            try expect(exporter == "udmabuf", "exporter \(exporter ?? "none"), expected udmabuf")
            if runner.sample == nil { runner.sample = b }
            return "\(ByteCount(size)) from a sealed memfd, exporter udmabuf"
        }
        runner.check("udmabuf/coherence") {
            let memfd = try Memfd(name: "dmabufctl-selftest", size: 4 * page)
            let b = try device.create(memfd: memfd.fd.descriptor, offset: 0, size: UInt64(4 * page))
            let fileMapping = try memfd.map(length: 4 * page)
            fill(fileMapping.bytes, seed: 0x5A)
            try b.withMappedCPUAccess(.read) { bytes in
                try expect(matches(bytes, seed: 0x5A), "bytes written through the memfd differ in the dma-buf")
            }
            try b.withMappedCPUAccess(.readWrite) { fill($0, seed: 0xC3) }
            try expect(matches(fileMapping.bytes, seed: 0xC3), "bytes written through the dma-buf differ in the memfd")
            return "memfd and dma-buf mappings see each other's writes"
        }
        runner.check("udmabuf/create-list") {
            let memfd = try Memfd(name: "dmabufctl-selftest", size: 4 * page)
            let fileMapping = try memfd.map(length: 4 * page)
            for i in 0..<4 { fileMapping.bytes[i * page] = UInt8(0x10 + i) }
            let b = try device.create(list: [
                .init(memfd: memfd.fd.descriptor, offset: 0, size: UInt64(page)),
                .init(memfd: memfd.fd.descriptor, offset: UInt64(2 * page), size: UInt64(page)),
            ])
            let size = try b.size()
            try expect(size == 2 * page, "size \(size), expected \(2 * page)")
            try b.withMappedCPUAccess(.read) { bytes in
                try expect(bytes[0] == 0x10 && bytes[page] == 0x12, "pages are not memfd pages 0 and 2 in order")
            }
            return "2 ranges of one memfd make a \(ByteCount(size)) buffer in order"
        }
        runner.check("udmabuf/requires-seal-shrink") {
            let memfd = try Memfd(name: "dmabufctl-selftest", size: page, seals: [])
            try expectFailure(.invalidArgument, "a udmabuf over an unsealed memfd") {
                _ = try device.create(memfd: memfd.fd.descriptor, offset: 0, size: UInt64(page))
            }
            return "a memfd without F_SEAL_SHRINK is refused with EINVAL"
        }
    }

    /// dma-buf ioctls, on whichever buffer the heap or udmabuf checks made.
    func dmaBufChecks(_ runner: CheckRunner) {
        let none = Skip(reason: "no dma-buf could be made here (no accessible heap or udmabuf)")
        let sample = runner.sample
        runner.check("dma-buf/set-name") {
            guard let b = sample else { throw none }
            let name = "dmabufctl-selftest"
            try b.setName(name)
            let seen = try b.info().name
            try expect(seen == name, "fdinfo name is \(seen.map { "'\($0)'" } ?? "absent"), expected '\(name)'")
            return "DMA_BUF_SET_NAME shows in fdinfo"
        }
        var exported: SyncFile?
        runner.check("dma-buf/export-sync-file") {
            guard let b = sample else { throw none }
            let file: SyncFile
            do {
                file = try b.exportSyncFile(.write)
            } catch let error as DmaBufError where error.errno == .inappropriateIOCTLForDevice {
                throw Skip(reason: "kernel lacks DMA_BUF_IOCTL_EXPORT_SYNC_FILE (Linux 6.0+)")
            }
            try expect(try file.isSignaled(), "an idle buffer's exported fence is not signalled")
            let status = try file.status()
            try expect(status == .signaled, "SYNC_IOC_FILE_INFO status \(status), expected signaled")
            exported = file
            return "an idle buffer exports a signalled sync_file"
        }
        runner.check("dma-buf/import-sync-file") {
            guard let b = sample, let file = exported else { throw Skip(reason: "no exported sync_file") }
            try b.importSyncFile(file, access: .read)
            let again = try b.exportSyncFile(.write)
            try expect(try again.isSignaled(), "after importing a signalled fence, the buffer is not idle")
            return "a signalled sync_file imports as a read fence"
        }
        runner.check("sync_file/merge") {
            guard let b = sample, let first = exported else { throw Skip(reason: "no exported sync_file") }
            let merged = try first.merge(try b.exportSyncFile(.read))
            try expect(try merged.isSignaled(), "merging signalled fences gave an unsignalled one")
            return "SYNC_IOC_MERGE of signalled fences is signalled"
        }
    }
}

/// Runs checks one at a time and keeps their results.
final class CheckRunner {
    private(set) var results: [CheckResult] = []
    /// A buffer for the dma-buf checks: the first one a heap or udmabuf check made.
    var sample: DmaBuffer?
    private let report: (CheckResult) -> Void

    init(report: @escaping (CheckResult) -> Void) { self.report = report }

    func check(_ name: String, _ body: () throws -> String) {
        let result: CheckResult
        do {
            result = CheckResult(.pass, name, try body())
        } catch let skip as Skip {
            result = CheckResult(.skip, name, skip.reason)
        } catch {
            result = CheckResult(.fail, name, "\(error)")
        }
        results.append(result)
        report(result)
    }
}

/// EACCES/EPERM/ENOENT/ENODEV mean "cannot run here": SKIP with the reason. Anything else is a FAIL.
func skipOrFail(_ error: any Error) -> any Error {
    guard let error = error as? DmaBufError, let errno = error.errno else { return error }
    switch errno {
    case .permissionDenied, .notPermitted:
        return Skip(reason: "\(error.cause) (\(errno.name)); run as root")
    case .noSuchFileOrDirectory, .operationNotSupportedByDevice:
        return Skip(reason: "\(error.cause) (\(errno.name))" + (error.fix.map { "; \($0)" } ?? ""))
    default:
        return error
    }
}

/// Maps `buffer`, writes a pattern between SYNC_START/END for write, reads it back between START/END for read.
func mapAndSync(_ buffer: DmaBuffer) throws -> String {
    let size = try buffer.size()
    try buffer.withMappedCPUAccess(.write) { fill($0, seed: 0xA5) }
    try buffer.withMappedCPUAccess(.read) { bytes in
        try expect(matches(bytes, seed: 0xA5), "bytes read back differ from those written")
    }
    try expectFailure(.invalidArgument, "DMA_BUF_IOCTL_SYNC without a direction") { try buffer.sync(DmaBuffer.SyncFlags(rawValue: 0)) }
    return "wrote and read back \(ByteCount(size)) between DMA_BUF_IOCTL_SYNC START/END; invalid sync flags refused"
}

func fill(_ bytes: UnsafeMutableRawBufferPointer, seed: UInt8) {
    for i in 0..<bytes.count { bytes[i] = seed &+ UInt8(truncatingIfNeeded: i / 4096) }
}

func matches(_ bytes: UnsafeMutableRawBufferPointer, seed: UInt8) -> Bool {
    for i in 0..<bytes.count where bytes[i] != seed &+ UInt8(truncatingIfNeeded: i / 4096) { return false }
    return true
}

public struct SelftestCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "selftest",
        abstract: "Check this machine's dma-buf devices directly, without the daemon.",
        discussion: """
            Runs the kernel dma-buf selftests' checks through dmabufd's own kernel layer: for each dma-heap, \
            allocation, mapping with DMA_BUF_IOCTL_SYNC, and refusal of a zero size and invalid flags; udmabuf \
            creation from a sealed memfd (single and list), coherence with the memfd, and refusal of an \
            unsealed one; DMA_BUF_SET_NAME; sync_file export, import and merge. One line per check: \
            `PASS|SKIP|FAIL name: detail`. Devices are root-only by default, so unprivileged runs mostly SKIP.

            Exits 0 when no check failed, 4 when one did.

            EXAMPLES:
              sudo dmabufctl selftest
              sudo dmabufctl selftest | grep -v ^PASS
            """)

    @Option(help: .hidden)
    public var heapDirectory = DmaHeap.defaultDirectory

    @Option(help: .hidden)
    public var udmabufDevice = UDmabuf.defaultDevicePath

    public init() {}

    public func run() throws {
        let console = Console.current
        let results = Selftest(heapDirectory: heapDirectory, udmabufPath: udmabufDevice).run { console.out($0.description) }
        let failed = results.filter { $0.status == .fail }.count
        let passed = results.filter { $0.status == .pass }.count
        console.out("selftest: \(passed) passed, \(failed) failed, \(results.count - passed - failed) skipped")
        if failed > 0 { throw ExitStatus.selftestFailed.exitCode }
    }
}
