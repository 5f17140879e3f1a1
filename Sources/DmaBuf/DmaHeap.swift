import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A dma-heap: a character device under `/dev/dma_heap` that allocates dma-bufs (`DMA_HEAP_IOCTL_ALLOC`).
///
/// The heap's device fd is owned here and closed when the `DmaHeap` goes away; buffers it allocated
/// outlive it.
public struct DmaHeap: ~Copyable, Sendable {
    /// The directory the kernel creates heap devices in.
    public static let defaultDirectory = "/dev/dma_heap"

    /// The heap's name (`system`, `linux,cma`, ...).
    public let name: String
    private let device: UniqueFD

    /// Lists the heaps present, sorted by name. An absent directory means no heaps: the result is empty.
    /// - Parameter directory: where heap devices live; `/dev/dma_heap` unless testing.
    public static func available(in directory: String = defaultDirectory) -> [String] {
        ((try? SmallFiles.entries(of: directory)) ?? []).sorted()
    }

    /// Opens the heap called `name`.
    /// - Throws: ``DmaBufError`` ENOENT naming the heaps that do exist, EACCES with the permission fix.
    public init(named name: String, directory: String = defaultDirectory) throws {
        let path = directory + "/" + name
        do {
            let fd = try FileDescriptor.open(path, .readOnly, options: [.closeOnExec], retryOnInterrupt: true)
            self.device = UniqueFD(adopting: fd)
        } catch let errno as Errno {
            switch errno {
            case .noSuchFileOrDirectory:
                let present = DmaHeap.available(in: directory)
                throw DmaBufError(
                    "dma-heap", errno, "no heap named '\(name)' in \(directory)",
                    fix: present.isEmpty
                        ? "this kernel exposes no dma-heaps (CONFIG_DMABUF_HEAPS_SYSTEM/CMA)"
                        : "available heaps: \(present.joined(separator: ", "))")
            case .permissionDenied:
                throw DmaBufError(
                    "dma-heap", errno, "cannot open \(path)",
                    fix: "heaps are root-only by default: go through dmabufd, or grant access with a udev rule")
            default:
                throw DmaBufError("dma-heap", errno, "cannot open \(path)")
            }
        }
        self.name = name
    }

    /// Flags for the new buffer's fd (`dma_heap_allocation_data.fd_flags`).
    public struct FDFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// `O_RDWR`: the buffer can be mapped writable.
        public static let readWrite = FDFlags(rawValue: UInt32(O_RDWR))
        /// `O_CLOEXEC`
        public static let closeOnExec = FDFlags(rawValue: UInt32(O_CLOEXEC))
        /// The kernel's `DMA_HEAP_VALID_FD_FLAGS` (`O_CLOEXEC | O_ACCMODE`).
        public static let valid = FDFlags(rawValue: UInt32(O_CLOEXEC | O_ACCMODE))
    }

    /// Heap-specific allocation flags (`dma_heap_allocation_data.heap_flags`). The kernel defines none yet
    /// (`DMA_HEAP_VALID_HEAP_FLAGS` is 0); the type exists so a future flag is typed.
    public struct HeapFlags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
    }

    /// Allocates a dma-buf of `length` bytes (`DMA_HEAP_IOCTL_ALLOC`). The caller owns the returned buffer.
    ///
    /// The kernel rounds `length` up to whole pages. Allocations larger than free memory do not always fail
    /// with ENOMEM: the OOM killer may fire first, so callers that serve others must bound `length` themselves.
    /// - Throws: ``DmaBufError``: EINVAL for a zero length or invalid flags, ENOMEM when the heap is exhausted.
    public func allocate(
        length: Int, fdFlags: FDFlags = [.readWrite, .closeOnExec], heapFlags: HeapFlags = []
    ) throws -> DmaBuffer {
        var data = dma_heap_allocation_data(len: UInt64(max(length, 0)), fd: 0, fd_flags: fdFlags.rawValue, heap_flags: heapFlags.rawValue)
        let result = withUnsafeMutableBytes(of: &data) { Sys.ioctl(device.descriptor, CDmaBuf_DMA_HEAP_IOCTL_ALLOC, $0.baseAddress) }
        if case .failure(let errno) = result {
            throw explain(errno, length: length, fdFlags: fdFlags, heapFlags: heapFlags)
        }
        return DmaBuffer(adopting: UniqueFD(adopting: CInt(bitPattern: data.fd)))
    }

    private func explain(_ errno: Errno, length: Int, fdFlags: FDFlags, heapFlags: HeapFlags) -> DmaBufError {
        let heap = "dma-heap '\(name)'"
        switch errno {
        case .invalidArgument where length <= 0:
            return DmaBufError(heap, errno, "cannot allocate \(length) bytes", fix: "ask for at least one byte")
        case .invalidArgument where !FDFlags.valid.isSuperset(of: fdFlags):
            return DmaBufError(
                heap, errno, "fd flags 0x\(String(fdFlags.rawValue, radix: 16)) are invalid",
                fix: "use only O_CLOEXEC and O_RDWR/O_RDONLY/O_WRONLY")
        case .invalidArgument where heapFlags.rawValue != 0:
            return DmaBufError(
                heap, errno, "heap flags 0x\(String(heapFlags.rawValue, radix: 16)) are not supported",
                fix: "this kernel defines no heap flags: pass 0")
        case .noMemory:
            return DmaBufError(
                heap, errno, "out of memory allocating \(ByteCount(length))",
                fix: "free buffers, ask for less, or use another heap")
        default:
            return DmaBufError(heap, errno, "DMA_HEAP_IOCTL_ALLOC of \(ByteCount(length)) failed")
        }
    }
}

/// A byte count printed in binary units (`1 MiB`, `4 KiB`, `512 B`) for messages and listings.
public struct ByteCount: CustomStringConvertible, Sendable {
    public var bytes: Int
    public init(_ bytes: Int) { self.bytes = bytes }
    public var description: String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(bytes)
        var unit = 0
        while abs(value) >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 { return "\(bytes) B" }
        if value == value.rounded() { return "\(Int(value)) \(units[unit])" }
        return "\((value * 10).rounded() / 10) \(units[unit])"
    }

    /// Parses `4096`, `4K`, `4KiB`, `1M`, `1.5G` (binary units; case-insensitive). Nil for anything else.
    public static func parse(_ text: String) -> Int? {
        let trimmed = text.trimmingSpaces().lowercased()
        let digits = trimmed.prefix(while: { $0.isNumber || $0 == "." })
        let suffix = trimmed.dropFirst(digits.count).trimmingSpaces()
        guard let number = Double(digits), number >= 0 else { return nil }
        let multipliers: [String: Double] = [
            "": 1, "b": 1, "k": 0x1p10, "kb": 0x1p10, "kib": 0x1p10, "m": 0x1p20, "mb": 0x1p20, "mib": 0x1p20,
            "g": 0x1p30, "gb": 0x1p30, "gib": 0x1p30, "t": 0x1p40, "tb": 0x1p40, "tib": 0x1p40,
        ]
        guard let multiplier = multipliers[String(suffix)] else { return nil }
        let value = number * multiplier
        guard value < Double(Int.max), value == value.rounded() else { return nil }
        return Int(value)
    }
}

extension StringProtocol {
    /// The one trimming helper, under the name this layer's parsers (fdinfo, sysfs) already use.
    func trimmingSpaces() -> String { trimmingWhitespace() }
}
