// The attacker side of hostile.* (issue 9): a child process that drops to an unprivileged uid (65534 by
// default, as the other daemon tests do) and runs one attack per command, reporting what the daemon did.
// It holds whatever the attack holds (connections, fds, leases, a blocking TCP socket) until told to
// let go, so the test can check that the daemon still serves others meanwhile.
import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum HostileChildren {
    static func run(role: String, arguments: [String]) -> Int32 {
        let channel = Channel(socket: SharedFD(adopting: 3))
        guard role == "hostile-agent" else {
            Harness.warn("unknown child role \(role)")
            return 64
        }
        let uid = arguments.first.flatMap { UInt32($0) } ?? 65534
        guard setgroups(0, nil) == 0, setgid(uid) == 0, setuid(uid) == 0 else {
            try? channel.send("err EPERM cannot drop to uid \(uid)")
            return 2
        }
        var attacker = Attacker()
        while true {
            guard let (text, fds) = try? channel.receive(timeout: .seconds(600)), !text.isEmpty else { return 0 }
            let words = text.split(separator: " ").map(String.init)
            if words[0] == "exit" {
                try? channel.send("ok")
                return 0
            }
            let reply: String
            do {
                reply = "ok " + (try attacker.perform(words, fds: fds))
            } catch let error as DmaBufClientError {
                reply = "err \(error.errno?.name ?? "EIO") \(error.description)"
            } catch let error as DmaBufError {
                reply = "err \(error.errno?.name ?? "EIO") \(error.description)"
            } catch {
                reply = "err EIO \(error)"
            }
            try? channel.send(reply)
        }
    }
}

/// Hex, so that names and tags with newlines, CRs and escapes pass the line-based channel intact.
func hexEncode(_ text: String) -> String {
    text.utf8.map { String(format2: $0) }.joined()
}

func hexDecode(_ hex: String) -> String {
    var bytes: [UInt8] = []
    var i = hex.startIndex
    while i < hex.endIndex, let j = hex.index(i, offsetBy: 2, limitedBy: hex.endIndex) {
        bytes.append(UInt8(hex[i..<j], radix: 16) ?? 0x3f)
        i = j
    }
    return String(decoding: bytes, as: UTF8.self)
}

extension String {
    init(format2 byte: UInt8) {
        let digits = Array("0123456789abcdef")
        self = String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
    }
}

/// What one attacker holds, and the attacks.
struct Attacker {
    var connection: DmaBufConnection?
    var held: [BufferID: RemoteBuffer] = [:]
    var memfds: [BufferID: Memfd] = [:]
    var extra: [DmaBufConnection] = []
    var raw: [SharedFD] = []
    var keep: [SharedFD] = []

    var main: DmaBufConnection {
        get throws {
            guard let connection else { throw DmaBufClientError(local: "not connected") }
            return connection
        }
    }

    mutating func perform(_ words: [String], fds: [SharedFD]) throws -> String {
        let arg = { (i: Int) -> String in i < words.count ? words[i] : "" }
        let id = { (i: Int) -> BufferID in BufferID(arg(i)) ?? 0 }
        let n = { (i: Int) -> Int in Int(arg(i)) ?? 0 }
        switch words[0] {
        case "connect":
            connection = try DmaBufConnection(path: arg(1), clientName: "hostile")
            return "\(try main.server.uid)"
        case "alloc":
            // alloc SIZE HEAP [HEXTAG]
            let buffer = try main.allocate(size: n(1), heap: arg(2), tag: words.count > 3 ? hexDecode(arg(3)) : "hostile")
            held[buffer.info.id] = buffer
            return "\(buffer.info.id) \(try buffer.buffer.inode())"
        case "rename":
            // Names the client's own copy: DMA_BUF_SET_NAME needs no privilege, only the fd.
            guard let buffer = held[id(1)] else { throw DmaBufClientError(local: "no buffer \(id(1)) held") }
            try buffer.buffer.setName(hexDecode(arg(2)))
            return "renamed"
        case "release":
            try main.release(id(1))
            return "released"
        case "drop":
            held[id(1)] = nil
            memfds[id(1)] = nil
            return "dropped"
        case "info":
            // The raw reply: whether a buffer fd came with it.
            let (response, received) = try main.call(.info(id(1)))
            guard case .buffer(let info) = response else { return "other 0" }
            return "revoked=\(info.revoked) fds=\(received.count) refs=\(info.externalReferences)"
        case "stats":
            let stats = try main.stats()
            return "uids=" + stats.clients.map { String($0.uid) }.joined(separator: ",")
        case "share":
            _ = try main.share(id(1), uid: UInt32(arg(2)))
            return "shared"
        case "fetch":
            let buffer = try main.fetch(id(1))
            held[buffer.info.id] = buffer
            return "\(try buffer.buffer.inode())"
        case "layout":
            let layout = try main.layout(id(1), physical: arg(2) == "physical")
            return "\(layout.lease) \(layout.runs.count)"
        case "revoke":
            try main.revoke(id(1))
            return "revoked"
        case "ranges":
            return try udmabufFromMemfd(memfdSize: n(1), ranges: Array(words.dropFirst(2)))
        case "punch":
            return try punch(id(1), offset: n(2), length: n(3))
        case "flood":
            return try flood(arg(1), id(2), n(3), fence: fds.first)
        case "connections":
            return try connections(path: arg(1), max: n(2), hello: arg(3) != "raw")
        case "unflood":
            let count = extra.count + raw.count
            extra.removeAll()
            raw.removeAll()
            return "\(count)"
        case "stop-reading":
            return try stopReading(max: n(1), buffer: id(2))
        case "linger":
            return try lingeringSocket()
        case "unlinger":
            keep.removeAll()
            return "released"
        case "send-pipes":
            return try sendPipes(n(1))
        case "import-pipe":
            // One request with an fd of a kind the daemon cannot close without blocking: its answer.
            let pipe = try pipeReadEnd()
            _ = try main.call(.importBuffer(tag: "pipe"), fds: [pipe.descriptor])
            return "accepted"
        default:
            throw DmaBufClientError(local: "unknown command \(words[0])")
        }
    }

    /// `ranges MEMFDSIZE OFFSET:SIZE...`: a udmabuf from this client's own memfd, with ranges as given
    /// (any 64-bit values: the daemon must refuse what does not fit, not trap).
    mutating func udmabufFromMemfd(memfdSize: Int, ranges: [String]) throws -> String {
        let memfd = try Memfd(name: "hostile", size: memfdSize)
        let list = ranges.map { piece -> ByteRange in
            let parts = piece.split(separator: ":")
            return ByteRange(offset: UInt64(parts[0]) ?? 0, size: UInt64(parts[1]) ?? 0)
        }
        let buffer = try main.createUDmabuf(memfd: memfd, ranges: list, tag: "hostile")
        held[buffer.info.id] = buffer
        memfds[buffer.info.id] = memfd
        return "\(buffer.info.id)"
    }

    /// Punches a hole in the memfd behind one of this client's udmabufs (MADV_REMOVE on a mapping is
    /// fallocate(PUNCH_HOLE) for shmem): the pages udmabuf pinned stay, the memfd's page cache changes.
    func punch(_ buffer: BufferID, offset: Int, length: Int) throws -> String {
        guard let memfd = memfds[buffer] else { throw DmaBufClientError(local: "no memfd for \(buffer)") }
        let mapping = try memfd.map(offset: offset, length: length)
        guard madvise(mapping.base, length, MADV_REMOVE) == 0 else { throw DmaBufError("memfd", Errno(rawValue: errno), "MADV_REMOVE failed") }
        return "punched"
    }

    /// Repeats one cheap request that makes the daemon keep something, until the first refusal or `max`.
    /// Returns `ACCEPTED ERRNO` (`none` when nothing was refused).
    mutating func flood(_ kind: String, _ buffer: BufferID, _ max: Int, fence: SharedFD?) throws -> String {
        let connection = try main
        for i in 0..<max {
            do {
                switch kind {
                case "tokens": _ = try connection.share(buffer, oneTimeToken: true)
                case "leases": _ = try connection.layout(buffer)
                case "shares": _ = try connection.share(buffer, uid: UInt32(100_000 + i))
                case "fences":
                    guard let fence else { throw DmaBufClientError(local: "no fence sent") }
                    try connection.attachFence(SyncFile(shared: fence), buffer: buffer, access: .write)
                default: throw DmaBufClientError(local: "unknown flood \(kind)")
                }
            } catch let error as DmaBufClientError where error.wire != nil {
                return "\(i) \(error.errno?.name ?? "EIO") \(error.description)"
            }
        }
        return "\(max) none"
    }

    /// Opens connections until the daemon refuses or closes one, or `max`; keeps them all open.
    /// Raw ones send nothing at all (no hello).
    mutating func connections(path: String, max: Int, hello: Bool) throws -> String {
        for i in 0..<max {
            do {
                if hello {
                    extra.append(try DmaBufConnection(path: path, clientName: "flood"))
                } else {
                    raw.append(try nonBlockingConnect(path))
                }
            } catch let error as DmaBufClientError {
                return "\(i) \(error.errno?.name ?? "closed") \(error.description)"
            } catch let error as DmaBufError {
                return "\(i) \(error.errno?.name ?? "EIO") \(error.description)"
            }
        }
        return "\(max) none"
    }

    /// Sends requests on the main connection (the one holding any lease) and never reads a reply:
    /// `info` of a held buffer (a reply that carries the buffer's fd) and `list`. When the socket is
    /// full it waits up to 2 s for room; it stops when none comes (the daemon stopped reading: back-
    /// pressure), when the daemon closes the connection, or after `max` requests. `max` 0 means "just
    /// enough to fill today's main to its outbox limit": 1024 queued replies plus the
    /// net.unix.max_dgram_qlen + 1 the kernel queues in the socket itself.
    mutating func stopReading(max: Int, buffer: BufferID) throws -> String {
        let connection = try main
        let qlen = Harness.readNumber("/proc/sys/net/unix/max_dgram_qlen") ?? 10
        let limit = max > 0 ? max : 1024 + qlen + 1
        let fd = connection.socket.descriptor
        var sent = 0
        var ending = "limit"
        while sent < limit {
            let request: Request = sent % 2 == 0 ? .info(buffer) : .list(all: false)
            let bytes = WireMessage.encode(request, requestID: UInt32(sent + 1000), version: connection.server.version)
            do {
                _ = try UnixSocket.send(fd, bytes: bytes, flags: CInt(MSG_DONTWAIT))
                sent += 1
            } catch let error as DmaBufError where error.errno == .resourceTemporarilyUnavailable || error.errno == .wouldBlock {
                var p = [pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)]
                if poll(&p, 1, 2000) <= 0 {
                    ending = "stalled"
                    break
                }
            } catch {
                ending = "closed"
                break
            }
        }
        return "\(sent) \(ending)"
    }

    func peerPath() throws -> String {
        // The daemon's socket path, from the main connection's peer name.
        var address = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let fd = try main.socket.descriptor.rawValue
        let rc = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
        }
        guard rc == 0 else { throw DmaBufError("socket", Errno(rawValue: errno), "getpeername failed") }
        return withUnsafeBytes(of: address.sun_path) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
    }

    /// A TCP socket over 127.0.0.1 whose close() blocks: SO_LINGER 120 s and a full send queue towards a
    /// peer that never reads. Sent to the daemon (as an import, which it must refuse), then this
    /// client's copy is closed, so the daemon's close is the last one. The peer is kept until `unlinger`.
    mutating func lingeringSocket() throws -> String {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard listener >= 0 else { throw DmaBufError("tcp", Errno(rawValue: errno), "socket failed") }
        let listenFD = SharedFD(adopting: listener)
        var small: CInt = 4096
        _ = setsockopt(listener, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<CInt>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr = in_addr(s_addr: UInt32(0x7f00_0001).bigEndian)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) == 0 && getsockname(listener, $0, &length) == 0 }
        }
        guard bound, listen(listener, 1) == 0 else { throw DmaBufError("tcp", Errno(rawValue: errno), "bind/listen on 127.0.0.1 failed (is lo up?)") }
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        let clientFD = SharedFD(adopting: client)
        _ = setsockopt(client, SOL_SOCKET, SO_SNDBUF, &small, socklen_t(MemoryLayout<CInt>.size))
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(client, $0, length) == 0 }
        }
        guard connected else { throw DmaBufError("tcp", Errno(rawValue: errno), "connect to 127.0.0.1 failed") }
        let peer = accept(listener, nil, nil)
        guard peer >= 0 else { throw DmaBufError("tcp", Errno(rawValue: errno), "accept failed") }
        keep.append(SharedFD(adopting: peer))
        _ = listenFD
        // Fill the send queue: the peer never reads.
        let chunk = [UInt8](repeating: 0x55, count: 4096)
        var queued = 0
        while queued < 64 << 20 {
            let n = chunk.withUnsafeBytes { send(client, $0.baseAddress, $0.count, CInt(MSG_DONTWAIT)) }
            if n <= 0 { break }
            queued += n
        }
        var lingering = linger(l_onoff: 1, l_linger: 120)
        guard setsockopt(client, SOL_SOCKET, SO_LINGER, &lingering, socklen_t(MemoryLayout<linger>.size)) == 0 else {
            throw DmaBufError("tcp", Errno(rawValue: errno), "SO_LINGER failed")
        }
        // Sent without waiting for the answer: on today's main the daemon's loop blocks in close().
        let bytes = WireMessage.encode(.importBuffer(tag: "linger"), requestID: 7, descriptors: 1, version: try main.server.version)
        _ = try UnixSocket.send(try main.socket.descriptor, bytes: bytes, fds: [clientFD.descriptor])
        return "\(queued)"
    }
}

extension Attacker {
    /// `send-pipes N`: up to N imports, each carrying a pipe (closed on a closer thread), without waiting
    /// for their answers; a full socket is waited on for up to a second, then the sending stops. On a
    /// daemon with one closer thread and a shared queue, a close that blocks makes these fill that
    /// queue, and then no client at all is read; with per-uid closing, this uid alone stops being read.
    mutating func sendPipes(_ count: Int) throws -> String {
        let socket = try main.socket.descriptor
        let version = try main.server.version
        var sent = 0
        var stopped = "full"
        for i in 0..<count {
            guard let pipe = try? pipeReadEnd() else { stopped = "EMFILE"; break }
            let bytes = WireMessage.encode(.importBuffer(tag: "pipe"), requestID: UInt32(1000 + i), descriptors: 1, version: version)
            var done = false
            for _ in 0..<2 where !done {
                do {
                    try UnixSocket.send(socket, bytes: bytes, fds: [pipe.descriptor], flags: CInt(MSG_DONTWAIT))
                    done = true
                } catch let error as DmaBufError where error.errno == .wouldBlock || error.errno == .resourceTemporarilyUnavailable {
                    var p = pollfd(fd: socket.rawValue, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&p, 1, 1000)
                } catch let error as DmaBufError {
                    stopped = error.errno?.name ?? "EIO"
                    break
                }
            }
            guard done else { break }
            sent += 1
        }
        return "\(sent) \(stopped)"
    }
}

/// A pipe's read end, its write end closed.
func pipeReadEnd() throws -> SharedFD {
    var ends: [CInt] = [0, 0]
    guard pipe(&ends) == 0 else { throw DmaBufError("pipe", Errno(rawValue: errno), "pipe failed") }
    _ = close(ends[1])
    return SharedFD(adopting: ends[0])
}

/// The test side of a `hostile-agent` child.
final class HostileAgent {
    let channel: Channel
    let pid: pid_t
    private var ended = false

    init(uid: UInt32 = 65534, connectTo path: String? = nil) throws {
        let (mine, theirs) = try UnixSocket.pair(.seqpacket)
        pid = try Harness.child("hostile-agent", [String(uid)], fds: [theirs.descriptor])
        channel = Channel(socket: mine)
        if let path { try ok("connect \(path)") }
    }

    /// Sends a command and returns the whole reply line (`ok ...` or `err ERRNO ...`).
    func ask(_ command: String, fds: [FileDescriptor] = [], timeout: Duration = .seconds(300)) throws -> String {
        try channel.send(command, fds: fds)
        return try channel.receive(timeout: timeout).text
    }

    /// The reply's words after `ok`; throws the child's `err` line.
    @discardableResult
    func ok(_ command: String, fds: [FileDescriptor] = [], timeout: Duration = .seconds(300)) throws -> [String] {
        let reply = try ask(command, fds: fds, timeout: timeout)
        guard reply.hasPrefix("ok") else { throw TestFailure(description: "attacker '\(command.prefix(80))': \(reply)") }
        return reply.split(separator: " ").dropFirst().map(String.init)
    }

    /// Ends the child and waits for it, so everything it held is closed.
    func end() {
        guard !ended else { return }
        ended = true
        try? channel.send("exit")
        kill(pid, SIGKILL)
        _ = Harness.wait(pid)
    }

    deinit { end() }
}

/// connect(2) without blocking: a daemon that stops accepting fills its backlog, and a blocking
/// connect would then wait forever.
func nonBlockingConnect(_ path: String) throws -> SharedFD {
    let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw DmaBufError("socket", Errno(rawValue: errno), "socket failed") }
    let owned = SharedFD(adopting: fd)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, byte) in path.utf8.prefix(raw.count - 1).enumerated() { raw[i] = byte }
    }
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard rc == 0 else { throw DmaBufError("socket", Errno(rawValue: errno), "connect to \(path) failed") }
    return owned
}
