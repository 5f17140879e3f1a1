// The CMA dma-buf heap on a real kernel (the 7.3-cma test kernel: a 64 MiB default region, exposed as
// /dev/dma_heap/default_cma_region and its legacy alias `reserved`). Debian's kernels have no CMA heap, so
// these tests are not applicable there (see Harness.swift); on 7.3-cma a missing heap is a failure.
//
// What the kernel exposes about the region: /proc/meminfo CmaTotal/CmaFree (always, with CONFIG_CMA). It
// does not expose buffer addresses: the heap's mmap is not visible in pagemap, and /sys/kernel/mm/cma and
// /sys/kernel/debug/cma exist only with CMA_SYSFS/CMA_DEBUGFS (off in this build). So contiguity is a fact by
// construction (cma_alloc returns one run of pages), never an address the tests invent.
import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// What the running kernel says about its CMA heaps and region.
enum CMAFacts {
    /// The names a CMA heap has had: the default region since 6.17 (`default_cma_region`), its legacy
    /// alias and pre-6.17 name (`reserved`), and the usual devicetree name (`linux,cma`).
    static let aliases = ["default_cma_region", "reserved", "linux,cma"]

    /// The CMA heaps in /dev/dma_heap.
    static func heapNames(directory: String = DmaHeap.defaultDirectory) -> [String] {
        DmaHeap.available(in: directory).filter { aliases.contains($0) || $0.contains("cma") }
    }

    /// A /proc/meminfo field in bytes (`CmaTotal`, `CmaFree`).
    static func meminfo(_ key: String) -> UInt64? {
        guard let text = Harness.readFile("/proc/meminfo") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
            let fields = line.split(separator: " ")
            guard fields.count >= 2, let value = UInt64(fields[1]) else { return nil }
            return fields.count >= 3 && fields[2] == "kB" ? value * 1024 : value
        }
        return nil
    }

    static func free() throws -> UInt64 { try expectSome(meminfo("CmaFree"), "CmaFree in /proc/meminfo") }
    static func total() throws -> UInt64 { try expectSome(meminfo("CmaTotal"), "CmaTotal in /proc/meminfo") }
}

private let cma: [Requirement] = [.cmaHeap, .root]
private let cmaAndSystem: [Requirement] = [.cmaHeap, .heap("system"), .root]
private let mib = 1 << 20
/// The allocation size of the exhaustion tests: three fit in the 64 MiB region, a fourth cannot.
private let chunk = 16 << 20

/// Allocates from `heap`, writes a pattern through a mapping and reads it back, and checks that CmaFree
/// dropped by at least half the size (the region may also hold movable pages, so not exactly by the size).
private func allocateAndCheck(_ heap: String, size: Int) throws -> DmaBuffer {
    let before = try CMAFacts.free()
    let buffer = try DmaHeap(named: heap).allocate(length: size)
    try expectEqual(try buffer.size(), size, "size")
    try expectEqual(try buffer.info().exporter, heap, "exporter")
    try buffer.withMappedCPUAccess(.readWrite) { bytes in
        Pages.stamp(bytes) { 0x434d_4100_0000_0000 | UInt64($0) }
        for page in stride(from: 0, to: size / pageSize, by: 97) {
            try expectEqual(Pages.tag(bytes, page: page), 0x434d_4100_0000_0000 | UInt64(page), "page \(page)")
        }
    }
    let after = try CMAFacts.free()
    try expect(after + UInt64(size / 2) <= before, "CmaFree went from \(before) to \(after) for a \(size)-byte buffer")
    return buffer
}

/// Allocates `chunk`-sized buffers from `heap` until the kernel says ENOMEM; at most `limit`.
private func fill(_ heap: String, limit: Int = 8) throws -> [DmaBuffer] {
    let device = try DmaHeap(named: heap)
    var held: [DmaBuffer] = []
    while held.count < limit {
        do {
            held.append(try device.allocate(length: chunk))
        } catch let error as DmaBufError where error.errno == .noMemory {
            return held
        }
    }
    throw TestFailure(description: "\(limit) buffers of \(chunk) bytes from \(heap) and still no ENOMEM: the region is not 64 MiB")
}

/// A heap directory holding symlinks `names` to the real default CMA heap (plus `system`), so that the
/// daemon's resolver sees the alias sets other kernels have, while allocations still reach the real heap.
private func aliasDirectory(_ names: [String]) throws -> String {
    TestDaemon.counter += 1
    let directory = "/tmp/cma-heaps-\(getpid())-\(TestDaemon.counter)"
    _ = mkdir(directory, 0o755)
    for name in names + ["system"] {
        let target = DmaHeap.defaultDirectory + "/" + (name == "system" ? "system" : "default_cma_region")
        try expect(symlink(target, directory + "/" + name) == 0, "symlink \(name): \(Errno(rawValue: errno).name)")
    }
    return directory
}

/// True when `text` says how much is free as "<number> <unit> free" (`12.5 MiB free`, `0 B free`).
private func namesFreeSpace(_ text: String) -> Bool {
    let words = text.split(separator: " ").map(String.init)
    for i in words.indices.dropFirst(2) where words[i].hasPrefix("free") {
        if ["B", "KiB", "MiB", "GiB", "bytes"].contains(words[i - 1]) && Double(words[i - 2]) != nil { return true }
    }
    return false
}

private func removeAliasDirectory(_ directory: String, _ names: [String]) {
    for name in names + ["system"] { _ = unlink(directory + "/" + name) }
    _ = rmdir(directory)
}

/// What root can confirm about a buffer without any address: debugfs `dma_buf/bufinfo` lists every dma-buf
/// with its exporter (the heap's name) and inode. Returns the exporter of the line for `inode`, or nil.
private func bufinfoExporter(inode: UInt64) -> String? {
    guard let text = Harness.readFile("/sys/kernel/debug/dma_buf/bufinfo") else { return nil }
    // size, flags, mode, count, exp_name, ino, name: tab-separated, numbers zero-padded.
    for line in text.split(separator: "\n") {
        let fields = line.split(separator: "\t").map { String($0).trimmingCharacters(in: " ") }
        if fields.count >= 6, UInt64(fields[5]) == inode { return fields[4] }
    }
    return nil
}

enum CMATests {
    static let all: [DeviceTest] = [
        DeviceTest("cma.heap-present-with-both-names", requires: cma) {
            let names = CMAFacts.heapNames()
            try expect(names.contains("default_cma_region"), "no default_cma_region in \(names)")
            try expect(names.contains("reserved"), "no legacy alias reserved in \(names)")
            try expectEqual(try CMAFacts.total(), UInt64(64 * mib), "CmaTotal (CONFIG_CMA_SIZE_MBYTES=64)")
        },
        DeviceTest("cma.alloc-default-cma-region", requires: cma) {
            _ = try allocateAndCheck("default_cma_region", size: 4 * mib)
        },
        DeviceTest("cma.alloc-legacy-reserved-alias", requires: cma) {
            _ = try allocateAndCheck("reserved", size: 4 * mib)
        },
        DeviceTest("cma.both-names-share-one-region", requires: cma) {
            // 40 MiB through one name leaves under 24 MiB: 32 MiB through the other must then fail, and
            // succeed once the first buffer is gone.
            var first: DmaBuffer? = try DmaHeap(named: "default_cma_region").allocate(length: 40 * mib)
            try expectError(.noMemory, "dma-heap 'reserved'", "out of memory") {
                try DmaHeap(named: "reserved").allocate(length: 32 * mib)
            }
            try expect(first != nil, "first buffer held")
            first = nil
            _ = try DmaHeap(named: "reserved").allocate(length: 32 * mib)
        },
        DeviceTest("cma.freed-returns-for-next-request", requires: cma) {
            // CmaFree also moves with movable pages the kernel parks in the region, so the proof is that the
            // freed space serves the next request, and that the whole region fills the same way again.
            var held = try fill("default_cma_region")
            try expectEqual(held.count, 3, "16 MiB buffers that fit in 64 MiB (less what the kernel took at boot)")
            let freeWhenFull = try CMAFacts.free()
            try expect(freeWhenFull < UInt64(chunk), "CmaFree \(freeWhenFull) after filling the region")
            held.removeLast()
            held.append(try DmaHeap(named: "default_cma_region").allocate(length: chunk))
            try expectEqual(try held.last!.size(), chunk, "size of the buffer in the freed space")
            held.removeAll()
            try expectEqual(try fill("default_cma_region").count, 3, "buffers after freeing all")
        },
        DeviceTest("cma.resolver-logical-cma-on-this-kernel", requires: cma) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let heaps = try connection.heaps().heaps
                let logical = try expectSome(heaps.first { $0.name == "cma" }, "logical cma in \(heaps.map(\.name))")
                try expectEqual(logical.kind, "cma", "kind")
                // Both names are the same region; the resolver must pick the current name, not the alias
                // the kernel keeps only for old userspace (CONFIG_DMABUF_HEAPS_CMA_LEGACY).
                try expectEqual(logical.device, DmaHeap.defaultDirectory + "/default_cma_region", "device behind cma")
                for name in ["cma:default_cma_region", "cma:reserved"] {
                    try expect(heaps.contains { $0.name == name && $0.kind == "cma" }, "\(name) listed: \(heaps.map(\.name))")
                }
                let buffer = try connection.allocate(size: 2 * mib, heap: "cma", tag: "camera")
                try expectEqual(buffer.info.heap, "cma", "heap")
                try expectEqual(try buffer.buffer.info().exporter, "default_cma_region", "exporter")
            }
        },
        DeviceTest("cma.resolver-choice-among-aliases", requires: cma) {
            // The alias sets kernels have: 6.x (reserved), 6.17+ (default_cma_region + legacy reserved), and
            // devicetree boards (linux,cma), each a directory of symlinks to this kernel's real heap.
            let cases: [(names: [String], expected: String)] = [
                (["reserved"], "reserved"),
                (["linux,cma"], "linux,cma"),
                (["default_cma_region", "reserved"], "default_cma_region"),
                (["linux,cma", "reserved"], "linux,cma"),
            ]
            for (names, expected) in cases {
                let directory = try aliasDirectory(names)
                defer { removeAliasDirectory(directory, names) }
                try withDaemon(config: "heap_directory = \(directory)") { daemon in
                    let connection = try daemon.connect()
                    let logical = try expectSome(try connection.heaps().heaps.first { $0.name == "cma" }, "logical cma with \(names)")
                    try expectEqual(logical.device, directory + "/" + expected, "cma among \(names)")
                    let buffer = try connection.allocate(size: mib, heap: "cma")
                    try expectEqual(buffer.info.heap, "cma", "heap with \(names)")
                }
            }
        },
        DeviceTest("cma.buffer-is-one-contiguous-run", requires: cma) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 8 * mib, heap: "cma")
                let layout = try connection.layout(buffer.info.id)
                try expectEqual(layout.kind, .bufferPages, "kind")
                try expectEqual(layout.runs, [PageRun(start: 0, pages: UInt64(8 * mib / pageSize))], "one run")
                // Physical: the CMA heap maps its pages so that pagemap cannot see them. The daemon must
                // either refuse with the reason or, if it ever learns the pages, give exactly one run.
                do {
                    let physical = try connection.layout(buffer.info.id, physical: true)
                    try expectEqual(physical.kind, .physical, "kind")
                    try expectEqual(physical.runs.count, 1, "physical runs of a CMA buffer: \(physical.runs)")
                    try expectEqual(physical.runs.first?.pages, UInt64(8 * mib / pageSize), "pages")
                } catch let error as DmaBufClientError {
                    try expectEqual(error.errno, .notSupported, "physical layout refusal: \(error)")
                }
            }
        },
        DeviceTest("cma.contiguous-flag-on-cma-not-system", requires: cmaAndSystem) {
            // Protocol v2: buffer_info and layout say "contiguous" for CMA buffers (by construction), under
            // both kernel names and the logical ones; a system-heap buffer never says it. No address comes
            // with it: root confirms the fact through debugfs bufinfo (exporter = the CMA heap, by inode).
            try withDaemon { daemon in
                let connection = try daemon.connect()
                for heap in ["cma", "cma:default_cma_region", "cma:reserved", "default_cma_region", "reserved"] {
                    let buffer = try connection.allocate(size: 2 * mib, heap: heap, tag: "contig")
                    try expect(buffer.info.isContiguous, "\(heap): allocate reply flags \(buffer.info.flags)")
                    try expect(try connection.info(buffer.info.id).isContiguous, "\(heap): info")
                    let layout = try connection.layout(buffer.info.id, firstPage: 3, pageCount: 100)
                    try expect(layout.isContiguous && layout.runs == [PageRun(start: 3, pages: 100)], "\(heap): layout \(layout)")
                    try connection.releaseLease(layout.lease, fence: nil)
                    let exporter = try expectSome(bufinfoExporter(inode: buffer.info.inode), "buffer \(buffer.info.inode) in debugfs dma_buf/bufinfo")
                    try expect(CMAFacts.aliases.contains(exporter), "\(heap): bufinfo exporter \(exporter)")
                }
                let system = try connection.allocate(size: 2 * mib, heap: "system")
                try expectEqual(system.info.flags, 0, "system heap buffer flags")
                let layout = try connection.layout(system.info.id)
                try expect(!layout.isContiguous, "system heap layout marked contiguous: \(layout)")
                try connection.releaseLease(layout.lease, fence: nil)
                // As users see it: dmabufctl info and ranges, text and JSON.
                let cma = try connection.allocate(size: mib, heap: "cma")
                try expectOK(try dmabufctl(daemon, "info", "\(cma.info.id)"), "physically contiguous")
                try expectOK(try dmabufctl(daemon, "ranges", "\(cma.info.id)"), "physically contiguous")
                let json = try dmabufctl(daemon, "ranges", "\(cma.info.id)", "--format", "json")
                try expectOK(json)
                try expect(json.out.filter { !$0.isWhitespace }.contains("\"contiguous\":true"), "ranges JSON:\n\(json.out)")
                let sysText = try dmabufctl(daemon, "ranges", "\(system.info.id)")
                try expect(!sysText.out.contains("contiguous"), "system heap ranges: \(sysText.out)")
            }
        },
        DeviceTest("cma.exhaustion-any-falls-back-to-system", requires: cmaAndSystem) {
            try withDaemon(config: "policy.any = cma, system") { daemon in
                let connection = try daemon.connect()
                var heaps: [String] = []
                var held: [RemoteBuffer] = []
                while !heaps.contains("system") && heaps.count < 8 {
                    let buffer = try connection.allocate(size: chunk, heap: "any", tag: "frame")
                    heaps.append(buffer.info.heap)
                    held.append(buffer)
                }
                try expectEqual(heaps, ["cma", "cma", "cma", "system"], "heaps while filling the region")
                let stats = try connection.stats()
                try expectEqual(stats.heaps.first { $0.heap == "cma" }?.failures, 1, "cma refusals counted")
                try expectEqual(stats.heaps.first { $0.heap == "system" }?.failures ?? 0, 0, "system refusals")
                try expectEqual(stats.heaps.first { $0.heap == "cma" }?.bytes, UInt64(3 * chunk), "cma bytes")
                // Freed CMA returns: release one CMA buffer (ours and the daemon's references), ask again.
                let freed = held.removeFirst()
                try connection.release(freed.info.id)
                _ = consume freed
                try eventually(.seconds(5), "the released CMA buffer to be freed") {
                    try connection.stats().heaps.first { $0.heap == "cma" }?.bytes == UInt64(2 * chunk)
                }
                try expectEqual(try connection.allocate(size: chunk, heap: "any").info.heap, "cma", "heap after the free")
            }
        },
        DeviceTest("cma.exhaustion-cma-only-enomem-names-heap-and-free", requires: cma) {
            try withDaemon(config: "policy.camera = cma") { daemon in
                let connection = try daemon.connect()
                var held: [RemoteBuffer] = []
                for _ in 0..<3 { held.append(try connection.allocate(size: chunk, heap: "camera")) }
                let free = try CMAFacts.free()
                let device = try expectSome(try connection.heaps().heaps.first { $0.name == "cma" }?.device, "logical cma")
                let kernelName = String(device.split(separator: "/").last ?? "")
                // The refusal must say which heap is full and how much it has left, so a camera app's log
                // tells the user what happened (rpicam-apps #707).
                let error = try expectRefusal(.noMemory, kernelName) {
                    try connection.allocate(size: chunk, heap: "camera")
                }
                try expect(namesFreeSpace(error.description), "refusal names the heap's free space (\"<size> free\"; CmaFree was \(free)): \(error)")
                let direct = try expectRefusal(.noMemory, kernelName) { try connection.allocate(size: chunk, heap: "cma") }
                try expect(namesFreeSpace(direct.description), "refusal names the heap's free space: \(direct)")
                try expectEqual(try connection.stats().heaps.first { $0.heap == "cma" }?.failures, 2, "cma refusals counted")
                try expectEqual(held.count, 3, "buffers held")
            }
        },
        DeviceTest("cma.heaps-report-total-and-free", requires: cma) {
            // Protocol v2 (docs/PROTOCOL.md): each heap entry has total_bytes and free_bytes; CMA heaps report
            // CmaTotal/CmaFree. Checked through dmabufctl, as users see it.
            try withDaemon { daemon in
                let total = try CMAFacts.total()
                let result = try dmabufctl(daemon, "heaps", "--format", "json")
                try expectOK(result)
                let compact = result.out.filter { !$0.isWhitespace }
                try expect(compact.contains("\"total_bytes\":\(total)") || compact.contains("\"totalBytes\":\(total)"),
                           "heaps JSON lacks CMA total \(total):\n\(result.out)")
                try expect(compact.contains("\"free_bytes\":") || compact.contains("\"freeBytes\":"), "heaps JSON lacks free bytes:\n\(result.out)")
                let text = try dmabufctl(daemon, "heaps")
                try expectOK(text, "cma", "64 MiB")
            }
        },
    ]
}
