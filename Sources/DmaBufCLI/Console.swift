import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where dmabufctl writes: results to `out` (stdout), diagnostics to `err` (stderr).
///
/// Commands never call `print` directly, so that tests can run a whole command in-process and read what it
/// wrote: ``Console/current`` is task-local, and ``Dmabufctl/execute(_:)`` run under
/// `Console.$current.withValue(...)` writes into the given console instead of the process's streams.
///
/// Everything written passes ``printableLines(_:)``: whatever reaches the terminal has no control
/// character but the newlines between lines, whichever formatter built it.
public struct Console: Sendable {
    private let rawOut: @Sendable (String) -> Void
    private let rawErr: @Sendable (String) -> Void

    public init(out: @escaping @Sendable (String) -> Void, err: @escaping @Sendable (String) -> Void) {
        self.rawOut = out
        self.rawErr = err
    }

    /// Writes `text` to stdout as it is, but for the last escaping net.
    public func writeOut(_ text: String) { rawOut(printableLines(text)) }
    /// Writes `text` to stderr as it is, but for the last escaping net.
    public func writeErr(_ text: String) { rawErr(printableLines(text)) }

    /// The process's stdout and stderr, flushed after every write (output may be a pipe read by a script
    /// that waits for `alloc --hold` to print the id).
    public static let standard = Console(out: { writeAll(1, $0) }, err: { writeAll(2, $0) })

    @TaskLocal public static var current: Console = .standard

    /// Writes `text` and a newline to stdout.
    public func out(_ text: String) { writeOut(text.hasSuffix("\n") ? text : text + "\n") }
    /// Writes `text` and a newline to stderr.
    public func err(_ text: String) { writeErr(text.hasSuffix("\n") ? text : text + "\n") }
}

/// Writes all of `text` to `fd` (unbuffered, so nothing waits in a buffer when the process is killed).
func writeAll(_ fd: CInt, _ text: String) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        bytes = bytes.dropFirst(n)
    }
}

/// A console that keeps what was written, for tests.
public final class CapturingConsole: Sendable {
    private let text = Mutex((out: "", err: ""))

    public init() {}

    public var console: Console {
        Console(
            out: { [self] written in text.withLock { $0.out += written } },
            err: { [self] written in text.withLock { $0.err += written } })
    }

    public var stdout: String { text.withLock { $0.out } }
    public var stderr: String { text.withLock { $0.err } }
}
