import DmaBufClient
import DmaBufWire

#if canImport(Glibc)
import Glibc
#endif

/// Why `alloc --hold` stopped holding.
public enum HoldEnd: Sendable, Equatable {
    /// SIGINT, SIGTERM or SIGHUP.
    case signal(Int32)
    /// Standard input reached its end.
    case endOfInput
    /// The daemon freed the buffer (it was revoked).
    case freed
}

/// True when `fd` is something whose end means "stop": a terminal, a pipe or a socket. A regular file or
/// `/dev/null` (what a background job or a service gets) is not watched, or the hold would end at once.
func isWatchableInput(_ fd: CInt) -> Bool {
    if isatty(fd) == 1 { return true }
    var st = stat()
    guard fstat(fd, &st) == 0 else { return false }
    let type = st.st_mode & S_IFMT
    return type == S_IFIFO || type == S_IFSOCK
}

/// Keeps the connection (and with it `buffer`) until a signal, the end of `input`, or the daemon freeing it.
///
/// SIGINT, SIGTERM and SIGHUP are blocked and collected with `sigtimedwait` between polls, so the
/// connection is closed in an orderly way rather than by the default action. Daemon events are printed to
/// stderr as they come.
/// - Throws: ``DmaBufClientError`` when the daemon goes away.
func holdBuffer(_ buffer: BufferID, connection: DmaBufConnection, input: CInt = 0) throws -> HoldEnd {
    var signals = sigset_t()
    sigemptyset(&signals)
    for number in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&signals, number) }
    var previous = sigset_t()
    pthread_sigmask(SIG_BLOCK, &signals, &previous)
    defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }

    var watchInput = isWatchableInput(input)
    var scratch = [UInt8](repeating: 0, count: 4096)
    while true {
        var zero = timespec(tv_sec: 0, tv_nsec: 0)
        let number = sigtimedwait(&signals, nil, &zero)
        if number > 0 { return .signal(number) }

        var fds = [pollfd(fd: connection.socket.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
        if watchInput { fds.append(pollfd(fd: input, events: Int16(POLLIN), revents: 0)) }
        let ready = poll(&fds, nfds_t(fds.count), 100)
        if ready <= 0 { continue }
        if fds[0].revents != 0 {
            // Reads one event (or throws when the daemon closed the connection).
            if let event = try connection.nextEvent(timeout: .milliseconds(50)) {
                Console.current.err("dmabufd: \(describe(event: event))")
                if case .bufferFreed(let id) = event, id == buffer { return .freed }
            }
        }
        if watchInput, fds.count > 1, fds[1].revents != 0 {
            let n = scratch.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
            if n == 0 { return .endOfInput }
            if n < 0 && errno != EINTR && errno != EAGAIN { watchInput = false }
        }
    }
}

/// An event for people: `lease 3 on buffer 7 revoked, 2 s to release`.
public func describe(event: Response) -> String {
    switch event {
    case .leaseRevoked(let lease, let buffer, let deadline):
        "lease \(lease) on buffer \(buffer) revoked, \(human(milliseconds: UInt64(deadline))) to release"
    case .leaseEnded(let lease, let buffer): "lease \(lease) on buffer \(buffer) ended"
    case .bufferFreed(let buffer): "buffer \(buffer) freed"
    case .fenceSignaled(let buffer): "fences on buffer \(buffer) signalled"
    default: "\(event)"
    }
}
