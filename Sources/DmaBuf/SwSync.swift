import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A sw_sync timeline (`CONFIG_SW_SYNC`): a software fence context for tests, with exact control over when
/// each fence signals. vgem's fences signal by themselves after about 10 s, so "pending, then signalled"
/// races a timer there; a sw_sync fence at value N signals exactly when the timeline is advanced to N.
///
/// Each open of `/sys/kernel/debug/sync/sw_sync` (debugfs, root only) is a new timeline starting at 0; closing
/// it signals every fence still pending on it with ENOENT. The kernel marks this interface as test-only.
public struct SwSyncTimeline: ~Copyable, Sendable {
    /// Where debugfs exposes the control file.
    public static let defaultPath = "/sys/kernel/debug/sync/sw_sync"

    private let control: UniqueFD
    /// The timeline's current value (how far it has been advanced from 0).
    public private(set) var value: UInt32 = 0

    /// True when this kernel offers sw_sync here (and this process may open it).
    public static func isAvailable(path: String = defaultPath) -> Bool {
        access(path, R_OK | W_OK) == 0
    }

    /// Opens a new timeline at value 0.
    /// - Throws: ``DmaBufError`` ENOENT with the fix when debugfs is not mounted or the kernel lacks SW_SYNC.
    public init(path: String = defaultPath) throws {
        do {
            control = UniqueFD(adopting: try FileDescriptor.open(path, .readWrite, options: [.closeOnExec], retryOnInterrupt: true))
        } catch let errno as Errno {
            throw DmaBufError(
                "sw_sync", errno, "cannot open \(path)",
                fix: errno == .noSuchFileOrDirectory
                    ? "mount debugfs (mount -t debugfs none /sys/kernel/debug) on a kernel with CONFIG_SW_SYNC" : nil)
        }
    }

    /// A new fence that signals when the timeline reaches `value` (`SW_SYNC_IOC_CREATE_FENCE`). The caller owns
    /// the returned sync_file. A value the timeline has already reached gives a fence that is signalled at once.
    public func fence(at value: UInt32, name: String = "dmabufd-test") throws -> SyncFile {
        var data = CDmaBuf_sw_sync_create_fence_data()
        data.value = value
        withUnsafeMutableBytes(of: &data.name) { raw in
            raw.copyBytes(from: Array(name.utf8.prefix(raw.count - 1)))
        }
        data.fence = -1
        _ = try withUnsafeMutableBytes(of: &data) {
            Sys.ioctl(control.descriptor, CDmaBuf_SW_SYNC_IOC_CREATE_FENCE, $0.baseAddress)
        }.get(or: "sw_sync", "SW_SYNC_IOC_CREATE_FENCE at \(value) failed")
        return SyncFile(adopting: UniqueFD(adopting: data.fence))
    }

    /// Advances the timeline by `steps` (`SW_SYNC_IOC_INC`), signalling every fence at or below the new value.
    public mutating func advance(by steps: UInt32 = 1) throws {
        var count = steps
        _ = try withUnsafeMutableBytes(of: &count) {
            Sys.ioctl(control.descriptor, CDmaBuf_SW_SYNC_IOC_INC, $0.baseAddress)
        }.get(or: "sw_sync", "SW_SYNC_IOC_INC by \(steps) failed")
        value &+= steps
    }

    /// Advances the timeline to `target` (no-op when it is already there or beyond).
    public mutating func advance(to target: UInt32) throws {
        if target > value { try advance(by: target - value) }
    }
}
