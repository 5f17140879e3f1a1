// The parts of dma-heap, dma-buf, sync_file and memfd handling that need no device: name lookup in a heap
// directory, refusals made before any ioctl, and the poll-based wait of SyncFile (a pipe stands in).
import CDmaBuf
import DmaBuf
import SystemPackage
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite struct DmaHeapDirectoryTests {
    @Test func availableListsAndSorts() throws {
        let scratch = try ScratchDirectory()
        defer { scratch.remove() }
        #expect(DmaHeap.available(in: scratch.path).isEmpty)
        for name in ["system", "linux,cma", "reserved"] { try scratch.write(name, "") }
        #expect(DmaHeap.available(in: scratch.path) == ["linux,cma", "reserved", "system"])
        #expect(DmaHeap.available(in: "/nonexistent/dma_heap").isEmpty)
    }

    @Test func unknownHeapNamesTheOthers() throws {
        let scratch = try ScratchDirectory()
        defer { scratch.remove() }
        try scratch.write("system", "")
        try scratch.write("linux,cma", "")
        expectDmaBufError(.noSuchFileOrDirectory, "dma-heap: no heap named 'vram' in \(scratch.path)", "available heaps: linux,cma, system") {
            _ = try DmaHeap(named: "vram", directory: scratch.path)
        }
    }

    @Test func emptyOrMissingDirectorySaysNoHeaps() throws {
        let scratch = try ScratchDirectory()
        defer { scratch.remove() }
        expectDmaBufError(.noSuchFileOrDirectory, "no heap named 'system'", "this kernel exposes no dma-heaps") {
            _ = try DmaHeap(named: "system", directory: scratch.path)
        }
        expectDmaBufError(.noSuchFileOrDirectory, "this kernel exposes no dma-heaps") {
            _ = try DmaHeap(named: "system", directory: "/nonexistent/dma_heap")
        }
    }

    @Test func fakeHeapRefusesTheIoctl() throws {
        // A regular file opens as a "heap"; the allocation ioctl then fails with the kernel's ENOTTY.
        let scratch = try ScratchDirectory()
        defer { scratch.remove() }
        try scratch.write("system", "")
        let heap = try DmaHeap(named: "system", directory: scratch.path)
        #expect(heap.name == "system")
        expectDmaBufError(.inappropriateIOCTLForDevice, "dma-heap 'system'", "DMA_HEAP_IOCTL_ALLOC of 4 KiB failed") {
            try heap.allocate(length: 4096)
        }
    }

    @Test func fdFlagConstants() {
        #expect(DmaHeap.FDFlags.readWrite.rawValue == UInt32(O_RDWR))
        #expect(DmaHeap.FDFlags.closeOnExec.rawValue == UInt32(O_CLOEXEC))
        #expect(DmaHeap.FDFlags.valid.rawValue == UInt32(O_CLOEXEC | O_ACCMODE))
        #expect(DmaHeap.FDFlags.valid.isSuperset(of: [.readWrite, .closeOnExec]))
    }
}

@Suite struct DmaBufferHostTests {
    @Test func memfdIsNotADmaBuf() throws {
        let memfd = try Memfd(name: "plain", size: pageSize)
        expectDmaBufError(.badFileDescriptor, "dma-buf: fd \(memfd.fd.descriptor.rawValue) is not a dma-buf", "dma-heap, udmabuf") {
            try DmaBuffer(checking: memfd.fd)
        }
    }

    @Test func nameLengthCheckedBeforeTheIoctl() throws {
        let buffer = DmaBuffer(shared: try Memfd(name: "named", size: pageSize).fd)
        #expect(DmaBuffer.maximumNameLength == 31)
        expectDmaBufError(.invalidArgument, "name '\(String(repeating: "a", count: 32))' is 32 bytes, longer than 31", "shorten it to 31 bytes") {
            try buffer.setName(String(repeating: "a", count: 32))
        }
        // Multi-byte characters count in bytes.
        expectDmaBufError(.invalidArgument, "is 32 bytes") { try buffer.setName(String(repeating: "é", count: 16)) }
        // A name that fits reaches the ioctl, which a memfd does not know.
        expectDmaBufError(.inappropriateIOCTLForDevice, "DMA_BUF_SET_NAME 'ok' failed") { try buffer.setName("ok") }
    }

    @Test func syncOnANonDmaBufIsENOTTY() throws {
        let buffer = DmaBuffer(shared: try Memfd(name: "sync", size: pageSize).fd)
        expectDmaBufError(.inappropriateIOCTLForDevice, "DMA_BUF_IOCTL_SYNC failed") { try buffer.sync(.read) }
        expectDmaBufError(.inappropriateIOCTLForDevice, "DMA_BUF_IOCTL_EXPORT_SYNC_FILE failed") { try buffer.exportSyncFile(.read) }
    }

    @Test func sizeInodeAndMappingOfAMemfd() throws {
        // size(), inode() and map() are plain file operations: a memfd exercises them.
        let memfd = try Memfd(name: "size", size: 3 * pageSize)
        let buffer = DmaBuffer(shared: memfd.fd)
        #expect(try buffer.size() == 3 * pageSize)
        #expect(try buffer.inode() == inode(of: memfd.fd.descriptor))
        let mapping = try buffer.map()
        #expect(mapping.count == 3 * pageSize)
        mapping.bytes[pageSize] = 0x99
        #expect(try memfd.map(length: 3 * pageSize).bytes[pageSize] == 0x99)
    }

    @Test func syncFlagConstants() {
        #expect(DmaBuffer.SyncFlags.read.rawValue == 1)
        #expect(DmaBuffer.SyncFlags.write.rawValue == 2)
        #expect(DmaBuffer.SyncFlags.end.rawValue == 4)
        #expect(CPUAccess.allCases.count == 3)
    }
}

@Suite struct SyncFileHostTests {
    /// A pipe's read end polls like a sync_file: readable once "signalled" (a byte written).
    func pipeFence() throws -> (SyncFile, SharedFD) {
        var fds: [CInt] = [-1, -1]
        guard pipe(&fds) == 0 else { throw Errno(rawValue: errno) }
        return (SyncFile(adopting: UniqueFD(adopting: fds[0])), SharedFD(adopting: fds[1]))
    }

    @Test func waitTimesOutWithETIME() throws {
        let (fence, _) = try pipeFence()
        #expect(try !fence.isSignaled())
        let start = ContinuousClock.now
        expectDmaBufError(Errno.timerExpired, "sync_file: fences in fd \(fence.fd.descriptor.rawValue) did not signal within", "(ETIME)", "wait longer") {
            try fence.wait(timeout: .milliseconds(30))
        }
        #expect(ContinuousClock.now - start >= .milliseconds(30))
        expectDmaBufError(Errno.timerExpired, "did not signal within") { try fence.wait(timeout: .zero) }
    }

    @Test func waitReturnsOnceReadable() throws {
        let (fence, writer) = try pipeFence()
        #expect(write(writer.descriptor.rawValue, "x", 1) == 1)
        #expect(try fence.isSignaled())
        try fence.wait(timeout: .zero)
        try fence.wait(timeout: .milliseconds(10))
        try fence.wait(timeout: nil)
    }

    @Test func waitSeesASignalDuringTheWait() throws {
        let (fence, writer) = try pipeFence()
        // A plain thread, not a task: wait() blocks its thread, and tasks share a small pool with other tests.
        let signaller = try PlainThread {
            usleep(50_000)
            _ = write(writer.descriptor.rawValue, "x", 1)
        }
        defer { signaller.join() }
        try fence.wait(timeout: .seconds(10))
    }

    @Test func infoOnANonSyncFileIsENOTTY() throws {
        let (fence, _) = try pipeFence()
        expectDmaBufError(.inappropriateIOCTLForDevice, "is not a sync_file (SYNC_IOC_FILE_INFO failed)", "SYNC_IOC_MERGE") {
            try fence.info()
        }
        expectDmaBufError(.inappropriateIOCTLForDevice, "is not a sync_file") { try SyncFile(checking: fence.fd) }
        expectDmaBufError(.inappropriateIOCTLForDevice, "SYNC_IOC_MERGE of fd", "both fds must be sync_files") {
            try fence.merge(fence)
        }
    }

    @Test func mergeOfNoneOrOne() throws {
        let (fence, _) = try pipeFence()
        #expect(try SyncFile.merge([]) == nil)
        #expect(try SyncFile.merge([fence])?.fd === fence.fd)
    }

    @Test func statusDescriptions() {
        #expect(SyncFile.Status.active.description == "active")
        #expect(SyncFile.Status.signaled.description == "signaled")
        #expect(SyncFile.Status.error(.timedOut).description == "error ETIMEDOUT")
    }
}

@Suite struct MemfdTests {
    @Test func defaultSealsAndSize() throws {
        let memfd = try Memfd(name: "seals", size: 5 * pageSize)
        #expect(try memfd.size() == 5 * pageSize)
        #expect(try memfd.seals() == [.shrink])
        try memfd.addSeals([.grow])
        #expect(try memfd.seals() == [.shrink, .grow])
        #expect(fcntlGetFD(memfd.fd.descriptor) & FD_CLOEXEC != 0)
    }

    @Test func shrinkSealHolds() throws {
        let memfd = try Memfd(name: "shrink", size: 2 * pageSize)
        #expect(ftruncate(memfd.fd.descriptor.rawValue, off_t(pageSize)) == -1)
        #expect(errno == EPERM)
    }

    @Test func sealingNeedsAllowSealing() throws {
        #expect(throws: DmaBufError.self) { try Memfd(name: "nosealing", size: pageSize, flags: [.closeOnExec]) }
        let memfd = try Memfd(name: "nosealing", size: pageSize, flags: [.closeOnExec], seals: [])
        #expect(try memfd.seals() == [.seal])
        expectDmaBufError(.notPermitted, "memfd: cannot add seals 0x2", "create the memfd with MFD_ALLOW_SEALING") {
            try memfd.addSeals(.shrink)
        }
    }

    @Test func writeSealRefusedWhileMapped() throws {
        let memfd = try Memfd(name: "mapped", size: pageSize)
        let mapping = try memfd.map(length: pageSize)
        expectDmaBufError(.resourceBusy, "cannot add seals 0x8") { try memfd.addSeals(.write) }
        _ = mapping
    }

    @Test func sealsOfANonMemfd() throws {
        let null = Memfd(shared: try openShared("/dev/null"))
        expectDmaBufError(.invalidArgument, "memfd: F_GET_SEALS failed") { try null.seals() }
    }

    @Test func sealConstantsMatchTheKernel() {
        #expect(Memfd.Seals.seal.rawValue == 0x1)
        #expect(Memfd.Seals.shrink.rawValue == 0x2)
        #expect(Memfd.Seals.grow.rawValue == 0x4)
        #expect(Memfd.Seals.write.rawValue == 0x8)
        #expect(Memfd.Seals.futureWrite.rawValue == 0x10)
        #expect(Memfd.Flags.closeOnExec.rawValue == 0x1)
        #expect(Memfd.Flags.allowSealing.rawValue == 0x2)
        #expect(Memfd.Flags.hugeTLB.rawValue == 0x4)
    }

    private func fcntlGetFD(_ fd: FileDescriptor) -> CInt { CDmaBuf_fcntl(fd.rawValue, F_GETFD, 0) }
}
