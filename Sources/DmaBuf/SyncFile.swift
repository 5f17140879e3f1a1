import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A sync_file: a file descriptor standing for one or more dma-fences. It becomes readable (POLLIN) when
/// every fence in it has signalled.
///
/// The descriptor is shared by copies of this value and closed when the last one goes.
public struct SyncFile: Sendable {
    /// The sync_file's descriptor. Closed by `SharedFD`.
    public let fd: SharedFD

    /// Wraps a descriptor without checking it is a sync_file; the kernel refuses it later if not.
    public init(adopting fd: consuming UniqueFD) {
        self.fd = fd.shared()
    }

    /// Wraps a shared descriptor without checking it.
    public init(shared fd: SharedFD) {
        self.fd = fd
    }

    /// Checks with `SYNC_IOC_FILE_INFO` that `fd` is a sync_file before wrapping it.
    /// - Throws: ``DmaBufError`` EINVAL/ENOTTY when it is not.
    public init(checking fd: SharedFD) throws {
        self.fd = fd
        _ = try info()
    }

    /// A fence's state as the kernel reports it (`sync_file_info.status`, `sync_fence_info.status`).
    public enum Status: Sendable, Hashable, CustomStringConvertible {
        /// Not yet signalled.
        case active
        /// Signalled without error.
        case signaled
        /// Signalled with an error.
        case error(Errno)

        init(raw: Int32) {
            switch raw {
            case 0: self = .active
            case 1...: self = .signaled
            default: self = .error(Errno(rawValue: -raw))
            }
        }

        public var description: String {
            switch self {
            case .active: "active"
            case .signaled: "signaled"
            case .error(let errno): "error \(errno.name)"
            }
        }
    }

    /// One fence inside a sync_file (`struct sync_fence_info`).
    public struct Fence: Sendable, Hashable {
        /// The timeline's name (`sync_fence_info.obj_name`).
        public var timeline: String
        /// The driver that created it (`driver_name`: `vgem`, `dma_fence_array`, ...).
        public var driver: String
        public var status: Status
        /// When it signalled, in CLOCK_MONOTONIC nanoseconds; 0 while active.
        public var timestampNanoseconds: UInt64
    }

    /// What `SYNC_IOC_FILE_INFO` says about this sync_file.
    public struct Info: Sendable, Hashable {
        public var name: String
        public var status: Status
        public var fences: [Fence]
    }

    /// Reads `SYNC_IOC_FILE_INFO`, including the per-fence array.
    /// - Throws: ``DmaBufError`` when the descriptor is not a sync_file.
    public func info() throws -> Info {
        var header = sync_file_info()
        try call { CDmaBuf_sync_file_info(fd.descriptor.rawValue, &header, nil, 0) }
        let count = Int(header.num_fences)
        var fences = [sync_fence_info](repeating: sync_fence_info(), count: count)
        if count > 0 {
            try fences.withUnsafeMutableBufferPointer { buffer in
                try call { CDmaBuf_sync_file_info(fd.descriptor.rawValue, &header, buffer.baseAddress, UInt32(count)) }
            }
        }
        return Info(
            name: cString(header.name),
            status: Status(raw: header.status),
            fences: fences.map {
                Fence(timeline: cString($0.obj_name), driver: cString($0.driver_name), status: Status(raw: $0.status),
                      timestampNanoseconds: $0.timestamp_ns)
            })
    }

    private func call(_ body: () -> CInt) throws {
        if case .failure(let errno) = Sys.retrying(body) {
            throw DmaBufError(
                "sync_file", errno, "fd \(fd.descriptor.rawValue) is not a sync_file (SYNC_IOC_FILE_INFO failed)",
                fix: "pass an fd from DMA_BUF_IOCTL_EXPORT_SYNC_FILE, SYNC_IOC_MERGE or a driver's out-fence")
        }
    }

    /// The combined status: signalled only when every fence is.
    public func status() throws -> Status { try info().status }

    /// True when every fence has signalled, checked without blocking (poll with a zero timeout).
    public func isSignaled() throws -> Bool {
        try poll(timeoutMilliseconds: 0)
    }

    /// Waits until every fence has signalled, at most `timeout` (nil: forever).
    /// - Throws: ``DmaBufError`` with ETIME when the fences did not signal in time.
    public func wait(timeout: Duration?) throws {
        let deadline = timeout.map { ContinuousClock.now + $0 }
        while true {
            var remaining: CInt = -1
            if let deadline {
                let left = deadline - ContinuousClock.now
                let milliseconds = left.wholeMilliseconds
                remaining = CInt(clamping: max(0, milliseconds + (left > .zero ? 1 : 0)))
            }
            if try poll(timeoutMilliseconds: remaining) { return }
            if let deadline, ContinuousClock.now >= deadline {
                throw DmaBufError(
                    "sync_file", .timerExpired, "fences in fd \(fd.descriptor.rawValue) did not signal within \(timeout!)",
                    fix: "wait longer, or find the job that never completes")
            }
        }
    }

    private func poll(timeoutMilliseconds: CInt) throws -> Bool {
        var fds = [pollfd(fd: fd.descriptor.rawValue, events: Int16(POLLIN), revents: 0)]
        let ready = try Sys.poll(&fds, timeoutMilliseconds: timeoutMilliseconds).get(or: "sync_file", "poll failed")
        if ready > 0 && fds[0].revents & Int16(POLLNVAL) != 0 {
            throw DmaBufError("sync_file", .badFileDescriptor, "fd \(fd.descriptor.rawValue) is closed")
        }
        return ready > 0 && fds[0].revents & Int16(POLLIN) != 0
    }

    /// Merges two sync_files into a new one that signals when both have (`SYNC_IOC_MERGE`).
    /// The caller owns the result; `self` and `other` stay open.
    public func merge(_ other: SyncFile, name: String = "dmabufd-merge") throws -> SyncFile {
        var data = sync_merge_data()
        withUnsafeMutableBytes(of: &data.name) { raw in
            let bytes = Array(name.utf8.prefix(raw.count - 1))
            raw.copyBytes(from: bytes)
        }
        data.fd2 = other.fd.descriptor.rawValue
        data.fence = -1
        let result = withUnsafeMutableBytes(of: &data) { Sys.ioctl(fd.descriptor, CDmaBuf_SYNC_IOC_MERGE, $0.baseAddress) }
        if case .failure(let errno) = result {
            throw DmaBufError(
                "sync_file", errno, "SYNC_IOC_MERGE of fd \(fd.descriptor.rawValue) and fd \(other.fd.descriptor.rawValue) failed",
                // The kernel answers ENOENT when the second fd is not a sync_file (or not open), ENOTTY when
                // the first is not one.
                fix: [.noSuchFileOrDirectory, .inappropriateIOCTLForDevice, .invalidArgument, .badFileDescriptor].contains(errno)
                    ? "both fds must be sync_files" : nil)
        }
        return SyncFile(adopting: UniqueFD(adopting: data.fence))
    }

    /// Merges any number of sync_files; nil for an empty list, the file itself for one.
    public static func merge(_ files: [SyncFile], name: String = "dmabufd-merge") throws -> SyncFile? {
        guard var merged = files.first else { return nil }
        for file in files.dropFirst() {
            merged = try merged.merge(file, name: name)
        }
        return merged
    }
}

func cString<T>(_ tuple: T) -> String {
    withUnsafeBytes(of: tuple) { raw in
        String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
    }
}
