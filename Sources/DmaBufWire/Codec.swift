import DmaBufTypes

/// Reading and writing the primitive types of the wire format: little-endian integers, length-prefixed
/// UTF-8 strings and counted arrays. The reader never trusts a length or a count: each is checked against
/// the bytes that remain and against the protocol's limits before anything is allocated.

/// Why a message could not be decoded. Every case becomes an error reply and a disconnect.
public enum WireDecodingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The message ended before a field did.
    case truncated(field: String)
    /// A length or count is larger than the protocol allows.
    case limitExceeded(field: String, value: Int, limit: Int)
    /// Bytes remain after the last field.
    case trailingBytes(Int)
    /// A string is not valid UTF-8.
    case invalidUTF8(field: String)
    /// A field holds a value outside its enumeration.
    case invalidValue(field: String, value: UInt64)
    /// The header's magic is wrong: not a dmabufd message at all.
    case badMagic(UInt32)
    /// The header names a protocol version this side does not speak.
    case unsupportedVersion(UInt16)
    /// After negotiation, the header's version differs from the negotiated one.
    case versionMismatch(negotiated: UInt16, header: UInt16)
    /// The header's type is unknown.
    case unknownType(UInt16)
    /// The header's payload length disagrees with the bytes received.
    case lengthMismatch(declared: Int, actual: Int)
    /// The message carried a different number of fds than its type requires.
    case wrongDescriptorCount(type: String, expected: ClosedRange<Int>, actual: Int)
    /// The message is larger than ``WireLimits/maximumMessageSize``.
    case oversize(Int)

    public var description: String {
        switch self {
        case .truncated(let field): "message ends inside field '\(field)'"
        case .limitExceeded(let field, let value, let limit): "field '\(field)' is \(value), over the limit of \(limit)"
        case .trailingBytes(let n): "\(n) unexpected bytes after the last field"
        case .invalidUTF8(let field): "field '\(field)' is not valid UTF-8"
        case .invalidValue(let field, let value): "field '\(field)' has invalid value \(value)"
        case .badMagic(let magic): "bad magic 0x\(String(magic, radix: 16)): not a dmabufd message"
        case .unsupportedVersion(let v): "protocol version \(v) is not supported (this side speaks \(WireLimits.supportedVersions))"
        case .versionMismatch(let negotiated, let header): "header version \(header) differs from the negotiated version \(negotiated)"
        case .unknownType(let t): "unknown message type 0x\(String(t, radix: 16))"
        case .lengthMismatch(let declared, let actual): "header declares \(declared) payload bytes but \(actual) arrived"
        case .wrongDescriptorCount(let type, let expected, let actual):
            "\(type) carries \(actual) fds, expected \(expected.lowerBound == expected.upperBound ? "\(expected.lowerBound)" : "\(expected.lowerBound)...\(expected.upperBound)")"
        case .oversize(let n): "message of \(n) bytes exceeds the maximum of \(WireLimits.maximumMessageSize)"
        }
    }
}

/// Appends wire-format values to a byte array.
public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    public mutating func bool(_ v: Bool) { u8(v ? 1 : 0) }

    /// A string: u16 byte length, then UTF-8 bytes, cut to ``WireLimits/maximumStringLength`` on a
    /// character boundary so the receiver never sees an over-limit string from us.
    public mutating func string(_ s: String) {
        var utf8 = Array(s.utf8)
        if utf8.count > WireLimits.maximumStringLength {
            var cut = Substring(s)
            while cut.utf8.count > WireLimits.maximumStringLength { cut = cut.dropLast() }
            utf8 = Array(cut.utf8)
        }
        u16(UInt16(utf8.count))
        bytes += utf8
    }

    /// An array: u32 count, then each element.
    public mutating func array<T>(_ items: [T], _ write: (inout WireWriter, T) -> Void) {
        u32(UInt32(items.count))
        for item in items { write(&self, item) }
    }

    public mutating func optional<T>(_ value: T?, _ write: (inout WireWriter, T) -> Void) {
        bool(value != nil)
        if let value { write(&self, value) }
    }
}

/// Reads wire-format values from a byte buffer, checking every length against what remains.
public struct WireReader {
    private let bytes: [UInt8]
    private var offset: Int

    public init(_ bytes: [UInt8], offset: Int = 0) {
        self.bytes = bytes
        self.offset = offset
    }

    /// Bytes not yet read.
    public var remaining: Int { bytes.count - offset }

    private mutating func take(_ n: Int, _ field: String) throws(WireDecodingError) -> ArraySlice<UInt8> {
        guard n >= 0, remaining >= n else { throw .truncated(field: field) }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }

    private mutating func integer<T: FixedWidthInteger>(_ field: String, as: T.Type) throws(WireDecodingError) -> T {
        let slice = try take(MemoryLayout<T>.size, field)
        var value: T = 0
        for (i, byte) in slice.enumerated() { value |= T(byte) << (8 * i) }
        return value
    }

    public mutating func u8(_ field: String) throws(WireDecodingError) -> UInt8 { try integer(field, as: UInt8.self) }
    public mutating func u16(_ field: String) throws(WireDecodingError) -> UInt16 { try integer(field, as: UInt16.self) }
    public mutating func u32(_ field: String) throws(WireDecodingError) -> UInt32 { try integer(field, as: UInt32.self) }
    public mutating func u64(_ field: String) throws(WireDecodingError) -> UInt64 { try integer(field, as: UInt64.self) }
    public mutating func i32(_ field: String) throws(WireDecodingError) -> Int32 { Int32(bitPattern: try u32(field)) }

    public mutating func bool(_ field: String) throws(WireDecodingError) -> Bool {
        let v = try u8(field)
        guard v <= 1 else { throw .invalidValue(field: field, value: UInt64(v)) }
        return v == 1
    }

    public mutating func string(_ field: String) throws(WireDecodingError) -> String {
        let length = Int(try u16(field))
        guard length <= WireLimits.maximumStringLength else {
            throw .limitExceeded(field: field, value: length, limit: WireLimits.maximumStringLength)
        }
        let slice = try take(length, field)
        guard let s = String(validating: slice, as: UTF8.self) else { throw .invalidUTF8(field: field) }
        return s
    }

    /// An array of at most `limit` elements. The count is checked against `limit` and against the bytes
    /// left (each element takes at least `minimumElementSize`) before any element is read.
    public mutating func array<T>(
        _ field: String, limit: Int, minimumElementSize: Int, _ read: (inout WireReader) throws(WireDecodingError) -> T
    ) throws(WireDecodingError) -> [T] {
        let count = Int(try u32(field))
        guard count <= limit else { throw .limitExceeded(field: field, value: count, limit: limit) }
        guard count * max(minimumElementSize, 1) <= remaining else { throw .truncated(field: field) }
        var items: [T] = []
        items.reserveCapacity(count)
        for _ in 0..<count { items.append(try read(&self)) }
        return items
    }

    public mutating func optional<T>(_ field: String, _ read: (inout WireReader) throws(WireDecodingError) -> T) throws(WireDecodingError) -> T? {
        try bool(field) ? try read(&self) : nil
    }

    public mutating func enumeration<T: RawRepresentable>(_ field: String, as: T.Type) throws(WireDecodingError) -> T where T.RawValue == UInt8 {
        let raw = try u8(field)
        guard let value = T(rawValue: raw) else { throw .invalidValue(field: field, value: UInt64(raw)) }
        return value
    }

    /// A fence's or an access's mode: read (1) or write (2). A read-write access travels as a write.
    public mutating func fenceAccess() throws(WireDecodingError) -> AccessMode {
        let raw = try u8("access")
        guard raw == 1 || raw == 2, let mode = AccessMode(rawValue: raw) else { throw .invalidValue(field: "access", value: UInt64(raw)) }
        return mode
    }

    /// Fails when bytes remain: a message must be exactly as long as its fields.
    public func finish() throws(WireDecodingError) {
        if remaining != 0 { throw .trailingBytes(remaining) }
    }
}
