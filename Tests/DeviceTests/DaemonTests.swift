import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

private let system: [Requirement] = [.heap("system"), .root]
private let both: [Requirement] = [.heap("system"), .udmabuf, .root]

/// Sends raw bytes (and fds) on a fresh connection and returns the daemon's reply, then checks that the
/// daemon hung up.
private func rawExchange(_ daemon: TestDaemon, _ bytes: [UInt8], fds: [FileDescriptor] = [], hello: Bool = true) throws -> Response {
    let socket = try UnixSocket.connect(path: daemon.socketPath).shared()
    if hello {
        try UnixSocket.send(socket.descriptor, bytes: WireMessage.encode(.hello(Hello(client: "raw")), requestID: 1))
        _ = try UnixSocket.receive(socket.descriptor, maxBytes: WireLimits.maximumMessageSize)
    }
    try UnixSocket.send(socket.descriptor, bytes: bytes, fds: fds)
    let reply = try UnixSocket.receive(socket.descriptor, maxBytes: WireLimits.maximumMessageSize, maxFDs: 4)
    let (_, response) = try WireMessage.decodeResponse(reply.bytes, descriptors: reply.fds.count)
    let after = try UnixSocket.receive(socket.descriptor, maxBytes: WireLimits.maximumMessageSize, maxFDs: 4)
    try expect(after.isEndOfStream, "the daemon should disconnect a client that sent a malformed message")
    return response
}

/// After a malformed message, a well-behaved client must still be served.
private func expectStillServing(_ daemon: TestDaemon) throws {
    let connection = try daemon.connect("bystander")
    let buffer = try connection.allocate(size: 4096, heap: "system", tag: "bystander")
    try expectEqual(buffer.info.size, 4096, "bystander's allocation")
    try connection.release(buffer.info.id)
}

private func expectMalformed(_ response: Response, _ errno: Errno, _ part: String) throws {
    guard case .error(let error) = response else { throw TestFailure(description: "expected an error reply, got \(response)") }
    try expectEqual(Errno(rawValue: error.errno), errno, "errno")
    try expect(error.message.contains(part), "error message '\(error.message)' lacks '\(part)'")
}

enum DaemonTests {
    static let all: [DeviceTest] = [
        DeviceTest("daemon.hello-negotiates-v1", requires: system) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                // The daemon speaks 1...2 and the client library asks for its highest: v2 (docs/PROTOCOL.md).
                try expectEqual(connection.server.version, WireLimits.currentVersion, "version")
                try expectEqual(connection.server.uid, 0, "uid seen through SO_PEERCRED")
                try expectEqual(connection.server.pid, getpid(), "pid seen through SO_PEERCRED")
                try expectEqual(Int(connection.server.pageSize), pageSize, "page size")
            }
        },
        DeviceTest("daemon.heaps-lists-system-udmabuf-and-any", requires: both) {
            try withDaemon { daemon in
                let heaps = try daemon.connect().heaps()
                let names = heaps.heaps.map(\.name)
                try expect(names.contains("system") && names.contains("udmabuf"), "heaps: \(names)")
                try expect(heaps.policies.contains { $0.name == "any" && $0.chain.first == "system" }, "policies: \(heaps.policies)")
            }
        },
        DeviceTest("daemon.alloc-system-named-uid-pid-tag", requires: system) {
            try withDaemon { daemon in
                let buffer = try daemon.connect().allocate(size: 1 << 20, heap: "system", tag: "frame")
                try expectEqual(buffer.info.heap, "system", "heap")
                try expectEqual(try buffer.buffer.size(), 1 << 20, "size of the received fd")
                try expectEqual(buffer.info.name, "0:\(getpid()):frame", "name")
                try expectEqual(try buffer.buffer.info().name, "0:\(getpid()):frame", "kernel-visible name")
                try expectEqual(try buffer.buffer.inode(), buffer.info.inode, "inode")
            }
        },
        DeviceTest("daemon.name-cut-to-kernel-limit", requires: system) {
            try withDaemon { daemon in
                let buffer = try daemon.connect().allocate(size: 4096, heap: "system", tag: String(repeating: "t", count: 32))
                try expectEqual(buffer.info.name.utf8.count, DmaBuffer.maximumNameLength, "name length")
                try expectEqual(try buffer.buffer.info().name, buffer.info.name, "kernel name")
            }
        },
        DeviceTest("daemon.two-processes-exchange-same-inode-and-bytes", requires: system) {
            try withDaemon { daemon in
                let a = try Agent()
                try a.ok("connect \(daemon.socketPath)")
                let owner = try daemon.connect("owner")
                let mine = try owner.allocate(size: 1 << 20, heap: "system", tag: "pattern")
                var expected: UInt64 = 0
                try mine.buffer.withMappedCPUAccess(.write) { bytes in
                    for i in 0..<bytes.count { bytes[i] = UInt8(truncatingIfNeeded: i * 7 + 3); expected &+= UInt64(bytes[i]) }
                }
                let token = try owner.share(mine.info.id, oneTimeToken: true)!
                let reply = try a.ok("fetch \(mine.info.id) \(token)")
                try expectEqual(UInt64(reply[0]), try mine.buffer.inode(), "inode in the other process")
                try expectEqual(UInt64(reply[1]), expected, "byte sum in the other process")
            }
        },
        DeviceTest("daemon.fetch-unshared-refused-for-other-uid", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.allocate(size: 4096, heap: "system")
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                try nobody.refused("fetch \(buffer.info.id)", "EACCES", "not shared with uid 65534")
                withExtendedLifetime(owner) {}
            }
        },
        DeviceTest("daemon.share-with-uid-lets-it-fetch", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.allocate(size: 4096, heap: "system")
                try owner.share(buffer.info.id, uid: 65534)
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                let reply = try nobody.ok("fetch \(buffer.info.id)")
                try expectEqual(UInt64(reply[0]), buffer.info.inode, "inode")
                try expectEqual(try owner.info(buffer.info.id).sharedWith, [65534], "sharedWith")
            }
        },
        DeviceTest("daemon.one-time-token-works-once", requires: system) {
            try withDaemon { daemon in
                let owner = try daemon.connect()
                let buffer = try owner.allocate(size: 4096, heap: "system")
                let token = try owner.share(buffer.info.id, oneTimeToken: true)!
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                try nobody.ok("fetch \(buffer.info.id) \(token)")
                try nobody.refused("fetch \(buffer.info.id) \(token)", "EACCES")
            }
        },
        DeviceTest("daemon.quota-bytes-refused-daemon-fine", requires: system) {
            try withDaemon(config: "quota.uid.65534.bytes = 2M\nquota.uid.65534.buffers = 100") { daemon in
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                try nobody.ok("alloc \(1 << 20)")
                try nobody.ok("alloc \(1 << 20)")
                try nobody.refused("alloc \(1 << 20)", "EDQUOT", "quota exceeded for uid 65534", "quota.uid.65534")
                try expectStillServing(daemon)
                let stats = try daemon.connect().stats()
                let client = stats.clients.first { $0.uid == 65534 }
                try expectEqual(client?.bytes, 2 << 20, "bytes charged to 65534")
                try expectEqual(client?.refusals, 1, "refusals")
            }
        },
        DeviceTest("daemon.quota-buffers-refused", requires: system) {
            try withDaemon(config: "quota.uid.65534.buffers = 2") { daemon in
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                try nobody.ok("alloc 4096")
                try nobody.ok("alloc 4096")
                try nobody.refused("alloc 4096", "EDQUOT", "2 buffers held, limit 2")
            }
        },
        DeviceTest("daemon.max-buffer-size-bounds-requests", requires: system) {
            try withDaemon(config: "max_buffer_size = 8M") { daemon in
                try expectRefusal(.fileTooLarge, "exceeds max_buffer_size", "8 MiB") {
                    try daemon.connect().allocate(size: 9 << 20, heap: "system")
                }
            }
        },
        DeviceTest("daemon.larger-than-memory-refused-not-oom", requires: system) {
            try withDaemon(config: "max_buffer_size = 1T\nquota.default.bytes = 1T") { daemon in
                try expectRefusal(.noMemory, "would leave too little memory") {
                    try daemon.connect().allocate(size: 512 << 30, heap: "system")
                }
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.size-zero-refused", requires: system) {
            try withDaemon { daemon in
                try expectRefusal(.invalidArgument, "size 0") { try daemon.connect().allocate(size: 0, heap: "system") }
            }
        },
        DeviceTest("daemon.unknown-heap-lists-available", requires: system) {
            try withDaemon { daemon in
                try expectRefusal(.noSuchFileOrDirectory, "no heap or policy named 'nope'", "system") {
                    try daemon.connect().allocate(size: 4096, heap: "nope")
                }
            }
        },
        DeviceTest("daemon.policy-skips-missing-heap", requires: system) {
            try withDaemon(config: "policy.fast = no-such-heap, system") { daemon in
                let buffer = try daemon.connect().allocate(size: 4096, heap: "fast")
                try expectEqual(buffer.info.heap, "system", "heap chosen by the policy")
            }
        },
        DeviceTest("daemon.policy-falls-back-after-failure", requires: both) {
            // 80 MiB exceeds udmabuf's size_limit_mb (64): the first heap fails, the next one serves.
            try withDaemon(config: "policy.big = udmabuf, system") { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 80 << 20, heap: "big")
                try expectEqual(buffer.info.heap, "system", "heap after fallback")
                let failures = try connection.stats().heaps.first { $0.heap == "udmabuf" }?.failures
                try expectEqual(failures, 1, "udmabuf failures counted")
            }
        },
        DeviceTest("daemon.udmabuf-from-daemon-memfd", requires: both) {
            try withDaemon { daemon in
                let buffer = try daemon.connect().createUDmabuf(size: 1 << 20, tag: "u")
                try expectEqual(buffer.info.heap, "udmabuf", "heap")
                try expectEqual(try buffer.buffer.info().exporter, "udmabuf", "exporter")
                try buffer.buffer.withMappedCPUAccess(.readWrite) { bytes in
                    bytes[100] = 42
                    try expectEqual(bytes[100], 42, "write through the mapping")
                }
            }
        },
        DeviceTest("daemon.udmabuf-from-client-memfd-list", requires: both) {
            try withDaemon { daemon in
                let page = UInt64(pageSize)
                let memfd = try Memfd(name: "client", size: 16 * pageSize)
                let ranges = [ByteRange(offset: 0, size: 4 * page), ByteRange(offset: 4 * page, size: 4 * page),
                              ByteRange(offset: 12 * page, size: 4 * page)]
                let buffer = try daemon.connect().createUDmabuf(memfd: memfd, ranges: ranges, tag: "list")
                try expectEqual(buffer.info.size, 12 * page, "size")
                let mapping = try memfd.map(length: 16 * pageSize)
                mapping.bytes[12 * pageSize + 5] = 0xAB
                try buffer.buffer.withMappedCPUAccess(.read) { bytes in
                    try expectEqual(bytes[8 * pageSize + 5], 0xAB, "memfd page 12 is buffer page 8")
                }
            }
        },
        DeviceTest("daemon.import-accounts-foreign-dmabuf", requires: system) {
            try withDaemon { daemon in
                let local = try DmaHeap(named: "system").allocate(length: 8192)
                let connection = try daemon.connect()
                let info = try connection.importBuffer(local, tag: "mine")
                try expectEqual(info.heap, "import", "heap")
                try expectEqual(info.inode, try local.inode(), "inode")
                try expectEqual(info.size, 8192, "size")
            }
        },
        DeviceTest("daemon.import-non-dmabuf-refused", requires: system) {
            try withDaemon { daemon in
                let memfd = try Memfd(name: "not-a-dmabuf", size: 4096)
                try expectRefusal(.badFileDescriptor, "not a dma-buf") {
                    try daemon.connect().importBuffer(DmaBuffer(shared: memfd.fd))
                }
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.release-frees-when-unreferenced", requires: system) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                var buffer: RemoteBuffer? = try connection.allocate(size: 1 << 20, heap: "system")
                let id = buffer!.info.id
                try connection.release(id)
                // Our fd still references the memory: it stays accounted to us.
                try expectEqual(try connection.stats().bytes, 1 << 20, "bytes while our fd is open")
                buffer = nil
                try eventually(.seconds(3), "the buffer to leave the books") { try connection.stats().buffers == 0 }
                try expectRefusal(.noSuchFileOrDirectory, "no buffer \(id)") { try connection.info(id) }
            }
        },
        DeviceTest("daemon.killed-client-buffers-reclaimed", requires: system) {
            try withDaemon { daemon in
                let (mine, theirs) = try UnixSocket.pair(.seqpacket)
                let pid = try Harness.child("daemon-hold-and-die", [daemon.socketPath, "3"], fds: [theirs.descriptor])
                let (text, _) = try Channel(socket: mine).receive()
                try expect(text.hasPrefix("ready"), "child: \(text)")
                let root = try daemon.connect()
                try expectEqual(try root.list(all: true).filter { $0.ownerPID == pid }.count, 3, "buffers while alive")
                kill(pid, SIGKILL)
                _ = Harness.wait(pid)
                try eventually(.seconds(5), "the dead client's buffers to be reclaimed") {
                    try root.list(all: true).allSatisfy { $0.ownerPID != pid }
                }
                try expectEqual(try root.stats().bytes, 0, "bytes after reclaim")
            }
        },
        DeviceTest("daemon.killed-mid-request-daemon-fine", requires: system) {
            try withDaemon { daemon in
                let (_, theirs) = try UnixSocket.pair(.seqpacket)
                let pid = try Harness.child("daemon-die-mid-request", [daemon.socketPath], fds: [theirs.descriptor])
                try expectEqual(Harness.wait(pid), 128 + SIGKILL, "child died by SIGKILL")
                let root = try daemon.connect()
                try eventually(.seconds(5), "the half-served allocation to be reclaimed") { try root.stats().buffers == 0 }
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.malformed-short", requires: system) {
            try withDaemon { daemon in
                try expectMalformed(try rawExchange(daemon, [0x44, 0x4D, 0x42, 0x46, 1]), .badMessage, "ends inside field")
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.malformed-oversize", requires: system) {
            try withDaemon { daemon in
                var bytes = WireMessage.encode(.stats, requestID: 5)
                bytes += [UInt8](repeating: 0, count: WireLimits.maximumMessageSize)
                try expectMalformed(try rawExchange(daemon, bytes), .messageTooLong, "exceeds the maximum")
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.malformed-bad-version", requires: system) {
            try withDaemon { daemon in
                var bytes = WireMessage.encode(.stats, requestID: 5)
                bytes[4] = 9
                try expectMalformed(try rawExchange(daemon, bytes), .protocolNotSupported, "version 9")
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.malformed-unknown-type", requires: system) {
            try withDaemon { daemon in
                var bytes = WireMessage.encode(.stats, requestID: 5)
                bytes[6] = 0x77
                try expectMalformed(try rawExchange(daemon, bytes), .badMessage, "unknown message type")
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.malformed-wrong-fd-count", requires: system) {
            try withDaemon { daemon in
                let memfd = try Memfd(name: "stray", size: 4096)
                let bytes = WireMessage.encode(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "")), requestID: 5, descriptors: 1)
                try expectMalformed(try rawExchange(daemon, bytes, fds: [memfd.fd.descriptor]), .badMessage, "carries 1 fds, expected 0")
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.malformed-no-hello-first", requires: system) {
            try withDaemon { daemon in
                let response = try rawExchange(daemon, WireMessage.encode(.stats, requestID: 5), hello: false)
                try expectMalformed(response, .protocolError, "first message must be hello")
                try expectStillServing(daemon)
            }
        },
        DeviceTest("daemon.version-negotiation-refuses-future-only", requires: system) {
            try withDaemon { daemon in
                let response = try rawExchange(daemon, WireMessage.encode(.hello(Hello(minimumVersion: 2, maximumVersion: 5, client: "future")), requestID: 1), hello: false)
                try expectMalformed(response, .protocolNotSupported, "no common protocol version")
            }
        },
        DeviceTest("daemon.list-all-is-root-only", requires: system) {
            try withDaemon { daemon in
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                try nobody.refused("list-all", "EPERM", "for root")
            }
        },
        DeviceTest("daemon.stats-per-heap-and-client", requires: both) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                _ = try connection.allocate(size: 1 << 20, heap: "system")
                _ = try connection.createUDmabuf(size: 2 << 20)
                _ = try? connection.allocate(size: 4096, heap: "nope")
                let stats = try connection.stats()
                try expectEqual(stats.heaps.first { $0.heap == "system" }?.bytes, 1 << 20, "system bytes")
                try expectEqual(stats.heaps.first { $0.heap == "udmabuf" }?.bytes, 2 << 20, "udmabuf bytes")
                try expectEqual(stats.clients.first { $0.uid == 0 }?.buffers, 2, "root's buffers")
                try expectEqual(stats.failures.first { $0.errno == "ENOENT" }?.count, 1, "ENOENT failures")
                try expectEqual(stats.connectedClients, 1, "connected clients")
            }
        },
        DeviceTest("daemon.external-references-truthful", requires: system) {
            try withDaemon { daemon in
                let connection = try daemon.connect()
                let buffer = try connection.allocate(size: 4096, heap: "system")
                try expectEqual(try connection.info(buffer.info.id).externalReferences, 1, "our one fd")
                let copy = try buffer.buffer.fd.duplicate()
                try expectEqual(try connection.info(buffer.info.id).externalReferences, 2, "with a dup")
                _ = consume copy
            }
        },
        DeviceTest("daemon.hotplug-drm-seen-without-restart", requires: system + [.vgem]) {
            // Unload vgem, start the daemon without it, load it: the daemon must notice through udev.
            Harness.run(["/sbin/rmmod", "vgem"])
            try expect(!Harness.vgemLoaded, "cannot unload vgem (still in use?), so hotplug cannot be tested")
            try withDaemon { daemon in
                let connection = try daemon.connect()
                try expect(!(try connection.heaps().heaps.contains { $0.kind == "drm" }), "a DRM node listed before vgem was loaded")
                try expectEqual(Harness.run(["/sbin/modprobe", "vgem"]), 0, "modprobe vgem")
                try eventually(.seconds(10), "the daemon to see vgem's DRM node") {
                    try connection.heaps().heaps.contains { $0.kind == "drm" }
                }
            }
        },
        DeviceTest("daemon.reload-lower-quota-revokes-newest", requires: system) {
            try withDaemon(config: "quota.uid.65534.bytes = 4M") { daemon in
                let nobody = try Agent(uid: 65534)
                try nobody.ok("connect \(daemon.socketPath)")
                let ids = try (0..<3).map { _ in BufferID(try nobody.ok("alloc \(1 << 20)")[0])! }
                let text = Harness.readFile(daemon.directory + "/dmabufd.conf")! + "\nquota.uid.65534.bytes = 1M\n"
                Harness.writeFileCreating(daemon.directory + "/dmabufd.conf", text)
                kill(daemon.pid, SIGHUP)
                let root = try daemon.connect()
                try eventually(.seconds(5), "the two newest buffers to be revoked") {
                    let revoked = try root.list(all: true).filter { $0.ownerUID == 65534 && $0.revoked }.map(\.id)
                    return Set(revoked) == Set(ids[1...])
                }
                try expect(daemon.isRunning, "dmabufd survived SIGHUP")
            }
        },
        DeviceTest("daemon.reload-bad-config-keeps-running", requires: system) {
            try withDaemon { daemon in
                Harness.writeFileCreating(daemon.directory + "/dmabufd.conf", "socket_mode = 0666\nbogus_key = 1\n")
                kill(daemon.pid, SIGHUP)
                usleep(300_000)
                try expect(daemon.isRunning, "dmabufd survived a bad reload")
                try expectStillServing(daemon)
                try expect(daemon.logTail().contains("bogus_key"), "the log names the bad key")
            }
        },
        DeviceTest("daemon.list-paginates-past-one-message", requires: system) {
            // ~700 buffers with the longest tags (32 bytes, about 130 bytes an entry) take two 64 KiB replies.
            try withDaemon(config: "quota.default.buffers = 5000\nmax_buffers_per_client = 5000") { daemon in
                let connection = try daemon.connect()
                let tag = String(repeating: "x", count: 32)
                var keep: [RemoteBuffer] = []
                for _ in 0..<700 { keep.append(try connection.allocate(size: 4096, heap: "system", tag: tag)) }
                let listed = try connection.list(all: true)
                try expectEqual(listed.count, 700, "buffers listed across pages")
                try expectEqual(listed.map(\.id), keep.map(\.info.id), "ids in order, none twice")
            }
        },
        DeviceTest("daemon.sigterm-exits-cleanly-with-clients", requires: system) {
            let daemon = try TestDaemon()
            let connection = try daemon.connect()
            _ = try connection.allocate(size: 4096, heap: "system")
            try expectEqual(daemon.stop(), 0, "exit status after SIGTERM")
        },
    ]
}

extension Harness {
    static var vgemLoaded: Bool { access("/sys/module/vgem", F_OK) == 0 }
}
