import CUdev
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Hotplug events for heaps and DRM devices through libudev, from the kernel's own uevents.
///
/// Why the `kernel` source and not udevd's: udevd multicasts from the host's network namespace, so a
/// daemon hardened with `PrivateNetwork=yes` would never hear it, whereas the kernel broadcasts uevents
/// to every network namespace of the initial user namespace. dmabufd only needs to know that a heap or
/// DRM node came or went (devtmpfs has made the node by then), not udev's rules or symlinks.
public final class UdevMonitor {
    private let udev: OpaquePointer
    private let monitor: OpaquePointer
    /// The monitor's socket, to register in the event loop. Owned by the monitor.
    public let descriptor: FileDescriptor
    /// `udev` or `kernel`: which netlink source is used.
    public let source: String

    public struct Event: Sendable {
        public var action: String
        public var subsystem: String
        public var devnode: String?
        public var sysname: String
    }

    public init?(subsystems: [String] = ["dma_heap", "drm", "misc"]) {
        guard let udev = udev_new() else { return nil }
        let source = "kernel"
        guard let monitor = udev_monitor_new_from_netlink(udev, source) else {
            udev_unref(udev)
            return nil
        }
        for subsystem in subsystems {
            udev_monitor_filter_add_match_subsystem_devtype(monitor, subsystem, nil)
        }
        guard udev_monitor_enable_receiving(monitor) == 0 else {
            udev_monitor_unref(monitor)
            udev_unref(udev)
            return nil
        }
        self.udev = udev
        self.monitor = monitor
        self.source = source
        self.descriptor = FileDescriptor(rawValue: udev_monitor_get_fd(monitor))
    }

    /// Reads one pending event, if any.
    public func receive() -> Event? {
        guard let device = udev_monitor_receive_device(monitor) else { return nil }
        defer { udev_device_unref(device) }
        func string(_ p: UnsafePointer<CChar>?) -> String? { p.flatMap { String(validatingCString: $0) } }
        return Event(
            action: string(udev_device_get_action(device)) ?? "change",
            subsystem: string(udev_device_get_subsystem(device)) ?? "",
            devnode: string(udev_device_get_devnode(device)),
            sysname: string(udev_device_get_sysname(device)) ?? "")
    }

    deinit {
        udev_monitor_unref(monitor)
        udev_unref(udev)
    }
}
