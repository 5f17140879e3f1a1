import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A cgroup v2 path as `/proc/<pid>/cgroup` prints it (`/user.slice/user-1000.slice/...`, `/` for the
/// root), validated before any part of it becomes part of a file name.
///
/// The path is the client's choice within what it may write (a delegated subtree lets it create and
/// name cgroups), so it is checked like any other client input: absolute, at most ``maximumLength``
/// bytes and ``maximumDepth`` components, no empty, `.` or `..` component (a path read through another
/// cgroup namespace starts with `/..`), and no control character (a name with a newline would end the
/// line it is read from, and end up in logs and listings).
public struct CgroupPath: Hashable, Sendable, CustomStringConvertible {
    public static let maximumLength = 1024
    public static let maximumDepth = 32
    public static let root = CgroupPath(components: [])

    /// The components below the root, in order.
    public let components: [Substring]
    public var description: String { "/" + components.joined(separator: "/") }
    public var isRoot: Bool { components.isEmpty }

    private init(components: [Substring]) { self.components = components }

    /// Why a path was refused; nil when it is acceptable.
    public static func problem(with text: String) -> String? {
        guard text.hasPrefix("/") else { return "it is not absolute" }
        guard text.utf8.count <= maximumLength else { return "it is longer than \(maximumLength) bytes" }
        guard !text.utf8.contains(where: { $0 < 0x20 || $0 == 0x7F }) else { return "it holds a control character" }
        if text == "/" { return nil }
        let parts = text.dropFirst().split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= maximumDepth else { return "it is deeper than \(maximumDepth) levels" }
        guard parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else { return "it has an empty, '.' or '..' component" }
        return nil
    }

    /// A validated path, or nil (see ``problem(with:)``).
    public init?(_ text: String) {
        guard Self.problem(with: text) == nil else { return nil }
        components = text == "/" ? [] : text.dropFirst().split(separator: "/")
    }

    /// The parent; nil for the root.
    public var parent: CgroupPath? { isRoot ? nil : CgroupPath(components: Array(components.dropLast())) }

    /// This path and every ancestor up to and including the root, nearest first.
    public var selfAndAncestors: [CgroupPath] {
        (0...components.count).reversed().map { CgroupPath(components: Array(components.prefix($0))) }
    }

    /// True when `other` is this cgroup or below it.
    public func contains(_ other: CgroupPath) -> Bool {
        other.components.count >= components.count && zip(components, other.components).allSatisfy { $0 == $1 }
    }
}

/// What `/proc/<pid>/cgroup` says about a process's place in the unified (v2) hierarchy.
public enum CgroupMembership: Sendable, Equatable {
    /// The `0::` line, validated.
    case unified(CgroupPath)
    /// No `0::` line: a cgroup v1-only system. Nothing to check against.
    case none
    /// A `0::` line whose path is refused, and why.
    case refused(path: String, reason: String)

    /// Parses the file's text.
    public init(procCgroup text: String) {
        for line in text.split(separator: "\n") where line.hasPrefix("0::") {
            let path = String(line.dropFirst(3))
            if let valid = CgroupPath(path) { self = .unified(valid) } else {
                self = .refused(path: path, reason: CgroupPath.problem(with: path) ?? "unknown")
            }
            return
        }
        self = .none
    }

    /// Reads `/proc/<pid>/cgroup` (bounded: one line per hierarchy, each at most a path).
    /// - Throws: the `Errno` of the read (ENOENT when the process is gone).
    public static func of(pid: Int32, procDirectory: String = "/proc") throws -> CgroupMembership {
        CgroupMembership(procCgroup: try SmallFiles.read("\(procDirectory)/\(pid)/cgroup", maximumBytes: 16 << 10))
    }
}

/// One cgroup's memory limit and usage (`memory.max`, `memory.current`).
public struct CgroupMemory: Sendable, Equatable {
    public var path: CgroupPath
    /// nil: no limit (`max`, or no memory controller at this level, or the root).
    public var max: UInt64?
    /// nil: unknown (no file); then the cgroup is treated as full when it has a limit.
    public var current: UInt64?
    public init(path: CgroupPath, max: UInt64?, current: UInt64?) { self.path = path; self.max = max; self.current = current }

    /// `max − current`, 0 when over; nil when unlimited.
    public var headroom: UInt64? {
        guard let max else { return nil }
        guard let current else { return 0 }
        return max > current ? max - current : 0
    }
}

/// The cgroup v2 file system at ``root`` (`/sys/fs/cgroup`; host tests point it at a tree of their own).
public struct CgroupFS: Sendable {
    public static let defaultRoot = "/sys/fs/cgroup"
    public var root: String
    public init(root: String = defaultRoot) { self.root = root }

    /// The directory of `path` (only ever built from a validated ``CgroupPath``).
    public func directory(of path: CgroupPath) -> String { path.isRoot ? root : root + path.description }

    /// A `memory.*` value: a number, `max` (nil), or nil when absent or unreadable. Values are one short line.
    public func value(_ file: String, of path: CgroupPath) -> (present: Bool, value: UInt64?) {
        guard let text = try? SmallFiles.read(directory(of: path) + "/" + file, maximumBytes: 64) else { return (false, nil) }
        let trimmed = text.split(separator: "\n").first.map(String.init) ?? ""
        return (true, UInt64(trimmed))
    }

    /// `memory.max`: nil when absent (no memory controller at this level, or the root) or `max`.
    public func limit(of path: CgroupPath) -> UInt64? { value("memory.max", of: path).value }

    /// Limit and usage of one cgroup; `memory.current` is read only where there is a limit. `limit` lets a
    /// caller supply a `memory.max` it read recently.
    public func memory(of path: CgroupPath, limit known: UInt64?? = nil) -> CgroupMemory {
        let max = known ?? limit(of: path)
        return CgroupMemory(path: path, max: max, current: max == nil ? nil : value("memory.current", of: path).value)
    }

    /// The cgroup and every ancestor, nearest first: the path whose limits an allocation must fit.
    public func chain(_ path: CgroupPath) -> [CgroupMemory] { path.selfAndAncestors.map { memory(of: $0) } }

    /// True when a cgroup2 file system is there (`cgroup.controllers` exists at the root).
    public var isMounted: Bool { (try? SmallFiles.read(root + "/cgroup.controllers", maximumBytes: 4096)) != nil }
}
