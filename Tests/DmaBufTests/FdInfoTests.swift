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
        #expect(FdInfo(parsing: "") == FdInfo())
    }

    @Test func nameWithColonAndSpaces() {
        // Only the first colon splits; surrounding tabs and spaces go.
        let info = FdInfo(parsing: "name:\tcam:0 frame \nexp_name:  vgem\t\n")
        #expect(info.name == "cam:0 frame")
        #expect(info.exporter == "vgem")
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
