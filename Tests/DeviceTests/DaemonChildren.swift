import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Child processes that act as dmabufd clients. fd 3 is a socketpair back to the test.
enum DaemonChildren {
    static func run(role: String, arguments: [String]) -> Int32 {
        let channel = Channel(socket: SharedFD(adopting: 3))
        do {
            switch role {
            case "daemon-agent":
                return try agent(channel: channel, uid: arguments.first.flatMap { UInt32($0) })
            case "daemon-hold-and-die":
                // Allocates N buffers, reports their ids, then waits to be killed.
                let connection = try DmaBufConnection(path: arguments[0], clientName: "hold-and-die")
                let count = Int(arguments[1]) ?? 1
                var ids: [String] = []
                var keep: [RemoteBuffer] = []
                for i in 0..<count {
                    let buffer = try connection.allocate(size: 1 << 20, heap: "system", tag: "victim\(i)")
                    ids.append(String(buffer.info.id))
                    keep.append(buffer)
                }
                try channel.send("ready " + ids.joined(separator: " "))
                while true { pause() }
            case "daemon-die-mid-request":
                // Sends an allocation and dies before reading the reply.
                let connection = try DmaBufConnection(path: arguments[0], clientName: "mid-request")
                let bytes = WireMessage.encode(.allocate(AllocateRequest(size: 1 << 20, heap: "system", tag: "mid")), requestID: 99, version: connection.version)
                try UnixSocket.send(connection.socket.descriptor, bytes: bytes)
                raise(SIGKILL)
                return 1
            case "daemon-lease-fence-die":
                // Gets a sync_file from the test, takes a lease, attaches the fence to a range, reports, waits to die.
                let (_, fds) = try channel.receive()
                guard let fd = fds.first else { return 2 }
                let connection = try DmaBufConnection(path: arguments[0], clientName: "lease-fence-die")
                let buffer = try connection.allocate(size: 1 << 20, heap: "system", tag: "dies")
                let layout = try connection.layout(buffer.info.id)
                try connection.attachFence(SyncFile(shared: fd), buffer: buffer.info.id, firstPage: 0, pageCount: 16, access: .write)
                try channel.send("ready \(buffer.info.id) \(layout.lease)")
                while true { pause() }
            default:
                Harness.warn("unknown child role \(role)")
                return 64
            }
        } catch {
            Harness.warn("child \(role): \(error)")
            try? channel.send("err EIO \(error)")
            return 1
        }
    }

    /// Serves commands from the test, one per message, answering `ok ...` or `err ERRNO message`.
    /// With a uid, drops to it (and its gid) first: an unprivileged client.
    static func agent(channel: Channel, uid: UInt32?) throws -> Int32 {
        if let uid {
            guard setgroups(0, nil) == 0, setgid(uid) == 0, setuid(uid) == 0 else {
                try channel.send("err EPERM cannot drop to uid \(uid)")
                return 2
            }
        }
        var connection: DmaBufConnection?
        var held: [BufferID: RemoteBuffer] = [:]
        while true {
            let (text, fds) = try channel.receive(timeout: .seconds(120))
            if text.isEmpty { return 0 }
            let words = text.split(separator: " ").map(String.init)
            do {
                switch words[0] {
                case "connect":
                    connection = try DmaBufConnection(path: words[1], clientName: "agent")
                    try channel.send("ok \(connection!.server.uid)")
                case "alloc":
                    let buffer = try connection!.allocate(size: Int(words[1])!, heap: words.count > 2 ? words[2] : "system", tag: "agent")
                    held[buffer.info.id] = buffer
                    try channel.send("ok \(buffer.info.id) \(try buffer.buffer.inode())")
                case "fetch":
                    let buffer = try connection!.fetch(BufferID(words[1])!, token: words.count > 2 ? UInt64(words[2])! : 0)
                    held[buffer.info.id] = buffer
                    var sum: UInt64 = 0
                    try buffer.buffer.withMappedCPUAccess(.read) { for b in $0 { sum &+= UInt64(b) } }
                    try channel.send("ok \(try buffer.buffer.inode()) \(sum)")
                case "list-all":
                    try channel.send("ok \(try connection!.list(all: true).count)")
                case "layout":
                    let layout = try connection!.layout(BufferID(words[1])!, physical: words.count > 2 && words[2] == "physical")
                    try channel.send("ok \(layout.lease) \(layout.runs.count)")
                case "release":
                    let id = BufferID(words[1])!
                    try connection!.release(id)
                    held[id] = nil
                    try channel.send("ok")
                case "revoke":
                    try connection!.revoke(BufferID(words[1])!)
                    try channel.send("ok")
                case "import":
                    let info = try connection!.importBuffer(DmaBuffer(shared: fds[0]), tag: "agent")
                    try channel.send("ok \(info.id)")
                case "exit":
                    try channel.send("ok")
                    return 0
                default:
                    try channel.send("err EINVAL unknown command \(words[0])")
                }
            } catch let error as DmaBufClientError {
                try channel.send("err \(error.errno?.name ?? "EIO") \(error.description)")
            } catch {
                try channel.send("err EIO \(error)")
            }
        }
    }
}

/// The test side of a `daemon-agent` child.
final class Agent {
    let channel: Channel
    let pid: pid_t

    init(uid: UInt32? = nil) throws {
        let (mine, theirs) = try UnixSocket.pair(.seqpacket)
        pid = try Harness.child("daemon-agent", uid.map { [String($0)] } ?? [], fds: [theirs.descriptor])
        channel = Channel(socket: mine)
    }

    /// Sends a command and returns the reply's words after `ok`; throws the child's `err` line.
    @discardableResult
    func ok(_ command: String, fds: [FileDescriptor] = []) throws -> [String] {
        try channel.send(command, fds: fds)
        let reply = try channel.receive().text
        guard reply.hasPrefix("ok") else { throw TestFailure(description: "agent '\(command)': \(reply)") }
        return reply.split(separator: " ").dropFirst().map(String.init)
    }

    /// Sends a command that must be refused with `errno`; returns the message.
    @discardableResult
    func refused(_ command: String, _ errno: String, _ parts: String...) throws -> String {
        try channel.send(command)
        let reply = try channel.receive().text
        guard reply.hasPrefix("err \(errno) ") else { throw TestFailure(description: "agent '\(command)': expected err \(errno), got: \(reply)") }
        for part in parts where !reply.contains(part) { throw TestFailure(description: "agent '\(command)': reply lacks '\(part)': \(reply)") }
        return reply
    }

    deinit {
        try? channel.send("exit")
        kill(pid, SIGKILL)
        _ = Harness.wait(pid)
    }
}
