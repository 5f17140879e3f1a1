import DmaBuf
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The fake kernel's batch reference count (one pass over the fds, for `list`) must agree with its
/// count of one buffer, with the buffers' fds among sockets, eventfds and other memfds, and with copies
/// made by dup and by SCM_RIGHTS.
@Suite("Fake kernel")
struct FakeKernelTests {
    @Test func batchReferenceCountsAgreeWithOneAtATime() throws {
        let kernel = FakeKernel()
        let buffers = try (0..<3).map { _ in try FakeKernel.makeBuffer(size: 4096) }
        let (a, b) = try UnixSocket.pair()
        _ = try UnixSocket.send(a.descriptor, bytes: [1], fds: [buffers[0].descriptor, buffers[1].descriptor])
        let received = try UnixSocket.receive(b.descriptor, maxBytes: 16)
        let copy = SharedFD(adopting: fcntl(buffers[1].descriptor.rawValue, F_DUPFD_CLOEXEC, 0))
        let noise = [FakeFence().fd, try makeMemfd(4096)]
        let closed = SharedFD(adopting: -1)
        let counts = kernel.referenceCounts(buffers + [closed])
        #expect(counts == buffers.map(kernel.referenceCount) + [nil])
        #expect(counts == [2, 3, 1, nil])
        #expect(kernel.referenceCounts([]).isEmpty)
        withExtendedLifetime((received, copy, noise)) {}
    }
}
