import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Roles for child processes. Each gets its inherited descriptors at 3, 4, ... and returns an exit code.
enum Children {
    static func run(role: String, arguments: [String]) -> Int32 {
        do {
            switch role {
            case "echo-inode":
                // Receives one dma-buf on fd 3 (a socket) and sends back its inode as text.
                let socket = FileDescriptor(rawValue: 3)
                let message = try UnixSocket.receive(socket, maxBytes: 64, maxFDs: 4)
                guard let fd = message.fds.first else { return 2 }
                let buffer = try DmaBuffer(checking: fd)
                try UnixSocket.send(socket, bytes: Array(String(try buffer.inode()).utf8))
                return 0
            case "fill":
                // Receives one dma-buf on fd 3, fills it with the byte given as the argument under a WRITE
                // bracket, and answers "filled".
                let socket = FileDescriptor(rawValue: 3)
                guard let byte = arguments.first.flatMap({ UInt8($0) }) else { return 2 }
                let message = try UnixSocket.receive(socket, maxBytes: 64, maxFDs: 1)
                guard let fd = message.fds.first else { return 2 }
                let buffer = try DmaBuffer(checking: fd)
                try buffer.withMappedCPUAccess(.write) { _ = memset($0.baseAddress!, Int32(byte), $0.count) }
                try UnixSocket.send(socket, bytes: Array("filled".utf8))
                return 0
            case "hold":
                // Receives one dma-buf on fd 3, answers "held", and keeps it until the parent closes the socket.
                let socket = FileDescriptor(rawValue: 3)
                let message = try UnixSocket.receive(socket, maxBytes: 64, maxFDs: 1)
                guard message.fds.count == 1 else { return 2 }
                try UnixSocket.send(socket, bytes: Array("held".utf8))
                while !(try UnixSocket.receive(socket, maxBytes: 64, maxFDs: 1)).isEndOfStream {}
                return 0
            case "pagemap-unprivileged":
                // Run without CAP_SYS_ADMIN (setpriv): pagemap hides PFNs, which PageRuns must report as EPERM.
                guard geteuid() != 0 else {
                    Harness.warn("pagemap-unprivileged: still root")
                    return 3
                }
                let memfd = try Memfd(name: "unprivileged", size: 4 * pageSize)
                let mapping = try memfd.map(length: 4 * pageSize)
                do {
                    let runs = try PageRuns(physicalPagesOf: UnsafeRawBufferPointer(mapping.bytes))
                    Harness.warn("pagemap-unprivileged: PFNs visible without CAP_SYS_ADMIN: \(runs.runs)")
                    return 4
                } catch let error as DmaBufError {
                    guard error.errno == .notPermitted, error.description.contains("physical addresses are hidden"),
                        error.description.contains("CAP_SYS_ADMIN")
                    else {
                        Harness.warn("pagemap-unprivileged: wrong error: \(error)")
                        return 5
                    }
                    return 0
                }
            default:
                Harness.warn("unknown child role \(role)")
                return 64
            }
        } catch {
            Harness.warn("child \(role): \(error)")
            return 1
        }
    }
}
