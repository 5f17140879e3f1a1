import DmaBufCLI
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("dump: /proc parsing")
struct ProcParsingTests {
    @Test func dmaBufMapsLine() throws {
        let line = try #require(parseMapsLine("7f2c4a000000-7f2c4a400000 rw-s 00000000 00:0f 12345                      /dmabuf:1000:812:frame"))
        #expect(line.start == 0x7f2c_4a00_0000)
        #expect(line.end == 0x7f2c_4a40_0000)
        #expect(line.size == 4 << 20)
        #expect(line.permissions == "rw-s")
        #expect(line.offset == 0)
        #expect(line.device == "00:0f")
        #expect(line.inode == 12345)
        #expect(line.path == "/dmabuf:1000:812:frame")
        #expect(line.isDmaBuf)
        #expect(line.dmaBufName == "1000:812:frame")
        #expect(line.range == "7f2c4a000000-7f2c4a400000")
    }

    @Test func namesKeepSpacesAndOldKernelsHaveNone() throws {
        let spaced = try #require(parseMapsLine("1000-3000 r--s 00001000 00:0d 77 /dmabuf:camera preview buffer"))
        #expect(spaced.dmaBufName == "camera preview buffer")
        #expect(spaced.offset == 0x1000)
        let old = try #require(parseMapsLine("1000-2000 rw-s 00000000 00:0d 78                         anon_inode:dmabuf"))
        #expect(old.isDmaBuf)
        #expect(old.dmaBufName == nil)
        let unnamed = try #require(parseMapsLine("1000-2000 rw-s 00000000 00:0d 79 /dmabuf:"))
        #expect(unnamed.isDmaBuf)
        #expect(unnamed.dmaBufName == nil)
    }

    @Test func otherMappingsAreNotDmaBufs() throws {
        let anonymous = try #require(parseMapsLine("7ffd1b2c0000-7ffd1b2e1000 rw-p 00000000 00:00 0"))
        #expect(anonymous.path == "")
        #expect(!anonymous.isDmaBuf)
        #expect(try #require(parseMapsLine("55d0c9a00000-55d0c9a21000 rw-p 00000000 00:00 0     [heap]")).path == "[heap]")
        #expect(try #require(parseMapsLine("7f00-7f10 rw-s 00000000 00:01 1025 /memfd:dmabuf (deleted)")).isDmaBuf == false)
        #expect(try #require(parseMapsLine("7f00-7f10 r--p 00000000 08:01 4242 /usr/lib/dmabuf:x.so")).isDmaBuf == false)
    }

    @Test(arguments: ["", "garbage", "7f00 rw-s 0 00:01 1 /x", "zz-7f10 rw-s 0 00:01 1", "7f00-7f10 rw-s 0 0001 1", "7f00-7f10 rwxsp 0 00:01 1",
                      "7f00-7f10 rw-s 0 00:01 x /dmabuf:"])
    func malformedLines(line: String) {
        #expect(parseMapsLine(line) == nil)
    }

    @Test func mapsFileKeepsOnlyDmaBufs() {
        let maps = """
            55d0c9800000-55d0c9a00000 r-xp 00000000 08:01 1311 /usr/bin/camera
            7f2c4a000000-7f2c4a400000 rw-s 00000000 00:0f 12345 /dmabuf:1000:812:frame
            7f2c4a400000-7f2c4a410000 r--s 00000000 00:0f 12346 anon_inode:dmabuf
            7ffd1b2c0000-7ffd1b2e1000 rw-p 00000000 00:00 0 [stack]
            """
        #expect(parseDmaBufMaps(maps).map(\.inode) == [12345, 12346])
    }

    static let smaps = """
        55d0c9800000-55d0c9a00000 r-xp 00000000 08:01 1311                       /usr/bin/camera
        Size:               2048 kB
        KernelPageSize:        4 kB
        Rss:                 900 kB
        Pss:                 450 kB
        VmFlags: rd ex mr mw me dw
        7f2c4a000000-7f2c4a400000 rw-s 00000000 00:0f 12345                      /dmabuf:1000:812:frame
        Size:               4096 kB
        KernelPageSize:        4 kB
        MMUPageSize:           4 kB
        Rss:                  64 kB
        Pss:                  32 kB
        Pss_Dirty:            32 kB
        Shared_Clean:          0 kB
        THPeligible:    0
        ProtectionKey:         0
        VmFlags: rd wr sh mr mw me ms pf io dc de dd sd
        """

    @Test func smapsBlocks() throws {
        let entries = parseSmaps(Self.smaps)
        #expect(entries.count == 2)
        #expect(entries[0].rssKiB == 900)
        #expect(entries[0].pssKiB == 450)
        let dmabuf = entries[1]
        #expect(dmabuf.mapping.isDmaBuf)
        #expect(dmabuf.mapping.inode == 12345)
        #expect(dmabuf.kilobytes["Size"] == 4096)
        #expect(dmabuf.rssKiB == 64)
        #expect(dmabuf.pssKiB == 32)
        #expect(dmabuf.kilobytes["Pss_Dirty"] == 32)
        #expect(dmabuf.kilobytes["THPeligible"] == nil)
        #expect(dmabuf.kilobytes["VmFlags"] == nil)
    }

    @Test func dmaBufPaths() {
        #expect(isDmaBufPath("/dmabuf:"))
        #expect(isDmaBufPath("/dmabuf:1000:1:x"))
        #expect(isDmaBufPath("anon_inode:dmabuf"))
        #expect(!isDmaBufPath("anon_inode:sync_file"))
        #expect(!isDmaBufPath("/dev/dma_heap/system"))
        #expect(dmaBufName(fromPath: "/dmabuf:a:b") == "a:b")
    }
}

/// A /proc made of strings. Paths absent from `files`/`links`/`directories` are ENOENT; those in `denied` EACCES.
struct FakeProc: ProcSource {
    var directories: [String: [String]] = [:]
    var files: [String: String] = [:]
    var links: [String: String] = [:]
    var inodes: [String: UInt64] = [:]
    var denied: Set<String> = []

    func check(_ path: String) throws { if denied.contains(path) { throw Errno.permissionDenied } }
    func entries(_ directory: String) throws -> [String] {
        try check(directory)
        guard let names = directories[directory] else { throw Errno.noSuchFileOrDirectory }
        return names
    }
    func contents(_ path: String) throws -> String {
        try check(path)
        guard let text = files[path] else { throw Errno.noSuchFileOrDirectory }
        return text
    }
    func linkTarget(_ path: String) throws -> String {
        try check(path)
        guard let target = links[path] else { throw Errno.noSuchFileOrDirectory }
        return target
    }
    func inode(_ path: String) throws -> UInt64 {
        try check(path)
        guard let inode = inodes[path] else { throw Errno.noSuchFileOrDirectory }
        return inode
    }

    /// Two processes share buffer 12345 (camera holds it twice and maps it; the compositor holds and maps it
    /// without smaps access); the compositor maps 555 without an fd; pid 3 has no dma-bufs; pid 4 is
    /// someone else's; pid 5 is a kernel thread, pid 6 one we may not read; "self" and non-pids are ignored.
    static func sample() -> FakeProc {
        var proc = FakeProc()
        proc.directories["/proc"] = ["1", "812", "900", "3", "4", "5", "6", "self", "meminfo"]
        // pid 1: unreadable fds and maps
        proc.files["/proc/1/comm"] = "systemd\n"
        proc.denied = ["/proc/1/fd", "/proc/1/maps", "/proc/4/fd", "/proc/4/maps"]
        proc.files["/proc/4/comm"] = "sshd\n"
        proc.files["/proc/1/cmdline"] = "/sbin/init\0"
        proc.files["/proc/4/cmdline"] = "sshd: /usr/sbin/sshd -D\0"
        // pid 6: a kernel thread (empty cmdline) that we may not look into either: not worth a mention
        proc.files["/proc/6/comm"] = "kthreadd\n"
        proc.files["/proc/6/cmdline"] = ""
        proc.denied.formUnion(["/proc/6/fd", "/proc/6/maps"])
        // camera
        proc.files["/proc/812/comm"] = "camera\n"
        proc.directories["/proc/812/fd"] = ["0", "1", "2", "10", "11", "12"]
        proc.links["/proc/812/fd/0"] = "/dev/null"
        proc.links["/proc/812/fd/1"] = "pipe:[999]"
        proc.links["/proc/812/fd/2"] = "anon_inode:sync_file"
        proc.links["/proc/812/fd/10"] = "/dmabuf:1000:812:frame"
        proc.links["/proc/812/fd/11"] = "/dmabuf:1000:812:frame"
        proc.links["/proc/812/fd/12"] = "anon_inode:dmabuf"
        proc.files["/proc/812/fdinfo/10"] = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t12345\nsize:\t4194304\ncount:\t4\nexp_name:\tsystem\nname:\t1000:812:frame\n"
        proc.files["/proc/812/fdinfo/11"] = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t12345\nsize:\t4194304\ncount:\t4\nexp_name:\tsystem\nname:\t1000:812:frame\n"
        // an older kernel's fdinfo: no ino line, no name; the inode comes from stat
        proc.files["/proc/812/fdinfo/12"] = "pos:\t0\nflags:\t02\nmnt_id:\t15\nsize:\t65536\ncount:\t1\nexp_name:\tudmabuf\n"
        proc.inodes["/proc/812/fd/12"] = 4242
        proc.files["/proc/812/maps"] = """
            55d0c9800000-55d0c9a00000 r-xp 00000000 08:01 1311 /usr/bin/camera
            7f2c4a000000-7f2c4a400000 rw-s 00000000 00:0f 12345 /dmabuf:1000:812:frame
            """
        proc.files["/proc/812/smaps"] = ProcParsingTests.smaps
        // compositor
        proc.files["/proc/900/comm"] = "compositor\n"
        proc.directories["/proc/900/fd"] = ["3"]
        proc.links["/proc/900/fd/3"] = "/dmabuf:1000:812:frame"
        proc.files["/proc/900/fdinfo/3"] = "ino:\t12345\nsize:\t4194304\ncount:\t4\nexp_name:\tsystem\nname:\t1000:812:frame\n"
        proc.files["/proc/900/maps"] = """
            7f0000000000-7f0000200000 r--s 00000000 00:0f 12345 /dmabuf:1000:812:frame
            7f0000200000-7f0000210000 r--s 00000000 00:0f 555 /dmabuf:
            """
        proc.denied.insert("/proc/900/smaps")
        proc.files["/sys/kernel/dmabuf/buffers/555/size"] = "1048576\n"
        proc.files["/sys/kernel/dmabuf/buffers/555/exporter_name"] = "vgem\n"
        // pid 3: nothing
        proc.files["/proc/3/comm"] = "bash\n"
        proc.directories["/proc/3/fd"] = ["0"]
        proc.links["/proc/3/fd/0"] = "/dev/pts/0"
        proc.files["/proc/3/maps"] = "7ffd1b2c0000-7ffd1b2e1000 rw-p 00000000 00:00 0 [stack]\n"
        // pid 5: kernel thread
        proc.files["/proc/5/comm"] = "kworker/0:1\n"
        proc.directories["/proc/5/fd"] = []
        proc.files["/proc/5/maps"] = ""
        return proc
    }
}

@Suite("dump: collecting and formatting")
struct DumpTests {
    let report = DumpCollector(source: FakeProc.sample()).collect()

    @Test func processes() throws {
        #expect(report.processes.map(\.pid) == [812, 900])
        let camera = report.processes[0]
        #expect(camera.name == "camera")
        #expect(camera.fds.map(\.fd) == [10, 11, 12])
        #expect(camera.fds[0] == FdUsage(fd: 10, inode: 12345, size: 4 << 20, exporter: "system", name: "1000:812:frame", count: 4))
        #expect(camera.fds[2] == FdUsage(fd: 12, inode: 4242, size: 65536, exporter: "udmabuf", name: "", count: 1))
        #expect(camera.fdBytes == (4 << 20) + 65536)  // 12345 counted once
        #expect(camera.mappings == [MappingUsage(range: "7f2c4a000000-7f2c4a400000", inode: 12345, size: 4 << 20, name: "1000:812:frame", rssKiB: 64, pssKiB: 32)])
        #expect(camera.mappedBytes == 4 << 20)
        #expect(camera.rssKiB == 64)
        #expect(camera.pssKiB == 32)
    }

    @Test func unreadableSmapsIsNotAvailable() throws {
        let compositor = report.processes[1]
        #expect(compositor.mappings.count == 2)
        #expect(compositor.mappings.allSatisfy { $0.rssKiB == nil && $0.pssKiB == nil })
        #expect(compositor.rssKiB == nil)
        #expect(compositor.pssKiB == nil)
        #expect(compositor.mappedBytes == (2 << 20) + 65536)
    }

    @Test func buffersByInode() throws {
        #expect(report.buffers.map(\.inode) == [12345, 555, 4242])  // largest first
        let shared = report.buffers[0]
        #expect(shared.holders == [Holder(pid: 812, fds: 2), Holder(pid: 900, fds: 1)])
        #expect(shared.mappers == [812, 900])
        #expect(shared.count == 4)
        #expect(shared.exporter == "system")
        let mappedOnly = report.buffers[1]
        #expect(mappedOnly.holders.isEmpty)
        #expect(mappedOnly.mappers == [900])
        #expect(mappedOnly.size == 1 << 20)  // from sysfs, not the 64 KiB mapping
        #expect(mappedOnly.exporter == "vgem")
        #expect(mappedOnly.count == nil)
        #expect(report.totalBytes == (4 << 20) + (1 << 20) + 65536)
    }

    @Test func unreadableProcessesAreListed() {
        #expect(report.unreadable == [UnreadableProcess(pid: 1, name: "systemd"), UnreadableProcess(pid: 4, name: "sshd")])
    }

    @Test func mappedOnlyBufferWithoutSysfsUsesTheMappingSize() {
        var proc = FakeProc.sample()
        proc.files["/sys/kernel/dmabuf/buffers/555/size"] = nil
        proc.files["/sys/kernel/dmabuf/buffers/555/exporter_name"] = nil
        let buffer = DumpCollector(source: proc).collect().buffers.first { $0.inode == 555 }
        #expect(buffer?.size == 65536)
        #expect(buffer?.exporter == "?")
    }

    @Test func text() {
        #expect(format(dump: report) == """
            PID  PROCESS     FDS  FD BYTES  MAPS   MAPPED     RSS     PSS
            812  camera        3   4.1 MiB     1    4 MiB  64 KiB  32 KiB
            900  compositor    1     4 MiB     2  2.1 MiB     n/a     n/a

            camera (812)
              FD  INODE    SIZE  EXPORTER  COUNT  NAME
              10  12345   4 MiB  system        4  1000:812:frame
              11  12345   4 MiB  system        4  1000:812:frame
              12   4242  64 KiB  udmabuf       1
              MAPPING                    INODE   SIZE     RSS     PSS  NAME
              7f2c4a000000-7f2c4a400000  12345  4 MiB  64 KiB  32 KiB  1000:812:frame

            compositor (900)
              FD  INODE   SIZE  EXPORTER  COUNT  NAME
               3  12345  4 MiB  system        4  1000:812:frame
              MAPPING                    INODE    SIZE  RSS  PSS  NAME
              7f0000000000-7f0000200000  12345   2 MiB  n/a  n/a  1000:812:frame
              7f0000200000-7f0000210000    555  64 KiB  n/a  n/a

            INODE    SIZE  EXPORTER  COUNT  FD HOLDERS (PID×FDS)  MAPPED BY  NAME
            12345   4 MiB  system        4  812×2,900             812,900    1000:812:frame
              555   1 MiB  vgem          -  -                     900
             4242  64 KiB  udmabuf       1  812                   -

            3 buffers, 5.1 MiB in total
            2 processes could not be read (not permitted); run as root to see every process

            """)
    }

    @Test func nothingFound() {
        let empty = DumpReport(processes: [], buffers: [], totalBytes: 0, unreadable: [])
        #expect(format(dump: empty) == "no dma-bufs found in the processes readable here\n")
    }

    @Test func json() throws {
        let object = try jsonObject(try encodeJSON(report))
        #expect(Set(object.keys) == ["processes", "buffers", "totalBytes", "unreadable"])
        let process = try #require((object["processes"] as? [[String: Any]])?.first)
        #expect(Set(process.keys) == ["pid", "name", "fds", "mappings", "fdBytes", "mappedBytes", "rssKiB", "pssKiB"])
        let buffer = try #require((object["buffers"] as? [[String: Any]])?.first)
        #expect(Set(buffer.keys) == ["inode", "size", "exporter", "name", "count", "holders", "mappers"])
        let compositor = try #require((object["processes"] as? [[String: Any]])?.last)
        #expect(compositor["rssKiB"] == nil)  // n/a: omitted
    }

    @Test func liveProcIsReadable() {
        // On any Linux machine: our own process is readable and holds no dma-buf, so it is not listed.
        let live = DumpCollector().collect()
        #expect(!live.processes.contains { $0.pid == getpid() && $0.fds.isEmpty && $0.mappings.isEmpty })
        let result = run(["dump", "--format", "json"])
        #expect(result.status == 0)
        #expect((try? jsonObject(result.stdout))?["totalBytes"] != nil)
    }
}
