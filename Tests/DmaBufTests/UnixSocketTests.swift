import CDmaBuf
import DmaBuf
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct UnixSocketTests {
    @Test(arguments: [UnixSocket.Kind.seqpacket, .stream])
    func memfdRoundTrip(kind: UnixSocket.Kind) throws {
        let memfd = try Memfd(name: "scm", size: 2 * pageSize)
        let mapping = try memfd.map(length: 2 * pageSize)
        mapping.bytes.storeBytes(of: 0x0123_4567_89ab_cdef as UInt64, toByteOffset: pageSize, as: UInt64.self)
        let (a, b) = try UnixSocket.pair(kind)
        #expect(try UnixSocket.send(a.descriptor, bytes: Array("hello".utf8), fds: [memfd.fd.descriptor]) == 5)
        let message = try UnixSocket.receive(b.descriptor, maxBytes: 64, maxFDs: 4)
        #expect(message.bytes == Array("hello".utf8))
        #expect(message.fds.count == 1)
        #expect(message.surplusFDs == 0)
        #expect(!message.controlTruncated && !message.dataTruncated && !message.isEndOfStream)
        let received = try #require(message.fds.first)
        #expect(received.descriptor != memfd.fd.descriptor)
        #expect(try inode(of: received.descriptor) == inode(of: memfd.fd.descriptor))
        // MSG_CMSG_CLOEXEC: received descriptors do not leak into children.
        #expect(fcntlGetFD(received.descriptor) & FD_CLOEXEC != 0)
        // Same file: contents written before and after the transfer are visible through it.
        let other = try Memfd(shared: received).map(length: 2 * pageSize)
        #expect(other.bytes.load(fromByteOffset: pageSize, as: UInt64.self) == 0x0123_4567_89ab_cdef)
        mapping.bytes[0] = 0x42
        #expect(other.bytes[0] == 0x42)
        #expect(try Memfd(shared: received).size() == 2 * pageSize)
    }

    @Test func surplusDescriptorsAreReturnedOpenNotClosedOnReceipt() throws {
        let memfds = try (0..<5).map { try Memfd(name: "surplus-\($0)", size: pageSize) }
        let (a, b) = try UnixSocket.pair()
        try UnixSocket.send(a.descriptor, bytes: [1, 2, 3], fds: memfds.map(\.fd.descriptor))
        let before = try openDescriptorCount()
        var message = try UnixSocket.receive(b.descriptor, maxBytes: 16, maxFDs: 2)
        // All five are open in this process: receive closes nothing (a close could block on what a peer
        // sent); the caller decides where the three surplus ones are closed.
        #expect(try openDescriptorCount() == before + 5)
        #expect(message.bytes == [1, 2, 3])
        #expect(message.fds.count == 2)
        #expect(message.surplusFDs == 3 && message.surplus.count == 3)
        #expect(!message.controlTruncated)  // the kernel delivered all five
        #expect(try inode(of: message.surplus[2].descriptor) == inode(of: memfds[4].fd.descriptor))
        message.surplus = []
        #expect(try openDescriptorCount() == before + 2)
        #expect(try inode(of: message.fds[0].descriptor) == inode(of: memfds[0].fd.descriptor))
        #expect(try inode(of: message.fds[1].descriptor) == inode(of: memfds[1].fd.descriptor))
    }

    /// A signal without SA_RESTART interrupts a blocking receive (EINTR); the retry must still take the
    /// fds (it used to retry with room for none and closed every one as surplus).
    @Test func aReceiveInterruptedBySignalKeepsItsDescriptors() throws {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        action.sa_flags = 0  // no SA_RESTART: recvmsg fails with EINTR
        var old = sigaction()
        #expect(sigaction(SIGUSR2, &action, &old) == 0)
        defer { _ = sigaction(SIGUSR2, &old, nil) }
        // The test runs on a pool thread that blocks most signals: let this one through while it waits.
        var unblock = sigset_t(), previous = sigset_t()
        sigemptyset(&unblock)
        sigaddset(&unblock, SIGUSR2)
        #expect(pthread_sigmask(SIG_UNBLOCK, &unblock, &previous) == 0)
        defer { _ = pthread_sigmask(SIG_SETMASK, &previous, nil) }
        let memfd = try Memfd(name: "eintr", size: pageSize)
        let (a, b) = try UnixSocket.pair()
        let receiver = pthread_self()
        let sender = a, fd = memfd.fd
        let helper = try PlainThread {
            usleep(100_000)
            _ = pthread_kill(receiver, SIGUSR2)
            usleep(100_000)
            _ = try? UnixSocket.send(sender.descriptor, bytes: [5], fds: [fd.descriptor])
        }
        defer { helper.join() }
        let message = try UnixSocket.receive(b.descriptor, maxBytes: 16, maxFDs: 2)
        #expect(message.bytes == [5])
        #expect(message.fds.count == 1 && message.surplusFDs == 0)
    }

    @Test func zeroMaxFDsReturnsEverythingAsSurplus() throws {
        let memfd = try Memfd(name: "none", size: pageSize)
        let (a, b) = try UnixSocket.pair()
        try UnixSocket.send(a.descriptor, bytes: [9], fds: [memfd.fd.descriptor, memfd.fd.descriptor])
        let message = try UnixSocket.receive(b.descriptor, maxBytes: 16, maxFDs: 0)
        #expect(message.fds.isEmpty)
        #expect(message.surplusFDs == 2 && message.surplus.count == 2)
        #expect(message.bytes == [9])
    }

    @Test func seqpacketTruncationAndEndOfStream() throws {
        var (a, b) = try pairWithClosableFirstEnd()
        try UnixSocket.send(a!.descriptor, bytes: Array(repeating: 7, count: 100))
        let short = try UnixSocket.receive(b.descriptor, maxBytes: 10)
        #expect(short.bytes.count == 10)
        #expect(short.dataTruncated)
        #expect(!short.isEndOfStream)
        a = nil
        let end = try UnixSocket.receive(b.descriptor, maxBytes: 10)
        #expect(end.isEndOfStream)
        #expect(a == nil)
    }

    @Test func tooManyDescriptorsIsEINVAL() throws {
        let memfd = try Memfd(name: "many", size: pageSize)
        let (a, _) = try UnixSocket.pair()
        #expect(UnixSocket.maximumDescriptors == 253)
        let fds = Array(repeating: memfd.fd.descriptor, count: UnixSocket.maximumDescriptors + 1)
        expectDmaBufError(.invalidArgument, "socket", "with 254 fds failed") {
            try UnixSocket.send(a.descriptor, bytes: [0], fds: fds)
        }
    }

    @Test func maximumDescriptorsPass() throws {
        let memfd = try Memfd(name: "max", size: pageSize)
        let (a, b) = try UnixSocket.pair()
        try UnixSocket.send(a.descriptor, bytes: [0], fds: Array(repeating: memfd.fd.descriptor, count: UnixSocket.maximumDescriptors))
        let message = try UnixSocket.receive(b.descriptor, maxBytes: 4)
        #expect(message.fds.count == UnixSocket.maximumDescriptors)
        #expect(!message.controlTruncated)
    }

    @Test func sendToClosedPeerIsEPIPE() throws {
        var (b, a) = try pairWithClosableFirstEnd()
        b = nil
        #expect(b == nil)
        expectDmaBufError(.brokenPipe, "sendmsg of 1 bytes with 0 fds failed") {
            try UnixSocket.send(a.descriptor, bytes: [0])
        }
    }

    @Test func peerCredentialsAreOurs() throws {
        let (a, _) = try UnixSocket.pair()
        let peer = try UnixSocket.peerCredentials(a.descriptor)
        #expect(peer == PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid()))
    }

    @Test func listenConnectAccept() throws {
        let scratch = try ScratchDirectory()
        defer { scratch.remove() }
        let path = scratch.path + "/sock"
        let listener = try UnixSocket.listen(path: path)
        let client = try UnixSocket.connect(path: path)
        let server = try UnixSocket.accept(listener.descriptor)
        let memfd = try Memfd(name: "over-listen", size: pageSize)
        try UnixSocket.send(client.descriptor, bytes: [5], fds: [memfd.fd.descriptor])
        let message = try UnixSocket.receive(server.descriptor, maxBytes: 4)
        #expect(try inode(of: message.fds[0].descriptor) == inode(of: memfd.fd.descriptor))
        expectDmaBufError(.noSuchFileOrDirectory, "cannot connect to \(scratch.path)/absent", "is dmabufd running?") {
            _ = try UnixSocket.connect(path: scratch.path + "/absent")
        }
    }

    private func fcntlGetFD(_ fd: FileDescriptor) -> CInt {
        CDmaBuf_fcntl(fd.rawValue, F_GETFD, 0)
    }

    /// A seqpacket pair whose first end can be closed by setting it to nil (no other reference is kept).
    private func pairWithClosableFirstEnd() throws -> (SharedFD?, SharedFD) {
        let (first, second) = try UnixSocket.pair(.seqpacket)
        return (first, second)
    }

    /// How many descriptors this process has open (entries of /proc/self/fd, less the one reading it).
    private func openDescriptorCount() throws -> Int {
        guard let dir = opendir("/proc/self/fd") else { throw Errno(rawValue: errno) }
        defer { closedir(dir) }
        var count = 0
        while readdir(dir) != nil { count += 1 }
        return count - 3  // ".", "..", and the directory's own descriptor
    }
}
