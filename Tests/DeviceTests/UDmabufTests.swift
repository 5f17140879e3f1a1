// udmabuf tests, after tools/testing/selftests/drivers/dma-buf/udmabuf.c: alignment, non-memfd and seal
// refusals, the module limits (ours first, then the kernel's own refusal when ours is bypassed), CREATE and
// CREATE_LIST with data written through the memfd seen in the dma-buf, and hugetlb memfds.
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum UDmabufTests {
    static let udmabuf: [Requirement] = [.udmabuf]
    static let page = UInt64(pageSize)

    static let all: [DeviceTest] = [
        DeviceTest("udmabuf.create-1m", requires: udmabuf) {
            let memfd = try Memfd(name: "udmabuf-1m", size: 1 << 20)
            let memory = try memfd.map(length: 1 << 20)
            Pages.stamp(memory.bytes) { 0x5544_4d41_0000_0000 | UInt64($0) }
            let buffer = try UDmabuf().create(memfd: memfd.fd.descriptor, size: 1 << 20)
            try expectEqual(try buffer.size(), 1 << 20, "size")
            try buffer.withMappedCPUAccess(.read) { bytes in
                for page in 0..<256 {
                    try expectEqual(Pages.tag(bytes, page: page), 0x5544_4d41_0000_0000 | UInt64(page), "page \(page)")
                }
            }
            // Writes through the memfd after CREATE land in the same pages.
            Pages.fill(memory.bytes, 0x3c)
            try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 0x3c), "later memfd writes seen") }
            // And writes through the dma-buf land in the memfd.
            try buffer.withMappedCPUAccess(.write) { Pages.fill($0, 0xc3) }
            try expect(Pages.all(memory.bytes, equal: 0xc3), "dma-buf writes seen in the memfd")
        },
        DeviceTest("udmabuf.exporter-name", requires: udmabuf) {
            let memfd = try Memfd(name: "udmabuf-name", size: pageSize)
            let buffer = try UDmabuf().create(memfd: memfd.fd.descriptor, size: page)
            let info = try buffer.info()
            try expectEqual(info.exporter, "udmabuf", "exporter")
            try expectEqual(info.size, pageSize, "fdinfo size")
            try expect(try Descriptor.fdFlags(buffer.fd.descriptor) & FD_CLOEXEC != 0, "UDMABUF_FLAGS_CLOEXEC not honoured")
            _ = try DmaBuffer(checking: buffer.fd)
        },
        DeviceTest("udmabuf.limits-from-sysfs", requires: udmabuf) {
            // The defaults moved: size_limit_mb is 64 up to 6.x and INT_MAX from 7.0 on. Whatever this kernel
            // says, the library must read exactly that, and it must be one of the two known defaults.
            let device = try UDmabuf()
            let sizeLimit = try expectSome(Harness.readNumber(sizeLimitPath), "read \(sizeLimitPath)")
            let listLimit = try expectSome(Harness.readNumber(listLimitPath), "read \(listLimitPath)")
            try expectEqual(device.limits, UDmabuf.Limits(sizeLimitMB: sizeLimit, listLimit: listLimit), "limits vs sysfs")
            try expect([64, Int(Int32.max)].contains(sizeLimit), "size_limit_mb \(sizeLimit) is neither 6.x's 64 nor 7.x's INT_MAX")
            try expectEqual(listLimit, 1024, "list_limit default")
            try expectEqual(device.limits.sizeLimitBytes, sizeLimit << 20, "bytes")
        },
        DeviceTest("udmabuf.offset-half-page-einval", requires: udmabuf) {
            let memfd = try Memfd(name: "udmabuf-offset", size: 4 * pageSize)
            try expectError(.invalidArgument, "udmabuf", "offset \(page / 2) is not page-aligned", "multiples of \(page)") {
                try UDmabuf().create(memfd: memfd.fd.descriptor, offset: page / 2, size: page)
            }
        },
        DeviceTest("udmabuf.size-half-page-einval", requires: udmabuf) {
            let memfd = try Memfd(name: "udmabuf-size", size: 4 * pageSize)
            try expectError(.invalidArgument, "size \(page / 2) is not a positive multiple of the page size") {
                try UDmabuf().create(memfd: memfd.fd.descriptor, size: page / 2)
            }
            try expectError(.invalidArgument, "size 0 is not a positive multiple") {
                try UDmabuf().create(memfd: memfd.fd.descriptor, size: 0)
            }
        },
        DeviceTest("udmabuf.not-memfd-ebadfd", requires: udmabuf) {
            let device = try UDmabuf()
            let null = try Descriptor.open("/dev/null")
            try expectError(.badFileDescriptorState, "fd \(null.descriptor.rawValue) is not a memfd", "memfd_create") {
                try device.create(memfd: null.descriptor, size: page)
            }
            let (readEnd, _) = try Descriptor.pipe()
            try expectError(.badFileDescriptorState, "is not a memfd") {
                try device.create(memfd: readEnd.descriptor, size: page)
            }
            // A regular file (on /tmp's overlay in the VM) is not a memfd either.
            let directory = try Descriptor.temporaryDirectory()
            defer { Descriptor.remove(directory: directory, files: ["file"]) }
            let file = try Descriptor.open(directory + "/file", create: true)
            _ = ftruncate(file.descriptor.rawValue, off_t(pageSize))
            try expectError(.badFileDescriptorState, "is not a memfd") {
                try device.create(memfd: file.descriptor, size: page)
            }
        },
        DeviceTest("udmabuf.no-seal-shrink-einval", requires: udmabuf) {
            let memfd = try Memfd(name: "udmabuf-noseal", size: 4 * pageSize, seals: [])
            let error = try expectError(.invalidArgument, "memfd lacks F_SEAL_SHRINK", "add F_SEAL_SHRINK") {
                try UDmabuf().create(memfd: memfd.fd.descriptor, size: page)
            }
            try expect(!error.description.contains("kernel refused"), "the kernel's refusal came first: \(error)")
            // Without MFD_ALLOW_SEALING the memfd carries F_SEAL_SEAL and can never get F_SEAL_SHRINK.
            let unsealable = try Memfd(name: "udmabuf-nosealing", size: 4 * pageSize, flags: [.closeOnExec], seals: [])
            try expectError(.invalidArgument, "memfd lacks F_SEAL_SHRINK") {
                try UDmabuf().create(memfd: unsealable.fd.descriptor, size: page)
            }
            try expectError(.notPermitted, "cannot add seals 0x2", "MFD_ALLOW_SEALING") { try unsealable.addSeals(.shrink) }
        },
        DeviceTest("udmabuf.seal-write-einval", requires: udmabuf) {
            let memfd = try Memfd(name: "udmabuf-sealwrite", size: 4 * pageSize, seals: [.shrink, .write])
            try expectError(.invalidArgument, "memfd has F_SEAL_WRITE or F_SEAL_FUTURE_WRITE", "without write seals") {
                try UDmabuf().create(memfd: memfd.fd.descriptor, size: page)
            }
            let future = try Memfd(name: "udmabuf-sealfuture", size: 4 * pageSize, seals: [.shrink, .futureWrite])
            try expectError(.invalidArgument, "F_SEAL_FUTURE_WRITE") {
                try UDmabuf().create(memfd: future.fd.descriptor, size: page)
            }
        },
        DeviceTest("udmabuf.range-past-end-einval", requires: udmabuf) {
            let memfd = try Memfd(name: "udmabuf-short", size: 4 * pageSize)
            try expectError(.invalidArgument, "range [0, \(8 * page)) ends past the memfd's 16 KiB", "ftruncate") {
                try UDmabuf().create(memfd: memfd.fd.descriptor, size: 8 * page)
            }
            try expectError(.invalidArgument, "range [\(3 * page), \(5 * page)) ends past") {
                try UDmabuf().create(list: [.init(memfd: memfd.fd.descriptor, offset: 3 * page, size: 2 * page)])
            }
        },
        DeviceTest("udmabuf.over-size-limit", requires: udmabuf + [.root]) {
          try withSizeLimit(64) {
            // Sparse: ftruncate allocates nothing, and the refusal comes before any page is pinned.
            let memfd = try Memfd(name: "udmabuf-big", size: 65 << 20)
            try expectError(.invalidArgument, "MiB exceeds the module's size_limit_mb=64", "raise /sys/module/udmabuf/parameters/size_limit_mb") {
                try UDmabuf().create(memfd: memfd.fd.descriptor, size: UInt64(64 << 20) + page)
            }
            // Split over a list, the total still counts.
            let fd = memfd.fd.descriptor
            try expectError(.invalidArgument, "exceeds the module's size_limit_mb=64") {
                try UDmabuf().create(list: [
                    .init(memfd: fd, offset: 0, size: 32 << 20), .init(memfd: fd, offset: 32 << 20, size: page),
                    .init(memfd: fd, offset: (32 << 20) + 2 * page, size: 32 << 20),
                ])
            }
          }
        },
        DeviceTest("udmabuf.kernel-agrees-size-limit", requires: udmabuf + [.root]) {
          try withSizeLimit(64) {
            // Tell our check the limit is larger than it is: the kernel must then refuse by itself.
            let directory = try fakeParameters(sizeLimitMB: 4096, listLimit: 1024)
            defer { Descriptor.remove(directory: directory, files: ["size_limit_mb", "list_limit"]) }
            let device = try UDmabuf(parametersDirectory: directory)
            try expectEqual(device.limits.sizeLimitMB, 4096, "fake limit read")
            let memfd = try Memfd(name: "udmabuf-big", size: (64 << 20) + pageSize)
            try expectError(.invalidArgument, "the kernel refused the request") {
                try device.create(memfd: memfd.fd.descriptor, size: UInt64(64 << 20) + page)
            }
          }
        },
        DeviceTest("udmabuf.over-list-limit", requires: udmabuf) {
            // 1025 single pages, none adjacent, so merging cannot bring them under list_limit.
            let memfd = try Memfd(name: "udmabuf-list", size: 2050 * pageSize)
            let list = (0..<1025).map { UDmabuf.Range(memfd: memfd.fd.descriptor, offset: UInt64($0) * 2 * page, size: page) }
            try expectError(.invalidArgument, "1025 list entries exceed the module's list_limit=1024", "merge adjacent ranges") {
                try UDmabuf().create(list: list)
            }
        },
        DeviceTest("udmabuf.kernel-agrees-list-limit", requires: udmabuf) {
            let directory = try fakeParameters(sizeLimitMB: 64, listLimit: 100_000)
            defer { Descriptor.remove(directory: directory, files: ["size_limit_mb", "list_limit"]) }
            let memfd = try Memfd(name: "udmabuf-list", size: 2050 * pageSize)
            let list = (0..<1025).map { UDmabuf.Range(memfd: memfd.fd.descriptor, offset: UInt64($0) * 2 * page, size: page) }
            try expectError(.invalidArgument, "the kernel refused the request") {
                try UDmabuf(parametersDirectory: directory).create(list: list)
            }
        },
        DeviceTest("udmabuf.create-list-4-pieces", requires: udmabuf) {
            // A 1024-page memfd, four pieces out of order; the memfd is written only after CREATE_LIST.
            let memfd = try Memfd(name: "udmabuf-pieces", size: 1024 * pageSize)
            let pieces: [(offset: UInt64, size: UInt64)] = [(700 * page, 10 * page), (3 * page, 5 * page), (500 * page, 20 * page), (1023 * page, page)]
            let buffer = try UDmabuf().create(list: pieces.map { .init(memfd: memfd.fd.descriptor, offset: $0.offset, size: $0.size) })
            try expectEqual(try buffer.size(), 36 * pageSize, "size")
            let memory = try memfd.map(length: 1024 * pageSize)
            Pages.stamp(memory.bytes) { 0x4c49_5354_0000_0000 | UInt64($0) }
            let layout = PageRuns(memfdRanges: pieces)
            try expectEqual(layout.runs, [.init(start: 700, pages: 10), .init(start: 3, pages: 5), .init(start: 500, pages: 20), .init(start: 1023, pages: 1)], "layout")
            try buffer.withMappedCPUAccess(.read) { bytes in
                for page in 0..<36 {
                    let memfdPage = layout.page(at: UInt64(page))!
                    try expectEqual(Pages.tag(bytes, page: page), 0x4c49_5354_0000_0000 | memfdPage, "dma-buf page \(page) (memfd page \(memfdPage))")
                }
            }
        },
        DeviceTest("udmabuf.create-list-two-memfds", requires: udmabuf) {
            let a = try Memfd(name: "udmabuf-a", size: 8 * pageSize)
            let b = try Memfd(name: "udmabuf-b", size: 8 * pageSize)
            let buffer = try UDmabuf().create(list: [
                .init(memfd: b.fd.descriptor, offset: 4 * page, size: 2 * page),
                .init(memfd: a.fd.descriptor, offset: 0, size: page),
                .init(memfd: b.fd.descriptor, offset: 0, size: page),
            ])
            let mapA = try a.map(length: 8 * pageSize), mapB = try b.map(length: 8 * pageSize)
            Pages.stamp(mapA.bytes) { 0xa000 + UInt64($0) }
            Pages.stamp(mapB.bytes) { 0xb000 + UInt64($0) }
            try buffer.withMappedCPUAccess(.read) { bytes in
                try expectEqual((0..<4).map { Pages.tag(bytes, page: $0) }, [0xb004, 0xb005, 0xa000, 0xb000], "pages")
            }
        },
        DeviceTest("udmabuf.merge-adjacent", requires: udmabuf) {
            // 1025 adjacent single pages: over list_limit as given, one entry once merged.
            let memfd = try Memfd(name: "udmabuf-merge", size: 1025 * pageSize)
            let list = (0..<1025).map { UDmabuf.Range(memfd: memfd.fd.descriptor, offset: UInt64($0) * page, size: page) }
            let merged = UDmabuf.mergeAdjacent(list)
            try expectEqual(merged, [.init(memfd: memfd.fd.descriptor, offset: 0, size: 1025 * page)], "merged")
            let buffer = try UDmabuf().create(list: list)
            try expectEqual(try buffer.size(), 1025 * pageSize, "size")
            let memory = try memfd.map(length: 1025 * pageSize)
            Pages.stamp(memory.bytes) { UInt64($0) }
            try buffer.withMappedCPUAccess(.read) { bytes in
                for page in [0, 1, 512, 1024] { try expectEqual(Pages.tag(bytes, page: page), UInt64(page), "page \(page)") }
            }
        },
        DeviceTest("udmabuf.outlives-memfd", requires: udmabuf) {
            let buffer: DmaBuffer
            do {
                let memfd = try Memfd(name: "udmabuf-gone", size: 4 * pageSize)
                let memory = try memfd.map(length: 4 * pageSize)
                Pages.fill(memory.bytes, 0x77)
                buffer = try UDmabuf().create(memfd: memfd.fd.descriptor, size: 4 * page)
            }
            try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 0x77), "pages pinned after the memfd closed") }
        },
        DeviceTest("udmabuf.hugetlb-list", requires: [.udmabuf, .hugePages(2)]) {
            // Two 2 MiB huge pages; four 4 KiB-granular pieces from both, out of order, one across the boundary.
            let size = 4 << 20
            let memfd = try Memfd(name: "udmabuf-huge", size: size, flags: [.closeOnExec, .allowSealing, .hugeTLB])
            // Map before CREATE_LIST. In the other order, with the pool sized exactly, 6.12's mmap fails with
            // ENOMEM: the huge pages udmabuf allocated do not seem to count against the file's reservation,
            // so the mapping asks the pool for fresh ones.
            let memory = try memfd.map(length: size)
            let pieces: [(offset: UInt64, size: UInt64)] = [(600 * page, 4 * page), (10 * page, 2 * page), (500 * page, 30 * page), (0, page)]
            let buffer = try UDmabuf().create(list: pieces.map { .init(memfd: memfd.fd.descriptor, offset: $0.offset, size: $0.size) })
            try expectEqual(try buffer.size(), 37 * pageSize, "size")
            // Written only after CREATE_LIST.
            Pages.stamp(memory.bytes) { 0x4855_4745_0000_0000 | UInt64($0) }
            let layout = PageRuns(memfdRanges: pieces)
            try buffer.withMappedCPUAccess(.read) { bytes in
                for page in 0..<37 {
                    try expectEqual(Pages.tag(bytes, page: page), 0x4855_4745_0000_0000 | layout.page(at: UInt64(page))!, "page \(page)")
                }
            }
        },
        DeviceTest("udmabuf.hugetlb-create", requires: [.udmabuf, .hugePages(1)]) {
            let memfd = try Memfd(name: "udmabuf-huge1", size: 2 << 20, flags: [.closeOnExec, .allowSealing, .hugeTLB])
            let memory = try memfd.map(length: 2 << 20)
            Pages.fill(memory.bytes, 0x48)
            let buffer = try UDmabuf().create(memfd: memfd.fd.descriptor, size: 2 << 20)
            try expectEqual(try buffer.info().exporter, "udmabuf", "exporter")
            try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 0x48), "huge page contents") }
        },
    ]

    /// A directory that looks like /sys/module/udmabuf/parameters with the given limits.
    static let sizeLimitPath = UDmabuf.defaultParametersDirectory + "/size_limit_mb"
    static let listLimitPath = UDmabuf.defaultParametersDirectory + "/list_limit"

    /// Runs `body` with the module's size_limit_mb set to `megabytes` (root; the parameter is 0644), then
    /// puts the kernel's own value back. From 7.0 the default is INT_MAX, which no test can exceed, so the
    /// limit tests set 6.x's 64 on every kernel and test the same refusal everywhere.
    static func withSizeLimit(_ megabytes: Int, _ body: () throws -> Void) throws {
        let original = try expectSome(Harness.readNumber(sizeLimitPath), "read \(sizeLimitPath)")
        try expect(Harness.writeFile(sizeLimitPath, "\(megabytes)\n"), "write \(sizeLimitPath)")
        defer { Harness.writeFile(sizeLimitPath, "\(original)\n") }
        try expectEqual(Harness.readNumber(sizeLimitPath), megabytes, "size_limit_mb after writing it")
        try body()
    }

    static func fakeParameters(sizeLimitMB: Int, listLimit: Int) throws -> String {
        let directory = try Descriptor.temporaryDirectory()
        try expect(create(directory + "/size_limit_mb", "\(sizeLimitMB)\n"), "write size_limit_mb")
        try expect(create(directory + "/list_limit", "\(listLimit)\n"), "write list_limit")
        return directory
    }

    private static func create(_ path: String, _ text: String) -> Bool {
        guard let fd = try? FileDescriptor.open(path, .writeOnly, options: [.closeOnExec, .create, .truncate], permissions: .ownerReadWrite) else { return false }
        defer { try? fd.close() }
        return (try? fd.writeAll(Array(text.utf8))) != nil
    }
}
