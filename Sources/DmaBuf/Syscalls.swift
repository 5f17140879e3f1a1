// Every raw system call the DmaBuf layer makes goes through this file, so that errno is read right after
// the call, EINTR is retried in one place (never for close), and results are `Result<_, Errno>`.
import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

@usableFromInline
internal enum Sys {
    /// Runs `body` until it stops failing with EINTR; a -1 return becomes `.failure(errno)`.
    @inline(__always)
    static func retrying<T: FixedWidthInteger>(_ body: () -> T) -> Result<T, Errno> {
        while true {
            let result = body()
            if result == -1 {
                let error = Errno(rawValue: errno)
                if error == .interrupted { continue }
                return .failure(error)
            }
            return .success(result)
        }
    }

    static func ioctl(_ fd: FileDescriptor, _ request: UInt, _ arg: UnsafeMutableRawPointer?) -> Result<CInt, Errno> {
        retrying { CDmaBuf_ioctl(fd.rawValue, request, arg) }
    }

    static func fcntl(_ fd: FileDescriptor, _ command: CInt, _ arg: CInt = 0) -> Result<CInt, Errno> {
        retrying { CDmaBuf_fcntl(fd.rawValue, command, arg) }
    }

    static func memfdCreate(_ name: String, _ flags: CUnsignedInt) -> Result<CInt, Errno> {
        retrying { CDmaBuf_memfd_create(name, flags) }
    }

    static func ftruncate(_ fd: FileDescriptor, _ length: Int64) -> Result<CInt, Errno> {
        retrying { Glibc.ftruncate(fd.rawValue, off_t(length)) }
    }

    static func fstat(_ fd: FileDescriptor) -> Result<stat, Errno> {
        var st = stat()
        return retrying { Glibc.fstat(fd.rawValue, &st) }.map { _ in st }
    }

    static func lseek(_ fd: FileDescriptor, _ offset: Int64, _ whence: CInt) -> Result<Int64, Errno> {
        retrying { Int64(Glibc.lseek(fd.rawValue, off_t(offset), whence)) }
    }

    static func mmap(_ fd: FileDescriptor, length: Int, protection: CInt, flags: CInt, offset: Int64)
        -> Result<UnsafeMutableRawPointer, Errno>
    {
        let p = Glibc.mmap(nil, length, protection, flags, fd.rawValue, off_t(offset))
        if p == MAP_FAILED || p == nil { return .failure(Errno(rawValue: errno)) }
        return .success(p!)
    }

    static func munmap(_ base: UnsafeMutableRawPointer, _ length: Int) {
        _ = Glibc.munmap(base, length)
    }

    static func pread(_ fd: FileDescriptor, _ buffer: UnsafeMutableRawBufferPointer, _ offset: Int64) -> Result<Int, Errno> {
        retrying { Glibc.pread(fd.rawValue, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    static func poll(_ fds: inout [pollfd], timeoutMilliseconds: CInt) -> Result<CInt, Errno> {
        // EINTR is retried with the full timeout again: callers bound waits by deadline themselves.
        retrying { fds.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, nfds_t($0.count), timeoutMilliseconds) } }
    }

    static func socket(_ domain: CInt, _ type: CInt) -> Result<CInt, Errno> {
        retrying { Glibc.socket(domain, type | CInt(SOCK_CLOEXEC.rawValue), 0) }
    }

    static func socketpair(_ type: CInt) -> Result<(CInt, CInt), Errno> {
        var fds: [CInt] = [-1, -1]
        return retrying { Glibc.socketpair(AF_UNIX, type | CInt(SOCK_CLOEXEC.rawValue), 0, &fds) }.map { _ in (fds[0], fds[1]) }
    }

    static func withUnixAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> Result<R, Errno> {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { return .failure(.fileNameTooLong) }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        return .success(withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) }
        })
    }

    static func bind(_ fd: FileDescriptor, path: String) -> Result<CInt, Errno> {
        withUnixAddress(path) { address, length in
            retrying { Glibc.bind(fd.rawValue, address, length) }
        }.flatMap { $0 }
    }

    static func connect(_ fd: FileDescriptor, path: String) -> Result<CInt, Errno> {
        withUnixAddress(path) { address, length in
            retrying { Glibc.connect(fd.rawValue, address, length) }
        }.flatMap { $0 }
    }

    static func listen(_ fd: FileDescriptor, backlog: CInt) -> Result<CInt, Errno> {
        retrying { Glibc.listen(fd.rawValue, backlog) }
    }

    static func accept(_ fd: FileDescriptor) -> Result<CInt, Errno> {
        retrying { CDmaBuf_accept_cloexec(fd.rawValue) }
    }

    static func sendWithFDs(_ fd: FileDescriptor, _ bytes: UnsafeRawBufferPointer, _ fds: [CInt], flags: CInt) -> Result<Int, Errno> {
        retrying { CDmaBuf_send_with_fds(fd.rawValue, bytes.baseAddress, bytes.count, fds, fds.count, flags) }
    }

    static func receiveWithFDs(
        _ fd: FileDescriptor, _ buffer: UnsafeMutableRawBufferPointer, _ fds: inout [CInt],
        count: inout Int, surplus: inout Int, messageFlags: inout CInt, flags: CInt
    ) -> Result<Int, Errno> {
        // The shim overwrites the count it is given, so a retry after EINTR must start from the capacity
        // again (from the count it returned, 0, every fd would be closed as surplus).
        let capacity = count
        return retrying {
            var n = capacity
            var extra = 0
            let r = fds.withUnsafeMutableBufferPointer {
                CDmaBuf_recv_with_fds(fd.rawValue, buffer.baseAddress, buffer.count, $0.baseAddress, &n, &extra, &messageFlags, flags)
            }
            count = n
            surplus = extra
            return r
        }
    }

    static func peerCredentials(_ fd: FileDescriptor) -> Result<(pid_t, uid_t, gid_t), Errno> {
        var pid: pid_t = 0, uid: uid_t = 0, gid: gid_t = 0
        return retrying { CDmaBuf_peer_credentials(fd.rawValue, &pid, &uid, &gid) }.map { _ in (pid, uid, gid) }
    }

    static func dup(_ fd: FileDescriptor) -> Result<CInt, Errno> {
        retrying { CDmaBuf_fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 0) }
    }

    /// close(2) is never retried: on Linux the fd is gone even when close reports EINTR.
    static func close(_ fd: CInt) {
        _ = Glibc.close(fd)
    }
}
