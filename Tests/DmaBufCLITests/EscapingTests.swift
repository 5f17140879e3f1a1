import DmaBuf
import DmaBufCLI
import DmaBufWire
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Client-chosen text (tags, names, cgroups, daemon messages) never reaches the terminal raw.
@Suite("Escaping") struct EscapingTests {
    static let hostile = "x\u{1b}]0;pwned\u{7}\r\nfake\u{9b}2J\u{202e}gpj.exe\\"

    @Test("printable escapes controls, bidi and separators, doubles backslashes, keeps the rest")
    func printableField() {
        #expect(printable("plain tag é 🦀") == "plain tag é 🦀")
        #expect(printable(Self.hostile) == #"x\x1b]0;pwned\x07\r\nfake\u{9b}2J\u{202e}gpj.exe\\"#)
        #expect(printable("a\u{2028}b\u{0}c\u{7f}") == #"a\u{2028}b\x00c\x7f"#)
        #expect(printableLines("one\ntwo\u{1b}\n") == "one\ntwo\\x1b\n")
    }

    @Test("text listings escape every client-chosen field")
    func listings() {
        var b = Fixtures.buffer
        b.tag = Self.hostile; b.name = Self.hostile; b.cgroup = "/evil\n/slice"
        for text in [format(buffers: [b]), format(info: b)] {
            #expect(!text.unicodeScalars.contains { $0.value < 0x20 && $0 != "\n" || (0x7f...0x9f).contains($0.value) || $0 == "\u{202e}" })
        }
        #expect(format(buffers: [b]).split(separator: "\n").count == 2)
        #expect(format(info: b).contains(#"  cgroup:      /evil\n/slice"#))
        var stats = Fixtures.stats
        stats.cgroups = [CgroupStats(cgroup: "/a\u{1b}b", bytes: 4096, buffers: 1)]
        #expect(format(stats: stats).contains(#"/a\x1bb"#))
    }

    @Test("JSON stays valid and decodes to the exact strings")
    func json() throws {
        var b = Fixtures.buffer
        b.tag = Self.hostile
        let text = try encodeJSON(b)
        #expect(!text.unicodeScalars.contains { !($0.value >= 0x20 && $0.value < 0x7f) && $0 != "\n" && $0.value < 0xa0 || $0 == "\u{202e}" })
        let decoded = try JSONDecoder().decode(BufferInfo.self, from: Data(text.utf8))
        #expect(decoded.tag == Self.hostile)
    }

    @Test("OpenMetrics label values escape what the format requires and make the rest visible")
    func openMetricsLabels() {
        var stats = Fixtures.stats
        stats.cgroups = [CgroupStats(cgroup: "/user.slice/\u{1b}[2J\"q\"", bytes: 8192, buffers: 2, quotaBytes: 1 << 20, refusals: 4)]
        let text = openMetrics(stats: stats)
        #expect(text.contains(#"dmabufd_cgroup_allocated_bytes{cgroup="/user.slice/\\x1b[2J\"q\""} 8192"#))
        #expect(text.contains(#"dmabufd_cgroup_refusals_total{cgroup="/user.slice/\\x1b[2J\"q\""} 4"#))
        #expect(text.contains(#"dmabufd_cgroup_quota_bytes{cgroup="/user.slice/\\x1b[2J\"q\""} 1048576"#))
        #expect(!text.unicodeScalars.contains("\u{1b}"))
    }

    @Test("the console is the last net: nothing but newlines below U+0020 gets out")
    func consoleNet() {
        let capture = CapturingConsole()
        capture.console.writeOut("ok\n\u{1b}[31mred\n")
        capture.console.err("bad \u{9b}")
        #expect(capture.stdout == "ok\n\\x1b[31mred\n")
        #expect(capture.stderr == "bad \\u{9b}\n")
    }
}

/// Exit statuses come from the error's kind, code and errno, and v2 fields reach the listings.
@Suite("Exit statuses and v2 output") struct ExitStatusTests {
    @Test("a refusal exits 1 and prints the daemon's message escaped; a malformed verdict means the daemon is gone (3)")
    func refusalAndMalformed() throws {
        let hostile = try FakeDaemon { _ in FakeReply(response: .error(.refusal(EINVAL, code: .invalidArgument, cause: "tag 'a\u{1b}b' refused"))) }
        defer { hostile.stop() }
        let refused = run(["info", "1", "--socket", hostile.path])
        #expect(refused.status == ExitStatus.refused.rawValue)
        #expect(refused.stderr == "error: tag 'a\\x1bb' refused (EINVAL)\n")

        let malformed = try FakeDaemon { _ in FakeReply(response: .error(.refusal(EBADMSG, code: .malformed, cause: "malformed message"))) }
        defer { malformed.stop() }
        #expect(run(["info", "1", "--socket", malformed.path]).status == ExitStatus.unreachable.rawValue)
    }

    @Test("ls and info show the owner's cgroup from a v2 daemon; a v1 daemon shows none")
    func cgroupColumns() throws {
        var owned = Fixtures.buffer
        owned.cgroup = "/user.slice/user-1000.slice"
        let b = owned
        let pipe = try Pipe()  // stands in for the buffer's fd; kept open for as long as the fake may send it
        let v2 = try FakeDaemon { request in
            if case .list = request { return FakeReply(response: .list([b])) }
            return FakeReply(response: .buffer(b), fds: [pipe.read.descriptor])
        }
        defer { v2.stop() }
        #expect(run(["ls", "--socket", v2.path]).stdout.contains("/user.slice/user-1000.slice"))
        #expect(run(["info", "7", "--socket", v2.path]).stdout.contains("  cgroup:      /user.slice/user-1000.slice\n"))

        let v1 = try FakeDaemon(version: 1) { _ in FakeReply(response: .list([b])) }
        defer { v1.stop() }
        let old = run(["ls", "--socket", v1.path])
        #expect(old.status == 0)
        #expect(!old.stdout.contains("user-1000"))
    }

    @Test("stats shows per-cgroup rows and series")
    func statsCgroups() throws {
        var fixture = Fixtures.stats
        fixture.cgroups = [CgroupStats(cgroup: "/system.slice/camera.service", bytes: 8 << 20, buffers: 2, quotaBytes: 1 << 30, refusals: 1)]
        let stats = fixture
        let daemon = try FakeDaemon { _ in FakeReply(response: .stats(stats)) }
        defer { daemon.stop() }
        let text = run(["stats", "--socket", daemon.path]).stdout
        #expect(text.contains("CGROUP"))
        #expect(text.contains("/system.slice/camera.service      8 MiB        2        1 GiB         1"))
        let metrics = run(["stats", "--format", "openmetrics", "--socket", daemon.path]).stdout
        #expect(metrics.contains(#"dmabufd_cgroup_buffers{cgroup="/system.slice/camera.service"} 2"#))
        #expect(openMetricsProblems(metrics) == [])
    }
}
