import ArgumentParser
import DmaBuf
import DmaBufClient
import DmaBufWire

// The commands that talk to dmabufd. Each connects, sends one or two requests, prints, and exits; the
// daemon releases what a disconnected client held, so only `alloc --hold` keeps its connection.

/// A command that asks the daemon one thing and prints the reply as text or JSON. Conforming commands
/// only say what to ask (`query`) and how the reply reads as text (`text`); connecting, the error
/// reporting and exit statuses of `withDaemon`, and the `--format` switch live here once.
public protocol DaemonReplyCommand: ParsableCommand {
    associatedtype Reply: Encodable
    var connection: ConnectionOptions { get }
    var output: FormatOptions { get }
    func query(_ daemon: DmaBufConnection) throws -> Reply
    func text(_ reply: Reply) -> String
}

extension DaemonReplyCommand {
    public func run() throws {
        let reply = try withDaemon(connection) { try query($0) }
        try emit(output.format, reply, text: text)
    }
}

public struct HeapsCommand: DaemonReplyCommand {
    public static let configuration = CommandConfiguration(
        commandName: "heaps",
        abstract: "List the heaps the daemon serves and its allocation policies.",
        discussion: """
            One row per heap: the logical name clients ask for, the kernel device or heap name behind it, its \
            kind (system, system-uncached, cma, udmabuf, other), and what is allocated from it through dmabufd. \
            Then the policies: names that stand for an ordered list of heaps (`any` and the configured ones).

            JSON keys: heaps[] {name, device, kind, allocatedBytes, buffers}, policies[] {name, chain}.

            EXAMPLES:
              dmabufctl heaps
              dmabufctl heaps --format json | jq -r '.heaps[].name'
            """)

    @OptionGroup public var connection: ConnectionOptions
    @OptionGroup public var output: FormatOptions

    public init() {}

    public func query(_ daemon: DmaBufConnection) throws -> HeapsReply { try daemon.heaps() }
    public func text(_ reply: HeapsReply) -> String { format(heaps: reply) }
}

public struct AllocCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "alloc",
        abstract: "Allocate a buffer through the daemon.",
        discussion: """
            SIZE takes binary units: 4096, 64K, 4M, 1.5G, 2GiB. --heap names a heap or a policy (default `any`, \
            the daemon's preference order). The daemon releases a client's buffers when it disconnects, so \
            without --hold the buffer is freed as soon as dmabufctl exits; with --hold dmabufctl prints the \
            buffer and keeps it until SIGINT, SIGTERM, SIGHUP or the end of its standard input (when that is a \
            terminal, pipe or socket), or until the daemon frees it.

            JSON: the buffer's record (see `dmabufctl info --help`).

            EXAMPLES:
              dmabufctl alloc 4M
              dmabufctl alloc 1G --heap system --tag test-frame --hold
              coproc dmabufctl alloc 16M --hold   # freed when its stdin closes
            """)

    @Argument(help: ArgumentHelp("Bytes to allocate, with an optional unit (K, M, G, T).", valueName: "size"),
              transform: parseSize)
    public var size: Int

    @Option(help: ArgumentHelp("A heap or policy name.", valueName: "name|policy"))
    public var heap: String = "any"

    @Option(help: ArgumentHelp("A tag, part of the buffer's kernel name (uid:pid:tag).", valueName: "tag"))
    public var tag: String = ""

    @Flag(help: "Keep the buffer until interrupted or stdin closes.")
    public var hold = false

    @OptionGroup public var connection: ConnectionOptions
    @OptionGroup public var output: FormatOptions

    public init() {}

    public func run() throws {
        try withDaemon(connection) { connection in
            let buffer = try connection.allocate(size: size, heap: heap, tag: tag)
            try emit(output.format, buffer.info) { "allocated " + format(info: $0) }
            guard hold else { return }
            Console.current.err("holding buffer \(buffer.info.id) until SIGINT/SIGTERM or end of input")
            let end = try holdBuffer(buffer.info.id, connection: connection)
            switch end {
            case .signal(let number):
                try? connection.release(buffer.info.id)
                Console.current.err("released buffer \(buffer.info.id) (signal \(number))")
            case .endOfInput:
                try? connection.release(buffer.info.id)
                Console.current.err("released buffer \(buffer.info.id) (end of input)")
            case .freed:
                Console.current.err("error: the daemon freed buffer \(buffer.info.id) (revoked)")
                throw ExitStatus.refused.exitCode
            }
        }
    }
}

public struct ListCommand: DaemonReplyCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ls",
        abstract: "List buffers: yours, or every buffer with --all (root).",
        discussion: """
            Columns: ID; OWNER uid/pid; HEAP; SIZE; HOLDERS, the file references outside the daemon (fds and \
            device imports); LEASES, layout leases outstanding; STATE (active, revoked, orphaned — owner gone, \
            kept for leases, fences or holders — and shared); NAME, the kernel-visible uid:pid:tag.

            JSON: {"buffers": [...]} with each buffer's record (see `dmabufctl info --help`).

            EXAMPLES:
              dmabufctl ls
              sudo dmabufctl ls --all
              dmabufctl ls --all --format json | jq '.buffers[] | select(.orphaned)'
            """)

    @Flag(help: "Every client's buffers (the daemon allows this to root only).")
    public var all = false

    @OptionGroup public var connection: ConnectionOptions
    @OptionGroup public var output: FormatOptions

    public init() {}

    public func query(_ daemon: DmaBufConnection) throws -> BufferListOutput {
        BufferListOutput(buffers: try daemon.list(all: all))
    }
    public func text(_ reply: BufferListOutput) -> String { format(buffers: reply.buffers) }
}

public struct InfoCommand: DaemonReplyCommand {
    public static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show one buffer.",
        discussion: """
            JSON keys: id, inode, size (bytes), heap, tag, name, ownerUID, ownerPID, generation (bumped on \
            revoke), externalReferences (holders), leases, sharedWith (uids), revoked, orphaned.

            EXAMPLES:
              dmabufctl info 7
              dmabufctl info 7 --format json
            """)

    @Argument(help: "The buffer's id (from `ls`).")
    public var id: BufferID

    @OptionGroup public var connection: ConnectionOptions
    @OptionGroup public var output: FormatOptions

    public init() {}

    public func query(_ daemon: DmaBufConnection) throws -> BufferInfo { try daemon.info(id) }
    public func text(_ reply: BufferInfo) -> String { format(info: reply) }
}

public struct RangesCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ranges",
        abstract: "Print a buffer's page runs under a lease, then release the lease.",
        discussion: """
            Runs are {start, pages} stretches in buffer order. Without --physical, start counts the buffer's own \
            pages (or the memfd's pages, for a udmabuf); with --physical, start is a page frame number and the \
            ADDRESS column the physical address — the daemon allows that only to the uids its config names \
            (`physical_addresses`), and refuses others with EPERM.

            JSON keys: buffer, lease, leaseReleased, generation, kind (buffer-pages, memfd-pages, physical), \
            pageSize, firstPage, pages, runs[] {start, pages}.

            EXAMPLES:
              dmabufctl ranges 7
              dmabufctl ranges 7 --first-page 256 --pages 16
              sudo dmabufctl ranges 7 --physical --format json
            """)

    @Argument(help: "The buffer's id.")
    public var id: BufferID

    @Option(help: ArgumentHelp("The first page to describe.", valueName: "n"))
    public var firstPage: UInt64 = 0

    @Option(help: ArgumentHelp("How many pages; 0 for all to the end.", valueName: "n"))
    public var pages: UInt64 = 0

    @Flag(help: "Physical page frame numbers (authorised uids only).")
    public var physical = false

    @OptionGroup public var connection: ConnectionOptions
    @OptionGroup public var output: FormatOptions

    public init() {}

    public func run() throws {
        let (layout, released) = try withDaemon(connection) { connection in
            let layout = try connection.layout(id, firstPage: firstPage, pageCount: pages, physical: physical)
            do {
                try connection.releaseLease(layout.lease)
                return (layout, true)
            } catch {
                _ = report(error)
                return (layout, false)
            }
        }
        switch output.format {
        case .text: Console.current.writeOut(format(layout: layout, leaseReleased: released))
        case .json: Console.current.writeOut(try encodeJSON(LayoutOutput(layout, leaseReleased: released)))
        }
        if !released { throw ExitStatus.refused.exitCode }
    }
}

public struct FenceCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "fence",
        abstract: "Ask which fences guard a buffer's pages, and wait for them.",
        discussion: """
            --pages takes A:B (pages A to B-1), A: (A to the end) or A (one page); the default is the whole \
            buffer. --access read waits for writers only; --access write waits for readers and writers.

            EXAMPLES:
              dmabufctl fence status 7 --access write
              dmabufctl fence wait 7 --pages 0:16 --access read --timeout 5s
            """,
        subcommands: [FenceWaitCommand.self, FenceStatusCommand.self])

    public init() {}
}

/// What `fence wait` and `fence status` share.
public struct FenceOptions: ParsableArguments {
    @Argument(help: "The buffer's id.")
    public var id: BufferID

    @Option(help: ArgumentHelp("Pages: A:B, A: or A (default: all).", valueName: "pages"), transform: PageSpan.parse)
    public var pages: PageSpan = .all

    @Option(help: "read or write.")
    public var access: AccessMode

    public init() {}

    /// beginAccess on these pages: the number of fences and, when there are any, their sync_file.
    func begin(on connection: DmaBufConnection) throws -> (Int, SyncFile?) {
        try connection.beginAccess(buffer: id, firstPage: pages.first, pageCount: pages.count, access: access)
    }

    func output(fences: Int, signaled: Bool, waitedMilliseconds: UInt64?) -> FenceOutput {
        FenceOutput(buffer: id, firstPage: pages.first, pageCount: pages.count, access: access.description,
                    fences: UInt32(fences), signaled: signaled, waitedMilliseconds: waitedMilliseconds)
    }
}

public struct FenceWaitCommand: DaemonReplyCommand {
    public static let configuration = CommandConfiguration(
        commandName: "wait",
        abstract: "Wait until the fences on the pages signal (beginAccess, then poll the sync_file).",
        discussion: """
            Exits 0 once every fence signalled (or when there was none), 1 when --timeout ran out.

            JSON keys: buffer, firstPage, pageCount, access, fences, signaled, waitedMilliseconds.

            EXAMPLES:
              dmabufctl fence wait 7 --access write
              dmabufctl fence wait 7 --pages 0:16 --access read --timeout 500ms
            """)

    @OptionGroup public var fence: FenceOptions

    @Option(help: ArgumentHelp("Give up after this long (500ms, 5s, 1m); default: wait forever.", valueName: "duration"),
            transform: parseDuration)
    public var timeout: Duration?

    @OptionGroup public var connection: ConnectionOptions
    @OptionGroup public var output: FormatOptions

    public init() {}

    public func query(_ daemon: DmaBufConnection) throws -> FenceOutput {
        let (count, syncFile) = try fence.begin(on: daemon)
        let start = ContinuousClock.now
        if let syncFile {
            do {
                try syncFile.wait(timeout: timeout)
            } catch let error as DmaBufError where error.errno == .timerExpired {
                Console.current.err("error: \(count) fence(s) on buffer \(fence.id) pages \(fence.pages) did not signal within \(human(milliseconds: UInt64((timeout ?? .zero).wholeMilliseconds)))")
                throw ExitStatus.refused.exitCode
            }
        }
        return fence.output(fences: count, signaled: true,
            waitedMilliseconds: syncFile == nil ? 0 : UInt64(max(0, (ContinuousClock.now - start).wholeMilliseconds)))
    }

    public func text(_ reply: FenceOutput) -> String { format(fence: reply) }
}

public struct FenceStatusCommand: DaemonReplyCommand {
    public static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Print how many fences guard the pages and whether they signalled, without waiting.",
        discussion: """
            JSON keys: buffer, firstPage, pageCount, access, fences, signaled.

            EXAMPLES:
              dmabufctl fence status 7 --access write
              dmabufctl fence status 7 --pages 4: --access read --format json
            """)

    @OptionGroup public var fence: FenceOptions
    @OptionGroup public var connection: ConnectionOptions
    @OptionGroup public var output: FormatOptions

    public init() {}

    public func query(_ daemon: DmaBufConnection) throws -> FenceOutput {
        let (count, syncFile) = try fence.begin(on: daemon)
        return fence.output(fences: count, signaled: try syncFile?.isSignaled() ?? true, waitedMilliseconds: nil)
    }

    public func text(_ reply: FenceOutput) -> String { format(fence: reply) }
}

/// `fence wait` / `fence status` text: `buffer 7 pages 0:16 write: 2 fences, signalled after 12 ms`.
public func format(fence: FenceOutput) -> String {
    let pages = PageSpan(first: fence.firstPage, count: fence.pageCount)
    var text = "buffer \(fence.buffer) pages \(pages) \(fence.access): "
    if fence.fences == 0 {
        text += "no fences, nothing to wait for"
    } else {
        text += "\(fence.fences) fence\(fence.fences == 1 ? "" : "s"), "
        if let waited = fence.waitedMilliseconds {
            text += "signalled after \(human(milliseconds: waited))"
        } else {
            text += fence.signaled ? "signalled" : "pending"
        }
    }
    return text + "\n"
}

public struct RevokeCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "revoke",
        abstract: "Revoke a buffer: holders are told and given a deadline to release it.",
        discussion: """
            After the deadline the daemon ends the remaining leases and frees the buffer once its fences have \
            signalled. Without --deadline the daemon's configured `revoke_deadline` applies. Owners may revoke \
            their own buffers; root may revoke any.

            EXAMPLES:
              dmabufctl revoke 7
              sudo dmabufctl revoke 7 --deadline 2s
            """)

    @Argument(help: "The buffer's id.")
    public var id: BufferID

    @Option(help: ArgumentHelp("How long holders get to release (500ms, 2s, 1m).", valueName: "duration"), transform: parseDuration)
    public var deadline: Duration?

    @OptionGroup public var connection: ConnectionOptions

    public init() {}

    public func run() throws {
        try withDaemon(connection) { try $0.revoke(id, deadline: deadline) }
        let when = deadline.map { "\(human(milliseconds: UInt64($0.wholeMilliseconds))) to release" } ?? "the configured deadline to release"
        Console.current.out("revoked buffer \(id); holders have \(when)")
    }
}

public struct StatsCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "stats",
        abstract: "Show the daemon's accounting: per heap, per client uid, failures by errno, fences.",
        discussion: """
            --format openmetrics prints the OpenMetrics text format (metrics named dmabufd_*, ending with \
            `# EOF`), for a node-exporter textfile collector or a scrape proxy. A quota shown as `-` is not set. \
            Text and OpenMetrics also say whether this kernel charges heap memory to memory cgroups \
            (dma_heap.mem_accounting=1). Rows the daemon summed to fit one message are shown as uid `others` and \
            cgroup `(N more cgroups)`.

            JSON keys: buffers, bytes, leases, connectedClients, pendingFences, oldestPendingFenceMilliseconds, \
            heaps[] {heap, bytes, buffers, failures}, clients[] {uid, bytes, buffers, quotaBytes, quotaBuffers, \
            refusals}, failures[] {errno, count}.

            EXAMPLES:
              dmabufctl stats
              dmabufctl stats --format json
              dmabufctl stats --format openmetrics > /var/lib/node_exporter/textfile/dmabufd.prom
            """)

    @Option(help: "Output format: text, json or openmetrics.")
    public var format: StatsFormat = .text

    @OptionGroup public var connection: ConnectionOptions

    public init() {}

    public func run() throws {
        // Whether the kernel charges heap memory to cgroups is in the `heaps` reply (v2); a daemon that
        // cannot say leaves the line out.
        let (stats, accounting) = try withDaemon(connection) { daemon in
            (try daemon.stats(), daemon.version >= 2 ? (try? daemon.heaps())?.memAccounting : nil)
        }
        switch format {
        case .text: Console.current.writeOut(DmaBufCLI.format(stats: stats, memAccounting: accounting))
        case .json: Console.current.writeOut(try encodeJSON(stats))
        case .openmetrics: Console.current.writeOut(openMetrics(stats: stats, memAccounting: accounting))
        }
    }
}
