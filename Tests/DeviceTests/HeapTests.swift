// dma-heap tests, after tools/testing/selftests/dmabuf-heaps/dmabuf-heap.c: allocation sizes, mapping under
// DMA_BUF_IOCTL_SYNC, zeroed re-allocation, and every EINVAL/ENOENT the allocation path can give.
import CDmaBuf
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum HeapTests {
    static let system: [Requirement] = [.heap("system")]

    static let all: [DeviceTest] = [
        DeviceTest("heap.alloc-4k", requires: system) {
            let heap = try DmaHeap(named: "system")
            let buffer = try heap.allocate(length: 4096)
            try expectEqual(try buffer.size(), 4096, "size")
            let info = try buffer.info()
            try expectEqual(info.exporter, "system", "exporter")
            try expectEqual(info.size, 4096, "fdinfo size")
        },
        DeviceTest("heap.alloc-1m", requires: system) {
            let heap = try DmaHeap(named: "system")
            let buffer = try heap.allocate(length: 1 << 20)
            try expectEqual(try buffer.size(), 1 << 20, "size")
            try expectEqual(try buffer.info().size, 1 << 20, "fdinfo size")
            try expectEqual(heap.name, "system", "heap name")
        },
        DeviceTest("heap.write-read-under-sync", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 1 << 20)
            try buffer.withMappedCPUAccess(.write) { bytes in
                Pages.stamp(bytes) { 0x4845_4150_0000_0000 | UInt64($0) }
            }
            // A fresh mapping, read-only, under a READ bracket sees every page's stamp.
            try buffer.withMappedCPUAccess(.read) { bytes in
                try expectEqual(Pages.count(bytes), 256, "pages")
                for page in 0..<Pages.count(bytes) {
                    try expectEqual(Pages.tag(bytes, page: page), 0x4845_4150_0000_0000 | UInt64(page), "page \(page)")
                }
            }
            // READ|WRITE bracket, overwrite everything, read back through another mapping.
            try buffer.withMappedCPUAccess(.readWrite) { Pages.fill($0, 0x5a) }
            try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 0x5a), "0x5a everywhere") }
        },
        DeviceTest("heap.zeroed-after-reuse", requires: system) {
            // dmabuf-heap.c test_alloc_zeroed: dirty 32 buffers, free them, the next 32 must read as zero.
            let heap = try DmaHeap(named: "system")
            do {
                var dirty: [DmaBuffer] = []
                for _ in 0..<32 {
                    let buffer = try heap.allocate(length: 1 << 20)
                    try buffer.withMappedCPUAccess(.write) { Pages.fill($0, 0xff) }
                    dirty.append(buffer)
                }
                try buffer0xff(dirty[31])
            }
            for i in 0..<32 {
                let buffer = try heap.allocate(length: 1 << 20)
                try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 0), "buffer \(i) is not zeroed") }
            }
        },
        DeviceTest("heap.len-0-einval", requires: system) {
            let heap = try DmaHeap(named: "system")
            try expectError(.invalidArgument, "dma-heap 'system'", "cannot allocate 0 bytes", "at least one byte") {
                try heap.allocate(length: 0)
            }
        },
        DeviceTest("heap.heap-flags-einval", requires: system) {
            let heap = try DmaHeap(named: "system")
            try expectError(.invalidArgument, "heap flags 0x1 are not supported", "pass 0") {
                try heap.allocate(length: 4096, heapFlags: .init(rawValue: 1))
            }
            try expectError(.invalidArgument, "heap flags 0x8000000000000000 are not supported") {
                try heap.allocate(length: 4096, heapFlags: .init(rawValue: 1 << 63))
            }
        },
        DeviceTest("heap.fd-flags-einval", requires: system) {
            let heap = try DmaHeap(named: "system")
            let nonblock = DmaHeap.FDFlags(rawValue: UInt32(O_NONBLOCK))
            try expectError(.invalidArgument, "fd flags 0x802 are invalid", "O_CLOEXEC") {
                try heap.allocate(length: 4096, fdFlags: [.readWrite, nonblock])
            }
            try expectError(.invalidArgument, "fd flags 0x80400 are invalid") {
                try heap.allocate(length: 4096, fdFlags: [.closeOnExec, .init(rawValue: UInt32(O_APPEND))])
            }
            // O_CLOEXEC and the access modes are all there is.
            _ = try heap.allocate(length: 4096, fdFlags: .valid.subtracting(.init(rawValue: UInt32(O_ACCMODE))).union(.readWrite))
        },
        DeviceTest("heap.unknown-name-enoent", requires: system) {
            try expectError(.noSuchFileOrDirectory, "no heap named 'no-such-heap'", "available heaps:", "system") {
                _ = try DmaHeap(named: "no-such-heap")
            }
        },
        DeviceTest("heap.available-lists-system", requires: system) {
            let heaps = DmaHeap.available()
            try expect(heaps.contains("system"), "available() = \(heaps) lacks system")
            try expectEqual(heaps, heaps.sorted(), "sorted")
            try expect(!heaps.contains(".") && !heaps.contains(".."), "dot entries listed: \(heaps)")
        },
        DeviceTest("heap.size-rounds-up", requires: system) {
            let heap = try DmaHeap(named: "system")
            try expectEqual(try heap.allocate(length: 1).size(), pageSize, "1 byte")
            try expectEqual(try heap.allocate(length: pageSize + 1).size(), 2 * pageSize, "page + 1")
            try expectEqual(try heap.allocate(length: 3 * pageSize - 1).size(), 3 * pageSize, "3 pages - 1")
            try expectEqual(try heap.allocate(length: 5 * pageSize).size(), 5 * pageSize, "5 pages")
        },
        DeviceTest("heap.distinct-inodes", requires: system) {
            let heap = try DmaHeap(named: "system")
            let a = try heap.allocate(length: 4096)
            let b = try heap.allocate(length: 4096)
            let inodeA = try a.inode(), inodeB = try b.inode()
            try expect(inodeA != inodeB, "two buffers share inode \(inodeA)")
            try expectEqual(try a.info().inode, try a.inode(), "fdinfo ino")
            // A duplicate descriptor is the same buffer.
            let dup = DmaBuffer(adopting: try a.fd.duplicate())
            try expectEqual(try dup.inode(), try a.inode(), "dup inode")
        },
        DeviceTest("heap.cloexec-honoured", requires: system) {
            let heap = try DmaHeap(named: "system")
            let closing = try heap.allocate(length: 4096)
            try expect(try Descriptor.fdFlags(closing.fd.descriptor) & FD_CLOEXEC != 0, "default allocation lacks FD_CLOEXEC")
            try expectEqual(try closing.info().flags & Int(O_ACCMODE), Int(O_RDWR), "access mode")
            try expect(try closing.info().flags & Int(O_CLOEXEC) != 0, "fdinfo flags lack O_CLOEXEC")
            let inheriting = try heap.allocate(length: 4096, fdFlags: [.readWrite])
            try expectEqual(try Descriptor.fdFlags(inheriting.fd.descriptor) & FD_CLOEXEC, 0, "FD_CLOEXEC without O_CLOEXEC")
        },
        DeviceTest("heap.readonly-fd", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 8192, fdFlags: [.closeOnExec])
            try expectEqual(try buffer.info().flags & Int(O_ACCMODE), Int(O_RDONLY), "access mode")
            try expectError(.permissionDenied, "dma-buf", "mmap of 8192 bytes failed") { _ = try buffer.map(writable: true) }
            try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 0), "read-only mapping reads zero") }
        },
        DeviceTest("heap.buffer-outlives-heap", requires: system) {
            let buffer: DmaBuffer
            do {
                let heap = try DmaHeap(named: "system")
                buffer = try heap.allocate(length: 16384)
            }
            try buffer.withMappedCPUAccess(.readWrite) { Pages.fill($0, 0x11) }
            try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 0x11), "contents after the heap fd closed") }
        },
    ]

    private static func buffer0xff(_ buffer: DmaBuffer) throws {
        try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 0xff), "dirty buffer reads 0xff") }
    }
}

// MARK: - Helpers shared by the device tests

/// Page-granular helpers over mapped bytes. Fills and compares go through libc so that they stay fast under
/// TCG in a debug build.
enum Pages {
    static func count(_ bytes: UnsafeMutableRawBufferPointer) -> Int { bytes.count / pageSize }

    /// Sets every byte to `byte`.
    static func fill(_ bytes: UnsafeMutableRawBufferPointer, _ byte: UInt8) {
        _ = memset(bytes.baseAddress!, Int32(byte), bytes.count)
    }

    /// True when every byte is `byte`.
    static func all(_ bytes: UnsafeMutableRawBufferPointer, equal byte: UInt8) -> Bool {
        let reference = [UInt8](repeating: byte, count: pageSize)
        var offset = 0
        while offset < bytes.count {
            let n = min(pageSize, bytes.count - offset)
            if memcmp(bytes.baseAddress! + offset, reference, n) != 0 { return false }
            offset += n
        }
        return true
    }

    /// Writes `tag(page)` into the first and the last 8 bytes of every page.
    static func stamp(_ bytes: UnsafeMutableRawBufferPointer, _ tag: (Int) -> UInt64) {
        for page in 0..<count(bytes) { stamp(bytes, page: page, tag(page)) }
    }

    static func stamp(_ bytes: UnsafeMutableRawBufferPointer, page: Int, _ value: UInt64) {
        bytes.storeBytes(of: value, toByteOffset: page * pageSize, as: UInt64.self)
        bytes.storeBytes(of: ~value, toByteOffset: (page + 1) * pageSize - 8, as: UInt64.self)
    }

    /// The tag of `page`, or 0xdead… when its first and last words disagree (a torn or foreign page).
    static func tag(_ bytes: UnsafeMutableRawBufferPointer, page: Int) -> UInt64 {
        let first = bytes.load(fromByteOffset: page * pageSize, as: UInt64.self)
        let last = bytes.load(fromByteOffset: (page + 1) * pageSize - 8, as: UInt64.self)
        return first == ~last ? first : 0xdead_dead_dead_dead
    }
}

/// Descriptor helpers the typed layer does not offer.
enum Descriptor {
    /// fcntl(F_GETFD).
    static func fdFlags(_ fd: FileDescriptor) throws -> CInt {
        let flags = CDmaBuf_fcntl(fd.rawValue, F_GETFD, 0)
        if flags < 0 { throw TestFailure(description: "F_GETFD on \(fd.rawValue): \(Errno(rawValue: errno).name)") }
        return flags
    }

    /// A pipe, both ends close-on-exec.
    static func pipe() throws -> (read: SharedFD, write: SharedFD) {
        var fds: [CInt] = [-1, -1]
        if Glibc.pipe(&fds) != 0 { throw TestFailure(description: "pipe: \(Errno(rawValue: errno).name)") }
        for fd in fds { _ = CDmaBuf_fcntl(fd, F_SETFD, FD_CLOEXEC) }
        return (SharedFD(adopting: fds[0]), SharedFD(adopting: fds[1]))
    }

    /// Opens `path` (created if needed) read-write.
    static func open(_ path: String, create: Bool = false) throws -> SharedFD {
        let fd = try FileDescriptor.open(
            path, .readWrite, options: create ? [.closeOnExec, .create] : [.closeOnExec], permissions: create ? .ownerReadWrite : nil)
        return SharedFD(adopting: fd)
    }

    /// A fresh directory under /tmp, removed with its files by `remove`.
    static func temporaryDirectory() throws -> String {
        var template = Array("/tmp/dmabufd-test-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw TestFailure(description: "mkdtemp: \(Errno(rawValue: errno).name)") }
        return String(cString: made)
    }

    static func remove(directory: String, files: [String]) {
        for file in files { _ = unlink(directory + "/" + file) }
        _ = rmdir(directory)
    }
}
