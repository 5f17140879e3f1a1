import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Reading the small pseudo-files and device directories the kernel exposes (procfs, sysfs, `/dev`).
public enum SmallFiles {
    /// The most a read keeps by default: procfs and sysfs files dmabufd reads are a few hundred bytes.
    /// A bound all the same, because some of them hold text other processes chose (a dma-buf's name).
    public static let defaultMaximumBytes = 1 << 20

    /// Reads a whole file, at most `maximumBytes` of it. Pseudo-files report size 0, so it reads until end
    /// of file.
    /// - Throws: the `Errno` of `open` or `read` (ENOENT, EACCES, ...); EFBIG past `maximumBytes`.
    public static func read(_ path: String, maximumBytes: Int = defaultMaximumBytes) throws -> String {
        let fd = try FileDescriptor.open(path, .readOnly, options: [.closeOnExec], retryOnInterrupt: true)
        defer { try? fd.close() }
        // Read straight into uninitialised capacity: these files are small and read often (the daemon reads
        // fdinfo for every reply), and zero-filling a 64 KiB chunk each time dominated the cost.
        var bytes: [UInt8] = []
        while true {
            bytes.reserveCapacity(bytes.count + 4096)
            let start = bytes.count
            var failure: Errno?
            bytes.append(contentsOf: [UInt8](unsafeUninitializedCapacity: 4096) { chunk, initialized in
                do {
                    initialized = try fd.read(into: UnsafeMutableRawBufferPointer(chunk), retryOnInterrupt: true)
                } catch {
                    failure = error as? Errno ?? .ioError
                    initialized = 0
                }
            })
            if let failure { throw failure }
            if bytes.count == start { break }
            if bytes.count > maximumBytes { throw Errno.fileTooLarge }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The names in a directory, without `.` and `..`, in directory order.
    /// - Throws: the `Errno` of `opendir` (ENOENT when the directory does not exist).
    public static func entries(of directory: String) throws -> [String] {
        guard let dir = opendir(directory) else { throw Errno(rawValue: errno) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}

extension Duration {
    /// The duration in whole milliseconds, rounded toward zero: what `poll(2)` timeouts and the wire
    /// protocol's `*_ms` fields take.
    /// Saturates at `Int64.min`/`Int64.max` instead of trapping: durations can come from clients.
    public var wholeMilliseconds: Int64 {
        let (ms, overflow) = components.seconds.multipliedReportingOverflow(by: 1000)
        if overflow { return components.seconds < 0 ? .min : .max }
        let (sum, overflow2) = ms.addingReportingOverflow(components.attoseconds / 1_000_000_000_000_000)
        if overflow2 { return ms < 0 ? .min : .max }
        return sum
    }
}
