// dma-buf tests common to every exporter: naming, DMA_BUF_IOCTL_SYNC flags, fdinfo, and passing buffers to
// other processes with SCM_RIGHTS.
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum DmaBufferTests {
    static let system: [Requirement] = [.heap("system")]

    static let all: [DeviceTest] = [
        DeviceTest("dmabuf.set-name-fdinfo", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            try expectEqual(try buffer.info().name, nil, "name before SET_NAME")
            try buffer.setName("dmabufd-test")
            try expectEqual(try buffer.info().name, "dmabufd-test", "name")
            // The longest name the kernel takes, then a rename.
            let longest = String(repeating: "n", count: DmaBuffer.maximumNameLength)
            try buffer.setName(longest)
            try expectEqual(try buffer.info().name, longest, "31-byte name")
            try buffer.setName("renamed")
            try expectEqual(try buffer.info().name, "renamed", "renamed")
        },
        DeviceTest("dmabuf.name-too-long-einval", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            try buffer.setName("kept")
            try expectEqual(DmaBuffer.maximumNameLength, 31, "DMA_BUF_NAME_LEN - 1")
            let long = String(repeating: "x", count: 32)
            try expectError(.invalidArgument, "dma-buf", "is 32 bytes, longer than 31", "shorten it to 31 bytes") {
                try buffer.setName(long)
            }
            try expectEqual(try buffer.info().name, "kept", "name after the refused rename")
        },
        DeviceTest("dmabuf.udmabuf-set-name", requires: [.udmabuf]) {
            let memfd = try Memfd(name: "named", size: pageSize)
            let buffer = try UDmabuf().create(memfd: memfd.fd.descriptor, size: UInt64(pageSize))
            try buffer.setName("camera-frame-0")
            let info = try buffer.info()
            try expectEqual(info.name, "camera-frame-0", "name")
            try expectEqual(info.exporter, "udmabuf", "exporter")
        },
        DeviceTest("dmabuf.sync-bad-flags-einval", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            try expectError(.invalidArgument, "DMA_BUF_IOCTL_SYNC flags 0x100 are invalid", "READ, WRITE or both") {
                try buffer.sync(.init(rawValue: 0x100))
            }
            try expectError(.invalidArgument, "flags 0x0 are invalid") { try buffer.sync([]) }
            try expectError(.invalidArgument, "flags 0x4 are invalid") { try buffer.sync(.end) }
            try expectError(.invalidArgument, "flags 0x107 are invalid") { try buffer.sync([.read, .write, .end, .init(rawValue: 0x100)]) }
        },
        DeviceTest("dmabuf.sync-all-directions", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            for access in CPUAccess.allCases {
                try buffer.withCPUAccess(access) {}
            }
            try buffer.sync(.read)
            try buffer.sync([.read, .end])
            try buffer.sync([.read, .write])
            try buffer.sync([.read, .write, .end])
            // END runs even when the body throws, and the error comes through.
            struct Marker: Error {}
            do {
                try buffer.withCPUAccess(.write) { throw Marker() }
                try expect(false, "the body's error was swallowed")
            } catch is Marker {}
        },
        DeviceTest("dmabuf.fdinfo-fields", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 3 * pageSize)
            let info = try buffer.info()
            try expectEqual(info.size, 3 * pageSize, "size")
            try expectEqual(info.exporter, "system", "exp_name")
            try expectEqual(info.inode, try buffer.inode(), "ino")
            try expectEqual(info.count, 1, "count")
            try expectEqual(info.flags & Int(O_ACCMODE), Int(O_RDWR), "flags")
            try expectEqual(info.position, 0, "pos")
        },
        DeviceTest("dmabuf.fdinfo-count", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            try expectEqual(try buffer.info().count, 1, "one descriptor")
            do {
                let dup = try buffer.fd.duplicate()
                try expectEqual(try buffer.info().count, 2, "with a dup")
                _ = dup
            }
            try expectEqual(try buffer.info().count, 1, "dup closed")
            do {
                let mapping = try buffer.map()
                try expectEqual(try buffer.info().count, 2, "with a mapping")
                _ = mapping
            }
            try expectEqual(try buffer.info().count, 1, "mapping gone")
        },
        DeviceTest("dmabuf.fdinfo-count-other-process", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            let child = try Child("hold")
            try child.send([1], fds: [buffer.fd.descriptor])
            try expectEqual(try child.receiveText(), "held", "child answer")
            try expectEqual(try buffer.info().count, 2, "count while the child holds it")
            child.hangUp()  // the child sees EOF, drops the buffer and exits
            try expectEqual(child.finish(), 0, "child exit")
            try expectEqual(try buffer.info().count, 1, "count after the child exited")
        },
        DeviceTest("dmabuf.scm-rights-same-inode", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 1 << 16)
            let child = try Child("echo-inode")
            try child.send(Array("buffer".utf8), fds: [buffer.fd.descriptor])
            let answer = try child.receiveText()
            try expectEqual(child.finish(), 0, "child exit")
            try expectEqual(UInt64(answer), try buffer.inode(), "inode seen by the child")
        },
        DeviceTest("dmabuf.child-writes-visible", requires: system) {
            let buffer = try DmaHeap(named: "system").allocate(length: 1 << 16)
            let child = try Child("fill", ["165"])
            try child.send([0], fds: [buffer.fd.descriptor])
            try expectEqual(try child.receiveText(), "filled", "child answer")
            try expectEqual(child.finish(), 0, "child exit")
            try buffer.withMappedCPUAccess(.read) { try expect(Pages.all($0, equal: 165), "the child's writes") }
        },
        DeviceTest("dmabuf.surplus-fds-closed", requires: system) {
            let heap = try DmaHeap(named: "system")
            let buffers = try (0..<3).map { _ in try heap.allocate(length: 4096) }
            let (a, b) = try UnixSocket.pair()
            try UnixSocket.send(a.descriptor, bytes: [7], fds: buffers.map(\.fd.descriptor))
            for (i, buffer) in buffers.enumerated() {
                try expectEqual(try buffer.info().count, 2, "buffer \(i) in flight")
            }
            var message = try UnixSocket.receive(b.descriptor, maxBytes: 16, maxFDs: 1)
            try expectEqual(message.bytes, [7], "data")
            try expectEqual(message.fds.count, 1, "fds kept")
            try expectEqual(message.surplusFDs, 2, "surplus")
            try expect(!message.controlTruncated, "MSG_CTRUNC")
            let received = try DmaBuffer(checking: message.fds[0])
            try expectEqual(try received.inode(), try buffers[0].inode(), "first buffer received")
            try expectEqual(try buffers[0].info().count, 2, "received buffer held once more")
            // The surplus comes back open (the receive closes nothing: a close could block on what a
            // peer sent); dropping it closes it.
            try expectEqual(message.surplus.count, 2, "surplus handed back")
            try expectEqual(try buffers[1].info().count, 2, "surplus buffer 1 held until dropped")
            message.surplus = []
            try expectEqual(try buffers[1].info().count, 1, "surplus buffer 1 closed, not leaked")
            try expectEqual(try buffers[2].info().count, 1, "surplus buffer 2 closed, not leaked")
        },
        DeviceTest("dmabuf.checking-memfd-ebadf", requires: system) {
            let memfd = try Memfd(name: "not-a-dmabuf", size: pageSize)
            try expectError(.badFileDescriptor, "fd \(memfd.fd.descriptor.rawValue) is not a dma-buf", "dma-heap, udmabuf") {
                try DmaBuffer(checking: memfd.fd)
            }
            let null = try Descriptor.open("/dev/null")
            try expectError(.badFileDescriptor, "is not a dma-buf") { try DmaBuffer(checking: null) }
            // A real one passes.
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            _ = try DmaBuffer(checking: buffer.fd)
        },
    ]
}

/// A child process of this binary in some role, connected by a seqpacket socket at its fd 3.
final class Child {
    private var socket: SharedFD?
    let pid: pid_t
    private var reaped = false

    init(_ role: String, _ arguments: [String] = []) throws {
        let (mine, theirs) = try UnixSocket.pair()
        // Keep the child's end off descriptor 3 itself, so dup2 to 3 always happens (and clears close-on-exec).
        let passed = theirs.descriptor.rawValue == 3 ? try theirs.duplicate().shared() : theirs
        self.pid = try Harness.spawn([Harness.executablePath, "--child", role] + arguments, fds: [passed.descriptor])
        self.socket = mine
    }

    /// Sends one message, with descriptors, to the child.
    func send(_ bytes: [UInt8], fds: [FileDescriptor] = []) throws {
        guard let socket else { throw TestFailure(description: "sending to a child after hanging up") }
        try UnixSocket.send(socket.descriptor, bytes: bytes, fds: fds)
    }

    /// Receives one message as text; a child that died without answering gives an empty string.
    func receiveText() throws -> String {
        guard let socket else { throw TestFailure(description: "receiving from a child after hanging up") }
        return String(decoding: try UnixSocket.receive(socket.descriptor, maxBytes: 256, maxFDs: 0).bytes, as: UTF8.self)
    }

    /// Closes our end of the socket: the child reads end of stream.
    func hangUp() {
        socket = nil
    }

    /// Waits for the child; its exit status.
    func finish() -> Int32 {
        reaped = true
        return Harness.wait(pid)
    }

    deinit {
        if !reaped {
            kill(pid, SIGKILL)
            _ = Harness.wait(pid)
        }
    }
}
