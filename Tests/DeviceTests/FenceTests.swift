// Fence tests with real dma-fences from vgem: a dumb buffer gets an unsignalled fence (VGEM_FENCE_ATTACH)
// that the test signals itself (VGEM_FENCE_SIGNAL). vgem would signal it on its own after about 10 s, so
// every test signals well before that, and no test depends on that timer. The fence.swsync-* tests do the
// same with sw_sync timelines (exact: a fence signals when the test advances its timeline, never by itself);
// they apply on kernels with CONFIG_SW_SYNC (7.3-cma), and the daemon's fence tests use sw_sync there too
// (TestFence in DaemonSupport.swift).
import DmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum FenceTests {
    static let vgem: [Requirement] = [.vgem]
    static let vgemAndHeap: [Requirement] = [.vgem, .heap("system")]

    static let all: [DeviceTest] = [
        DeviceTest("fence.vgem-write-fence-pending-then-signaled", requires: vgem) {
            let drm = try DRMDevice.vgem()
            try expectEqual(drm.driver, "vgem", "driver")
            let (handle, size) = try drm.createDumb(width: 64, height: 64)
            defer { drm.closeHandle(handle) }
            try expectEqual(size, 64 * 64 * 4, "dumb size")
            let buffer = try drm.exportBuffer(handle)
            // GEM PRIME exports are named after the DRM core module, not the driver.
            try expectEqual(try buffer.info().exporter, "drm", "exporter")
            let fence = try drm.vgemAttachFence(handle, write: true)
            let syncFile = try buffer.exportSyncFile(.read)
            try expect(!(try syncFile.isSignaled()), "exported sync_file signalled before the fence")
            let info = try syncFile.info()
            try expectEqual(info.status, .active, "status")
            try expectEqual(info.fences.count, 1, "fences")
            try expectEqual(info.fences.first?.driver, "vgem", "fence driver")
            try expectEqual(info.fences.first?.status, .active, "fence status")
            try expectEqual(info.fences.first?.timestampNanoseconds, 0, "timestamp while active")
            try drm.vgemSignalFence(fence)
            try syncFile.wait(timeout: .seconds(2))
            try expect(try syncFile.isSignaled(), "signalled after VGEM_FENCE_SIGNAL")
            let after = try syncFile.info()
            try expectEqual(after.status, .signaled, "status after")
            try expect(after.fences.first.map { $0.timestampNanoseconds > 0 } ?? false, "signal timestamp set")
        },
        DeviceTest("fence.wait-timeout-etime", requires: vgem) {
            let drm = try DRMDevice.vgem()
            let (handle, _) = try drm.createDumb(width: 16, height: 16)
            defer { drm.closeHandle(handle) }
            let buffer = try drm.exportBuffer(handle)
            let fence = try drm.vgemAttachFence(handle, write: true)
            let syncFile = try buffer.exportSyncFile(.write)
            let start = ContinuousClock.now
            try expectError(Errno.timerExpired, "sync_file", "did not signal within", "wait longer") {
                try syncFile.wait(timeout: .milliseconds(50))
            }
            try expect(ContinuousClock.now - start >= .milliseconds(50), "returned before the timeout")
            try expectError(Errno.timerExpired, "did not signal within") { try syncFile.wait(timeout: .zero) }
            try drm.vgemSignalFence(fence)
            try syncFile.wait(timeout: .milliseconds(50))
            try syncFile.wait(timeout: nil)
        },
        DeviceTest("fence.signal-twice-enoent", requires: vgem) {
            let drm = try DRMDevice.vgem()
            let (handle, _) = try drm.createDumb(width: 16, height: 16)
            defer { drm.closeHandle(handle) }
            let fence = try drm.vgemAttachFence(handle, write: false)
            try drm.vgemSignalFence(fence)
            try expectError(.noSuchFileOrDirectory, "drm", "DRM_IOCTL_VGEM_FENCE_SIGNAL failed") { try drm.vgemSignalFence(fence) }
        },
        DeviceTest("fence.write-fence-conflict-ebusy", requires: vgem) {
            // vgem refuses a write fence while any fence is pending, as a GPU driver would wait.
            let drm = try DRMDevice.vgem()
            let (handle, _) = try drm.createDumb(width: 16, height: 16)
            defer { drm.closeHandle(handle) }
            let read = try drm.vgemAttachFence(handle, write: false)
            let secondRead = try drm.vgemAttachFence(handle, write: false)
            try expectError(.resourceBusy, "DRM_IOCTL_VGEM_FENCE_ATTACH failed") { try drm.vgemAttachFence(handle, write: true) }
            try drm.vgemSignalFence(read)
            try drm.vgemSignalFence(secondRead)
            let write = try drm.vgemAttachFence(handle, write: true)
            try drm.vgemSignalFence(write)
        },
        DeviceTest("fence.read-vs-write-export", requires: vgem) {
            let drm = try DRMDevice.vgem()
            let (handle, _) = try drm.createDumb(width: 16, height: 16)
            defer { drm.closeHandle(handle) }
            let buffer = try drm.exportBuffer(handle)
            // A pending read fence: a CPU reader need not wait, a CPU writer must.
            let read = try drm.vgemAttachFence(handle, write: false)
            try expect(try buffer.exportSyncFile(.read).isSignaled(), "export(.read) waits on a read fence")
            let forWriting = try buffer.exportSyncFile(.write)
            try expect(!(try forWriting.isSignaled()), "export(.write) ignores a read fence")
            try expect(!(try buffer.exportSyncFile(.readWrite).isSignaled()), "export(.readWrite) ignores a read fence")
            try drm.vgemSignalFence(read)
            try forWriting.wait(timeout: .seconds(2))
            // A pending write fence: both must wait.
            let write = try drm.vgemAttachFence(handle, write: true)
            let forReading = try buffer.exportSyncFile(.read)
            try expect(!(try forReading.isSignaled()), "export(.read) ignores a write fence")
            try expect(!(try buffer.exportSyncFile(.write).isSignaled()), "export(.write) ignores a write fence")
            try drm.vgemSignalFence(write)
            try forReading.wait(timeout: .seconds(2))
            try expect(try buffer.exportSyncFile(.readWrite).isSignaled(), "all fences signalled")
        },
        DeviceTest("fence.no-fences-signaled", requires: [.heap("system")]) {
            // With nothing pending, export gives a signalled stub fence.
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            for access in CPUAccess.allCases {
                let syncFile = try buffer.exportSyncFile(access)
                try expect(try syncFile.isSignaled(), "\(access): stub fence not signalled")
                try expectEqual(try syncFile.status(), .signaled, "\(access) status")
                try syncFile.wait(timeout: .zero)
            }
        },
        DeviceTest("fence.import-into-heap-buffer", requires: vgemAndHeap) {
            let drm = try DRMDevice.vgem()
            let (handle, _) = try drm.createDumb(width: 16, height: 16)
            defer { drm.closeHandle(handle) }
            let fence = try drm.vgemAttachFence(handle, write: true)
            let pending = try drm.exportBuffer(handle).exportSyncFile(.read)
            let heapBuffer = try DmaHeap(named: "system").allocate(length: 4096)
            try heapBuffer.importSyncFile(pending, access: .write)
            let exported = try heapBuffer.exportSyncFile(.read)
            try expect(!(try exported.isSignaled()), "heap buffer's sync_file signalled before the vgem fence")
            try expectEqual(try exported.info().fences.first?.driver, "vgem", "imported fence's driver")
            try drm.vgemSignalFence(fence)
            try exported.wait(timeout: .seconds(2))
            try expect(try heapBuffer.exportSyncFile(.write).isSignaled(), "heap buffer idle after the signal")
        },
        DeviceTest("fence.import-as-read-fence", requires: vgemAndHeap) {
            let drm = try DRMDevice.vgem()
            let (handle, _) = try drm.createDumb(width: 16, height: 16)
            defer { drm.closeHandle(handle) }
            let fence = try drm.vgemAttachFence(handle, write: true)
            let pending = try drm.exportBuffer(handle).exportSyncFile(.read)
            let heapBuffer = try DmaHeap(named: "system").allocate(length: 4096)
            try heapBuffer.importSyncFile(pending, access: .read)
            try expect(try heapBuffer.exportSyncFile(.read).isSignaled(), "a read fence made readers wait")
            let forWriting = try heapBuffer.exportSyncFile(.write)
            try expect(!(try forWriting.isSignaled()), "a read fence did not make writers wait")
            try drm.vgemSignalFence(fence)
            try forWriting.wait(timeout: .seconds(2))
        },
        DeviceTest("fence.cpu-sync-waits-for-fence", requires: vgemAndHeap) {
            // DMA_BUF_IOCTL_SYNC START waits for the buffer's fences: a thread blocks in it until we signal.
            let drm = try DRMDevice.vgem()
            let (handle, _) = try drm.createDumb(width: 16, height: 16)
            defer { drm.closeHandle(handle) }
            let fence = try drm.vgemAttachFence(handle, write: true)
            let heapBuffer = try DmaHeap(named: "system").allocate(length: 4096)
            try heapBuffer.importSyncFile(try drm.exportBuffer(handle).exportSyncFile(.read), access: .write)
            let reader = BackgroundThread {
                try heapBuffer.withCPUAccess(.read) {}
                return ContinuousClock.now
            }
            usleep(200_000)
            let signalled = ContinuousClock.now
            try drm.vgemSignalFence(fence)
            let finished = try reader.join()
            try expect(finished >= signalled, "SYNC START returned \(signalled - finished) before the fence signalled")
        },
        DeviceTest("fence.merge-signals-after-both", requires: vgem) {
            let drm = try DRMDevice.vgem()
            let (first, _) = try drm.createDumb(width: 16, height: 16)
            let (second, _) = try drm.createDumb(width: 16, height: 16)
            defer { drm.closeHandle(first); drm.closeHandle(second) }
            let fenceA = try drm.vgemAttachFence(first, write: true)
            let fenceB = try drm.vgemAttachFence(second, write: true)
            let a = try drm.exportBuffer(first).exportSyncFile(.read)
            let b = try drm.exportBuffer(second).exportSyncFile(.read)
            let merged = try a.merge(b, name: "both")
            let info = try merged.info()
            try expectEqual(info.name, "both", "merged name")
            try expectEqual(info.fences.count, 2, "merged fences")
            try expectEqual(info.fences.map(\.driver), ["vgem", "vgem"], "drivers")
            try drm.vgemSignalFence(fenceA)
            try a.wait(timeout: .seconds(2))
            try expect(!(try merged.isSignaled()), "merged signalled after only one fence")
            try expectEqual(try merged.status(), .active, "merged status with one pending")
            try drm.vgemSignalFence(fenceB)
            try merged.wait(timeout: .seconds(2))
            try expectEqual(try merged.status(), .signaled, "merged status")
        },
        DeviceTest("fence.merge-list", requires: vgem) {
            let drm = try DRMDevice.vgem()
            var handles: [DRMDevice.Handle] = []
            defer { handles.forEach { drm.closeHandle($0) } }
            var fences: [UInt32] = []
            var files: [SyncFile] = []
            for _ in 0..<3 {
                let (handle, _) = try drm.createDumb(width: 16, height: 16)
                handles.append(handle)
                fences.append(try drm.vgemAttachFence(handle, write: true))
                files.append(try drm.exportBuffer(handle).exportSyncFile(.read))
            }
            try expect(try SyncFile.merge([]) == nil, "merge of nothing")
            try expectEqual(try SyncFile.merge([files[0]])?.fd.descriptor, files[0].fd.descriptor, "merge of one")
            let merged = try SyncFile.merge(files, name: "three")!
            try expectEqual(try merged.info().fences.count, 3, "fences")
            for (i, fence) in fences.enumerated() {
                try expect(!(try merged.isSignaled()), "signalled with \(3 - i) fences pending")
                try drm.vgemSignalFence(fence)
            }
            try merged.wait(timeout: .seconds(2))
        },
        // sw_sync: exact fences (the 7.3-cma kernel; not applicable on Debian's kernels, which lack SW_SYNC).
        DeviceTest("fence.swsync-pending-until-timeline-reaches-value", requires: [.swSync, .root]) {
            var timeline = try SwSyncTimeline()
            let fence = try timeline.fence(at: 2, name: "at-two")
            let info = try fence.info()
            try expectEqual(info.status, .active, "status at 0")
            try expectEqual(info.fences.first?.driver, "sw_sync", "driver")
            try timeline.advance(by: 1)
            try expect(!(try fence.isSignaled()), "signalled at 1, before its value 2")
            try expectError(Errno.timerExpired, "did not signal within") { try fence.wait(timeout: .zero) }
            try timeline.advance(by: 1)
            try fence.wait(timeout: .zero)
            try expectEqual(try fence.info().status, .signaled, "status at 2")
            try expectEqual(timeline.value, 2, "timeline value")
        },
        DeviceTest("fence.swsync-reached-value-signalled-at-once", requires: [.swSync, .root]) {
            var timeline = try SwSyncTimeline()
            try timeline.advance(to: 5)
            try expect(try timeline.fence(at: 3).isSignaled(), "a fence below the timeline's value is signalled")
            try expect(!(try timeline.fence(at: 6).isSignaled()), "a fence above it is pending")
        },
        DeviceTest("fence.swsync-closed-timeline-signals-enoent", requires: [.swSync, .root]) {
            // Closing the timeline signals what is still pending on it, with an error: a dying producer can
            // never leave a waiter hanging.
            let fence: SyncFile
            do {
                let timeline = try SwSyncTimeline()
                fence = try timeline.fence(at: 1)
                try expect(!(try fence.isSignaled()), "pending while the timeline is open")
            }
            try fence.wait(timeout: .seconds(2))
            try expectEqual(try fence.info().status, .error(.noSuchFileOrDirectory), "status after close")
        },
        DeviceTest("fence.swsync-imported-into-heap-buffer", requires: [.swSync, .root, .heap("system")]) {
            var timeline = try SwSyncTimeline()
            let buffer = try DmaHeap(named: "system").allocate(length: 4096)
            try buffer.importSyncFile(try timeline.fence(at: 1), access: .write)
            let exported = try buffer.exportSyncFile(.read)
            try expect(!(try exported.isSignaled()), "the buffer's reservation waits for the sw_sync fence")
            try expectEqual(try exported.info().fences.first?.driver, "sw_sync", "imported fence's driver")
            try timeline.advance()
            try exported.wait(timeout: .zero)
        },
        DeviceTest("fence.swsync-merge-signals-after-both", requires: [.swSync, .root]) {
            var first = try SwSyncTimeline(), second = try SwSyncTimeline()
            let merged = try first.fence(at: 1).merge(try second.fence(at: 1))
            try expectEqual(try merged.info().fences.count, 2, "fences in the merge")
            try first.advance()
            try expect(!(try merged.isSignaled()), "merge signalled after one of two")
            try second.advance()
            try merged.wait(timeout: .zero)
        },
        DeviceTest("fence.import-non-syncfile-einval", requires: [.heap("system")]) {
            let heapBuffer = try DmaHeap(named: "system").allocate(length: 4096)
            let memfd = try Memfd(name: "not-a-fence", size: pageSize)
            let fake = SyncFile(adopting: try memfd.fd.duplicate())
            try expectError(.invalidArgument, "dma-buf", "fd \(fake.fd.descriptor.rawValue) is not a sync_file", "DMA_BUF_IOCTL_EXPORT_SYNC_FILE") {
                try heapBuffer.importSyncFile(fake, access: .write)
            }
            try expectError(.inappropriateIOCTLForDevice, "sync_file", "is not a sync_file (SYNC_IOC_FILE_INFO failed)") {
                try fake.info()
            }
            try expectError(.inappropriateIOCTLForDevice, "is not a sync_file") {
                try SyncFile(checking: memfd.fd)
            }
        },
        DeviceTest("fence.merge-non-syncfile", requires: [.heap("system")]) {
            let real = try DmaHeap(named: "system").allocate(length: 4096).exportSyncFile(.read)
            let fake = SyncFile(adopting: try Memfd(name: "not-a-fence", size: pageSize).fd.duplicate())
            // The second fd is looked up as a sync_file by the kernel: not one is ENOENT.
            try expectError(.noSuchFileOrDirectory, "SYNC_IOC_MERGE of fd", "both fds must be sync_files") {
                try real.merge(fake)
            }
            // Called on a non-sync_file, the ioctl itself is unknown.
            try expectError(.inappropriateIOCTLForDevice, "SYNC_IOC_MERGE of fd") {
                try fake.merge(real)
            }
        },
    ]
}

/// Runs `body` on a new POSIX thread; ``join()`` waits for it and hands back its result or error.
final class BackgroundThread<Value: Sendable>: @unchecked Sendable {
    private var thread = pthread_t()
    private var started = false
    // Written by the thread before it exits, read after pthread_join: the join orders the two.
    private var outcome: Result<Value, any Error>?

    init(_ body: @escaping @Sendable () throws -> Value) {
        let start = ThreadStart { [self] in self.outcome = Result { try body() } }
        let context = Unmanaged.passRetained(start).toOpaque()
        let rc = pthread_create(&thread, nil, threadMain, context)
        if rc == 0 {
            started = true
        } else {
            Unmanaged<ThreadStart>.fromOpaque(context).release()
            outcome = .failure(TestFailure(description: "pthread_create: \(Errno(rawValue: rc).name)"))
        }
    }

    func join() throws -> Value {
        if started {
            pthread_join(thread, nil)
            started = false
        }
        return try outcome!.get()
    }
}

private final class ThreadStart {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

private func threadMain(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    Unmanaged<ThreadStart>.fromOpaque(context!).takeRetainedValue().run()
    return nil
}
