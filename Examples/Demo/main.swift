// dmabuf-demo: client A allocates 1 MiB from `system`, writes a pattern and shares it with a one-time
// token; client B — a second process — fetches it and checks it sees the same inode and the same bytes.
//
//   dmabuf-demo [--socket PATH]
import DmaBuf
import DmaBufClient
import DmaBufWire

#if canImport(Glibc)
import Glibc
#endif

/// Writes straight to fd 1: the VM's stdout is fully buffered and B's lines must not be lost or reordered.
func say(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
}

func fail(_ line: String) -> Never {
    let bytes = Array("demo: \(line)\n".utf8)
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    exit(1)
}

func pattern(_ i: Int) -> UInt8 { UInt8(truncatingIfNeeded: i &* 31 &+ 7) }

var arguments = Array(CommandLine.arguments.dropFirst())
var socket = DmaBufConnection.defaultSocketPath
if let i = arguments.firstIndex(of: "--socket"), i + 1 < arguments.count {
    socket = arguments[i + 1]
    arguments.removeSubrange(i...i + 1)
}

if arguments.first == "--client-b" {
    // Client B: fetch by id and token, compare inode and bytes, release.
    let id = BufferID(arguments[1])!, token = UInt64(arguments[2])!, inode = UInt64(arguments[3])!
    do {
        let b = try DmaBufConnection(path: socket, clientName: "demo-b")
        let fetched = try b.fetch(id, token: token)
        let sameInode = try fetched.buffer.inode() == inode
        var mismatches = 0
        try fetched.buffer.withMappedCPUAccess(.read) { bytes in
            for i in 0..<bytes.count where bytes[i] != pattern(i) { mismatches += 1 }
        }
        say("B (pid \(getpid())): fetched buffer \(id): inode \(try fetched.buffer.inode()) \(sameInode ? "== A's" : "!= A's"), \(mismatches == 0 ? "all \(fetched.info.size) bytes match" : "\(mismatches) bytes differ")")
        try b.release(id)
        say("B: released")
        exit(sameInode && mismatches == 0 ? 0 : 1)
    } catch {
        fail("client B: \(error)")
    }
}

do {
    let a = try DmaBufConnection(path: socket, clientName: "demo-a")
    say("A (pid \(getpid())): connected to dmabufd (protocol v\(a.server.version)) as uid \(a.server.uid)")
    let buffer = try a.allocate(size: 1 << 20, heap: "system", tag: "demo")
    try buffer.buffer.withMappedCPUAccess(.write) { bytes in
        for i in 0..<bytes.count { bytes[i] = pattern(i) }
    }
    let inode = try buffer.buffer.inode()
    say("A: allocated buffer \(buffer.info.id): \(ByteCount(Int(buffer.info.size))) from '\(buffer.info.heap)', inode \(inode), named '\(buffer.info.name)', pattern written")
    let token = try a.share(buffer.info.id, oneTimeToken: true)!
    say("A: shared it with a one-time token")
    var pid: pid_t = 0
    let argv = [CommandLine.arguments[0], "--socket", socket, "--client-b", String(buffer.info.id), String(token), String(inode)]
    let cArgs = argv.map { strdup($0) } + [nil]
    guard posix_spawn(&pid, argv[0], nil, nil, cArgs, environ) == 0 else { fail("cannot start client B") }
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    try a.release(buffer.info.id)
    say("A: released")
    let ok = status == 0
    say(ok ? "demo: ok — both clients saw the same buffer" : "demo: FAILED")
    exit(ok ? 0 : 1)
} catch {
    fail("client A: \(error)")
}
