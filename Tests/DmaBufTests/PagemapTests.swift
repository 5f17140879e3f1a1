import DmaBuf
import Testing

@Suite struct PagemapTests {
    @Test func entryBits() {
        let present = Pagemap.Entry(rawValue: 1 << 63 | 1 << 61 | 1 << 56 | 0x1234)
        #expect(present.isPresent && present.isFileOrShared && present.isExclusive)
        #expect(!present.isSwapped && !present.isSoftDirty)
        #expect(present.pfn == 0x1234)

        let widest = Pagemap.Entry(rawValue: 1 << 63 | (1 << 55 - 1))
        #expect(widest.pfn == (1 << 55) - 1)  // bits 0-54
        #expect(Pagemap.Entry(rawValue: 1 << 63 | 1 << 55 | 7).pfn == 7)  // soft-dirty is not part of the PFN
        #expect(Pagemap.Entry(rawValue: 1 << 55).isSoftDirty)

        #expect(Pagemap.Entry(rawValue: 0x1234).pfn == nil)  // not present
        #expect(Pagemap.Entry(rawValue: 1 << 63 | 1 << 62 | 0x55).pfn == nil)  // swapped: bits are a swap entry
        #expect(Pagemap.Entry(rawValue: 1 << 63).pfn == 0)  // present, PFN hidden
    }

    @Test func parsesLittleEndianEntries() {
        var bytes: [UInt8] = []
        for value: UInt64 in [0x8000_0000_0000_0001, 0, 0x8000_0000_00ab_cdef] {
            withUnsafeBytes(of: value.littleEndian) { bytes += $0 }
        }
        bytes += [1, 2, 3]  // a partial trailing entry is dropped
        let entries = bytes.withUnsafeBytes { Pagemap.entries(from: $0) }
        #expect(entries.map(\.rawValue) == [0x8000_0000_0000_0001, 0, 0x8000_0000_00ab_cdef])
        #expect(entries.map(\.pfn) == [1, nil, 0xab_cdef])
        #expect([UInt8]().withUnsafeBytes { Pagemap.entries(from: $0) }.isEmpty)
    }

    @Test func readsOwnMapping() throws {
        let memfd = try Memfd(name: "pagemap", size: 8 * pageSize)
        let mapping = try memfd.map(length: 8 * pageSize)
        for page in 0..<4 { mapping.bytes[page * pageSize] = 1 }  // fault in the first half only
        let entries = try Pagemap.read(address: mapping.base, count: 8 * pageSize)
        #expect(entries.count == 8)
        #expect(entries.prefix(4).allSatisfy { $0.isPresent && $0.isFileOrShared })
        #expect(entries.suffix(4).allSatisfy { !$0.isPresent })
        // An unaligned address and count cover every page they touch.
        #expect(try Pagemap.read(address: mapping.base + 100, count: pageSize).count == 2)
        expectDmaBufError(.noSuchFileOrDirectory, "pagemap", "cannot open /nonexistent/pagemap") {
            try Pagemap.read(address: mapping.base, count: pageSize, path: "/nonexistent/pagemap")
        }
    }

    @Test func physicalRunsOfMemfdCoverEveryPage() throws {
        let memfd = try Memfd(name: "runs", size: 16 * pageSize)
        let mapping = try memfd.map(length: 16 * pageSize)
        do {
            let runs = try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapping.bytes))
            #expect(runs.totalPages == 16)
            #expect(runs.allSatisfy { $0.start != 0 })
        } catch let error as DmaBufError {
            // Without CAP_SYS_ADMIN (containers, CI) the PFNs read as 0: that must be the error.
            #expect(error.errno == .notPermitted)
            #expect(error.description.contains("physical addresses are hidden"))
        }
    }
}
