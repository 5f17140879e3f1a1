import ArgumentParser
import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

/// dmabufctl's exit statuses.
///
/// | status | meaning |
/// | --- | --- |
/// | 0 | success |
/// | 1 | the daemon refused the request (its message and errno are printed), or the operation failed (a fence wait timed out, a held buffer was revoked) |
/// | 2 | usage error: unknown option, bad value (`12Q` as a size, `5:2` as pages) |
/// | 3 | cannot reach the daemon: no socket, connection refused, permission denied, or it went away |
/// | 4 | `selftest`: at least one check failed |
public enum ExitStatus: Int32, Sendable, CaseIterable {
    case success = 0
    case refused = 1
    case usage = 2
    case unreachable = 3
    case selftestFailed = 4
}

let exitStatusHelp = """
    EXIT STATUS:
      0  success
      1  refused by the daemon (errno in the message), or the operation failed
      2  usage error (bad option or value)
      3  cannot reach the daemon (not running, socket not permitted, gone)
      4  selftest: a check failed
    """

/// The `dmabufctl` command: inspect and drive dmabufd, and look at dma-bufs system-wide.
public struct Dmabufctl: ParsableCommand {
    public static let version = "0.1.0"

    public static let configuration = CommandConfiguration(
        commandName: "dmabufctl",
        abstract: "Inspect and drive dmabufd, the dma-buf broker; inspect dma-bufs system-wide.",
        discussion: """
            Commands that talk to the daemon connect to --socket (default $DMABUFD_SOCKET, else \
            /run/dmabufd/dmabufd.sock; the socket's group is `dmabuf`). `dump` and `selftest` work without the \
            daemon. Listings take --format text|json; JSON keys are sorted and stable. Results go to stdout, \
            diagnostics (`error: ...`) to stderr.

            EXAMPLES:
              dmabufctl heaps
              dmabufctl alloc 4M --heap system --tag camera --hold
              dmabufctl ls --all --format json
              dmabufctl ranges 7 --first-page 0 --pages 16
              dmabufctl fence wait 7 --pages 0:16 --access write --timeout 5s
              dmabufctl stats --format openmetrics
              dmabufctl dump
              dmabufctl selftest

            \(exitStatusHelp)
            """,
        version: version,
        subcommands: [
            HeapsCommand.self, AllocCommand.self, ListCommand.self, InfoCommand.self, RangesCommand.self,
            FenceCommand.self, RevokeCommand.self, StatsCommand.self, DumpCommand.self, SelftestCommand.self,
        ])

    public init() {}

    /// Parses `arguments` (without the program name), runs the command and returns the exit status.
    /// Output goes to ``Console/current``. ArgumentParser's usage errors (its EX_USAGE, 64) become 2.
    public static func execute(_ arguments: [String], columns: Int? = nil) -> Int32 {
        let console = Console.current
        do {
            var command = try parseAsRoot(arguments)
            try command.run()
            return ExitStatus.success.rawValue
        } catch {
            let code = exitCode(for: error)
            let message = fullMessage(for: error, columns: columns)
            if code == .success {
                if !message.isEmpty { console.out(message) }
                return ExitStatus.success.rawValue
            }
            if !message.isEmpty { console.err(message) }
            guard code.rawValue == ExitCode.validationFailure.rawValue else { return code.rawValue }
            // ArgumentParser reads `-4K` as options and then reports the size as missing; say why.
            if let negative = arguments.prefix(while: { $0 != "--" }).first(where: { $0.count > 1 && $0.hasPrefix("-") && $0.dropFirst().first!.isNumber }) {
                console.err("note: '\(negative)' looks like a negative number: sizes, ids, pages and durations cannot be negative")
            }
            return ExitStatus.usage.rawValue
        }
    }
}

// MARK: - Errors

/// A failure already explained on stderr; carries the exit status.
struct Failed: Error {
    var status: ExitStatus
}

extension ExitStatus {
    var exitCode: ExitCode { ExitCode(rawValue) }
}

/// Prints `error: ...` for `error` and returns the matching exit status, decided on the error's kind, code
/// and errno, never on its text. The daemon's message already reads `cause (ENAME); fix`.
func report(_ error: any Error, console: Console = .current) -> ExitStatus {
    switch error {
    case let failed as Failed:
        return failed.status
    case let client as DmaBufClientError:
        if let wire = client.wire {
            console.err("error: \(printable(wire.message))")
            return status(of: wire)
        }
        switch client.kind {
        case .disconnected, .protocolViolation:
            console.err("error: lost the daemon: \(printable(client.local ?? "unknown error")) (\(client.errno?.name ?? "?"))")
            return .unreachable
        case .refused, .unsupported, .timedOut:
            console.err("error: \(printable(client.local ?? "unknown error")) (\(client.errno?.name ?? "?"))")
            return .refused
        }
    case let kernel as DmaBufError:
        console.err("error: \(printable(kernel.description))")
        return kernel.errno.map(lostConnection) == true ? .unreachable : .refused
    case let validation as ValidationError:
        console.err("error: \(printable(validation.message))")
        return .usage
    default:
        console.err("error: \(printable("\(error)"))")
        return .refused
    }
}

/// A refusal's exit status: a malformed message or no common version ends the connection (the daemon
/// disconnects), anything else is a refusal.
func status(of refusal: WireError) -> ExitStatus {
    switch refusal.code {
    case .malformed, .unsupportedVersion: .unreachable
    default: .refused
    }
}

/// The errnos of a socket that no longer reaches the daemon.
func lostConnection(_ errno: Errno) -> Bool {
    [.brokenPipe, .connectionReset, .socketNotConnected, .connectionRefused, .connectionAbort].contains(errno)
}

/// Connects to the daemon and runs `body`, turning failures into `error: ...` and the documented exit status.
func withDaemon<T>(_ options: ConnectionOptions, _ body: (DmaBufConnection) throws -> T) throws -> T {
    let connection: DmaBufConnection
    do {
        connection = try DmaBufConnection(path: options.socket, clientName: "dmabufctl")
    } catch let error as DmaBufError {
        Console.current.err("error: cannot reach dmabufd at \(printable(options.socket)): \(printable(error.description))")
        throw ExitStatus.unreachable.exitCode
    } catch {
        throw report(error).exitCode
    }
    do {
        return try body(connection)
    } catch let code as ExitCode {
        throw code
    } catch {
        throw report(error).exitCode
    }
}

/// Prints `value` as JSON, or `text` (built lazily) for `.text`.
func emit<T: Encodable>(_ format: OutputFormat, _ value: T, text: (T) -> String) throws {
    switch format {
    case .text: Console.current.writeOut(text(value))
    case .json: Console.current.writeOut(try encodeJSON(value))
    }
}
