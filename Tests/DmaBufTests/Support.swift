import DmaBufTestSupport
import DmaBuf
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Expects `body` to throw a ``DmaBufError`` with `errno` whose description contains every part.
@discardableResult
func expectDmaBufError<T>(
    _ errno: Errno?, _ parts: String..., sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> T
) -> DmaBufError? {
    let error = #expect(throws: DmaBufError.self, sourceLocation: sourceLocation) { _ = try body() }
    guard let error else { return nil }
    #expect(error.errno == errno, "errno of: \(error)", sourceLocation: sourceLocation)
    for part in parts {
        #expect(error.description.contains(part), "'\(part)' missing from: \(error)", sourceLocation: sourceLocation)
    }
    return error
}

/// A scratch directory under /tmp, removed (with the files it holds, not subdirectories) by `remove()`.
struct ScratchDirectory {
    let path: String

    init() throws {
        var template = Array("/tmp/dmabufd-host-test-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw Errno(rawValue: errno) }
        path = String(cString: made)
    }

    func write(_ name: String, _ text: String) throws {
        let fd = try FileDescriptor.open(path + "/" + name, .writeOnly, options: [.create, .truncate, .closeOnExec], permissions: .ownerReadWrite)
        defer { try? fd.close() }
        try fd.writeAll(Array(text.utf8))
    }

    func remove() {
        if let dir = opendir(path) {
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
                if name != "." && name != ".." { _ = unlink(path + "/" + name) }
            }
            closedir(dir)
        }
        _ = rmdir(path)
    }
}

/// The inode behind a descriptor.
func inode(of fd: FileDescriptor) throws -> UInt64 {
    var st = stat()
    guard fstat(fd.rawValue, &st) == 0 else { throw Errno(rawValue: errno) }
    return UInt64(st.st_ino)
}

/// Opens a path as a shared descriptor.
func openShared(_ path: String, _ mode: FileDescriptor.AccessMode = .readWrite) throws -> SharedFD {
    SharedFD(adopting: try FileDescriptor.open(path, mode, options: [.closeOnExec]))
}

/// A POSIX thread running `body`, outside Swift concurrency's shared pool; `join()` waits for it.
final class PlainThread {
    private var thread = pthread_t()
    private var joined = false

    init(_ body: @escaping @Sendable () -> Void) throws {
        let context = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
        let rc = pthread_create(&thread, nil, runThreadBody, context)
        if rc != 0 {
            Unmanaged<ThreadBody>.fromOpaque(context).release()
            throw Errno(rawValue: rc)
        }
    }

    func join() {
        guard !joined else { return }
        joined = true
        pthread_join(thread, nil)
    }

    deinit { join() }
}

private final class ThreadBody {
    let run: @Sendable () -> Void
    init(_ run: @escaping @Sendable () -> Void) { self.run = run }
}

private func runThreadBody(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    Unmanaged<ThreadBody>.fromOpaque(context!).takeRetainedValue().run()
    return nil
}
