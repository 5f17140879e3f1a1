import DmaBuf
import DmaBufWire
import SystemPackage

/// Refusals are ``WireError``s built by one initialiser, which renders the errno's name, so no message
/// spells an errno by hand: `<cause> (<ERRNO>); <fix>`.
typealias Refusal = WireError

extension WireError {
    init(_ errno: Errno, _ code: Code, _ cause: String, fix: String? = nil) {
        self = .refusal(errno.rawValue, code: code, cause: cause, fix: fix)
    }
}

/// Checks on what clients send, done once at the boundary so later arithmetic cannot overflow.
enum Validate {
    /// Tags: at most ``maximumTagLength`` bytes of `[A-Za-z0-9._+-]`. Tags end up in dma-buf names, logs,
    /// listings and fd-store metadata; a safe set keeps control characters, separators and terminal
    /// escapes out of all of them.
    static let maximumTagLength = 32
    static let tagCharacters = "[A-Za-z0-9._+-]"

    static func tag(_ tag: String) throws {
        let ok = tag.utf8.count <= maximumTagLength && tag.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "+") || byte == UInt8(ascii: "-")
        }
        guard ok else {
            throw Refusal(.invalidArgument, .invalidArgument,
                          "tag must be at most \(maximumTagLength) bytes of \(tagCharacters)",
                          fix: "use letters, digits, '.', '_', '+' and '-' only")
        }
    }

    /// A single buffer size: positive and ≤ max_buffer_size.
    static func size(_ size: UInt64, config: DaemonConfig) throws {
        guard size > 0 else { throw Refusal(.invalidArgument, .invalidArgument, "size 0", fix: "ask for at least one byte") }
        guard size <= config.maxBufferSize else {
            throw Refusal(.fileTooLarge, .limit,
                          "\(ByteCount(Int(clamping: size))) exceeds max_buffer_size \(ByteCount(Int(clamping: config.maxBufferSize)))",
                          fix: "ask for less or raise max_buffer_size in dmabufd.conf")
        }
    }

    /// memfd ranges: page-aligned, non-empty, `offset + size` without overflow, the total without
    /// overflow and within max_buffer_size and the udmabuf module's limits.
    static func memfdRanges(_ ranges: [ByteRange], config: DaemonConfig, limits: UDmabuf.Limits) throws -> UInt64 {
        let page = UInt64(pageSize)
        guard !ranges.isEmpty else { throw Refusal(.invalidArgument, .invalidArgument, "no ranges", fix: "send at least one {offset, size}") }
        guard ranges.count <= limits.listLimit else {
            throw Refusal(.invalidArgument, .invalidArgument, "\(ranges.count) ranges exceed udmabuf list_limit \(limits.listLimit)", fix: "merge ranges or send fewer")
        }
        var total: UInt64 = 0
        for (i, range) in ranges.enumerated() {
            guard range.size > 0, range.offset % page == 0, range.size % page == 0 else {
                throw Refusal(.invalidArgument, .invalidArgument, "range \(i) {\(range.offset), \(range.size)} is empty or not page-aligned",
                              fix: "use multiples of \(page) bytes")
            }
            let (_, endOverflow) = range.offset.addingReportingOverflow(range.size)
            let (sum, totalOverflow) = total.addingReportingOverflow(range.size)
            guard !endOverflow, !totalOverflow, range.offset <= UInt64(Int64.max) else {
                throw Refusal(.overflow, .invalidArgument, "range \(i) {\(range.offset), \(range.size)} overflows 64 bits", fix: "send real offsets")
            }
            total = sum
        }
        try size(total, config: config)
        guard total <= UInt64(limits.sizeLimitBytes) else {
            throw Refusal(.fileTooLarge, .limit, "\(ByteCount(Int(clamping: total))) exceeds udmabuf size_limit_mb \(limits.sizeLimitMB)", fix: "ask for less")
        }
        return total
    }

    /// v2 `fd_flags` (the kernel's DMA_HEAP_VALID_FD_FLAGS) and `heap_flags` (none are valid).
    static func allocationFlags(fdFlags: UInt32, heapFlags: UInt64) throws {
        guard fdFlags & ~FDFlags.valid == 0 else {
            throw Refusal(.invalidArgument, .invalidArgument, "fd_flags 0x\(String(fdFlags, radix: 16)) has bits outside O_ACCMODE | O_CLOEXEC",
                          fix: "use O_RDONLY, O_WRONLY or O_RDWR, optionally with O_CLOEXEC")
        }
        guard heapFlags == 0 else {
            throw Refusal(.invalidArgument, .invalidArgument, "heap_flags 0x\(String(heapFlags, radix: 16)) are not supported", fix: "the kernel defines no heap flags: pass 0")
        }
    }

    /// An owner's cgroup path as v2 `buffer_info` carries it: at most 255 bytes, shortened from the left.
    static func cgroupField(_ path: String) -> String {
        let bytes = Array(path.utf8)
        guard bytes.count > 255 else { return path }
        var tail = bytes.suffix(252)
        while let first = tail.first, first & 0xC0 == 0x80 { tail = tail.dropFirst() }  // not inside a character
        return "..." + String(decoding: tail, as: UTF8.self)
    }

    /// Pages `[first, first + count)` of a buffer of `pages` pages (`count` 0: to the end), without overflow.
    static func pages(_ first: UInt64, _ count: UInt64, of pages: UInt64, buffer: BufferID) throws -> Range<UInt64> {
        let (end, overflow) = count == 0 ? (pages, false) : first.addingReportingOverflow(count)
        guard !overflow, first < pages, end <= pages, end > first else {
            throw Refusal(.invalidArgument, .invalidArgument,
                          "pages [\(first), +\(count)) are outside buffer \(buffer)'s \(pages) pages")
        }
        return first..<end
    }
}
