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
