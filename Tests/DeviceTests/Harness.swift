// A small harness for tests that need real devices. It runs each test in order in this process (tests that
// need a second process spawn this binary again with `--child ROLE`), prints one line per test, and ends
// with `device: N passed, M failed, K skipped`.
//
// Missing devices: outside the VM a test whose requirement is absent is skipped with the reason; inside
// the VM (DMABUFD_IN_VM=1, set by scripts/vm) the same absence is a failure, because there the devices
// must exist and a skip would hide a broken setup.
//
// Kernel features that only some test kernels have (sw_sync, the CMA heap) are different: a test that needs
// one is "not applicable" on a kernel without it, printed as `N/A name: reason` and counted apart. So that
// this never hides a broken setup, the VM names its kernel (DMABUFD_VM_KERNEL, set by scripts/vm) and the
// harness knows which features each test kernel has (`KernelFeature.expected`): a feature that kernel must
// have and lacks is a failure, like a missing device.
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Something a device test needs from the machine.
enum Requirement: Hashable, Sendable, CustomStringConvertible {
    /// `/dev/dma_heap/<name>`
    case heap(String)
    /// `/dev/udmabuf`
    case udmabuf
    /// A vgem DRM node (the harness runs `modprobe vgem` once if none is present).
    case vgem
    /// Running as root (CAP_SYS_ADMIN for pagemap PFNs, setting nr_hugepages).
    case root
    /// At least this many free 2 MiB huge pages (the harness tries to reserve them as root).
    case hugePages(Int)
    /// A fence source the test controls: sw_sync where the kernel has it, else vgem (see `TestFence`).
    case fence
    /// A kernel feature only some test kernels have (not applicable elsewhere, see above).
    case kernel(KernelFeature)
    /// sw_sync timelines (`/sys/kernel/debug/sync/sw_sync`, CONFIG_SW_SYNC).
    static let swSync = Requirement.kernel(.swSync)
    /// The CMA dma-buf heap (CONFIG_DMABUF_HEAPS_CMA with a CMA region).
    static let cmaHeap = Requirement.kernel(.cmaHeap)
    /// vgem as a loadable module (=m), so a test can unload and load it.
    static let vgemModule = Requirement.kernel(.vgemModule)

    var description: String {
        switch self {
        case .heap(let name): "/dev/dma_heap/\(name)"
        case .udmabuf: "/dev/udmabuf"
        case .vgem: "a vgem DRM device"
        case .root: "root"
        case .hugePages(let n): "\(n) free huge pages"
        case .kernel(let feature): feature.description
        case .fence: "sw_sync or a vgem DRM device"
        }
    }

    var hasSideEffects: Bool {
        switch self {
        case .vgem, .hugePages, .fence: true
        default: false
        }
    }

    /// Nil when met, else why not.
    func unmetReason() -> String? {
        switch self {
        case .heap(let name):
            return access(DmaHeap.defaultDirectory + "/" + name, R_OK) == 0 ? nil : "no \(description) (kernel lacks CONFIG_DMABUF_HEAPS_SYSTEM or no access)"
        case .udmabuf:
            return access(UDmabuf.defaultDevicePath, R_OK | W_OK) == 0 ? nil : "no /dev/udmabuf (kernel lacks CONFIG_UDMABUF or no access)"
        case .vgem:
            if DRMDevice.nodes(driver: "vgem").isEmpty { Harness.loadVgemOnce() }
            return DRMDevice.nodes(driver: "vgem").isEmpty ? "no vgem DRM node (modprobe vgem failed; CONFIG_DRM_VGEM?)" : nil
        case .root:
            return geteuid() == 0 ? nil : "not running as root"
        case .hugePages(let n):
            if Harness.freeHugePages() < n && geteuid() == 0 {
                let total = Harness.readNumber("/proc/sys/vm/nr_hugepages") ?? 0
                Harness.writeFile("/proc/sys/vm/nr_hugepages", "\(total + n)\n")
            }
            let free = Harness.freeHugePages()
            return free >= n ? nil : "only \(free) free huge pages, need \(n) (echo N > /proc/sys/vm/nr_hugepages)"
        case .kernel(let feature):
            return feature.isPresent ? nil : "this kernel lacks \(feature)"
        case .fence:
            return TestFence.exact ? nil : Requirement.vgem.unmetReason().map { "no sw_sync and \($0)" }
        }
    }
}

/// Kernel features that decide which tests apply on which test kernel.
enum KernelFeature: String, Hashable, Sendable, CustomStringConvertible, CaseIterable {
    case swSync = "sw_sync"
    case cmaHeap = "the CMA heap"
    case vgemModule = "vgem as a loadable module"
    case heapMemcg = "heap memory cgroup charging (dma_heap.mem_accounting=1)"

    var description: String { rawValue }

    /// Read from the running kernel, never from its name.
    var isPresent: Bool {
        switch self {
        case .swSync: SwSyncTimeline.isAvailable()
        case .cmaHeap: !CMAFacts.heapNames().isEmpty
        case .vgemModule: Harness.moduleExists("vgem")
        case .heapMemcg: Harness.readFile("/sys/module/dma_heap/parameters/mem_accounting")?.hasPrefix("Y") ?? false
        }
    }

    /// What each of scripts/vm's kernels has; nil outside the VM or for a kernel the harness does not know
    /// (then a lacking feature is a failure in the VM, as for devices).
    static var expected: Set<KernelFeature>? {
        switch Harness.vmKernel {
        case "6.12": [.vgemModule]
        case "7.3": [.vgemModule, .heapMemcg]
        case "7.3-cma": [.swSync, .cmaHeap, .heapMemcg]
        default: nil
        }
    }
}

/// A failed expectation inside a test.
struct TestFailure: Error, CustomStringConvertible {
    var description: String
}

struct DeviceTest: Sendable {
    var name: String
    var requires: [Requirement]
    var body: @Sendable () throws -> Void

    init(_ name: String, requires: [Requirement] = [], _ body: @escaping @Sendable () throws -> Void) {
        self.name = name
        self.requires = requires
        self.body = body
    }
}

enum Harness {
    static let inVM = getenv("DMABUFD_IN_VM").map { String(cString: $0) == "1" } ?? false
    /// scripts/vm's name for the kernel the VM booted (6.12, 7.3, 7.3-cma); empty outside the VM.
    static let vmKernel = getenv("DMABUFD_VM_KERNEL").map { String(cString: $0) } ?? ""
    nonisolated(unsafe) static var vgemTried = false  // the harness is single-threaded

    static func loadVgemOnce() {
        guard !vgemTried, geteuid() == 0 else { return }
        vgemTried = true
        _ = run(["/sbin/modprobe", "vgem"])
        // udev may be absent in the VM: give devtmpfs a moment to show the node.
        for _ in 0..<50 where DRMDevice.nodes(driver: "vgem").isEmpty { usleep(20_000) }
    }

    static func readFile(_ path: String) -> String? {
        guard let fd = try? FileDescriptor.open(path, .readOnly, options: [.closeOnExec]) else { return nil }
        defer { try? fd.close() }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while let n = try? chunk.withUnsafeMutableBytes({ try fd.read(into: $0) }), n > 0 { bytes += chunk[0..<n] }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// True when this kernel's modules.dep lists `name`.ko (built-in drivers and module-less kernels: false).
    static func moduleExists(_ name: String) -> Bool {
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let dep = readFile("/lib/modules/\(release)/modules.dep") ?? ""
        return dep.split(separator: "\n").contains { $0.hasPrefix("kernel/") && $0.contains("/\(name).ko") }
    }

    static func readNumber(_ path: String) -> Int? {
        readFile(path).flatMap { Int($0.trimmingCharacters(in: " \n")) }
    }

    @discardableResult
    static func writeFile(_ path: String, _ text: String) -> Bool {
        guard let fd = try? FileDescriptor.open(path, .writeOnly, options: [.closeOnExec, .truncate]) else { return false }
        defer { try? fd.close() }
        return (try? fd.writeAll(Array(text.utf8))) != nil
    }

    static func freeHugePages() -> Int {
        guard let text = readFile("/proc/meminfo") else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("HugePages_Free:") {
            return Int(String(line.dropFirst("HugePages_Free:".count)).trimmingCharacters(in: " ")) ?? 0
        }
        return 0
    }

    /// Writes a line straight to fd 1: no stdio buffer to lose when a child is spawned or killed.
    static func say(_ line: String) {
        _ = try? FileDescriptor.standardOutput.writeAll(Array((line + "\n").utf8))
    }

    /// Writes a line straight to fd 2.
    static func warn(_ line: String) {
        _ = try? FileDescriptor.standardError.writeAll(Array((line + "\n").utf8))
    }

    /// Runs a program and waits; returns its exit status (-1 if it could not start).
    @discardableResult
    static func run(_ argv: [String]) -> Int32 {
        guard let pid = try? spawn(argv) else { return -1 }
        return wait(pid)
    }

    /// Starts a program with `fds` dup'ed to descriptors 3, 4, ... in the child.
    static func spawn(_ argv: [String], fds: [FileDescriptor] = [], environment: [String: String] = [:]) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (i, fd) in fds.enumerated() {
            posix_spawn_file_actions_adddup2(&actions, fd.rawValue, CInt(3 + i))
        }
        var env = ProcessEnvironment.current
        for (k, v) in environment { env[k] = v }
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { cArgs.forEach { free($0) }; cEnv.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, nil, cArgs, cEnv)
        if rc != 0 { throw TestFailure(description: "posix_spawn \(argv[0]) failed: \(Errno(rawValue: rc).name)") }
        return pid
    }

    /// Waits for a child; returns its exit code, or 128+signal.
    static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1 && errno == EINTR {}
        if status & 0x7f == 0 { return (status >> 8) & 0xff }
        return 128 + (status & 0x7f)
    }

    /// This test binary's own path, to spawn it again as a child.
    static var executablePath: String {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, 4095)
        return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    }

    /// The directory holding this binary and its siblings (`dmabufd`, `dmabufctl`).
    static var binDirectory: String {
        let path = executablePath
        return String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
    }

    /// The kernel feature that makes `test` not applicable here: one it needs, this kernel lacks, and (in the
    /// VM) this test kernel is not meant to have. Nil when the test should run (or fail for a broken setup).
    static func notApplicable(_ test: DeviceTest) -> KernelFeature? {
        for case .kernel(let feature) in test.requires where !feature.isPresent {
            let mustHave = inVM && (KernelFeature.expected?.contains(feature) ?? true)
            if !mustHave { return feature }
        }
        return nil
    }

    /// Runs the suite and returns the process exit code.
    static func main(tests: [DeviceTest], filter: [String]) -> Int32 {
        var passed = 0, failed = 0, skipped = 0, notApplicableCount = 0
        var lacking: Set<KernelFeature> = []
        say("device tests: \(tests.count) registered; \(inVM ? "inside the VM (kernel \(vmKernel.isEmpty ? "?" : vmKernel)): missing devices fail" : "on this host: missing devices skip")")
        // A filter is a name prefix to run; one starting with "-" excludes that prefix (scripts/test runs the
        // long fault and load tests on one kernel only).
        let include = filter.filter { !$0.hasPrefix("-") }, exclude = filter.filter { $0.hasPrefix("-") }.map { String($0.dropFirst()) }
        for test in tests where (include.isEmpty || include.contains(where: { test.name.hasPrefix($0) }))
            && !exclude.contains(where: { test.name.hasPrefix($0) }) {
            if let feature = notApplicable(test) {
                notApplicableCount += 1
                lacking.insert(feature)
                say("N/A \(test.name): this kernel lacks \(feature)")
                continue
            }
            // Requirements with side effects (loading vgem, reserving huge pages) are checked last, so a
            // host that lacks the devices is never changed by a test that would skip anyway.
            let ordered = test.requires.filter { !$0.hasSideEffects } + test.requires.filter(\.hasSideEffects)
            if let reason = ordered.lazy.compactMap({ $0.unmetReason() }).first {
                if inVM {
                    failed += 1
                    say("FAIL \(test.name): required device missing in the VM: \(reason)")
                } else {
                    skipped += 1
                    say("SKIP \(test.name): \(reason)")
                }
                continue
            }
            let start = ContinuousClock.now
            do {
                try test.body()
                passed += 1
                say("PASS \(test.name) (\(ContinuousClock.now - start))")
            } catch {
                failed += 1
                say("FAIL \(test.name): \(error)")
            }
        }
        let lacks = lacking.map(\.description).sorted().joined(separator: ", ")
        say("device: \(passed) passed, \(failed) failed, \(skipped) skipped, \(notApplicableCount) not applicable\(lacks.isEmpty ? "" : " (kernel lacks \(lacks))")")
        return failed == 0 ? 0 : 1
    }
}

// MARK: - Expectations

func expect(_ condition: Bool, _ message: @autoclosure () -> String, file: StaticString = #fileID, line: UInt = #line) throws {
    if !condition { throw TestFailure(description: "\(message()) [\(file):\(line)]") }
}

func expectEqual<T: Equatable>(_ a: T, _ b: T, _ what: String = "", file: StaticString = #fileID, line: UInt = #line) throws {
    if a != b { throw TestFailure(description: "\(what.isEmpty ? "" : what + ": ")expected \(b), got \(a) [\(file):\(line)]") }
}

/// Expects `body` to throw a ``DmaBufError`` with `errno` whose text contains every string in `message`.
@discardableResult
func expectError<T>(
    _ errno: Errno, _ message: String..., file: StaticString = #fileID, line: UInt = #line, _ body: () throws -> T
) throws -> DmaBufError {
    do {
        _ = try body()
    } catch let error as DmaBufError {
        guard error.errno == errno else {
            throw TestFailure(description: "expected \(errno.name), got: \(error) [\(file):\(line)]")
        }
        for part in message where !error.description.contains(part) {
            throw TestFailure(description: "error text lacks '\(part)': \(error) [\(file):\(line)]")
        }
        return error
    }
    throw TestFailure(description: "expected \(errno.name), but it succeeded [\(file):\(line)]")
}

enum ProcessEnvironment {
    static var current: [String: String] {
        var result: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let text = String(validatingCString: entry) ?? ""
            if let eq = text.firstIndex(of: "=") {
                result[String(text[..<eq])] = String(text[text.index(after: eq)...])
            }
            p += 1
        }
        return result
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

/// Unwraps `value`, failing the test with `what` when it is nil.
func expectSome<T>(_ value: T?, _ what: String, file: StaticString = #fileID, line: UInt = #line) throws -> T {
    guard let value else { throw TestFailure(description: "\(what): got nothing [\(file):\(line)]") }
    return value
}
