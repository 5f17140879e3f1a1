import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

extension Sys {
    static func peerPidfd(_ socket: FileDescriptor) -> Result<CInt, Errno> { retrying { CDmaBuf_peer_pidfd(socket.rawValue) } }
    static func pidfdOpen(_ pid: pid_t) -> Result<CInt, Errno> { retrying { CDmaBuf_pidfd_open(pid) } }
    static func pidfdSendSignal(_ pidfd: FileDescriptor, _ signal: CInt) -> Result<CInt, Errno> {
        retrying { CDmaBuf_pidfd_send_signal(pidfd.rawValue, signal) }
    }
}

/// A pidfd: a reference to one process that, unlike its pid, can never come to mean another process.
///
/// dmabufd learns a client's cgroup from `/proc/<pid>/cgroup`. A pid is reused once its process is reaped,
/// so the read alone could describe some other process. With a pidfd taken first, a read followed by
/// ``isAlive(pid:)`` proves the pid still named the same process while it was read.
public struct PidFD: Sendable {
    /// How the pidfd was obtained.
    public enum Source: String, Sendable {
        /// `SO_PEERPIDFD` (Linux 6.5): the kernel's record of the process that connected. No race.
        case peerSocket = "SO_PEERPIDFD"
        /// `pidfd_open(SO_PEERCRED pid)`: before 6.5. If the client exited and its pid was reused between
        /// `connect` and this call, the pidfd names the newcomer; the window is the time to accept.
        case pidfdOpen = "pidfd_open"
    }

    public let fd: SharedFD
    public let pid: Int32
    public let source: Source

    /// The pidfd of the process at the other end of `socket`: `SO_PEERPIDFD`, else `pidfd_open(pid)`.
    /// - Throws: ``DmaBufError`` (ESRCH when the peer is gone, ENOSYS without pidfds).
    public static func ofPeer(_ socket: FileDescriptor, pid: Int32) throws -> PidFD {
        switch Sys.peerPidfd(socket) {
        case .success(let fd): return PidFD(fd: SharedFD(adopting: fd), pid: pid, source: .peerSocket)
        case .failure(let errno) where errno == .protocolNotAvailable || errno == .invalidArgument:
            let fd = try Sys.pidfdOpen(pid).get(or: "pidfd", "pidfd_open(\(pid)) failed")
            return PidFD(fd: SharedFD(adopting: fd), pid: pid, source: .pidfdOpen)
        case .failure(let errno):
            throw DmaBufError("pidfd", errno, "SO_PEERPIDFD failed")
        }
    }

    /// Opens a pidfd for `pid` (tests, and kernels before 6.5).
    public static func open(pid: Int32) throws -> PidFD {
        let fd = try Sys.pidfdOpen(pid).get(or: "pidfd", "pidfd_open(\(pid)) failed")
        return PidFD(fd: SharedFD(adopting: fd), pid: pid, source: .pidfdOpen)
    }

    /// True while the process has not been reaped, so `pid` still names it. Read from the pidfd's fdinfo
    /// (`Pid:` is the pid in our namespace, -1 once reaped); where a kernel prints no `Pid:` line, from
    /// `pidfd_send_signal(0)` (EPERM also means it exists).
    public func isAlive() -> Bool {
        if let text = try? SmallFiles.read("/proc/self/fdinfo/\(fd.descriptor.rawValue)", maximumBytes: 4096) {
            for line in text.split(separator: "\n") where line.hasPrefix("Pid:") {
                return Int32(line.dropFirst(4).trimmingCharacters(in: " \t")) == pid
            }
        }
        switch Sys.pidfdSendSignal(fd.descriptor, 0) {
        case .success: return true
        case .failure(let errno): return errno == .notPermitted
        }
    }
}

extension Substring {
    func trimmingCharacters(in set: String) -> Substring {
        var s = self
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return s
    }
}
