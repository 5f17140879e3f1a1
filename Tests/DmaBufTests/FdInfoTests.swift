import DmaBuf
import SystemPackage
import Testing

@Suite struct FdInfoTests {
    @Test func parsesDmaBufSample() {
        let info = FdInfo(parsing: "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nsize:\t4096\ncount:\t1\nexp_name:\tsystem\nname:\tfoo\n")
        #expect(info.position == 0)
        #expect(info.flags == 0o2000002)
        #expect(info.flags & 0o3 == 2)  // O_RDWR
        #expect(info.flags & 0o2000000 != 0)  // O_CLOEXEC
        #expect(info.mountID == 15)
        #expect(info.inode == 1057)
        #expect(info.size == 4096)
        #expect(info.count == 1)
        #expect(info.exporter == "system")
        #expect(info.name == "foo")
    }

    @Test func plainFileHasNoDmaBufFields() {
        let info = FdInfo(parsing: "pos:\t12\nflags:\t0100002\nmnt_id:\t29\nino:\t42\n")
        #expect(info.position == 12)
        #expect(info.flags == 0o100002)
        #expect(info.inode == 42)
        #expect(info.size == nil && info.count == nil && info.exporter == nil && info.name == nil)
    }

    @Test func ignoresUnknownKeysAndBadNumbers() {
        let info = FdInfo(parsing: "pos:\tx\nflags:\t9\nino:\t-1\nsize:\tbig\nlock:\t1: POSIX ADVISORY\neventfd-count: 5\nno colon here\nexp_name:\tudmabuf\n\n")
        #expect(info.position == 0)
        #expect(info.flags == 0)  // 9 is not octal
        #expect(info.inode == nil)
        #expect(info.size == nil)
        #expect(info.exporter == "udmabuf")
        #expect(!info.unexpected.isEmpty)
        #expect(FdInfo(parsing: "") == FdInfo())
    }

    @Test func nameIsEverythingAfterNameColon() {
        // The kernel prints the name last; a "key:" after it is part of the name, not a kernel line.
        let info = FdInfo(parsing: "name:\tcam:0 frame \nexp_name:  vgem\t\n")
        #expect(info.name == "cam:0 frame \nexp_name:  vgem\t")
        #expect(info.exporter == nil)
        #expect(info.unexpected.isEmpty)
    }

    static let kernelLines = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nsize:\t4096\ncount:\t3\nexp_name:\tsystem\n"

    @Test func nameCannotRaiseTheCount() {
        // issue 9: a name holding "\ncount:\t9999999999" made the last count win, and UInt32(...) trapped.
        let info = FdInfo(parsing: Self.kernelLines + "name:\tx\ncount:\t9999999999\n")
        #expect(info.count == 3)
        #expect(info.name == "x\ncount:\t9999999999")
        #expect(info.unexpected.isEmpty)
    }

    @Test func nameCannotLowerTheCount() {
        // issue 9: "\ncount:\t1" made a buffer still held elsewhere look unreferenced, and it was uncharged.
        let info = FdInfo(parsing: Self.kernelLines + "name:\t\ncount:\t1\nsize:\t1\nexp_name:\tfake\n")
        #expect(info.count == 3)
        #expect(info.size == 4096)
        #expect(info.exporter == "system")
        #expect(info.name == "\ncount:\t1\nsize:\t1\nexp_name:\tfake")
    }

    @Test func carriageReturnsDoNotHideLines() {
        // "\r\n" is one Swift Character: a Character-based split would not see this newline at all.
        let info = FdInfo(parsing: "size:\t4096\r\ncount:\t2\nexp_name:\tsystem\nname:\ta\r\ncount:\t1\r\n")
        #expect(info.count == 2)
        #expect(info.name == "a\r\ncount:\t1\r")
        // "4096\r": read as 4096 when trimming takes the CR, else reported; never silently wrong.
        #expect(info.size == 4096 || info.unexpected == ["'size:' has a malformed or out-of-range value '4096\r'"])
    }

    @Test func firstOccurrenceWinsAndRepeatsAreUnexpected() {
        let info = FdInfo(parsing: "size:\t4096\ncount:\t2\ncount:\t0\nexp_name:\tsystem\nexp_name:\tudmabuf\n")
        #expect(info.count == 2)
        #expect(info.exporter == "system")
        #expect(info.unexpected.count == 2)
        #expect(info.unexpected.allSatisfy { $0.contains("printed twice") })
    }

    @Test func outOfRangeNumbersAreUnexpected() {
        let big = FdInfo(parsing: "size:\t4096\ncount:\t4294967296\nexp_name:\tsystem\n")
        #expect(big.count == nil)
        #expect(big.unexpected.contains { $0.contains("'count:'") && $0.contains("4294967296") })
        #expect(FdInfo(parsing: "size:\t4096\ncount:\t4294967295\nexp_name:\tx\n").count == Int(UInt32.max))
        let negative = FdInfo(parsing: "size:\t-4096\ncount:\t-1\nexp_name:\tsystem\n")
        #expect(negative.size == nil && negative.count == nil)
        #expect(negative.unexpected.count == 2)
        let huge = FdInfo(parsing: "size:\t99999999999999999999\ncount:\t1\nexp_name:\tsystem\n")
        #expect(huge.size == nil && !huge.unexpected.isEmpty)
    }

    @Test func dmaBufWithoutSizeOrCountIsUnexpected() {
        let info = FdInfo(parsing: "pos:\t0\nexp_name:\tsystem\nname:\tcount:\t1\n")
        #expect(info.count == nil)
        #expect(info.unexpected == ["a dma-buf without 'size:'", "a dma-buf without 'count:'"])
        // Not a dma-buf: no exporter, nothing expected.
        #expect(FdInfo(parsing: "pos:\t0\nflags:\t02\n").unexpected.isEmpty)
    }

    @Test func kernelOutputIsNeverUnexpected() {
        #expect(FdInfo(parsing: Self.kernelLines).unexpected.isEmpty)
        #expect(FdInfo(parsing: Self.kernelLines + "name:\tframe 7\n").unexpected.isEmpty)
        // flock lines come between ino and the dma-buf's own lines.
        #expect(FdInfo(parsing: "pos:\t0\nflags:\t02\nmnt_id:\t1\nino:\t5\nlock:\t1: FLOCK  ADVISORY  WRITE 12 00:0f:5 0 EOF\nsize:\t4096\ncount:\t1\nexp_name:\tsystem\n").unexpected.isEmpty)
    }

    @Test func readsThisProcessFdInfo() throws {
        let memfd = try Memfd(name: "fdinfo", size: 4096)
        let info = try FdInfo.read(memfd.fd.descriptor)
        #expect(info.inode == (try inode(of: memfd.fd.descriptor)))
        #expect(info.exporter == nil)
        #expect(info.flags & 0o3 == 2)
        expectDmaBufError(.noSuchFileOrDirectory, "fdinfo", "cannot read /proc/self/fdinfo/999999") {
            try FdInfo.read(FileDescriptor(rawValue: 999_999))
        }
    }
}
