import ArgumentParser
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

// `dmabufctl dump`: who holds which dma-buf, system-wide, without the daemon — like Android's dmabuf_dump.
// Read from /proc/<pid>/fd + fdinfo (held by descriptor), /proc/<pid>/maps (mapped) and /proc/<pid>/smaps
// (Rss/Pss of those mappings). Unprivileged it sees the processes it may ptrace-read (its own uid's);
// the rest are counted as unreadable.

/// Where the collector reads procfs and sysfs from: the live system, or a fake in tests.
/// Each method throws `Errno` (ENOENT for a process that exited, EACCES for one not ours).
public protocol ProcSource {
    /// The names in a directory.
    func entries(_ directory: String) throws -> [String]
    /// A small file's text.
    func contents(_ path: String) throws -> String
    /// A symlink's target (`/proc/<pid>/fd/<n>`).
    func linkTarget(_ path: String) throws -> String
    /// The inode number of what a path (or `/proc/<pid>/fd/<n>` link) leads to.
    func inode(_ path: String) throws -> UInt64
}

/// The live `/proc` and `/sys`.
public struct LiveProcSource: ProcSource {
    public init() {}

    public func entries(_ directory: String) throws -> [String] {
        try SmallFiles.entries(of: directory)
    }

    public func contents(_ path: String) throws -> String {
        try SmallFiles.read(path)
    }

    public func linkTarget(_ path: String) throws -> String {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(path, &buffer, buffer.count - 1)
        guard n >= 0 else { throw Errno(rawValue: errno) }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public func inode(_ path: String) throws -> UInt64 {
        var st = stat()
        guard stat(path, &st) == 0 else { throw Errno(rawValue: errno) }
        return UInt64(st.st_ino)
    }
}

// MARK: - Report

/// A dma-buf a process holds by file descriptor.
public struct FdUsage: Codable, Sendable, Equatable {
    public var fd: Int32
    public var inode: UInt64
    public var size: UInt64
    /// The exporter (`system`, `udmabuf`, a driver).
    public var exporter: String
    /// The name set with DMA_BUF_SET_NAME; empty when none.
    public var name: String
    /// File references to the buffer system-wide (fdinfo `count`).
    public var count: Int

    public init(fd: Int32, inode: UInt64, size: UInt64, exporter: String, name: String, count: Int) {
        self.fd = fd; self.inode = inode; self.size = size; self.exporter = exporter; self.name = name; self.count = count
    }
}

/// A dma-buf mapping in a process's address space.
public struct MappingUsage: Codable, Sendable, Equatable {
    /// `7f2c4a000000-7f2c4a400000`
    public var range: String
    public var inode: UInt64
    /// Bytes mapped (the mapping's length).
    public var size: UInt64
    public var name: String
    /// From smaps; nil when smaps could not be read. Heap and udmabuf mappings are VM_PFNMAP, which the
    /// kernel does not count in Rss, so 0 is common: `size` is what is mapped.
    public var rssKiB: UInt64?
    public var pssKiB: UInt64?

    public init(range: String, inode: UInt64, size: UInt64, name: String, rssKiB: UInt64?, pssKiB: UInt64?) {
        self.range = range; self.inode = inode; self.size = size; self.name = name; self.rssKiB = rssKiB; self.pssKiB = pssKiB
    }
}

/// One process that holds or maps dma-bufs.
public struct ProcessUsage: Codable, Sendable, Equatable {
    public var pid: Int32
    /// `/proc/<pid>/comm`
    public var name: String
    public var fds: [FdUsage]
    public var mappings: [MappingUsage]
    /// Bytes of the distinct buffers held by fd.
    public var fdBytes: UInt64
    /// Bytes mapped, over all dma-buf mappings.
    public var mappedBytes: UInt64
    /// Sums over the dma-buf mappings from smaps; nil ("n/a") when smaps was not readable.
    public var rssKiB: UInt64?
    public var pssKiB: UInt64?
}

/// How many fds one process has on a buffer.
public struct Holder: Codable, Sendable, Equatable {
    public var pid: Int32
    public var fds: Int

    public init(pid: Int32, fds: Int) { self.pid = pid; self.fds = fds }
}

/// One dma-buf, system-wide.
public struct BufferUsage: Codable, Sendable, Equatable {
    public var inode: UInt64
    public var size: UInt64
    public var exporter: String
    public var name: String
    /// fdinfo `count` (the largest seen); nil when no fd of it was readable.
    public var count: Int?
    /// Processes holding it by fd.
    public var holders: [Holder]
    /// Processes mapping it.
    public var mappers: [Int32]
}

/// A process whose fds or maps could not be read (not permitted). Kernel threads are left out.
public struct UnreadableProcess: Codable, Sendable, Equatable {
    public var pid: Int32
    public var name: String

    public init(pid: Int32, name: String) { self.pid = pid; self.name = name }
}

/// Everything `dump` found. JSON keys as named here.
public struct DumpReport: Codable, Sendable, Equatable {
    public var processes: [ProcessUsage]
    public var buffers: [BufferUsage]
    /// Bytes of all distinct buffers found.
    public var totalBytes: UInt64
    public var unreadable: [UnreadableProcess]

    public init(processes: [ProcessUsage], buffers: [BufferUsage], totalBytes: UInt64, unreadable: [UnreadableProcess]) {
        self.processes = processes; self.buffers = buffers; self.totalBytes = totalBytes; self.unreadable = unreadable
    }
}

/// Walks `/proc` and builds a ``DumpReport``.
public struct DumpCollector {
    public var source: any ProcSource
    public var proc: String
    public var sysfsBuffers: String

    public init(source: any ProcSource = LiveProcSource(), proc: String = "/proc", sysfsBuffers: String = "/sys/kernel/dmabuf/buffers") {
        self.source = source
        self.proc = proc
        self.sysfsBuffers = sysfsBuffers
    }

    public func collect() -> DumpReport {
        let pids = ((try? source.entries(proc)) ?? []).compactMap { Int32($0) }.sorted()
        var processes: [ProcessUsage] = []
        var unreadable: [UnreadableProcess] = []
        for pid in pids {
            switch process(pid) {
            case .some(.found(let usage)): processes.append(usage)
            case .some(.denied(let name)): unreadable.append(UnreadableProcess(pid: pid, name: name))
            case nil: break
            }
        }
        let buffers = aggregate(processes)
        return DumpReport(processes: processes, buffers: buffers, totalBytes: buffers.reduce(0) { $0 + $1.size }, unreadable: unreadable)
    }

    enum Outcome { case found(ProcessUsage), denied(String) }

    /// Nil for a process with no dma-bufs (or that exited meanwhile).
    func process(_ pid: Int32) -> Outcome? {
        let base = "\(proc)/\(pid)"
        let name = ((try? source.contents(base + "/comm")) ?? "?").trimmingWhitespace()
        var denied = false

        var fds: [FdUsage] = []
        do {
            let numbers = try source.entries(base + "/fd").compactMap { Int32($0) }.sorted()
            for fd in numbers {
                guard let target = try? source.linkTarget("\(base)/fd/\(fd)"), isDmaBufPath(target) else { continue }
                guard let text = try? source.contents("\(base)/fdinfo/\(fd)") else { continue }
                let info = FdInfo(parsing: text)
                let inode = info.inode ?? (try? source.inode("\(base)/fd/\(fd)")) ?? 0
                fds.append(FdUsage(
                    fd: fd, inode: inode, size: UInt64(max(info.size ?? 0, 0)), exporter: info.exporter ?? "?",
                    name: info.name ?? dmaBufName(fromPath: target) ?? "", count: info.count ?? 0))
            }
        } catch let errno as Errno where errno == .permissionDenied || errno == .notPermitted {
            denied = true
        } catch {
            return nil  // gone
        }

        var mappings: [MappingUsage] = []
        var rss: UInt64? = 0, pss: UInt64? = 0
        do {
            let maps = parseDmaBufMaps(try source.contents(base + "/maps"))
            if !maps.isEmpty {
                let smaps = (try? source.contents(base + "/smaps")).map(parseSmaps)
                var byStart: [UInt64: SmapsEntry] = [:]
                for entry in smaps ?? [] where entry.mapping.isDmaBuf { byStart[entry.mapping.start] = entry }
                for line in maps {
                    let entry = byStart[line.start]
                    let lineRss = smaps == nil ? nil : entry?.rssKiB ?? 0
                    let linePss = smaps == nil ? nil : entry?.pssKiB ?? 0
                    mappings.append(MappingUsage(
                        range: line.range, inode: line.inode, size: line.size, name: line.dmaBufName ?? "",
                        rssKiB: lineRss, pssKiB: linePss))
                    rss = rss.flatMap { r in lineRss.map { r + $0 } }
                    pss = pss.flatMap { p in linePss.map { p + $0 } }
                }
            }
        } catch let errno as Errno where errno == .permissionDenied || errno == .notPermitted {
            denied = true
        } catch {}

        if fds.isEmpty && mappings.isEmpty {
            // Kernel threads (and zombies) have an empty cmdline and no files or memory of their own:
            // not being allowed to look at them hides nothing.
            guard denied, let cmdline = try? source.contents(base + "/cmdline"), !cmdline.isEmpty else { return nil }
            return .denied(name)
        }
        var seen = Set<UInt64>()
        let fdBytes = fds.reduce(UInt64(0)) { total, fd in seen.insert(fd.inode).inserted ? total + fd.size : total }
        return .found(ProcessUsage(
            pid: pid, name: name, fds: fds, mappings: mappings, fdBytes: fdBytes,
            mappedBytes: mappings.reduce(0) { $0 + $1.size }, rssKiB: rss, pssKiB: pss))
    }

    /// One entry per inode: sizes from fdinfo, else sysfs (CONFIG_DMABUF_SYSFS_STATS), else the largest mapping.
    func aggregate(_ processes: [ProcessUsage]) -> [BufferUsage] {
        var buffers: [UInt64: BufferUsage] = [:]
        for process in processes {
            for fd in process.fds {
                var buffer = buffers[fd.inode] ?? BufferUsage(inode: fd.inode, size: 0, exporter: "?", name: "", count: nil, holders: [], mappers: [])
                buffer.size = max(buffer.size, fd.size)
                if buffer.exporter == "?" { buffer.exporter = fd.exporter }
                if buffer.name.isEmpty { buffer.name = fd.name }
                buffer.count = max(buffer.count ?? 0, fd.count)
                if let i = buffer.holders.firstIndex(where: { $0.pid == process.pid }) {
                    buffer.holders[i].fds += 1
                } else {
                    buffer.holders.append(Holder(pid: process.pid, fds: 1))
                }
                buffers[fd.inode] = buffer
            }
            for mapping in process.mappings {
                var buffer = buffers[mapping.inode]
                    ?? BufferUsage(inode: mapping.inode, size: 0, exporter: "?", name: mapping.name, count: nil, holders: [], mappers: [])
                if !buffer.mappers.contains(process.pid) { buffer.mappers.append(process.pid) }
                if buffer.name.isEmpty { buffer.name = mapping.name }
                buffers[mapping.inode] = buffer
            }
        }
        for (inode, var buffer) in buffers where buffer.count == nil {
            let dir = "\(sysfsBuffers)/\(inode)"
            if let size = (try? source.contents(dir + "/size")).flatMap({ UInt64($0.trimmingWhitespace()) }) { buffer.size = size }
            if let exporter = try? source.contents(dir + "/exporter_name") { buffer.exporter = exporter.trimmingWhitespace() }
            if buffer.size == 0 {
                buffer.size = processes.flatMap(\.mappings).filter { $0.inode == inode }.map(\.size).max() ?? 0
            }
            buffers[inode] = buffer
        }
        return buffers.values.sorted { ($0.size, $1.inode) > ($1.size, $0.inode) }
    }
}

// MARK: - Text

func kib(_ value: UInt64?) -> String { value.map { human(bytes: $0 * 1024) } ?? "n/a" }

/// `dump` as text: a summary row per process, each process's fds and mappings, then the buffers by inode.
public func format(dump report: DumpReport) -> String {
    var text = ""
    if report.processes.isEmpty {
        text += "no dma-bufs found in the processes readable here\n"
    } else {
        var summary = TextTable([
            .init("PID", .right), .init("PROCESS"), .init("FDS", .right), .init("FD BYTES", .right), .init("MAPS", .right),
            .init("MAPPED", .right), .init("RSS", .right), .init("PSS", .right),
        ])
        for p in report.processes {
            summary.append([
                "\(p.pid)", p.name, "\(p.fds.count)", human(bytes: p.fdBytes), "\(p.mappings.count)", human(bytes: p.mappedBytes),
                kib(p.rssKiB), kib(p.pssKiB),
            ])
        }
        text += summary.render()
        for p in report.processes {
            text += "\n\(printable(p.name)) (\(p.pid))\n"
            if !p.fds.isEmpty {
                var fds = TextTable([
                    .init("FD", .right), .init("INODE", .right), .init("SIZE", .right), .init("EXPORTER"), .init("COUNT", .right),
                    .init("NAME"),
                ])
                for fd in p.fds {
                    fds.append(["\(fd.fd)", "\(fd.inode)", human(bytes: fd.size), fd.exporter, "\(fd.count)", fd.name])
                }
                text += fds.render(indent: "  ")
            }
            if !p.mappings.isEmpty {
                var maps = TextTable([
                    .init("MAPPING"), .init("INODE", .right), .init("SIZE", .right), .init("RSS", .right), .init("PSS", .right),
                    .init("NAME"),
                ])
                for m in p.mappings {
                    maps.append([m.range, "\(m.inode)", human(bytes: m.size), kib(m.rssKiB), kib(m.pssKiB), m.name])
                }
                text += maps.render(indent: "  ")
            }
        }
        var buffers = TextTable([
            .init("INODE", .right), .init("SIZE", .right), .init("EXPORTER"), .init("COUNT", .right), .init("FD HOLDERS (PID×FDS)"),
            .init("MAPPED BY"), .init("NAME"),
        ])
        for b in report.buffers {
            let holders = b.holders.map { $0.fds == 1 ? "\($0.pid)" : "\($0.pid)×\($0.fds)" }.joined(separator: ",")
            buffers.append([
                "\(b.inode)", human(bytes: b.size), b.exporter, b.count.map(String.init) ?? "-", holders.isEmpty ? "-" : holders,
                b.mappers.isEmpty ? "-" : b.mappers.map(String.init).joined(separator: ","), b.name,
            ])
        }
        text += "\n" + buffers.render()
        text += "\n\(report.buffers.count) buffer\(report.buffers.count == 1 ? "" : "s"), \(human(bytes: report.totalBytes)) in total\n"
    }
    if !report.unreadable.isEmpty {
        text += "\(report.unreadable.count) process\(report.unreadable.count == 1 ? "" : "es") could not be read (not permitted); run as root to see every process\n"
    }
    return text
}

// MARK: - Command

public struct DumpCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Show every process's dma-bufs, from /proc, without the daemon (like Android's dmabuf_dump).",
        discussion: """
            For each process: the dma-bufs it holds by fd (from /proc/PID/fd and fdinfo: inode, size, \
            exporter, name, system-wide reference count) and those it maps (/proc/PID/maps lines for \
            /dmabuf: or anon_inode:dmabuf), with Rss/Pss from /proc/PID/smaps (n/a when not readable; heap \
            and udmabuf mappings are VM_PFNMAP, which the kernel leaves out of Rss, so MAPPED is the mapped \
            length). Then one row per buffer with the pids that hold and map it. Works unprivileged on the \
            processes it may read (your own); run as root to see all.

            JSON keys: processes[] {pid, name, fds[] {fd, inode, size, exporter, name, count}, mappings[] \
            {range, inode, size, name, rssKiB, pssKiB}, fdBytes, mappedBytes, rssKiB, pssKiB}, buffers[] \
            {inode, size, exporter, name, count, holders[] {pid, fds}, mappers}, totalBytes, unreadable[] {pid, name}.

            EXAMPLES:
              dmabufctl dump
              sudo dmabufctl dump --format json | jq '.buffers[] | select(.holders | length > 1)'
            """)

    @OptionGroup public var output: FormatOptions

    public init() {}

    public func run() throws {
        let report = DumpCollector().collect()
        try emit(output.format, report, text: format(dump:))
    }
}
