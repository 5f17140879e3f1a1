import ArgumentParser
import CDmabufdStart
import DmaBuf
import DmaBufDaemon
import Logging
import ServiceLifecycle
import SystemPackage
import UnixSignals

#if canImport(Glibc)
import Glibc
#endif

/// dmabufd: the privileged dma-buf broker. Thin: parses options and config, then runs the services.
@main
struct DmabufdCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dmabufd",
        abstract: "Broker dma-buf heaps and udmabuf to unprivileged clients over a Unix socket.",
        discussion: """
            Reads its configuration from --config (default /etc/dmabufd/dmabufd.conf; a missing default file \
            means built-in defaults). Listens on the socket systemd passes (socket activation) or binds the \
            configured path. Stops gracefully on SIGTERM or SIGINT.

            Examples:
              dmabufd --config /etc/dmabufd/dmabufd.conf
              dmabufd --socket /tmp/dmabufd.sock --log-level debug
              dmabufd --check-config --config ./dmabufd.conf
            """)

    @Option(help: "Configuration file.")
    var config: String?

    @Option(help: "Listen here instead of the configured socket path.")
    var socket: String?

    @Option(help: "trace, debug, info, notice, warning, error or critical (overrides log_level).")
    var logLevel: String?

    @Flag(help: "Validate the configuration, print it, and exit.")
    var checkConfig = false

    func run() async throws {
        var settings = DaemonConfig()
        let path = config ?? "/etc/dmabufd/dmabufd.conf"
        if let text = Self.readFile(path) {
            do {
                settings = try DaemonConfig(parsing: text)
            } catch {
                throw ValidationError("\(path): \(error)")
            }
        } else if config != nil {
            throw ValidationError("cannot read configuration file \(path)")
        }
        if let socket { settings.socketPath = socket }
        if let logLevel { settings.logLevel = logLevel }
        guard let level = Logger.Level(rawValue: settings.logLevel) else {
            throw ValidationError("unknown log level '\(settings.logLevel)'")
        }
        // A client that vanishes mid-reply must cost an EPIPE, never the daemon. SIGHUP is ignored until
        // the reload service traps it, so an early one cannot kill a daemon that is already listening.
        signal(SIGPIPE, SIG_IGN)
        signal(SIGHUP, SIG_IGN)
        // Every buffer the daemon holds is an open fd: use all the descriptors the hard limit allows.
        var limit = rlimit()
        if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        }
        if checkConfig {
            print("configuration ok: socket \(settings.socketPath), max_buffer_size \(settings.maxBufferSize), policies \(settings.policies.keys.sorted())")
            return
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "dmabufd")
        adoptStartUpPrivileges(logger)
        // Trap SIGHUP before listening: once a client can connect, a reload request must be honoured.
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let broker = try BrokerService(config: settings, logger: logger)
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [
            .init(service: broker),
            .init(service: ReloadService(path: path, socketOverride: socket, signals: hangups, broker: broker, logger: logger), successTerminationBehavior: .ignore),
        ]
        if let interval = Systemd.watchdogInterval() {
            services.append(.init(service: broker.watchdog(interval: interval), successTerminationBehavior: .ignore))
        }
        let group = ServiceGroup(configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }

    static func readFile(_ path: String) -> String? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n == 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Re-reads the configuration on SIGHUP and hands it to the broker. A bad file is logged and ignored:
/// the running configuration stays.
struct ReloadService: Service {
    let path: String
    let socketOverride: String?
    let signals: UnixSignalsSequence
    let broker: BrokerService
    let logger: Logger

    func run() async throws {
        for await _ in signals.cancelOnGracefulShutdown() {
            guard let text = DmabufdCommand.readFile(path) else {
                logger.error("reload: cannot read \(path); keeping the running configuration")
                continue
            }
            do {
                var config = try DaemonConfig(parsing: text)
                if let socketOverride { config.socketPath = socketOverride }
                broker.reload(config)
            } catch {
                logger.error("reload: \(path): \(error); keeping the running configuration")
            }
        }
    }
}

/// Takes over what the start-up constructor (CDmabufdStart) did before main(): the pagemap descriptor
/// it opened while privileged, and whether it could drop every capability. dmabufd serves untrusted
/// clients with no capability at all; PFNs stay readable through that early descriptor.
func adoptStartUpPrivileges(_ logger: Logger) {
    Pagemap.adopt(CDmabufdStart_pagemap_fd())
    if CDmabufdStart_pagemap_fd() < 0 {
        logger.notice("cannot open /proc/self/pagemap: physical layouts will fail",
                      metadata: ["errno": "\(Errno(rawValue: CDmabufdStart_pagemap_errno()).name)"])
    }
    let dropped = CDmabufdStart_capabilities_errno()
    if dropped != 0 {
        logger.warning("could not drop capabilities", metadata: ["errno": "\(Errno(rawValue: dropped).name)"])
    }
}
