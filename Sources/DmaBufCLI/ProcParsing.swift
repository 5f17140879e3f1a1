import DmaBuf

// Pure parsers for the procfs text `dmabufctl dump` reads. They take strings, so they are tested on
// sample text; the collector in Dump.swift feeds them the live files.

/// One line of `/proc/<pid>/maps` (also the header line of each `/proc/<pid>/smaps` block):
/// `7f2c4a000000-7f2c4a400000 rw-s 00000000 00:0f 12345    /dmabuf:1000:812:frame`.
public struct MapsLine: Sendable, Equatable {
    public var start: UInt64
    public var end: UInt64
    /// `rw-s`: read, write, execute, shared/private.
    public var permissions: String
    public var offset: UInt64
    /// `major:minor` of the backing device.
    public var device: String
    public var inode: UInt64
    /// What is mapped: a path, `[heap]`, `/dmabuf:NAME`, `anon_inode:dmabuf`, or empty for anonymous memory.
    public var path: String

    public init(start: UInt64, end: UInt64, permissions: String, offset: UInt64, device: String, inode: UInt64, path: String) {
        self.start = start; self.end = end; self.permissions = permissions; self.offset = offset
        self.device = device; self.inode = inode; self.path = path
    }

    /// Bytes mapped.
    public var size: UInt64 { end >= start ? end - start : 0 }
    /// True for a mapping of a dma-buf.
    public var isDmaBuf: Bool { isDmaBufPath(path) }
    /// The dma-buf's name from the path, when it is a dma-buf with a name.
    public var dmaBufName: String? { DmaBufCLI.dmaBufName(fromPath: path) }
    /// `7f2c4a000000-7f2c4a400000`, as the kernel prints it.
    public var range: String { String(start, radix: 16) + "-" + String(end, radix: 16) }
}

/// True for the names the kernel gives dma-buf files in `/proc/<pid>/maps` and `/proc/<pid>/fd` links:
/// `/dmabuf:` followed by the buffer's name (Linux 5.3+; the name may be empty), or `anon_inode:dmabuf`
/// (older kernels).
public func isDmaBufPath(_ path: String) -> Bool {
    path.hasPrefix("/dmabuf:") || path == "anon_inode:dmabuf"
}

/// The name in a `/dmabuf:NAME` path; nil for `anon_inode:dmabuf`, an empty name, or another path.
public func dmaBufName(fromPath path: String) -> String? {
    guard path.hasPrefix("/dmabuf:") else { return nil }
    let name = String(path.dropFirst("/dmabuf:".count))
    return name.isEmpty ? nil : name
}

/// Parses one maps line; nil when it is not one. The path keeps inner spaces (dma-buf names may have them).
public func parseMapsLine(_ line: Substring) -> MapsLine? {
    var rest = line[...]
    func token() -> Substring? {
        rest = rest.drop(while: { $0 == " " || $0 == "\t" })
        guard !rest.isEmpty else { return nil }
        let t = rest.prefix(while: { $0 != " " && $0 != "\t" })
        rest = rest.dropFirst(t.count)
        return t
    }
    guard let range = token(), let permissions = token(), let offset = token(), let device = token(), let inode = token()
    else { return nil }
    let bounds = range.split(separator: "-", omittingEmptySubsequences: false)
    guard bounds.count == 2, let start = UInt64(bounds[0], radix: 16), let end = UInt64(bounds[1], radix: 16),
          permissions.count == 4, let offsetValue = UInt64(offset, radix: 16), device.contains(":"),
          let inodeValue = UInt64(inode)
    else { return nil }
    var path = rest.drop(while: { $0 == " " || $0 == "\t" })
    while path.last == "\n" || path.last == "\r" { path = path.dropLast() }
    return MapsLine(start: start, end: end, permissions: String(permissions), offset: offsetValue, device: String(device),
                    inode: inodeValue, path: String(path))
}

public func parseMapsLine(_ line: String) -> MapsLine? { parseMapsLine(line[...]) }

/// The dma-buf mappings in a whole `/proc/<pid>/maps` file.
public func parseDmaBufMaps(_ text: String) -> [MapsLine] {
    text.split(separator: "\n").compactMap(parseMapsLine).filter(\.isDmaBuf)
}

/// One block of `/proc/<pid>/smaps`: the mapping and its `Key: N kB` fields.
public struct SmapsEntry: Sendable, Equatable {
    public var mapping: MapsLine
    /// Fields measured in kB (`Size`, `Rss`, `Pss`, `Shared_Clean`, ...), in kB.
    public var kilobytes: [String: UInt64]

    public init(mapping: MapsLine, kilobytes: [String: UInt64] = [:]) {
        self.mapping = mapping
        self.kilobytes = kilobytes
    }

    public var rssKiB: UInt64? { kilobytes["Rss"] }
    public var pssKiB: UInt64? { kilobytes["Pss"] }
}

/// Parses `/proc/<pid>/smaps`: a maps-format header line per mapping followed by its fields. Fields not in
/// kB (`VmFlags`, `THPeligible`) are skipped.
public func parseSmaps(_ text: String) -> [SmapsEntry] {
    var entries: [SmapsEntry] = []
    for line in text.split(separator: "\n") {
        if let field = parseSmapsField(line) {
            if !entries.isEmpty { entries[entries.count - 1].kilobytes[field.key] = field.kilobytes }
        } else if let mapping = parseMapsLine(line) {
            entries.append(SmapsEntry(mapping: mapping))
        }
    }
    return entries
}

/// `Rss:                 128 kB` → ("Rss", 128). Nil for header lines and fields not in kB.
func parseSmapsField(_ line: Substring) -> (key: String, kilobytes: UInt64)? {
    guard let colon = line.firstIndex(of: ":") else { return nil }
    let key = line[..<colon]
    guard !key.isEmpty, key.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" }) else { return nil }
    let value = line[line.index(after: colon)...].split(separator: " ", omittingEmptySubsequences: true)
    guard value.count == 2, value[1] == "kB", let number = UInt64(value[0]) else { return nil }
    return (String(key), number)
}
