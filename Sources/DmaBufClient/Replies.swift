import DmaBuf
import DmaBufWire

#if canImport(Glibc)
import Glibc
#endif

/// What the blocking ``DmaBufConnection`` and the async ``DmaBufClient`` share: checking what a version
/// can say before sending, and turning replies into results. One copy, so the two clients cannot drift.
enum Replies {
    typealias Result = (response: Response, fds: [SharedFD])

    static func buffer(_ result: Result) throws -> RemoteBuffer {
        guard case .buffer(let info) = result.response, let fd = result.fds.first else {
            throw DmaBufClientError(local: "expected a buffer reply with its fd")
        }
        return RemoteBuffer(info: info, buffer: DmaBuffer(shared: fd))
    }

    static func buffers(_ result: Result, count: Int, fdFlags: UInt32) throws -> [RemoteBuffer] {
        guard case .buffers(let infos) = result.response, infos.count == result.fds.count, infos.count == count else {
            throw DmaBufClientError(local: "expected \(count) buffers with their fds")
        }
        for fd in result.fds { try keepOpenOnExec(fd, unless: fdFlags) }
        return zip(infos, result.fds).map { RemoteBuffer(info: $0, buffer: DmaBuffer(shared: $1)) }
    }

    static func expectOK(_ result: Result) throws {
        guard case .ok = result.response else { throw DmaBufClientError(local: "expected an ok reply") }
    }

    static func access(_ result: Result) throws -> (fences: Int, syncFile: SyncFile?) {
        guard case .access(let reply) = result.response else { throw DmaBufClientError(local: "expected an access reply") }
        return (Int(reply.fences), result.fds.first.map { SyncFile(shared: $0) })
    }

    static func revokeRequest(_ buffer: BufferID, deadline: Duration?) -> Request {
        .revoke(RevokeRequest(buffer: buffer, deadlineMilliseconds: deadline.map { UInt32(clamping: $0.wholeMilliseconds) } ?? 0))
    }

    /// The request for `allocate_batch`, or why it cannot be sent.
    static func batch(_ version: UInt16, count: Int, size: Int, heap: String, tag: String, fdFlags: UInt32,
                      heapFlags: UInt64) throws -> AllocateBatchRequest {
        try requireV2(version, unless: false, "allocate_batch")
        guard (1...WireLimits.maximumBatchCount).contains(count) else {
            throw DmaBufClientError(.unsupported, "a batch holds 1...\(WireLimits.maximumBatchCount) buffers, not \(count)")
        }
        return AllocateBatchRequest(count: UInt16(count), size: UInt64(clamping: size), heap: heap, tag: tag,
                                    fdFlags: fdFlags, heapFlags: heapFlags)
    }

    /// `create_udmabuf_from_memfd`: 1...16 memfds, every range naming one; flags and several memfds need v2.
    static func checkMemfds(_ count: Int, ranges: [ByteRange], version: UInt16, flags: UInt32) throws {
        try requireV2(version, unless: flags == 0, "udmabuf flags")
        try requireV2(version, unless: count == 1 && ranges.allSatisfy { $0.memfd == 0 }, "a udmabuf over several memfds")
        guard (1...WireLimits.maximumDescriptors).contains(count), ranges.allSatisfy({ Int($0.memfd) < count }) else {
            throw DmaBufClientError(.unsupported, "a udmabuf takes 1...\(WireLimits.maximumDescriptors) memfds, and each range's memfd must index one of the \(count) given")
        }
    }

    /// Throws ``DmaBufClientError/Kind/unsupported`` when `what` needs v2 and `version` is older, unless `fine`.
    static func requireV2(_ version: UInt16, unless fine: Bool, _ what: String) throws {
        guard !fine, version < 2 else { return }
        throw DmaBufClientError(.unsupported, "\(what) needs protocol v2; the daemon speaks v\(version): update dmabufd")
    }

    /// The receiver always gets fds with `FD_CLOEXEC` (`MSG_CMSG_CLOEXEC`); clear it when the caller's
    /// `fd_flags` did not ask for `O_CLOEXEC`.
    static func keepOpenOnExec(_ fd: SharedFD, unless flags: UInt32) throws {
        guard flags & FDFlags.closeOnExec == 0 else { return }
        if fcntl(fd.descriptor.rawValue, F_SETFD, 0) < 0 {
            throw DmaBufClientError(.unsupported, "cannot clear FD_CLOEXEC on the new buffer (\(ErrnoNames.name(errno)))")
        }
    }
}
