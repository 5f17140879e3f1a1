import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

// libdmabufd and its drop-in on real devices. The harness writes small C programs (below), compiles them
// with `cc`, builds libdmabufd from libdmabufd/ into /tmp, makes the heap and udmabuf nodes root-only
// (0600), and runs the programs as uid 65534:
//  - opened directly, the nodes refuse with EACCES;
//  - under dmabufd-run the raw-uAPI programs allocate, map, write and read back, dup, fork and exec, and
//    print one line per error case; that transcript must equal the one the same program prints as root
//    against the kernel itself, so every errno is the kernel's;
//  - a libdmabufd client built with `pkg-config --cflags --libs dmabufd` against a `make install DESTDIR=`
//    tree runs a full round trip (a second process fetches and reads the buffer back).

private let needs: [Requirement] = [.heap("system"), .udmabuf, .root]

/// Built once per run: the library, the install tree and the programs, under /tmp (the checkout may be
/// read-only in the VM).
private final class CLibBuild: @unchecked Sendable {
    let directory: String
    let library: String
    let installRoot: String
    private(set) var programs: [String: String] = [:]

    init() throws {
        directory = "/tmp/clib-device-\(getpid())"
        library = directory + "/lib"
        installRoot = directory + "/root"
        _ = mkdir(directory, 0o755)
        _ = chmod(directory, 0o755)
        guard let repository = CLibBuild.repository() else { throw TestFailure(description: "libdmabufd/Makefile not found above \(Harness.binDirectory)") }
        try shell("make -s -j2 -C '\(repository)/libdmabufd' B='\(library)' all install PREFIX=/opt/dmabufd DESTDIR='\(installRoot)'", "build libdmabufd")
        // Clients of the installed library are built the way users build them: pkg-config against the tree.
        let linked = "$(PKG_CONFIG_SYSROOT_DIR='\(installRoot)' PKG_CONFIG_LIBDIR='\(installRoot)/opt/dmabufd/lib/pkgconfig' pkg-config --cflags --libs dmabufd) -Wl,-rpath,'\(installRoot)/opt/dmabufd/lib'"
        // The C side of the allocation-cost figure is scripts/bench's row L1 program.
        let sources = clibPrograms.map { name, source in
            Harness.writeFileCreating(directory + "/\(name).c", source)
            return (name, directory + "/\(name).c", name == "client_roundtrip" ? linked : "")
        } + [("bench_alloc", repository + "/Benchmarks/clib_alloc.c", linked)]
        for (name, file, flags) in sources {
            try shell("cc -O1 -o '\(directory)/\(name)' '\(file)' \(flags)", "compile \(name)")
            programs[name] = directory + "/" + name
        }
        _ = chmod(library, 0o755)
    }

    nonisolated(unsafe) static var shared: Result<CLibBuild, Error>?
    static func get() throws -> CLibBuild {
        if shared == nil { shared = Result { try CLibBuild() } }
        return try shared!.get()
    }

    /// The checkout: the first directory above this binary with libdmabufd/Makefile.
    static func repository() -> String? {
        var path = Harness.binDirectory
        while path.count > 1 {
            if access(path + "/libdmabufd/Makefile", R_OK) == 0 { return path }
            path = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
            if path.isEmpty { break }
        }
        return nil
    }

    var dropIn: String { installRoot + "/opt/dmabufd/bin/dmabufd-run" }
    var preload: String { installRoot + "/opt/dmabufd/lib/libdmabufd-preload.so" }
}

/// Runs `command` with /bin/sh; returns its exit status and its output (stdout and stderr).
@discardableResult
private func shell(_ command: String, _ what: String, expect status: Int32? = 0) throws -> (status: Int32, output: String) {
    let out = "/tmp/clib-shell-\(getpid()).out"
    let rc = Harness.run(["/bin/sh", "-c", "(\(command)) > '\(out)' 2>&1"])
    let text = Harness.readFile(out) ?? ""
    unlink(out)
    if let status, rc != status {
        throw TestFailure(description: "\(what): exit \(rc), expected \(status):\n\(text.suffix(3000))")
    }
    return (rc, text)
}

/// Makes the heap and udmabuf nodes root-only for `body`, then restores their modes.
private func withRootOnlyNodes(_ body: () throws -> Void) throws {
    let nodes = [DmaHeap.defaultDirectory + "/system", UDmabuf.defaultDevicePath]
    try withNodeModes(nodes, mode: 0o600, body)
}

/// Gives `nodes` owner root:root and `mode` while `body` runs, then puts back owner, group and mode.
private func withNodeModes(_ nodes: [String], mode: mode_t, _ body: () throws -> Void) throws {
    var saved: [String: stat] = [:]
    defer { for (node, st) in saved { _ = chown(node, st.st_uid, st.st_gid); _ = chmod(node, st.st_mode & 0o7777) } }
    for node in nodes {
        var st = stat()
        guard stat(node, &st) == 0 else { throw TestFailure(description: "\(node) is missing") }
        saved[node] = st
        guard chown(node, 0, 0) == 0, chmod(node, mode) == 0 else { throw TestFailure(description: "chmod \(String(mode, radix: 8)) \(node) failed") }
    }
    try body()
}

/// The first line where two transcripts differ, or nil.
private func firstDifference(_ kernel: String, _ dropIn: String) -> String? {
    let a = kernel.split(separator: "\n", omittingEmptySubsequences: false), b = dropIn.split(separator: "\n", omittingEmptySubsequences: false)
    for i in 0..<max(a.count, b.count) {
        let x = i < a.count ? String(a[i]) : "<end>", y = i < b.count ? String(b[i]) : "<end>"
        if x != y { return "line \(i + 1): kernel '\(x)', drop-in '\(y)'" }
    }
    return nil
}

/// Runs `program` as root against the kernel, then as uid 65534 under dmabufd-run against `daemon`, and
/// expects identical transcripts.
private func compareWithKernel(_ build: CLibBuild, _ program: String, _ daemon: TestDaemon) throws -> String {
    let path = build.programs[program]!
    let kernel = try shell("'\(path)'", "\(program) as root against the kernel").output
    let env = "DMABUFD_SOCKET='\(daemon.socketPath)' DMABUFD_PRELOAD='\(build.preload)'"
    let dropIn = try shell("\(env) '\(build.programs["runas"]!)' 65534 '\(build.dropIn)' '\(path)'", "\(program) as uid 65534 under dmabufd-run").output
    if getenv("CLIB_VERBOSE") != nil { Harness.say("--- \(program), kernel ---\n\(kernel)--- \(program), drop-in ---\n\(dropIn)") }
    if let diff = firstDifference(kernel, dropIn) {
        throw TestFailure(description: "\(program): the drop-in differs from the kernel at \(diff)\n--- kernel ---\n\(kernel)\n--- drop-in ---\n\(dropIn)")
    }
    return kernel
}

/// kselftest result lines: test number -> "ok", "skip" or "not ok".
private func kselftestResults(_ output: String) -> [Int: String] {
    var results: [Int: String] = [:]
    for line in output.split(separator: "\n") {
        let words = line.split(separator: " ")
        if words.first == "ok", words.count > 1, let n = Int(words[1]) {
            results[n] = line.contains("# SKIP") ? "skip" : "ok"
        } else if words.count > 2, words[0] == "not", words[1] == "ok", let n = Int(words[2]) {
            results[n] = "not ok"
        }
    }
    return results
}

/// Where libdmabufd/fetch-selftests.sh put the kernel's selftests.
private var selftestDirectory: String {
    let cache = getenv("DMABUFD_CACHE").map { String(cString: $0) } ?? ((getenv("HOME").map { String(cString: $0) } ?? "/root") + "/.cache/dmabufd")
    return cache + "/selftests/6.12"
}

private func hundredths(_ x: Double) -> String {
    let v = Int((x * 100).rounded())
    return "\(v / 100).\(v % 100 < 10 ? "0" : "")\(v % 100)"
}

enum CLibTests {
    static let all: [DeviceTest] = [
        DeviceTest("clib.direct-open-refused-as-nobody", requires: needs) {
            let build = try CLibBuild.get()
            try withRootOnlyNodes {
                for program in ["heap_uapi", "udmabuf_uapi"] {
                    let run = try shell("'\(build.programs["runas"]!)' 65534 '\(build.programs[program]!)'", program, expect: nil)
                    try expect(run.output.hasPrefix("open: EACCES"), "\(program) as uid 65534 without the drop-in: \(run.output)")
                }
            }
        },
        DeviceTest("clib.heap-drop-in-matches-kernel", requires: needs) {
            let build = try CLibBuild.get()
            try withRootOnlyNodes {
                try withDaemon { daemon in
                    // Without a broker the drop-in steps aside and the program sees the kernel's EACCES.
                    let alone = try shell("DMABUFD_SOCKET=/nonexistent DMABUFD_PRELOAD='\(build.preload)' '\(build.programs["runas"]!)' 65534 '\(build.dropIn)' '\(build.programs["heap_uapi"]!)'",
                                          "heap_uapi without a broker", expect: nil)
                    try expect(alone.output.hasPrefix("open: EACCES"), "without a broker: \(alone.output)")
                    let transcript = try compareWithKernel(build, "heap_uapi", daemon)
                    try expect(transcript.contains("first round trip: size 16384, cloexec 1, readback ok"), "round trip:\n\(transcript)")
                    try expect(transcript.contains("exec child exit: 0") && transcript.contains("done, 0 checks failed"), "checks:\n\(transcript)")
                }
            }
        },
        DeviceTest("clib.udmabuf-drop-in-matches-kernel", requires: needs) {
            let build = try CLibBuild.get()
            try withRootOnlyNodes {
                try withDaemon { daemon in
                    let transcript = try compareWithKernel(build, "udmabuf_uapi", daemon)
                    try expect(transcript.contains("the udmabuf maps the memfd's pages: yes") && transcript.contains("done, 0 checks failed"),
                               "round trip:\n\(transcript)")
                }
            }
        },
        DeviceTest("clib.udmabuf-list-over-several-memfds", requires: needs) {
            // UDMABUF_CREATE_LIST whose entries name different memfds (protocol v2 carries up to 16 per
            // message): bytes through the buffer are each memfd's, and every error is the kernel's.
            let build = try CLibBuild.get()
            try withRootOnlyNodes {
                try withDaemon { daemon in
                    let transcript = try compareWithKernel(build, "udmabuf_multi", daemon)
                    try expect(transcript.contains("three memfds, interleaved: ok") && transcript.contains("sixteen memfds: ok"),
                               "lists over several memfds:\n\(transcript)")
                    try expect(transcript.contains("done, 0 checks failed"), "bytes:\n\(transcript)")
                }
            }
        },
        DeviceTest("clib.drop-in-leaves-privileged-programs-alone", requires: needs) {
            let build = try CLibBuild.get()
            // Root opens the nodes itself; with no daemon at all the program must behave as without the drop-in.
            let plain = try shell("'\(build.programs["heap_uapi"]!)'", "heap_uapi").output
            let wrapped = try shell("DMABUFD_SOCKET=/nonexistent DMABUFD_PRELOAD='\(build.preload)' '\(build.dropIn)' '\(build.programs["heap_uapi"]!)'",
                                    "heap_uapi under dmabufd-run").output
            if let diff = firstDifference(plain, wrapped) { throw TestFailure(description: "root under dmabufd-run differs: \(diff)") }
        },
        DeviceTest("clib.drop-in-broker-refusal-is-enomem", requires: needs) {
            let build = try CLibBuild.get()
            try withRootOnlyNodes {
                try withDaemon(config: "quota.uid.65534.bytes = 64K") { daemon in
                    let env = "DMABUFD_DEBUG=1 DMABUFD_SOCKET='\(daemon.socketPath)' DMABUFD_PRELOAD='\(build.preload)'"
                    let run = try shell("\(env) '\(build.programs["runas"]!)' 65534 '\(build.dropIn)' '\(build.programs["heap_uapi"]!)' alloc 1048576",
                                        "over-quota allocation")
                    try expect(run.output.contains("alloc: ENOMEM"), "a quota refusal reaches the program as ENOMEM: \(run.output)")
                    try expect(run.output.contains("dmabufd refused"), "DMABUFD_DEBUG says why: \(run.output)")
                    let small = try shell("\(env) '\(build.programs["runas"]!)' 65534 '\(build.dropIn)' '\(build.programs["heap_uapi"]!)' alloc 4096",
                                          "allocation within quota")
                    try expect(small.output.contains("alloc: ok"), "within quota: \(small.output)")
                }
            }
        },
        // The kernel's own selftests, compiled unmodified (-D__user= only: the heap test includes the
        // kernel's raw uapi drm.h, as its own build does after headers_install), as uid 65534 under
        // dmabufd-run: no test may fail that passes as root against the kernel in the same boot. (The
        // udmabuf test's last case needs 1024 free 2 MiB huge pages, which the VM lacks either way.)
        DeviceTest("clib.kernel-selftests", requires: needs + [.vgem]) {
            let build = try CLibBuild.get()
            let source = selftestDirectory
            guard access(source + "/tools/testing/selftests/kselftest.h", R_OK) == 0 else {
                throw TestFailure(description: "the kernel selftests are not in \(source): run libdmabufd/fetch-selftests.sh on the host first (apt, once)")
            }
            let tests = [("dmabuf-heap", "tools/testing/selftests/dmabuf-heaps/dmabuf-heap.c"),
                         ("udmabuf", "tools/testing/selftests/drivers/dma-buf/udmabuf.c")]
            for (name, file) in tests {
                try shell("cc -O1 -D__user= -isystem '\(source)/include/uapi' -o '\(build.directory)/\(name)' '\(source)/\(file)'", "compile \(name)")
            }
            // The heap selftest's first case imports a buffer into vgem: vgem is not what dmabufd brokers,
            // so uid 65534 gets the vgem node for this test, and that case runs under the drop-in too.
            let vgem = DRMDevice.nodes(driver: "vgem")
            try expect(!vgem.isEmpty, "no vgem node: the heap selftest's import case needs one")
            try withNodeModes(vgem, mode: 0o666) { try withRootOnlyNodes {
                try withDaemon { daemon in
                    for (name, _) in tests {
                        let binary = build.directory + "/" + name
                        let kernel = try shell("'\(binary)'", "\(name) as root", expect: nil)
                        let env = "DMABUFD_SOCKET='\(daemon.socketPath)' DMABUFD_PRELOAD='\(build.preload)'"
                        let dropIn = try shell("\(env) '\(build.programs["runas"]!)' 65534 '\(build.dropIn)' '\(binary)'", "\(name) under dmabufd-run", expect: nil)
                        let k = kselftestResults(kernel.output), d = kselftestResults(dropIn.output)
                        Harness.say("  \(name): kernel \(k.values.filter { $0 == "ok" }.count) ok of \(k.count) (exit \(kernel.status)); " +
                                    "drop-in as uid 65534 \(d.values.filter { $0 == "ok" }.count) ok of \(d.count) (exit \(dropIn.status))")
                        if getenv("CLIB_VERBOSE") != nil { Harness.say("--- kernel ---\n\(kernel.output)--- drop-in ---\n\(dropIn.output)") }
                        let regressions = k.filter { $0.value == "ok" && d[$0.key] != "ok" }.keys.sorted()
                        try expect(!d.isEmpty && d.values.contains("ok"), "\(name) under dmabufd-run passed nothing:\n\(dropIn.output)")
                        try expect(regressions.isEmpty, "\(name): tests \(regressions) pass on the kernel but not under dmabufd-run:\n--- kernel ---\n\(kernel.output)--- drop-in ---\n\(dropIn.output)")
                    }
                }
            } }
        },
        // A figure, not an assertion (tests never assert timings): the C client's allocation against the
        // Swift client's, same daemon, same boot, alternating rounds.
        DeviceTest("clib.allocation-cost-vs-swift-client", requires: needs) {
            let build = try CLibBuild.get()
            try withDaemon { daemon in
                let connection = try daemon.connect("bench-swift")
                var swift: [Double] = [], c: [Double] = []
                for round in 0...5 {
                    var samples: [Double] = []
                    for _ in 0..<101 {
                        let t0 = nowNS()
                        let buffer = try connection.allocate(size: 4096, heap: "system", tag: "bench")
                        samples.append(Double(nowNS() - t0))
                        let id = buffer.info.id
                        _ = consume buffer
                        try connection.release(id)
                    }
                    let run = try shell("DMABUFD_SOCKET='\(daemon.socketPath)' '\(build.programs["bench_alloc"]!)' 101 4096", "bench_alloc")
                    guard let line = run.output.split(separator: "\n").first(where: { $0.hasPrefix("median_ns ") }),
                          let ns = Double(line.dropFirst("median_ns ".count)) else { throw TestFailure(description: "bench_alloc: \(run.output)") }
                    if round > 0 { swift.append(median(samples)); c.append(ns) }
                }
                let ratios = zip(c, swift).map { $0 / $1 }.sorted()
                Harness.say("  4 KiB allocation: C client median \(Int(median(c) / 1000)) us, Swift client \(Int(median(swift) / 1000)) us; " +
                            "C/Swift per round: median \(hundredths(median(ratios))) (\(hundredths(ratios.first!))-\(hundredths(ratios.last!)))")
            }
        },
        DeviceTest("clib.pkg-config-client-round-trip", requires: needs) {
            let build = try CLibBuild.get()
            try withRootOnlyNodes {
                try withDaemon { daemon in
                    let run = try shell("DMABUFD_SOCKET='\(daemon.socketPath)' '\(build.programs["runas"]!)' 65534 '\(build.programs["client_roundtrip"]!)'",
                                        "libdmabufd client as uid 65534")
                    try expect(run.output.contains("client round trip: ok") && run.output.contains("uid 65534"), run.output)
                }
            }
        },
    ]
}

// MARK: - the programs

private let clibPrograms: [(String, String)] = [
    ("runas", #"""
/* runas UID PROGRAM [ARGS...]: drops every group and becomes UID (as gid UID), then execs PROGRAM. */
#define _GNU_SOURCE
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    unsigned id = (unsigned)atoi(argv[1]);
    if (setgroups(0, NULL) || setgid(id) || setuid(id)) { perror("runas"); return 126; }
    execvp(argv[2], argv + 2);
    perror("runas: exec");
    return 127;
}
"""#),
    ("heap_uapi", #"""
/* Raw dma-heap uAPI, as an unmodified program uses it. Prints one line per case (no fd numbers), so a
 * run against the kernel and a run through dmabufd-run can be compared line by line. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/dma-heap.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define HEAP "/dev/dma_heap/system"
static int bad;

static const char *res(int r) { return r < 0 ? strerrorname_np(errno) : "ok"; }
static void check(int cond, const char *what) { if (!cond) { bad++; printf("CHECK FAILED: %s\n", what); } }

static int alloc(int h, unsigned long cmd, struct dma_heap_allocation_data *d) { return ioctl(h, cmd, d); }

/* Allocates, maps, writes and reads back `pages` pages. */
static int round_trip(int h, size_t pages, const char *who) {
    struct dma_heap_allocation_data d = { .len = pages * 4096 - 100, .fd_flags = O_RDWR | O_CLOEXEC };
    if (alloc(h, DMA_HEAP_IOCTL_ALLOC, &d) < 0) { printf("%s alloc: %s\n", who, res(-1)); return -1; }
    int fd = (int)d.fd;
    off_t size = lseek(fd, 0, SEEK_END);
    unsigned char *p = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { printf("%s mmap: %s\n", who, res(-1)); close(fd); return -1; }
    for (size_t i = 0; i < pages * 4096; i++) p[i] = (unsigned char)(i * 7 + 3);
    munmap(p, pages * 4096);
    p = mmap(NULL, pages * 4096, PROT_READ, MAP_SHARED, fd, 0);
    int same = p != MAP_FAILED;
    for (size_t i = 0; same && i < pages * 4096; i++) same = p[i] == (unsigned char)(i * 7 + 3);
    if (p != MAP_FAILED) munmap(p, pages * 4096);
    printf("%s round trip: size %lld, cloexec %d, readback %s\n", who, (long long)size, fcntl(fd, F_GETFD), same ? "ok" : "WRONG");
    check(same && size == (off_t)(pages * 4096), who);
    close(fd);
    return 0;
}

static void errcase(int h, const char *name, unsigned long cmd, struct dma_heap_allocation_data d) {
    int r = alloc(h, cmd, &d);
    printf("%s: %s\n", name, res(r));
    if (r == 0 && d.fd > 0) close((int)d.fd);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "alloc") == 0) { /* one allocation of argv[2] bytes */
        int h = open(HEAP, O_RDWR | O_CLOEXEC);
        struct dma_heap_allocation_data d = { .len = strtoull(argv[2], NULL, 10), .fd_flags = O_RDWR | O_CLOEXEC };
        printf("alloc: %s\n", res(h < 0 ? -1 : ioctl(h, DMA_HEAP_IOCTL_ALLOC, &d)));
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "exec-child") == 0) {
        round_trip(atoi(argv[2]), 2, "after exec");
        return bad;
    }
    int h = open(HEAP, O_RDONLY | O_CLOEXEC);
    printf("open: %s\n", res(h));
    if (h < 0) return 3;
    struct stat a, b;
    fstat(h, &a);
    stat(HEAP, &b);
    printf("fstat matches the node: %s\n", S_ISCHR(a.st_mode) && a.st_rdev == b.st_rdev ? "yes" : "no");
    round_trip(h, 4, "first");

    struct dma_heap_allocation_data d = { .len = 4096, .fd_flags = O_RDWR };
    int r = alloc(h, DMA_HEAP_IOCTL_ALLOC, &d);
    printf("without O_CLOEXEC: %s, cloexec %d\n", res(r), r == 0 ? fcntl((int)d.fd, F_GETFD) : -1);
    if (r == 0) close((int)d.fd);
    d = (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDONLY | O_CLOEXEC };
    r = alloc(h, DMA_HEAP_IOCTL_ALLOC, &d);
    printf("O_RDONLY: %s\n", res(r));
    if (r == 0) close((int)d.fd);

    errcase(h, "len 0", DMA_HEAP_IOCTL_ALLOC, (struct dma_heap_allocation_data){ .len = 0, .fd_flags = O_RDWR });
    errcase(h, "len wraps when page-aligned", DMA_HEAP_IOCTL_ALLOC, (struct dma_heap_allocation_data){ .len = ~0ull - 5, .fd_flags = O_RDWR });
    errcase(h, "input fd non-zero", DMA_HEAP_IOCTL_ALLOC, (struct dma_heap_allocation_data){ .len = 4096, .fd = 1, .fd_flags = O_RDWR });
    errcase(h, "fd_flags O_CREAT", DMA_HEAP_IOCTL_ALLOC, (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR | O_CREAT });
    errcase(h, "fd_flags O_NONBLOCK", DMA_HEAP_IOCTL_ALLOC, (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_NONBLOCK });
    errcase(h, "heap_flags 1", DMA_HEAP_IOCTL_ALLOC, (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR, .heap_flags = 1 });
    errcase(h, "nr 1", _IOWR('H', 1, struct dma_heap_allocation_data), (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR });
    errcase(h, "nr 0x20", _IOWR('H', 0x20, struct dma_heap_allocation_data), (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR });
    errcase(h, "type X nr 0 (dispatch is by number)", _IOWR('X', 0, struct dma_heap_allocation_data),
            (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR });
    errcase(h, "_IOR: nothing copied in", _IOR('H', 0, struct dma_heap_allocation_data), (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR });
    errcase(h, "_IO: nothing copied", _IO('H', 0), (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR });

    /* _IOW: copied in, not back: succeeds, the caller never learns the fd. */
    d = (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR };
    r = alloc(h, _IOW('H', 0, struct dma_heap_allocation_data), &d);
    printf("_IOW: %s, fd field %s\n", res(r), d.fd ? "set" : "untouched");
    /* 8 bytes: len only; the rest is zero-filled in, and only 8 bytes go back. */
    struct { struct dma_heap_allocation_data d; unsigned char tail[8]; } big;
    memset(&big, 0xAA, sizeof big);
    big.d = (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = 0xAAAAAAAA, .heap_flags = ~0ull };
    r = ioctl(h, _IOC(_IOC_READ | _IOC_WRITE, 'H', 0, 8), &big);
    printf("size 8: %s, fd field %s\n", res(r), big.d.fd == 0 ? "untouched" : "set");
    /* 32 bytes: the whole struct plus 8 more, copied in and back unchanged. */
    memset(&big, 0xAA, sizeof big);
    big.d = (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR | O_CLOEXEC };
    r = ioctl(h, _IOC(_IOC_READ | _IOC_WRITE, 'H', 0, 32), &big);
    int tail = 1;
    for (int i = 0; i < 8; i++) tail &= big.tail[i] == 0xAA;
    printf("size 32: %s, fd %s, tail %s\n", res(r), big.d.fd > 0 ? "set" : "missing", tail ? "kept" : "changed");
    if (r == 0) close((int)big.d.fd);
    /* 48 bytes, of which the last 8 are not mapped: EFAULT. */
    unsigned char *page = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(page + 4096, 4096);
    struct dma_heap_allocation_data *edge = (void *)(page + 4096 - 40);
    *edge = (struct dma_heap_allocation_data){ .len = 4096, .fd_flags = O_RDWR };
    printf("size 48 past the mapping: %s\n", res(ioctl(h, _IOC(_IOC_READ | _IOC_WRITE, 'H', 0, 48), edge)));
    printf("NULL argument: %s\n", res(ioctl(h, DMA_HEAP_IOCTL_ALLOC, NULL)));
    int n = 0;
    printf("FIONREAD: %s\n", res(ioctl(h, FIONREAD, &n)));
    printf("TCGETS: %s\n", res(ioctl(h, 0x5401, &n)));
    r = ioctl(h, FIONCLEX);
    printf("FIONCLEX: %s, cloexec %d\n", res(r), fcntl(h, F_GETFD));
    r = ioctl(h, FIOCLEX);
    printf("FIOCLEX: %s, cloexec %d\n", res(r), fcntl(h, F_GETFD));

    int h2 = dup(h);
    printf("dup: %s\n", res(h2));
    printf("close original: %s\n", res(close(h)));
    round_trip(h2, 1, "via dup");
    int h3 = fcntl(h2, F_DUPFD_CLOEXEC, 40);
    printf("F_DUPFD_CLOEXEC: %s, at or above 40: %s\n", res(h3), h3 >= 40 ? "yes" : "no");
    round_trip(h3, 1, "via F_DUPFD");
    printf("close_range above: %s\n", res(close_range((unsigned)h3 + 1, ~0U, 0)));
    round_trip(h2, 1, "after close_range");
    printf("dup2 onto 512: %s\n", res(dup2(1, 512)));
    round_trip(h2, 1, "after dup2");
    close(512);

    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) { round_trip(h2, 2, "forked child"); fflush(stdout); _exit(bad); }
    int status;
    waitpid(pid, &status, 0);
    printf("forked child exit: %d\n", WEXITSTATUS(status));

    fcntl(h2, F_SETFD, 0);
    char fdarg[16];
    snprintf(fdarg, sizeof fdarg, "%d", h2);
    fflush(stdout);
    pid = fork();
    if (pid == 0) { execl("/proc/self/exe", argv[0], "exec-child", fdarg, (char *)NULL); _exit(127); }
    waitpid(pid, &status, 0);
    printf("exec child exit: %d\n", WEXITSTATUS(status));
    printf("done, %d checks failed\n", bad);
    return bad ? 1 : 0;
}
"""#),
    ("udmabuf_uapi", #"""
/* Raw udmabuf uAPI, as an unmodified program uses it. One line per case, no fd numbers, so a run against
 * the kernel and one through dmabufd-run can be compared line by line. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/udmabuf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010
#endif
#define PG 4096ul
static int bad;

static const char *res(int r) { return r < 0 ? strerrorname_np(errno) : "ok"; }

static int sealed_memfd(size_t pages, int seals) {
    int m = memfd_create("clib", MFD_ALLOW_SEALING | MFD_CLOEXEC);
    if (ftruncate(m, (off_t)(pages * PG)) < 0) return -1;
    if (seals && fcntl(m, F_ADD_SEALS, seals) < 0) return -1;
    return m;
}

static void create(int u, const char *name, int memfd, unsigned flags, unsigned long off, unsigned long size) {
    struct udmabuf_create c = { .memfd = (unsigned)memfd, .flags = flags, .offset = off, .size = size };
    int fd = ioctl(u, UDMABUF_CREATE, &c);
    if (fd >= 0) {
        printf("%s: ok, size %lld, cloexec %d\n", name, (long long)lseek(fd, 0, SEEK_END), fcntl(fd, F_GETFD));
        close(fd);
    } else {
        printf("%s: %s\n", name, res(fd));
    }
}

static void create_list(int u, const char *name, int memfd, unsigned count, unsigned pages_each) {
    struct udmabuf_create_list *l = calloc(1, sizeof *l + (count ? count : 1) * sizeof(struct udmabuf_create_item));
    l->flags = UDMABUF_FLAGS_CLOEXEC;
    l->count = count;
    for (unsigned i = 0; i < count; i++)
        l->list[i] = (struct udmabuf_create_item){ .memfd = (unsigned)memfd, .offset = (i % 4) * pages_each * PG, .size = pages_each * PG };
    int fd = ioctl(u, UDMABUF_CREATE_LIST, l);
    if (fd >= 0) { printf("%s: ok, size %lld\n", name, (long long)lseek(fd, 0, SEEK_END)); close(fd); }
    else printf("%s: %s\n", name, res(fd));
    free(l);
}

int main(void) {
    int u = open("/dev/udmabuf", O_RDWR | O_CLOEXEC);
    printf("open: %s\n", res(u));
    if (u < 0) return 3;
    struct stat a, b;
    fstat(u, &a);
    stat("/dev/udmabuf", &b);
    printf("fstat matches the node: %s\n", S_ISCHR(a.st_mode) && a.st_rdev == b.st_rdev ? "yes" : "no");

    int m = sealed_memfd(16, F_SEAL_SHRINK);
    unsigned char *mp = mmap(NULL, 16 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
    for (size_t i = 0; i < 16 * PG; i++) mp[i] = (unsigned char)(i * 13 + 1);
    struct udmabuf_create c = { .memfd = (unsigned)m, .flags = UDMABUF_FLAGS_CLOEXEC, .offset = 4 * PG, .size = 4 * PG };
    int fd = ioctl(u, UDMABUF_CREATE, &c);
    printf("create: %s\n", res(fd));
    if (fd >= 0) {
        unsigned char *dp = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        int same = dp != MAP_FAILED;
        for (size_t i = 0; same && i < 4 * PG; i++) same = dp[i] == mp[4 * PG + i];
        if (same) { dp[5] = 0x5A; same = mp[4 * PG + 5] == 0x5A; }
        printf("the udmabuf maps the memfd's pages: %s\n", same ? "yes" : "NO");
        if (!same) bad++;
        if (dp != MAP_FAILED) munmap(dp, 4 * PG);
        close(fd);
    }
    create(u, "flags 0", m, 0, 0, PG);
    create(u, "flags 0xff (only CLOEXEC counts)", m, 0xff, 0, PG);
    create(u, "flags 0xfe", m, 0xfe, 0, PG);
    create(u, "whole memfd", m, UDMABUF_FLAGS_CLOEXEC, 0, 16 * PG);
    create(u, "offset not page-aligned", m, 1, 100, PG);
    create(u, "size not page-aligned", m, 1, 0, 100);
    create(u, "size 0", m, 1, 0, 0);
    create(u, "past the end of the memfd", m, 1, 12 * PG, 8 * PG);
    create(u, "offset past the end", m, 1, 32 * PG, PG);
    create(u, "fd not open", 9999, 1, 0, PG);
    int p[2];
    pipe(p);
    create(u, "a pipe", p[0], 1, 0, PG);
    int null = open("/dev/null", O_RDWR);
    create(u, "/dev/null", null, 1, 0, PG);
    int path = open("/proc/self/exe", O_PATH);
    create(u, "an O_PATH fd", path, 1, 0, PG);
    create(u, "memfd without F_SEAL_SHRINK", sealed_memfd(4, 0), 1, 0, PG);
    create(u, "memfd with F_SEAL_WRITE", sealed_memfd(4, F_SEAL_SHRINK | F_SEAL_WRITE), 1, 0, PG);
    create(u, "memfd with F_SEAL_FUTURE_WRITE", sealed_memfd(4, F_SEAL_SHRINK | F_SEAL_FUTURE_WRITE), 1, 0, PG);
    create(u, "memfd with F_SEAL_GROW", sealed_memfd(4, F_SEAL_SHRINK | F_SEAL_GROW), 1, 0, PG);
    char tmpl[] = "/tmp/clib-tmpfile-XXXXXX";
    int t = mkstemp(tmpl);
    ftruncate(t, 4 * PG);
    unlink(tmpl);
    create(u, "a regular file", t, 1, 0, PG);
    /* The module's size limit: 64 MiB on 6.12. */
    int huge = sealed_memfd(65 * 256, F_SEAL_SHRINK);
    create(u, "65 MiB", huge, 1, 0, 65ul << 20);
    create(u, "64 MiB", huge, 1, 0, 64ul << 20);
    close(huge);

    create_list(u, "list of 2", m, 2, 2);
    create_list(u, "list of 0", m, 0, 1);
    create_list(u, "list of 1024", m, 1024, 1);
    create_list(u, "list of 1025", m, 1025, 1);
    create_list(u, "list with an unaligned size", m, 1, 0);

    printf("NULL argument to UDMABUF_CREATE: %s\n", res(ioctl(u, UDMABUF_CREATE, NULL)));
    printf("NULL argument to UDMABUF_CREATE_LIST: %s\n", res(ioctl(u, UDMABUF_CREATE_LIST, NULL)));
    printf("_IOW('u', 0x44): %s\n", res(ioctl(u, _IOW('u', 0x44, struct udmabuf_create), &c)));
    printf("UDMABUF_CREATE with size 16: %s\n", res(ioctl(u, _IOC(_IOC_WRITE, 'u', 0x42, 16), &c)));
    printf("UDMABUF_CREATE as _IOWR: %s\n", res(ioctl(u, _IOWR('u', 0x42, struct udmabuf_create), &c)));
    int n;
    printf("FIONREAD: %s\n", res(ioctl(u, FIONREAD, &n)));
    printf("FIOCLEX: %s\n", res(ioctl(u, FIOCLEX)));
    printf("done, %d checks failed\n", bad);
    return bad ? 1 : 0;
}
"""#),
    ("udmabuf_multi", #"""
/* UDMABUF_CREATE_LIST over several different memfds, raw uAPI: each entry names its own memfd, as the
 * kernel allows. One line per case, no fd numbers, so the kernel's run and dmabufd-run's compare. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/udmabuf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define PG 4096ul
static int bad;

static const char *res(int r) { return r < 0 ? strerrorname_np(errno) : "ok"; }

static int memfd(size_t pages, int seals, unsigned char fill) {
    int m = memfd_create("multi", MFD_ALLOW_SEALING | MFD_CLOEXEC);
    if (m < 0 || ftruncate(m, (off_t)(pages * PG)) < 0) return -1;
    unsigned char *p = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
    if (p == MAP_FAILED) return -1;
    for (size_t i = 0; i < pages * PG; i++) p[i] = (unsigned char)(fill + i * 7);
    munmap(p, pages * PG);
    if (seals && fcntl(m, F_ADD_SEALS, seals) < 0) return -1;
    return m;
}

/* entries: {memfd, first page, pages} */
static int make(int u, const unsigned (*e)[3], unsigned n) {
    struct udmabuf_create_list *l = calloc(1, sizeof *l + n * sizeof(struct udmabuf_create_item));
    l->flags = UDMABUF_FLAGS_CLOEXEC;
    l->count = n;
    for (unsigned i = 0; i < n; i++) l->list[i] = (struct udmabuf_create_item){ .memfd = e[i][0], .offset = e[i][1] * PG, .size = e[i][2] * PG };
    int fd = ioctl(u, UDMABUF_CREATE_LIST, l);
    free(l);
    return fd;
}

/* Each entry's pages in the udmabuf are the memfd's, both ways. */
static const char *same_bytes(int fd, const unsigned (*e)[3], unsigned n) {
    size_t total = 0;
    for (unsigned i = 0; i < n; i++) total += e[i][2] * PG;
    unsigned char *d = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (d == MAP_FAILED) return "NO (mmap)";
    size_t at = 0;
    int ok = 1;
    for (unsigned i = 0; i < n && ok; i++) {
        size_t len = e[i][2] * PG;
        unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, (int)e[i][0], (off_t)(e[i][1] * PG));
        if (m == MAP_FAILED) { ok = 0; break; }
        ok = memcmp(d + at, m, len) == 0;
        d[at + 3] ^= 0xFF;
        ok = ok && m[3] == d[at + 3];
        munmap(m, len);
        at += len;
    }
    munmap(d, total);
    return ok ? "yes" : "NO";
}

static void list(int u, const char *name, const unsigned (*e)[3], unsigned n, int check) {
    int fd = make(u, e, n);
    if (fd < 0) { printf("%s: %s\n", name, res(fd)); return; }
    printf("%s: ok, size %lld, cloexec %d", name, (long long)lseek(fd, 0, SEEK_END), fcntl(fd, F_GETFD));
    if (check) {
        const char *same = same_bytes(fd, e, n);
        printf(", bytes match: %s", same);
        if (strcmp(same, "yes") != 0) bad++;
    }
    printf("\n");
    close(fd);
}

int main(void) {
    int u = open("/dev/udmabuf", O_RDWR | O_CLOEXEC);
    printf("open: %s\n", res(u));
    if (u < 0) return 3;
    unsigned a = (unsigned)memfd(8, F_SEAL_SHRINK, 0x11), b = (unsigned)memfd(4, F_SEAL_SHRINK, 0x22), c = (unsigned)memfd(16, F_SEAL_SHRINK, 0x33);
    unsigned unsealed = (unsigned)memfd(4, 0, 0x44), wsealed = (unsigned)memfd(4, F_SEAL_SHRINK | F_SEAL_WRITE, 0x55);
    int p[2];
    pipe(p);
    list(u, "two memfds", (const unsigned[][3]){ { a, 0, 2 }, { b, 1, 3 } }, 2, 1);
    list(u, "three memfds, interleaved", (const unsigned[][3]){ { c, 4, 4 }, { a, 2, 1 }, { b, 0, 1 }, { a, 5, 3 }, { c, 0, 1 } }, 5, 1);
    list(u, "one memfd through two fds", (const unsigned[][3]){ { a, 0, 1 }, { (unsigned)dup((int)a), 1, 1 }, { b, 0, 1 } }, 3, 1);
    list(u, "second memfd without F_SEAL_SHRINK", (const unsigned[][3]){ { a, 0, 1 }, { unsealed, 0, 1 } }, 2, 0);
    list(u, "second memfd with F_SEAL_WRITE", (const unsigned[][3]){ { a, 0, 1 }, { wsealed, 0, 1 } }, 2, 0);
    list(u, "second entry a pipe", (const unsigned[][3]){ { a, 0, 1 }, { (unsigned)p[0], 0, 1 } }, 2, 0);
    list(u, "second entry not open", (const unsigned[][3]){ { a, 0, 1 }, { 9999, 0, 1 } }, 2, 0);
    list(u, "third entry past its memfd's end", (const unsigned[][3]){ { a, 0, 1 }, { b, 0, 1 }, { b, 3, 2 } }, 3, 0);
    list(u, "second entry unaligned", (const unsigned[][3]){ { a, 0, 1 }, { b, 0, 0 } }, 2, 0);
    unsigned sixteen[16][3];
    for (unsigned i = 0; i < 16; i++) { sixteen[i][0] = (unsigned)memfd(1, F_SEAL_SHRINK, (unsigned char)i); sixteen[i][1] = 0; sixteen[i][2] = 1; }
    list(u, "sixteen memfds", (const unsigned (*)[3])sixteen, 16, 1);
    printf("done, %d checks failed\n", bad);
    return bad ? 1 : 0;
}
"""#),
    ("client_roundtrip", #"""
/* A libdmabufd client, built with `pkg-config --cflags --libs dmabufd`: allocate, map, write, share with a
 * one-time token, a second process fetches and reads back, then layout, list, stats, release. */
#define _GNU_SOURCE
#include <dmabufd.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static int bad;
#define CHECK(c, ...) do { if (!(c)) { bad++; printf("FAIL line %d: ", __LINE__); printf(__VA_ARGS__); printf(" (%s)\n", dmabufd_last_message(NULL)); } } while (0)

static int fetch_and_verify(uint64_t id, uint64_t token) {
    dmabufd_conn *c;
    if (dmabufd_connect(NULL, "roundtrip-fetch", &c) < 0) { printf("fetch connect: %s\n", dmabufd_last_message(NULL)); return 1; }
    int fd = dmabufd_fetch(c, id, token, NULL);
    CHECK(fd >= 0, "fetch: %d", fd);
    if (fd < 0) return 1;
    unsigned char *p = mmap(NULL, 8192, PROT_READ, MAP_SHARED, fd, 0);
    CHECK(p != MAP_FAILED, "mmap fetched");
    for (int i = 0; p != MAP_FAILED && i < 8192; i++)
        if (p[i] != (unsigned char)(i ^ 0x5c)) { CHECK(0, "byte %d differs", i); break; }
    dmabufd_disconnect(c);
    return bad;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "fetch") == 0) return fetch_and_verify(strtoull(argv[2], 0, 10), strtoull(argv[3], 0, 10));
    dmabufd_conn *c;
    int e = dmabufd_connect(NULL, NULL, &c);
    if (e < 0) { printf("connect: %s\n", dmabufd_last_message(NULL)); return 2; }
    printf("connected, protocol v%d, uid %u\n", dmabufd_version(c), dmabufd_server(c)->uid);
    dmabufd_heaps *heaps;
    CHECK(dmabufd_list_heaps(c, &heaps) == 0 && heaps->heap_count > 0, "heaps");
    dmabufd_free(heaps);

    dmabufd_buffer_info *info;
    int fd = dmabufd_allocate(c, 8192, "system", "roundtrip", O_RDWR | O_CLOEXEC, 0, &info);
    CHECK(fd >= 0 && info && info->size == 8192, "allocate: %d", fd);
    if (fd < 0) return 1;
    CHECK(fcntl(fd, F_GETFD) == FD_CLOEXEC, "O_CLOEXEC honoured");
    unsigned char *p = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(p != MAP_FAILED, "mmap");
    for (int i = 0; p != MAP_FAILED && i < 8192; i++) p[i] = (unsigned char)(i ^ 0x5c);
    uint64_t token = 0;
    CHECK(dmabufd_share(c, info->id, NULL, true, &token) == 0 && token != 0, "share");
    char id[32], tok[32];
    snprintf(id, sizeof id, "%llu", (unsigned long long)info->id);
    snprintf(tok, sizeof tok, "%llu", (unsigned long long)token);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) { execl("/proc/self/exe", argv[0], "fetch", id, tok, (char *)NULL); _exit(127); }
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "second process read the buffer back (status %d)", status);

    dmabufd_layout *layout;
    CHECK(dmabufd_get_layout(c, info->id, 0, 0, false, &layout) == 0 && layout->run_count >= 1, "layout");
    if (layout) { CHECK(dmabufd_release_lease(c, layout->lease, -1) == 0, "release_lease"); dmabufd_free(layout); }
    dmabufd_buffer_list *list;
    CHECK(dmabufd_list(c, false, 0, &list) == 0 && list->count >= 1, "list");
    dmabufd_free(list);
    dmabufd_stats *stats;
    CHECK(dmabufd_get_stats(c, &stats) == 0 && stats->buffers >= 1, "stats");
    dmabufd_free(stats);
    CHECK(dmabufd_allocate(c, 4096, "no-such-heap", "x", O_RDWR, 0, NULL) == -ENOENT && dmabufd_last_code(c) == DMABUFD_CODE_NO_HEAP,
          "unknown heap refused with ENOENT/no_heap");
    CHECK(dmabufd_allocate(c, 4096, "system", "x", O_RDWR | O_APPEND, 0, NULL) == -EINVAL, "bad fd_flags refused");
    int u = dmabufd_create_udmabuf(c, 4096, "roundtrip", false, NULL);
    CHECK(u >= 0, "create_udmabuf: %d", u);
    if (u >= 0) close(u);
    CHECK(dmabufd_release(c, info->id) == 0, "release");
    CHECK(dmabufd_release(c, info->id) == -ENOENT, "second release refused");
    dmabufd_free(info);
    dmabufd_disconnect(c);
    printf("client round trip: %s\n", bad ? "FAILED" : "ok");
    return bad ? 1 : 0;
}
"""#),
]
