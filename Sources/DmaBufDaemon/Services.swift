import DmaBuf
import Logging
import ServiceLifecycle

/// Runs the broker's event loop on its own thread for the life of the service. Graceful shutdown
/// (SIGTERM/SIGINT through the ServiceGroup) asks the broker to stop accepting and wind down its leases;
/// the service returns once it has.
public struct BrokerService: Service {
    public let broker: Broker
    let loop: EventLoop

    /// Creates the loop and broker and starts listening (socket from systemd, or bound from config).
    public init(config: DaemonConfig, logger: Logger) throws {
        let loop = try EventLoop()
        self.loop = loop
        self.broker = Broker(config: config, loop: loop, logger: logger)
        broker.onStopped = { loop.stop() }
        try broker.start(inherited: Systemd.listenFDs())
    }

    public func run() async throws {
        let broker = self.broker
        let loop = self.loop
        await withGracefulShutdownHandler {
            await loop.runOnThread()
        } onGracefulShutdown: {
            loop.execute { broker.beginShutdown() }
        }
    }

    /// Applies `config` on the loop thread (after SIGHUP).
    public func reload(_ config: DaemonConfig) {
        let broker = self.broker
        loop.execute { broker.reload(config) }
    }

    /// A watchdog that pings through this broker's loop.
    public func watchdog(interval: Duration) -> WatchdogService {
        WatchdogService(interval: interval, loop: loop, broker: broker)
    }
}

/// Pings systemd's watchdog at half its interval, by queueing the ping on the broker's event loop: if the
/// loop hangs, pings stop and systemd restarts the daemon.
public struct WatchdogService: Service {
    let interval: Duration
    let loop: EventLoop
    let broker: Broker

    public func run() async throws {
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            let broker = self.broker
            loop.execute { broker.pingWatchdog() }
            try? await Task.sleep(for: interval / 2)
        }
    }
}
