import ArgumentParser
import DmaBufCLI
import Testing

@Suite("--help")
struct HelpTests {
    static let commands: [(arguments: [String], examples: [String])] = [
        (["heaps"], ["dmabufctl heaps", "dmabufctl heaps --format json"]),
        (["alloc"], ["dmabufctl alloc 4M", "dmabufctl alloc 1G --heap system --tag test-frame --hold"]),
        (["ls"], ["dmabufctl ls", "sudo dmabufctl ls --all"]),
        (["info"], ["dmabufctl info 7", "dmabufctl info 7 --format json"]),
        (["ranges"], ["dmabufctl ranges 7", "dmabufctl ranges 7 --first-page 256 --pages 16", "sudo dmabufctl ranges 7 --physical"]),
        (["fence"], ["dmabufctl fence status 7 --access write", "dmabufctl fence wait 7 --pages 0:16 --access read --timeout 5s"]),
        (["fence", "wait"], ["dmabufctl fence wait 7 --pages 0:16 --access read --timeout 500ms"]),
        (["fence", "status"], ["dmabufctl fence status 7 --pages 4: --access read --format json"]),
        (["revoke"], ["dmabufctl revoke 7", "sudo dmabufctl revoke 7 --deadline 2s"]),
        (["stats"], ["dmabufctl stats", "dmabufctl stats --format json", "dmabufctl stats --format openmetrics"]),
        (["dump"], ["dmabufctl dump", "sudo dmabufctl dump --format json"]),
        (["selftest"], ["sudo dmabufctl selftest"]),
    ]

    @Test(arguments: commands.indices)
    func everyCommandHasExamples(index: Int) {
        let (arguments, examples) = Self.commands[index]
        let result = run(arguments + ["--help"])
        #expect(result.status == 0)
        #expect(result.stderr.isEmpty)
        #expect(result.stdout.contains("EXAMPLES:"), "\(arguments)")
        for example in examples {
            #expect(result.stdout.contains(example), "\(arguments): missing '\(example)'")
        }
    }

    @Test func rootHelpListsCommandsAndExitStatuses() {
        let result = run(["--help"])
        #expect(result.status == 0)
        for command in ["heaps", "alloc", "ls", "info", "ranges", "fence", "revoke", "stats", "dump", "selftest"] {
            #expect(result.stdout.contains("  \(command) "), "missing \(command)")
        }
        for line in ["EXIT STATUS:", "0  success", "1  refused by the daemon", "2  usage error", "3  cannot reach the daemon",
                     "4  selftest: a check failed"] {
            #expect(result.stdout.contains(line), "missing '\(line)'")
        }
    }

    @Test func helpSubcommandAndNoArgumentsPrintHelp() {
        #expect(run(["help", "alloc"]).stdout.contains("dmabufctl alloc 4M"))
        let bare = run([])
        #expect(bare.status == 0)
        #expect(bare.stdout.contains("SUBCOMMANDS:"))
    }

    @Test func exitStatusesAreTheDocumentedNumbers() {
        #expect(ExitStatus.allCases.map(\.rawValue) == [0, 1, 2, 3, 4])
    }

    @Test func version() {
        let result = run(["--version"])
        #expect(result.status == 0)
        #expect(result.stdout == Dmabufctl.version + "\n")
    }
}
