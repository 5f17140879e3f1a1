import CSystemd

#if canImport(Glibc)
import Glibc
#endif

/// The parts of libsystemd dmabufd uses: readiness and watchdog notification, socket activation and the
/// fd store. Every call is a no-op when the daemon was not started by systemd.
public enum Systemd {
    /// True when `NOTIFY_SOCKET` is set.
    public static var isSupervised: Bool { getenv("NOTIFY_SOCKET") != nil }

    /// `sd_notify(0, state)`: `READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`.
    public static func notify(_ state: String) {
        _ = sd_notify(0, state)
    }

    /// The watchdog interval systemd expects pings within, if it set one (`sd_watchdog_enabled`).
    public static func watchdogInterval() -> Duration? {
        var usec: UInt64 = 0
        guard sd_watchdog_enabled(0, &usec) > 0, usec > 0 else { return nil }
        return .microseconds(Int64(usec))
    }

    /// Descriptors handed over by systemd (listening sockets and fd-store entries) with their names
    /// (`sd_listen_fds_with_names`). The daemon owns them now. The LISTEN_* variables stay set: unsetting
    /// them (`unset_environment` 1) would call unsetenv(3) while the runtime's other threads already run,
    /// and glibc's environment is not safe to change under them. They name this process's pid, so a child
    /// that inherits them ignores them.
    public static func listenFDs() -> [(fd: CInt, name: String)] {
        var names: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = nil
        let n = sd_listen_fds_with_names(0, &names)
        guard n > 0 else { return [] }
        var result: [(CInt, String)] = []
        for i in 0..<Int(n) {
            let name = names?[i].flatMap { String(validatingCString: $0) } ?? ""
            result.append((SD_LISTEN_FDS_START + CInt(i), name))
            free(names?[i])
        }
        free(names)
        return result
    }

    /// Puts `fd` in systemd's fd store under `name` (`FDSTORE=1`, `FDNAME=`); systemd dups it.
    @discardableResult
    public static func storeFD(_ fd: CInt, name: String) -> Bool {
        var fds = [fd]
        return sd_pid_notify_with_fds(0, 0, "FDSTORE=1\nFDNAME=\(name)", &fds, 1) > 0
    }

    /// Removes entries named `name` from the fd store (`FDSTOREREMOVE=1`).
    public static func removeStoredFD(name: String) {
        _ = sd_notify(0, "FDSTOREREMOVE=1\nFDNAME=\(name)")
    }

    /// True when `fd` is a listening Unix socket of `type` (`sd_is_socket_unix`).
    public static func isUnixListener(_ fd: CInt) -> Bool {
        sd_is_socket_unix(fd, 0, 1, nil, 0) > 0
    }
}
