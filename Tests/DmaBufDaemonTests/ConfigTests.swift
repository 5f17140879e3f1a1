import Testing
@testable import DmaBufDaemon

/// Parses `text`, expecting a ``DaemonConfig/ParseError`` on `line` whose message contains every part.
private func expectBad(_ text: String, line: Int, _ parts: String..., sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        let config = try DaemonConfig(parsing: text)
        Issue.record("expected a parse error on line \(line), got \(config)", sourceLocation: sourceLocation)
    } catch let error as DaemonConfig.ParseError {
        #expect(error.line == line, "wrong line in: \(error)", sourceLocation: sourceLocation)
        #expect(error.description.hasPrefix("line \(line): "), "message does not name the line: \(error)", sourceLocation: sourceLocation)
        for part in parts {
            #expect(error.description.contains(part), "message lacks '\(part)': \(error)", sourceLocation: sourceLocation)
        }
    } catch {
        Issue.record("expected a ParseError, got \(error)", sourceLocation: sourceLocation)
    }
}

/// Three good lines first, so every bad value below sits on line 5 (after a comment line).
private let prelude = """
    # dmabufd.conf under test
    socket = /run/dmabufd/dmabufd.sock
    max_buffer_size = 64M
    quota.default.buffers = 100

    """

@Suite("DaemonConfig parsing")
struct ConfigTests {
    @Test func defaultsWhenEmpty() throws {
        let config = try DaemonConfig(parsing: "")
        #expect(config == DaemonConfig())
        #expect(config.policies["any"] == ["system", "cma", "udmabuf"])
    }

    @Test func everyKeyParses() throws {
        let config = try DaemonConfig(parsing: """
            # comment
            socket = /tmp/d.sock   # trailing comment
            socket_mode = 0600
            max_buffer_size = 1.5G
            max_buffers_per_client = 20000
            quota.default.bytes = 2G
            quota.default.buffers = 20000
            quota.uid.1000.bytes = 64M
            quota.uid.1000.buffers = 8
            policy.camera = cma, system
            physical_addresses = root, 1000
            revoke_deadline = 250ms
            heap_directory = /tmp/heaps
            udmabuf_device = /tmp/udmabuf
            fd_store = no
            state_directory = /tmp/state
            log_level = debug
            """)
        #expect(config.socketPath == "/tmp/d.sock")
        #expect(config.socketMode == 0o600)
        #expect(config.maxBufferSize == 3 << 29)
        #expect(config.maxBuffersPerClient == 20000)
        #expect(config.defaultQuota == .init(bytes: 2 << 30, buffers: 20000))
        #expect(config.quota(for: 1000) == .init(bytes: 64 << 20, buffers: 8))
        #expect(config.quota(for: 1001) == config.defaultQuota)
        #expect(config.policies["camera"] == ["cma", "system"])
        #expect(config.physicalAddressUIDs == [0, 1000])
        #expect(config.revokeDeadline == .milliseconds(250))
        #expect(config.heapDirectory == "/tmp/heaps")
        #expect(config.udmabufDevice == "/tmp/udmabuf")
        #expect(config.fdStore == false)
        #expect(config.stateDirectory == "/tmp/state")
        #expect(config.logLevel == "debug")
    }

    @Test func durationsAndBools() throws {
        #expect(try DaemonConfig(parsing: "revoke_deadline = 2").revokeDeadline == .seconds(2))
        #expect(try DaemonConfig(parsing: "revoke_deadline = 1m").revokeDeadline == .seconds(60))
        #expect(try DaemonConfig(parsing: "revoke_deadline = 1.5s").revokeDeadline == .milliseconds(1500))
        for yes in ["yes", "true", "on", "1", "YES"] { #expect(try DaemonConfig(parsing: "fd_store = \(yes)").fdStore == true) }
        for no in ["no", "false", "off", "0"] { #expect(try DaemonConfig(parsing: "fd_store = \(no)").fdStore == false) }
    }

    @Test func unknownKey() {
        expectBad(prelude + "max_bufer_size = 1G\n", line: 5, "max_bufer_size", "unknown key")
        expectBad(prelude + "quota.default.bites = 1G\n", line: 5, "quota field must be 'bytes' or 'buffers'")
        expectBad(prelude + "quota.user.1000.bytes = 1G\n", line: 5, "unknown key")
        expectBad(prelude + "socket.path = /x\n", line: 5, "unknown key")
    }

    @Test func notKeyValue() {
        expectBad(prelude + "max_buffer_size 1G\n", line: 5, "expected 'key = value'", "max_buffer_size 1G")
    }

    @Test func badSize() {
        expectBad(prelude + "max_buffer_size = 12Q\n", line: 5, "max_buffer_size", "'12Q' is not a size")
        expectBad(prelude + "quota.default.bytes = -1\n", line: 5, "quota.default.bytes", "'-1' is not a size")
        expectBad(prelude + "quota.uid.1000.bytes = lots\n", line: 5, "'lots' is not a size")
        expectBad(prelude + "max_buffer_size =\n", line: 5, "is not a size")
        expectBad(prelude + "max_buffer_size = 1.5\n", line: 5, "'1.5' is not a size")
    }

    @Test func badCount() {
        expectBad(prelude + "max_buffers_per_client = many\n", line: 5, "max_buffers_per_client", "'many' is not a count")
        expectBad(prelude + "quota.default.buffers = -3\n", line: 5, "'-3' is not a count")
        expectBad(prelude + "quota.uid.root.buffers = 3\n", line: 5, "'root' is not a uid")
    }

    @Test func badMode() {
        expectBad(prelude + "socket_mode = rw-rw----\n", line: 5, "socket_mode", "not an octal mode")
        expectBad(prelude + "socket_mode = 0999\n", line: 5, "'0999' is not an octal mode")
        expectBad(prelude + "socket_mode = 01777\n", line: 5, "'01777' is not an octal mode")
    }

    @Test func badDuration() {
        expectBad(prelude + "revoke_deadline = soon\n", line: 5, "revoke_deadline", "'soon' is not a duration")
        expectBad(prelude + "revoke_deadline = 5w\n", line: 5, "'5w' is not a duration")  // 5h is one: the shared grammar
        expectBad(prelude + "revoke_deadline = -1s\n", line: 5, "'-1s' is not a duration")
    }

    @Test func badBool() {
        expectBad(prelude + "fd_store = maybe\n", line: 5, "fd_store", "'maybe' is not yes/no")
    }

    @Test func policyWithoutHeaps() {
        expectBad(prelude + "policy.camera =\n", line: 5, "policy.camera", "a policy needs at least one heap")
        expectBad(prelude + "policy.camera = , ,\n", line: 5, "a policy needs at least one heap")
    }

    @Test func nonAbsoluteSocket() {
        expectBad(prelude + "socket = run/dmabufd.sock\n", line: 5, "socket", "'run/dmabufd.sock' must be an absolute path")
        expectBad(prelude + "socket = /" + String(repeating: "s", count: 120) + "\n", line: 5, "longer than 107 bytes")
    }

    @Test func badPhysicalAddresses() {
        expectBad(prelude + "physical_addresses = root, alice\n", line: 5, "'alice' is neither 'root' nor a uid")
    }

    @Test func badLogLevel() {
        expectBad(prelude + "log_level = loud\n", line: 5, "'loud' is not one of", "debug")
    }

    @Test func zeroMaxBufferSizeNamesItsLine() {
        expectBad(prelude + "max_buffer_size = 0\n", line: 5, "max_buffer_size", "'0' must be positive")
    }

    @Test func sharesPerBufferStayDecodable() {
        expectBad(prelude + "max_shares_per_buffer = 4001\n", line: 5, "max_shares_per_buffer", "must be at most 4000")
        expectBad(prelude + "max_shares_per_buffer = 0\n", line: 5, "max_shares_per_buffer", "'0' must be positive")
    }

    @Test func firstBadLineWins() {
        expectBad("fd_store = maybe\nlog_level = loud\n", line: 1, "fd_store")
    }

    @Test func carriageReturnsAndTabsTolerated() throws {
        let config = try DaemonConfig(parsing: "max_buffer_size\t=\t8M\r\nfd_store = no\r\n")
        #expect(config.maxBufferSize == 8 << 20)
        #expect(config.fdStore == false)
        // CRLF files still count lines one by one.
        expectBad("max_buffer_size = 8M\r\nfd_store = maybe\r\n", line: 2, "fd_store", "'maybe' is not yes/no")
    }
}

@Suite struct CgroupConfigTests {
    @Test func cgroupKeys() throws {
        let config = try DaemonConfig(parsing: """
            # flatpak apps: 512 MiB and 64 buffers each
            cgroup_quota user.slice/user-*.slice/user@*.service/app.slice/app-flatpak-*.scope = 512M 64
            cgroup_quota /games.slice/*.scope = 1G together
            cgroup_quota\tmachine.slice/* = 2G 10 each
            max_daemon_memfd_bytes = 256M
            cgroup_admission = no
            cgroup_root = /tmp/cg
            """)
        #expect(config.cgroupQuotas == [
            CgroupQuotaRule(pattern: "user.slice/user-*.slice/user@*.service/app.slice/app-flatpak-*.scope", bytes: 512 << 20, buffers: 64),
            CgroupQuotaRule(pattern: "games.slice/*.scope", bytes: 1 << 30, together: true),
            CgroupQuotaRule(pattern: "machine.slice/*", bytes: 2 << 30, buffers: 10),
        ])
        #expect(config.maxDaemonMemfdBytes == 256 << 20)
        #expect(config.cgroupAdmission == false)
        #expect(config.cgroupRoot == "/tmp/cg")
        let rule = config.cgroupQuotas[0]
        #expect(rule.matches("/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.gnome.Maps-1234.scope"))
        #expect(!rule.matches("/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-x.scope/child"), "* never crosses /")
        #expect(!rule.matches("/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-x.scope"))
    }

    @Test func badCgroupQuotasNameTheLine() {
        let prelude = "socket = /tmp/s\n\n\n\n"
        expectBad(prelude + "cgroup_quota = 1G\n", line: 5, "needs a cgroup path pattern")
        expectBad(prelude + "cgroup_quota a/../b = 1G\n", line: 5, "'..' component")
        expectBad(prelude + "cgroup_quota a//b = 1G\n", line: 5, "empty")
        expectBad(prelude + "cgroup_quota a = lots\n", line: 5, "'lots' is not a size")
        expectBad(prelude + "cgroup_quota a = 1G 2 3 4\n", line: 5, "BYTES [BUFFERS] [each|together]")
        expectBad(prelude + "cgroup_quota a = 1G many\n", line: 5, "'many' is not a count")
        expectBad(prelude + "cgroup_quota " + String(repeating: "a", count: 600) + " = 1G\n", line: 5, "longer than 512 bytes")
        expectBad(prelude + "cgroup_root = relative\n", line: 5, "absolute path")
        expectBad(prelude + "max_daemon_memfd_bytes = -1\n", line: 5, "not a size")
        let many = (0..<CgroupQuotaRule.maximumRules).map { "cgroup_quota r\($0) = 1M\n" }.joined()
        expectBad(many + "cgroup_quota last = 1M\n", line: CgroupQuotaRule.maximumRules + 1, "more than \(CgroupQuotaRule.maximumRules) cgroup_quota lines")
    }
}
