import DmaBuf
import DmaBufWire
import SystemPackage
import Testing
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

/// A stand-in for systemd's notification socket: keeps the fds stored under each FDNAME, drops them on
/// FDSTOREREMOVE, as systemd does.
final class FakeSystemd {
    let path: String
    let socket: SharedFD
    var stored: [String: SharedFD] = [:]
    var messages: [String] = []

    init() throws {
        path = "/tmp/broker-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = Glibc.socket(AF_UNIX, CInt(SOCK_DGRAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue) | CInt(SOCK_NONBLOCK.rawValue), 0)
        socket = SharedFD(adopting: fd)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard rc == 0 else { throw Errno(rawValue: errno) }
    }

    deinit { unlink(path) }

    func read() {
        while let message = try? UnixSocket.receive(socket.descriptor, maxBytes: 4096, flags: CInt(MSG_DONTWAIT)), !message.bytes.isEmpty {
            let text = String(decoding: message.bytes, as: UTF8.self)
            messages.append(text)
            let name = text.split(separator: "\n").first { $0.hasPrefix("FDNAME=") }.map { String($0.dropFirst(7)) } ?? ""
            if text.hasPrefix("FDSTORE=1"), let fd = message.fds.first { stored[name] = fd }
            if text.hasPrefix("FDSTOREREMOVE=1") { stored[name] = nil }
        }
    }
}

@Suite("Broker fd store", .serialized)
struct FDStoreTests {
    @Test func everyBufferIsStoredWhenMadeAndRemovedWhenFreed() throws {
        let systemd = try FakeSystemd()
        let directory = "/tmp/broker-state-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        _ = mkdir(directory, 0o700)
        let store = FDStore(enabled: true, directory: directory, socket: NotifySocket(path: systemd.path))
        try BrokerHarness.scenario({ $0.fdStoreMax = 2 }, fdStore: store) { h in
            let client = try h.connect(uid: 1000)
            let (info, fd) = try client.allocate(4096, tag: "a.b")
            systemd.read()
            #expect(systemd.stored["buf-\(info.id)"] != nil)
            let meta = try SmallFiles.read("\(directory)/buffers/\(info.id)")
            #expect(meta.contains("tag=\(hex("a.b"))") && meta.contains("uid=1000"))
            // systemd's copy is not an outside reference: only the client's fd is.
            let (reply, _) = try client.request(.info(info.id))
            guard case .buffer(let seen) = reply else { Issue.record("\(reply)"); return }
            #expect(seen.externalReferences == 1)
            _ = try client.allocate()
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "system", tag: "")), .tooManyOpenFiles, .limit, "fd_store_max")
            try client.expectOK(.release(info.id))
            _ = consume fd
            h.pump(until: { systemd.read(); return systemd.stored["buf-\(info.id)"] == nil }, iterations: 400)
            #expect(systemd.stored["buf-\(info.id)"] == nil)
            #expect((try? SmallFiles.read("\(directory)/buffers/\(info.id)")) == nil)
            client.close()
            h.pump(until: { systemd.read(); return systemd.stored.isEmpty }, iterations: 400)
        }
        #expect(systemd.stored.isEmpty)
    }

    @Test func restoredThenRevokedBuffersAreFreed() throws {
        let systemd = try FakeSystemd()
        let directory = "/tmp/broker-state-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        _ = mkdir(directory, 0o700)
        let store = FDStore(enabled: true, directory: directory, socket: NotifySocket(path: systemd.path))
        var copy = try FakeKernel.makeBuffer(size: 4096) as SharedFD?
        do {
            // Metadata as a previous run wrote it; a tag that old rules let through, newline and all.
            let record = BufferRecord(id: 7, fd: copy!, facts: BufferFacts(size: 4096, inode: 1), heap: "system", tag: "x\ny", name: "",
                                      owner: PeerCredentials(pid: 1, uid: 1000, gid: 0), cgroup: "", ownerSession: nil)
            store.writeMetadata(record)
        }
        try BrokerHarness.scenario(fdStore: store) { h in
            h.broker.restore([7: copy!])
            copy = nil
            #expect(h.broker.buffers[7]?.restored == true && h.broker.buffers[7]?.tag == "x\ny")
            #expect(h.broker.books.usage[1000]?.bytes == 4096)
            let root = try h.connect(uid: 0)
            try root.expectOK(.revoke(RevokeRequest(buffer: 7, deadlineMilliseconds: 0)))
            h.pump(until: { h.broker.buffers[7] == nil }, iterations: 400)
            systemd.read()
            #expect(systemd.messages.contains("FDSTOREREMOVE=1\nFDNAME=buf-7"))
        }
    }
}
