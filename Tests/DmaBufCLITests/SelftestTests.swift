import DmaBufCLI
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("selftest")
struct SelftestTests {
    /// A scratch directory for fake heap directories.
    func scratch() throws -> String {
        var template = Array("/tmp/dmabufctl-selftest-XXXXXX".utf8CString)
        let path = try #require(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) })
        return String(cString: path)
    }

    @Test func lineFormat() {
        #expect(CheckResult(.pass, "dma-heap/system/alloc", "1 MiB").description == "PASS dma-heap/system/alloc: 1 MiB")
        #expect(CheckResult(.skip, "udmabuf", "no device").description == "SKIP udmabuf: no device")
        #expect(CheckResult(.fail, "x", "y").description == "FAIL x: y")
    }

    @Test func missingDevicesSkipWithReasons() throws {
        let empty = try scratch()
        defer { rmdir(empty) }
        let results = Selftest(heapDirectory: empty, udmabufPath: empty + "/udmabuf").run()
        #expect(results.map(\.name) == ["dma-heap", "udmabuf", "dma-buf/set-name", "dma-buf/export-sync-file", "dma-buf/import-sync-file", "sync_file/merge"])
        #expect(results.allSatisfy { $0.status == .skip })
        #expect(results[0].detail.contains("no heaps in \(empty)"))
        #expect(results[1].detail.contains("ENOENT"))
    }

    @Test func commandExitsZeroWhenNothingFails() throws {
        let empty = try scratch()
        defer { rmdir(empty) }
        let result = run(["selftest", "--heap-directory", empty, "--udmabuf-device", empty + "/none"])
        #expect(result.status == 0)
        let lines = result.stdout.split(separator: "\n")
        #expect(lines.first?.hasPrefix("SKIP dma-heap: ") == true)
        #expect(lines.last == "selftest: 0 passed, 0 failed, 6 skipped")
        #expect(lines.dropLast().allSatisfy { $0.hasPrefix("PASS ") || $0.hasPrefix("SKIP ") || $0.hasPrefix("FAIL ") })
    }

    @Test func aHeapThatIsNotAHeapFailsAndExitsFour() throws {
        // A regular file where a heap device should be: it opens, and DMA_HEAP_IOCTL_ALLOC fails (ENOTTY).
        let directory = try scratch()
        let fake = directory + "/system"
        _ = FileManager.default.createFile(atPath: fake, contents: Data())
        defer { unlink(fake); rmdir(directory) }
        let result = run(["selftest", "--heap-directory", directory, "--udmabuf-device", directory + "/none"])
        #expect(result.status == ExitStatus.selftestFailed.rawValue)
        #expect(result.stdout.contains("FAIL dma-heap/system/alloc: dma-heap 'system': "))
        #expect(result.stdout.contains("SKIP dma-heap/system/map-sync: no buffer (alloc failed)"))
        #expect(result.stdout.contains(" failed, "))
    }

    @Test func thisMachineHasNoFailures() {
        // Whatever devices this machine has: a FAIL means the kernel or the DmaBuf layer misbehaves.
        let results = Selftest().run()
        #expect(!results.isEmpty)
        for result in results where result.status == .fail {
            Issue.record("\(result)")
        }
    }
}
