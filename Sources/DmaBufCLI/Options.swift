import ArgumentParser
import DmaBuf
import DmaBufClient
import DmaBufWire

/// `--socket PATH`, shared by every command that talks to the daemon.
public struct ConnectionOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp(
        "The daemon's socket (default: $DMABUFD_SOCKET, else the path shown).", valueName: "path"))
    public var socket: String = DmaBufConnection.defaultSocketPath

    public init() {}
}

/// How listings print: aligned text for people, JSON for programs.
public enum OutputFormat: String, ExpressibleByArgument, CaseIterable, Sendable {
    case text, json
}

/// `--format text|json`, shared by every listing.
public struct FormatOptions: ParsableArguments {
    @Option(name: .long, help: "Output format: text or json.")
    public var format: OutputFormat = .text

    public init() {}
}

/// `stats` also speaks OpenMetrics (the Prometheus text exposition format).
public enum StatsFormat: String, ExpressibleByArgument, CaseIterable, Sendable {
    case text, json, openmetrics
}

/// `--access read|write` for fence commands: the one ``AccessMode``, limited to what the wire carries.
extension AccessMode: ExpressibleByArgument {
    public init?(argument: String) {
        switch argument {
        case "read": self = .read
        case "write": self = .write
        default: return nil
        }
    }

    public static var allValueStrings: [String] { ["read", "write"] }
    public var defaultValueDescription: String { description }
}

/// A page range from `--pages`: `A:B` (pages A up to, not including, B), `A:` (A to the end), or `A`
/// (that one page). `count` 0 means "to the end of the buffer", as in the protocol.
public struct PageSpan: Sendable, Equatable, CustomStringConvertible {
    public var first: UInt64
    public var count: UInt64

    public init(first: UInt64, count: UInt64) {
        self.first = first
        self.count = count
    }

    /// The whole buffer.
    public static let all = PageSpan(first: 0, count: 0)

    public var description: String { count == 0 ? "\(first):" : "\(first):\(first + count)" }

    /// Parses `A:B`, `A:` or `A`.
    /// - Throws: `ValidationError` saying what is wrong (`5:2`: the end is not after the start).
    public static func parse(_ text: String) throws -> PageSpan {
        let parts = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        guard let first = UInt64(parts[0]) else {
            throw ValidationError("'\(text)' is not a page range: expected A:B (pages A to B-1), A: or A, with page numbers ≥ 0")
        }
        if parts.count == 1 { return PageSpan(first: first, count: 1) }
        if parts[1].isEmpty { return PageSpan(first: first, count: 0) }
        guard let end = UInt64(parts[1]) else {
            throw ValidationError("'\(text)' is not a page range: '\(parts[1])' is not a page number")
        }
        guard end > first else {
            throw ValidationError("'\(text)' is an empty page range: the end (\(end)) must be greater than the start (\(first))")
        }
        return PageSpan(first: first, count: end - first)
    }
}

/// Parses a size with optional binary units (`4096`, `64K`, `4M`, `1.5G`, `2GiB`). At least one byte.
/// - Throws: `ValidationError` for anything else (`12Q`, `-4K`, `0`).
public func parseSize(_ text: String) throws -> Int {
    guard let bytes = ByteCount.parse(text) else {
        throw ValidationError("'\(text)' is not a size: use a whole number of bytes or a number with a unit (K, M, G, T; e.g. 4M, 1.5G)")
    }
    guard bytes > 0 else { throw ValidationError("the size must be at least one byte, not '\(text)'") }
    return bytes
}

/// Parses a duration: a non-negative number with a unit (`ms`, `s`, `m`, `h`); a bare number is seconds.
/// - Throws: `ValidationError` for anything else.
/// The grammar is the daemon's config grammar (``DurationText/parse(_:)``); the wire's `*_ms` fields are u32.
public func parseDuration(_ text: String) throws -> Duration {
    guard let duration = DurationText.parse(text) else {
        throw ValidationError("'\(text)' is not a duration: use a number with a unit (500ms, 5s, 2m, 1h)")
    }
    guard duration.wholeMilliseconds < Int64(UInt32.max) else { throw ValidationError("'\(text)' is too long a duration") }
    return duration
}
