import ArgumentParser
import DmaBufCLI
import DmaBufWire
import Testing

@Suite("Parsing commands from arguments")
struct ParsingTests {
    @Test func allocParsesSizeWithUnitsAndOptions() throws {
        let command = try #require(try Dmabufctl.parseAsRoot(["alloc", "4M", "--heap", "system", "--tag", "cam", "--hold"]) as? AllocCommand)
        #expect(command.size == 4 << 20)
        #expect(command.heap == "system")
        #expect(command.tag == "cam")
        #expect(command.hold)
        #expect(command.output.format == .text)
    }

    @Test func allocDefaults() throws {
        let command = try #require(try Dmabufctl.parseAsRoot(["alloc", "1.5G"]) as? AllocCommand)
        #expect(command.size == 3 << 29)
        #expect(command.heap == "any")
        #expect(command.tag == "")
        #expect(!command.hold)
    }

    @Test func socketOptionIsSharedByDaemonCommands() throws {
        for arguments in [["heaps"], ["ls"], ["info", "3"], ["ranges", "3"], ["revoke", "3"], ["stats"], ["alloc", "4K"],
                          ["fence", "wait", "3", "--access", "read"], ["fence", "status", "3", "--access", "write"]] {
            let parsed = try Dmabufctl.parseAsRoot(arguments + ["--socket", "/tmp/x.sock"])
            let mirror = Mirror(reflecting: parsed)
            let connection = try #require(mirror.children.first { $0.label == "_connection" }, "\(arguments)")
            #expect("\(connection.value)".contains("/tmp/x.sock"), "\(arguments)")
        }
    }

    @Test func listAndFormat() throws {
        let command = try #require(try Dmabufctl.parseAsRoot(["ls", "--all", "--format", "json"]) as? ListCommand)
        #expect(command.all)
        #expect(command.output.format == .json)
        #expect(command.connection.socket == (try ConnectionOptions.parse([])).socket)
    }

    @Test func rangesOptions() throws {
        let command = try #require(try Dmabufctl.parseAsRoot(["ranges", "9", "--first-page", "16", "--pages", "8", "--physical"]) as? RangesCommand)
        #expect(command.id == 9)
        #expect(command.firstPage == 16)
        #expect(command.pages == 8)
        #expect(command.physical)
    }

    @Test func fenceWaitOptions() throws {
        let command = try #require(
            try Dmabufctl.parseAsRoot(["fence", "wait", "7", "--pages", "2:10", "--access", "write", "--timeout", "500ms"]) as? FenceWaitCommand)
        #expect(command.fence.id == 7)
        #expect(command.fence.pages == PageSpan(first: 2, count: 8))
        #expect(command.fence.access == .write)
        #expect(command.fence.access == .write)
        #expect(command.timeout == .milliseconds(500))
    }

    @Test func fenceStatusDefaultsToTheWholeBuffer() throws {
        let command = try #require(try Dmabufctl.parseAsRoot(["fence", "status", "7", "--access", "read"]) as? FenceStatusCommand)
        #expect(command.fence.pages == .all)
        #expect(command.fence.access == .read)
    }

    @Test func revokeDeadline() throws {
        let command = try #require(try Dmabufctl.parseAsRoot(["revoke", "3", "--deadline", "2s"]) as? RevokeCommand)
        #expect(command.id == 3)
        #expect(command.deadline == .seconds(2))
        let noDeadline = try #require(try Dmabufctl.parseAsRoot(["revoke", "3"]) as? RevokeCommand)
        #expect(noDeadline.deadline == nil)
    }

    @Test func statsFormats() throws {
        for format in StatsFormat.allCases {
            let command = try #require(try Dmabufctl.parseAsRoot(["stats", "--format", format.rawValue]) as? StatsCommand)
            #expect(command.format == format)
        }
    }

    @Test func dumpAndSelftestTakeNoDaemonOptions() throws {
        #expect(try Dmabufctl.parseAsRoot(["dump", "--format", "json"]) is DumpCommand)
        #expect(try Dmabufctl.parseAsRoot(["selftest"]) is SelftestCommand)
        #expect(throws: (any Error).self) { try Dmabufctl.parseAsRoot(["dump", "--socket", "/x"]) }
    }

    // MARK: Values

    @Test(arguments: [("4096", 4096), ("4K", 4096), ("4KiB", 4096), ("1m", 1 << 20), ("1.5G", 3 << 29), ("2T", 2 << 40)])
    func sizes(text: String, bytes: Int) throws {
        #expect(try parseSize(text) == bytes)
    }

    @Test(arguments: ["12Q", "-4K", "0", "", "K", "1.2.3M", "0.3"])
    func badSizes(text: String) {
        #expect(throws: ValidationError.self) { try parseSize(text) }
    }

    @Test(arguments: [("500ms", 500), ("5s", 5000), ("5", 5000), ("1.5s", 1500), ("2m", 120_000), ("1h", 3_600_000), ("0", 0)])
    func durations(text: String, milliseconds: Int64) throws {
        #expect(try parseDuration(text) == .milliseconds(milliseconds))
    }

    @Test(arguments: ["5x", "-1s", "s", "", "1e3s"])
    func badDurations(text: String) {
        #expect(throws: ValidationError.self) { try parseDuration(text) }
    }

    @Test func pageSpans() throws {
        #expect(try PageSpan.parse("0:16") == PageSpan(first: 0, count: 16))
        #expect(try PageSpan.parse("4:") == PageSpan(first: 4, count: 0))
        #expect(try PageSpan.parse("9") == PageSpan(first: 9, count: 1))
        #expect(PageSpan(first: 2, count: 8).description == "2:10")
        #expect(PageSpan.all.description == "0:")
    }

    @Test func badPageSpans() {
        for text in ["5:2", "5:5", "a:b", ":4", "-1:3", "1:x", ""] {
            #expect(throws: ValidationError.self, "\(text)") { try PageSpan.parse(text) }
        }
        let error = #expect(throws: ValidationError.self) { try PageSpan.parse("5:2") }
        #expect(error?.message.contains("must be greater than the start") == true)
    }

    // MARK: Invalid input through the whole command: message on stderr, status 2

    @Test(arguments: [
        (["alloc", "12Q"], "'12Q' is not a size"),
        (["alloc", "0"], "at least one byte"),
        (["alloc", "--", "-4K"], "'-4K' is not a size"),
        (["alloc", "-4K"], "'-4K' looks like a negative number"),
        (["ranges", "3", "--first-page", "-1"], "'-1' looks like a negative number"),
        (["stats", "--format", "xml"], "'xml' is invalid for '--format <format>'"),
        (["ls", "--format", "yaml"], "'yaml' is invalid for '--format <format>'"),
        (["fence", "wait", "3", "--pages", "5:2", "--access", "read"], "the end (2) must be greater than the start (5)"),
        (["fence", "wait", "3", "--access", "execute"], "'execute' is invalid for '--access <access>'"),
        (["fence", "wait", "3"], "Missing expected argument '--access <access>'"),
        (["revoke", "3", "--deadline", "soon"], "'soon' is not a duration"),
        (["info", "seven"], "'seven' is invalid for '<id>'"),
        (["frobnicate"], "Unexpected argument 'frobnicate'"),
    ])
    func invalidInputIsAUsageError(arguments: [String], message: String) {
        let result = run(arguments)
        #expect(result.status == ExitStatus.usage.rawValue)
        #expect(result.stderr.contains(message), "stderr: \(result.stderr)")
        #expect(result.stdout.isEmpty)
    }
}
