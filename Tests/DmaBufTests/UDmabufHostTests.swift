// udmabuf's checks run before the ioctl, so they can be exercised here with a regular file standing in for
// /dev/udmabuf: a request that passes them reaches the "device", which answers ENOTTY.
import DmaBuf
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct UDmabufMergeTests {
    let a = FileDescriptor(rawValue: 10), b = FileDescriptor(rawValue: 11)

    @Test func mergesAdjacentRangesOfTheSameMemfd() {
        let merged = UDmabuf.mergeAdjacent([
            .init(memfd: a, offset: 0, size: 4096), .init(memfd: a, offset: 4096, size: 8192),
            .init(memfd: a, offset: 12288, size: 4096),
        ])
        #expect(merged == [.init(memfd: a, offset: 0, size: 16384)])
    }

    @Test func keepsGapsOtherMemfdsAndOrder() {
        let list: [UDmabuf.Range] = [
            .init(memfd: a, offset: 0, size: 4096), .init(memfd: b, offset: 4096, size: 4096),  // other memfd
            .init(memfd: a, offset: 8192, size: 4096), .init(memfd: a, offset: 16384, size: 4096),  // gap
            .init(memfd: a, offset: 12288, size: 4096),  // backwards: not merged into the one before
        ]
        #expect(UDmabuf.mergeAdjacent(list) == list)
    }

    @Test func mergesOnlyNeighboursInListOrder() {
        let merged = UDmabuf.mergeAdjacent([
            .init(memfd: b, offset: 0, size: 4096), .init(memfd: b, offset: 4096, size: 4096),
            .init(memfd: a, offset: 0, size: 4096), .init(memfd: b, offset: 8192, size: 4096),
        ])
        #expect(merged == [.init(memfd: b, offset: 0, size: 8192), .init(memfd: a, offset: 0, size: 4096), .init(memfd: b, offset: 8192, size: 4096)])
        #expect(UDmabuf.mergeAdjacent([]).isEmpty)
    }

    @Test func manySinglePagesBecomeOne() {
        let list = (0..<2000).map { UDmabuf.Range(memfd: a, offset: UInt64($0) * 4096, size: 4096) }
        #expect(UDmabuf.mergeAdjacent(list) == [.init(memfd: a, offset: 0, size: 2000 * 4096)])
    }
}

/// A regular file that stands in for /dev/udmabuf, plus fake module parameters.
final class FakeUDmabuf {
    let scratch: ScratchDirectory
    var devicePath: String { scratch.path + "/udmabuf" }
    var parameters: String { scratch.path }

    init(sizeLimitMB: Int? = 64, listLimit: Int? = 1024) throws {
        scratch = try ScratchDirectory()
        try scratch.write("udmabuf", "")
        if let sizeLimitMB { try scratch.write("size_limit_mb", "\(sizeLimitMB)\n") }
        if let listLimit { try scratch.write("list_limit", "\(listLimit)\n") }
    }

    func open() throws -> UDmabuf { try UDmabuf(devicePath: devicePath, parametersDirectory: parameters) }

    deinit { scratch.remove() }
}

@Suite struct UDmabufCheckTests {
    let page = UInt64(pageSize)

    @Test func limitsFromParameters() throws {
        let fake = try FakeUDmabuf(sizeLimitMB: 16, listLimit: 8)
        #expect(UDmabuf.Limits.current(in: fake.parameters) == .init(sizeLimitMB: 16, listLimit: 8))
        #expect(try fake.open().limits.sizeLimitBytes == 16 << 20)
        // Missing parameters fall back to the kernel's defaults.
        #expect(UDmabuf.Limits.current(in: "/nonexistent") == .init(sizeLimitMB: 64, listLimit: 1024))
        let partial = try FakeUDmabuf(sizeLimitMB: nil, listLimit: 3)
        #expect(UDmabuf.Limits.current(in: partial.parameters) == .init(sizeLimitMB: 64, listLimit: 3))
    }

    @Test func missingDeviceIsENOENTWithTheFix() {
        expectDmaBufError(.noSuchFileOrDirectory, "udmabuf", "cannot open /nonexistent/udmabuf", "CONFIG_UDMABUF") {
            _ = try UDmabuf(devicePath: "/nonexistent/udmabuf")
        }
    }

    @Test func alignmentChecks() throws {
        let fake = try FakeUDmabuf()
        let device = try fake.open()
        let memfd = try Memfd(name: "align", size: 4 * pageSize)
        expectDmaBufError(.invalidArgument, "offset \(page / 2) is not page-aligned", "multiples of \(page) bytes") {
            try device.create(memfd: memfd.fd.descriptor, offset: page / 2, size: page)
        }
        expectDmaBufError(.invalidArgument, "size \(page / 2) is not a positive multiple of the page size") {
            try device.create(memfd: memfd.fd.descriptor, size: page / 2)
        }
        expectDmaBufError(.invalidArgument, "size 0 is not a positive multiple") {
            try device.create(memfd: memfd.fd.descriptor, size: 0)
        }
    }

    @Test func notAMemfdIsEBADFD() throws {
        let device = try FakeUDmabuf().open()
        let null = try openShared("/dev/null")
        expectDmaBufError(.badFileDescriptorState, "fd \(null.descriptor.rawValue) is not a memfd", "memfd_create(MFD_ALLOW_SEALING)") {
            try device.create(memfd: null.descriptor, size: page)
        }
        var fds: [CInt] = [-1, -1]
        #expect(pipe(&fds) == 0)
        let readEnd = SharedFD(adopting: fds[0]), writeEnd = SharedFD(adopting: fds[1])
        expectDmaBufError(.badFileDescriptorState, "is not a memfd") { try device.create(memfd: readEnd.descriptor, size: page) }
        expectDmaBufError(.badFileDescriptorState, "is not a memfd") { try device.create(memfd: writeEnd.descriptor, size: page) }
        // A descriptor that is not open at all fails as EBADF, before any memfd question.
        expectDmaBufError(.badFileDescriptor, "cannot dup fd 999999") {
            try device.create(memfd: FileDescriptor(rawValue: 999_999), size: page)
        }
    }

    @Test func sealChecks() throws {
        let device = try FakeUDmabuf().open()
        let unsealed = try Memfd(name: "unsealed", size: pageSize, seals: [])
        expectDmaBufError(.invalidArgument, "udmabuf: memfd lacks F_SEAL_SHRINK (EINVAL); create it with MFD_ALLOW_SEALING and add F_SEAL_SHRINK") {
            try device.create(memfd: unsealed.fd.descriptor, size: page)
        }
        let writeSealed = try Memfd(name: "write", size: pageSize, seals: [.shrink, .write])
        expectDmaBufError(.invalidArgument, "memfd has F_SEAL_WRITE or F_SEAL_FUTURE_WRITE") {
            try device.create(memfd: writeSealed.fd.descriptor, size: page)
        }
        let futureSealed = try Memfd(name: "future", size: pageSize, seals: [.shrink, .futureWrite])
        expectDmaBufError(.invalidArgument, "memfd has F_SEAL_WRITE or F_SEAL_FUTURE_WRITE") {
            try device.create(memfd: futureSealed.fd.descriptor, size: page)
        }
        // Other seals are fine: the request reaches the device.
        let grow = try Memfd(name: "grow", size: pageSize, seals: [.shrink, .grow, .seal])
        expectDmaBufError(.inappropriateIOCTLForDevice, "the kernel refused the request") {
            try device.create(memfd: grow.fd.descriptor, size: page)
        }
    }

    @Test func rangeMustLieInsideTheMemfd() throws {
        let device = try FakeUDmabuf().open()
        let memfd = try Memfd(name: "short", size: 4 * pageSize)
        expectDmaBufError(.invalidArgument, "range [0, \(5 * page)) ends past the memfd's \(ByteCount(4 * pageSize))", "ftruncate the memfd") {
            try device.create(memfd: memfd.fd.descriptor, size: 5 * page)
        }
        expectDmaBufError(.invalidArgument, "range [\(4 * page), \(5 * page)) ends past") {
            try device.create(memfd: memfd.fd.descriptor, offset: 4 * page, size: page)
        }
        // Exactly to the end passes the checks.
        expectDmaBufError(.inappropriateIOCTLForDevice, "the kernel refused the request") {
            try device.create(memfd: memfd.fd.descriptor, offset: 3 * page, size: page)
        }
    }

    @Test func sizeLimitCountsTheWholeList() throws {
        let device = try FakeUDmabuf(sizeLimitMB: 1, listLimit: 1024).open()
        let memfd = try Memfd(name: "big", size: 2 << 20)
        let fd = memfd.fd.descriptor
        expectDmaBufError(.invalidArgument, "exceeds the module's size_limit_mb=1", "raise /sys/module/udmabuf/parameters/size_limit_mb") {
            try device.create(memfd: fd, size: UInt64(1 << 20) + page)
        }
        expectDmaBufError(.invalidArgument, "exceeds the module's size_limit_mb=1") {
            try device.create(list: [.init(memfd: fd, offset: 0, size: 1 << 19), .init(memfd: fd, offset: (1 << 19) + page, size: (1 << 19) + page)])
        }
        expectDmaBufError(.inappropriateIOCTLForDevice, "the kernel refused the request") {
            try device.create(memfd: fd, size: 1 << 20)
        }
    }

    @Test func listLimitAppliesAfterMerging() throws {
        let device = try FakeUDmabuf(sizeLimitMB: 64, listLimit: 4).open()
        let memfd = try Memfd(name: "list", size: 16 * pageSize)
        let fd = memfd.fd.descriptor
        let scattered = (0..<5).map { UDmabuf.Range(memfd: fd, offset: UInt64($0) * 2 * page, size: page) }
        expectDmaBufError(.invalidArgument, "5 list entries exceed the module's list_limit=4", "merge adjacent ranges") {
            try device.create(list: scattered)
        }
        let adjacent = (0..<10).map { UDmabuf.Range(memfd: fd, offset: UInt64($0) * page, size: page) }
        expectDmaBufError(.inappropriateIOCTLForDevice, "the kernel refused the request") {
            try device.create(list: adjacent)
        }
    }

    @Test func overflowingRangesAreRefusedNotTrapped() throws {
        // issue 9: [{2^64-4096, 4096}, {0, 4096}] crashed the daemon in these sums.
        let device = try FakeUDmabuf().open()
        let memfd = try Memfd(name: "overflow", size: 4 * pageSize)
        let fd = memfd.fd.descriptor
        expectDmaBufError(.overflow, "ends past the largest file offset") {
            try device.create(list: [.init(memfd: fd, offset: UInt64.max - page + 1, size: page), .init(memfd: fd, offset: 0, size: page)])
        }
        expectDmaBufError(.overflow, "ends past the largest file offset") {
            try device.create(memfd: fd, offset: UInt64(Int64.max) - page + 1, size: 2 * page)
        }
        expectDmaBufError(.overflow, "ends past the largest file offset") {
            try device.create(memfd: fd, offset: page, size: UInt64.max - page + 1)
        }
        // Two sizes that each fit but together wrap a UInt64 once merged.
        let half = (UInt64(1) << 63) - page
        expectDmaBufError(.overflow) {
            try device.create(list: [.init(memfd: fd, offset: 0, size: half), .init(memfd: fd, offset: half, size: half)])
        }
    }

    @Test func extentsValidateOnceAtTheBoundary() throws {
        let (extents, total) = try UDmabuf.extents([(0, page), (2 * page, 3 * page)])
        #expect(total == 4 * page)
        #expect(extents.map(\.end) == [page, 5 * page])
        expectDmaBufError(.invalidArgument, "the list of ranges is empty") { try UDmabuf.extents([]) }
        expectDmaBufError(.invalidArgument, "3 ranges are more than 2") { try UDmabuf.extents([(0, page), (0, page), (0, page)], maximumCount: 2) }
        expectDmaBufError(.overflow, "add up to more than \(3 * page) bytes") {
            try UDmabuf.extents([(0, 2 * page), (0, 2 * page)], maximumTotal: 3 * page)
        }
        let big = UInt64(Int64.max) / page * page
        expectDmaBufError(.overflow, "add up to more than") { try UDmabuf.extents([(0, big), (0, big), (0, big)]) }
        expectDmaBufError(.invalidArgument, "not page-aligned") { try UDmabuf.Extent(offset: 1, size: page) }
        expectDmaBufError(.overflow) { try UDmabuf.Extent(offset: UInt64.max - page + 1, size: page) }
    }

    @Test func mergeNeverWraps() {
        let fd = FileDescriptor(rawValue: 10)
        let top = UInt64.max - 4095
        let list: [UDmabuf.Range] = [.init(memfd: fd, offset: top, size: 4096), .init(memfd: fd, offset: 0, size: 4096)]
        #expect(UDmabuf.mergeAdjacent(list) == list)
        let wide: [UDmabuf.Range] = [.init(memfd: fd, offset: 0, size: UInt64.max - 4095), .init(memfd: fd, offset: UInt64.max - 4095, size: 8192)]
        #expect(UDmabuf.mergeAdjacent(wide) == wide)
    }
}
