// PageRuns from /proc/self/pagemap: the physical pages behind memfd mappings (the memory a udmabuf pins),
// and the refusals for dma-buf mappings (VM_PFNMAP) and for readers without CAP_SYS_ADMIN.
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum PageRunTests {
    static let all: [DeviceTest] = [
        DeviceTest("pageruns.memfd-covers-pages", requires: [.root]) {
            let memfd = try Memfd(name: "runs", size: 256 * pageSize)
            let mapping = try memfd.map(length: 256 * pageSize)
            let runs = try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapping.bytes))
            try expectEqual(runs.totalPages, 256, "pages covered")
            try expectEqual(runs.runs.reduce(0) { $0 + $1.pages }, 256, "sum of run lengths")
            try expect(runs.count >= 1 && runs.count <= 256, "\(runs.count) runs for 256 pages")
            try expect(runs.allSatisfy { $0.start > 0 && $0.pages > 0 }, "a run with PFN 0 or no pages: \(runs.runs)")
            // Runs are maximal: no run continues the one before it.
            for i in runs.indices.dropFirst() { try expect(runs[i - 1].end != runs[i].start, "runs \(i - 1) and \(i) should have merged") }
            for page in [UInt64(0), 1, 128, 255] { try expect(runs.page(at: page) != nil, "page \(page)") }
            try expectEqual(runs.page(at: 256), nil, "past the end")
            // The run list is its own page-by-page expansion, compressed again.
            let expanded = (0..<runs.totalPages).map { runs.page(at: $0)! }
            try expectEqual(PageRuns(pages: expanded), runs, "re-compressed")
        },
        DeviceTest("pageruns.udmabuf-pins-memfd-pages", requires: [.root, .udmabuf]) {
            let memfd = try Memfd(name: "pinned", size: 64 * pageSize)
            let buffer = try UDmabuf().create(memfd: memfd.fd.descriptor, offset: 16 * UInt64(pageSize), size: 32 * UInt64(pageSize))
            // Two separate mappings of the memfd see the same physical pages.
            let first = try memfd.map(length: 64 * pageSize)
            let second = try memfd.map(length: 64 * pageSize)
            let runs = try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(first.bytes))
            try expectEqual(try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(second.bytes)), runs, "second mapping")
            // The udmabuf covers memfd pages [16, 48): writes through it land exactly there.
            try buffer.withMappedCPUAccess(.write) { Pages.stamp($0) { 0x5049_4e00 + UInt64($0) } }
            for page in 0..<64 {
                let expected: UInt64 = (16..<48).contains(page) ? 0x5049_4e00 + UInt64(page - 16) : 0
                let actual = first.bytes.load(fromByteOffset: page * pageSize, as: UInt64.self)
                try expectEqual(actual, expected, "memfd page \(page)")
            }
            let pinned = runs.slice(16..<48)
            try expectEqual(pinned.totalPages, 32, "slice pages")
            try expect(pinned.sharesPages(with: runs), "slice shares pages with the whole")
            try expect(!pinned.sharesPages(with: runs.slice(0..<16)), "slice overlaps pages before it")
            try expectEqual(try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(first.bytes)), runs, "PFNs stable while pinned")
        },
        DeviceTest("pageruns.distinct-memfds-disjoint", requires: [.root]) {
            let a = try Memfd(name: "a", size: 32 * pageSize), b = try Memfd(name: "b", size: 32 * pageSize)
            let mapA = try a.map(length: 32 * pageSize), mapB = try b.map(length: 32 * pageSize)
            let runsA = try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapA.bytes))
            let runsB = try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapB.bytes))
            try expect(!runsA.sharesPages(with: runsB), "two memfds share physical pages: \(runsA.runs) \(runsB.runs)")
            try expect(runsA.sharesPages(with: runsA), "runs share pages with themselves")
        },
        DeviceTest("pageruns.heap-mapping-pfnmap", requires: [.root, .heap("system")]) {
            let buffer = try DmaHeap(named: "system").allocate(length: 4 * pageSize)
            let mapping = try buffer.map()
            Pages.fill(mapping.bytes, 1)
            try expectError(Errno(rawValue: 61), "pagemap", "page 0 of the mapping is not present", "dma-buf mappings are VM_PFNMAP") {
                try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapping.bytes))
            }
        },
        DeviceTest("pageruns.udmabuf-mapping-pfnmap", requires: [.root, .udmabuf]) {
            let memfd = try Memfd(name: "pfnmap", size: 4 * pageSize)
            let buffer = try UDmabuf().create(memfd: memfd.fd.descriptor, size: 4 * UInt64(pageSize))
            let mapping = try buffer.map()
            Pages.fill(mapping.bytes, 1)
            try expectError(Errno(rawValue: 61), "not present", "map a memfd, not a dma-buf") {
                try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapping.bytes))
            }
        },
        DeviceTest("pageruns.hugetlb-8m", requires: [.root, .hugePages(4)]) {
            let size = 8 << 20
            let memfd = try Memfd(name: "huge-runs", size: size, flags: [.closeOnExec, .allowSealing, .hugeTLB])
            let mapping = try memfd.map(length: size)
            let runs = try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapping.bytes))
            let perHuge = UInt64((2 << 20) / pageSize)
            try expectEqual(runs.totalPages, 4 * perHuge, "pages")
            try expect(runs.count <= 4, "\(runs.count) runs for 4 huge pages: \(runs.runs)")
            try expect(runs.allSatisfy { $0.start % perHuge == 0 && $0.pages % perHuge == 0 }, "runs not huge-page aligned: \(runs.runs)")
        },
        DeviceTest("pageruns.unprivileged-pfns-hidden", requires: [.root]) {
            let setpriv = "/usr/bin/setpriv"
            try expect(access(setpriv, X_OK) == 0, "\(setpriv) is missing")
            let pid = try Harness.spawn([
                setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                Harness.executablePath, "--child", "pagemap-unprivileged",
            ])
            try expectEqual(Harness.wait(pid), 0, "child as nobody (see its stderr)")
        },
    ]
}
