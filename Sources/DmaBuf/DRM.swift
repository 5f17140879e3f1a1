import CDmaBuf
import CDrm
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A DRM device node, through libdrm: dumb buffers, PRIME export/import, and vgem's test fences.
///
/// The node's fd is owned here and closed when the `DRMDevice` goes away.
public struct DRMDevice: ~Copyable, Sendable {
    private let device: UniqueFD
    /// The node's path (`/dev/dri/card0`).
    public let path: String
    /// The kernel driver's name (`vgem`, `i915`, ...), from `drmGetVersion`.
    public let driver: String

    /// Opens a DRM node.
    public init(path: String) throws {
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(path, .readWrite, options: [.closeOnExec], retryOnInterrupt: true)
        } catch let errno as Errno {
            throw DmaBufError("drm", errno, "cannot open \(path)")
        }
        guard let version = drmGetVersion(fd.rawValue) else {
            try? fd.close()
            throw DmaBufError("drm", .notSupported, "\(path) is not a DRM device")
        }
        defer { drmFreeVersion(version) }
        self.device = UniqueFD(adopting: fd)
        self.path = path
        self.driver = String(cString: version.pointee.name)
    }

    /// The primary nodes (`/dev/dri/card*`) whose driver is `driver`.
    public static func nodes(driver: String, directory: String = "/dev/dri") -> [String] {
        let names = ((try? SmallFiles.entries(of: directory)) ?? []).filter { $0.hasPrefix("card") }
        return names.map { directory + "/" + $0 }.filter { (try? DRMDevice(path: $0))?.driver == driver }.sorted()
    }

    /// Opens the first vgem node.
    /// - Throws: ``DmaBufError`` ENODEV with the fix (`modprobe vgem`) when there is none.
    public static func vgem() throws -> DRMDevice {
        guard let path = nodes(driver: "vgem").first else {
            throw DmaBufError("drm", Errno(rawValue: ENODEV), "no vgem device in /dev/dri", fix: "modprobe vgem (CONFIG_DRM_VGEM)")
        }
        return try DRMDevice(path: path)
    }

    /// A GEM buffer handle, valid on this device only.
    public typealias Handle = UInt32

    /// Creates a dumb buffer (`DRM_IOCTL_MODE_CREATE_DUMB`). Returns its handle and size in bytes.
    public func createDumb(width: UInt32, height: UInt32, bitsPerPixel: UInt32 = 32) throws -> (handle: Handle, size: Int) {
        var request = drm_mode_create_dumb()
        request.width = width
        request.height = height
        request.bpp = bitsPerPixel
        try check(drmIoctl(device.descriptor.rawValue, CDmaBuf_DRM_IOCTL_MODE_CREATE_DUMB, &request), "DRM_IOCTL_MODE_CREATE_DUMB")
        return (request.handle, Int(request.size))
    }

    /// Exports a GEM handle as a dma-buf (`DRM_IOCTL_PRIME_HANDLE_TO_FD`, read-write, close-on-exec).
    /// The caller owns the returned buffer.
    public func exportBuffer(_ handle: Handle) throws -> DmaBuffer {
        var fd: CInt = -1
        try check(drmPrimeHandleToFD(device.descriptor.rawValue, handle, UInt32(DRM_CLOEXEC | DRM_RDWR), &fd), "DRM_IOCTL_PRIME_HANDLE_TO_FD")
        return DmaBuffer(adopting: UniqueFD(adopting: fd))
    }

    /// Imports a dma-buf as a GEM handle (`DRM_IOCTL_PRIME_FD_TO_HANDLE`). The buffer stays the caller's.
    public func importBuffer(_ buffer: DmaBuffer) throws -> Handle {
        var handle: UInt32 = 0
        try check(drmPrimeFDToHandle(device.descriptor.rawValue, buffer.fd.descriptor.rawValue, &handle), "DRM_IOCTL_PRIME_FD_TO_HANDLE")
        return handle
    }

    /// Closes a GEM handle (`DRM_IOCTL_GEM_CLOSE`).
    public func closeHandle(_ handle: Handle) {
        var request = drm_gem_close(handle: handle, pad: 0)
        _ = drmIoctl(device.descriptor.rawValue, CDmaBuf_DRM_IOCTL_GEM_CLOSE, &request)
    }

    /// vgem: attaches a new unsignalled fence to the buffer's reservation (`DRM_IOCTL_VGEM_FENCE_ATTACH`),
    /// as a write (exclusive) fence when `write`. vgem signals it by itself after about 10 s.
    /// - Returns: the fence id for ``vgemSignalFence(_:)``.
    public func vgemAttachFence(_ handle: Handle, write: Bool) throws -> UInt32 {
        var request = CDmaBuf_vgem_fence_attach(handle: handle, flags: write ? CDmaBuf_VGEM_FENCE_WRITE : 0, out_fence: 0, pad: 0)
        try check(drmIoctl(device.descriptor.rawValue, CDmaBuf_DRM_IOCTL_VGEM_FENCE_ATTACH, &request), "DRM_IOCTL_VGEM_FENCE_ATTACH")
        return request.out_fence
    }

    /// vgem: signals a fence made by ``vgemAttachFence(_:write:)`` (`DRM_IOCTL_VGEM_FENCE_SIGNAL`).
    /// - Throws: ``DmaBufError`` ETIMEDOUT when vgem already signalled it on its own (after ~10 s), ENOENT when
    ///   it was already signalled through this call (the id is gone).
    public func vgemSignalFence(_ fence: UInt32) throws {
        var request = CDmaBuf_vgem_fence_signal(fence: fence, flags: 0)
        try check(drmIoctl(device.descriptor.rawValue, CDmaBuf_DRM_IOCTL_VGEM_FENCE_SIGNAL, &request), "DRM_IOCTL_VGEM_FENCE_SIGNAL")
    }

    private func check(_ result: CInt, _ what: String) throws {
        if result != 0 {
            throw DmaBufError("drm", Errno(rawValue: errno), "\(what) failed on \(path)")
        }
    }
}
