import CDmaBuf
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A DRM device node: dumb buffers, PRIME export/import, and vgem's test fences.
///
/// Raw uAPI ioctls, not libdrm: this module is linked by every client, and no client should pull in libdrm
/// for the five requests the tests and the daemon's hotplug scan need.
///
/// The node's fd is owned here and closed when the `DRMDevice` goes away.
public struct DRMDevice: ~Copyable, Sendable {
    private let device: UniqueFD
    /// The node's path (`/dev/dri/card0`).
    public let path: String
    /// The kernel driver's name (`vgem`, `i915`, ...), from `DRM_IOCTL_VERSION`.
    public let driver: String

    /// Opens a DRM node.
    public init(path: String) throws {
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(path, .readWrite, options: [.closeOnExec], retryOnInterrupt: true)
        } catch let errno as Errno {
            throw DmaBufError("drm", errno, "cannot open \(path)")
        }
        guard let driver = DRMDevice.driverName(fd) else {
            try? fd.close()
            throw DmaBufError("drm", .notSupported, "\(path) is not a DRM device")
        }
        self.device = UniqueFD(adopting: fd)
        self.path = path
        self.driver = driver
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
        var request = DRMModeCreateDumb(height: height, width: width, bpp: bitsPerPixel)
        try check(Sys.ioctl(device.descriptor, CDmaBuf_DRM_IOCTL_MODE_CREATE_DUMB, &request), "DRM_IOCTL_MODE_CREATE_DUMB")
        return (request.handle, Int(request.size))
    }

    /// Exports a GEM handle as a dma-buf (`DRM_IOCTL_PRIME_HANDLE_TO_FD`, read-write, close-on-exec).
    /// The caller owns the returned buffer.
    public func exportBuffer(_ handle: Handle) throws -> DmaBuffer {
        var request = DRMPrimeHandle(handle: handle, flags: UInt32(O_CLOEXEC | O_RDWR), fd: -1)
        try check(Sys.ioctl(device.descriptor, DRMPrimeHandle.handleToFD, &request), "DRM_IOCTL_PRIME_HANDLE_TO_FD")
        return DmaBuffer(adopting: UniqueFD(adopting: request.fd))
    }

    /// Imports a dma-buf as a GEM handle (`DRM_IOCTL_PRIME_FD_TO_HANDLE`). The buffer stays the caller's.
    public func importBuffer(_ buffer: DmaBuffer) throws -> Handle {
        var request = DRMPrimeHandle(handle: 0, flags: 0, fd: buffer.fd.descriptor.rawValue)
        try check(Sys.ioctl(device.descriptor, DRMPrimeHandle.fdToHandle, &request), "DRM_IOCTL_PRIME_FD_TO_HANDLE")
        return request.handle
    }

    /// Closes a GEM handle (`DRM_IOCTL_GEM_CLOSE`).
    public func closeHandle(_ handle: Handle) {
        var request = DRMGemClose(handle: handle, pad: 0)
        _ = Sys.ioctl(device.descriptor, CDmaBuf_DRM_IOCTL_GEM_CLOSE, &request)
    }

    /// vgem: attaches a new unsignalled fence to the buffer's reservation (`DRM_IOCTL_VGEM_FENCE_ATTACH`),
    /// as a write (exclusive) fence when `write`. vgem signals it by itself after about 10 s.
    /// - Returns: the fence id for ``vgemSignalFence(_:)``.
    public func vgemAttachFence(_ handle: Handle, write: Bool) throws -> UInt32 {
        var request = CDmaBuf_vgem_fence_attach(handle: handle, flags: write ? CDmaBuf_VGEM_FENCE_WRITE : 0, out_fence: 0, pad: 0)
        try check(Sys.ioctl(device.descriptor, CDmaBuf_DRM_IOCTL_VGEM_FENCE_ATTACH, &request), "DRM_IOCTL_VGEM_FENCE_ATTACH")
        return request.out_fence
    }

    /// vgem: signals a fence made by ``vgemAttachFence(_:write:)`` (`DRM_IOCTL_VGEM_FENCE_SIGNAL`).
    /// - Throws: ``DmaBufError`` ETIMEDOUT when vgem already signalled it on its own (after ~10 s), ENOENT when
    ///   it was already signalled through this call (the id is gone).
    public func vgemSignalFence(_ fence: UInt32) throws {
        var request = CDmaBuf_vgem_fence_signal(fence: fence, flags: 0)
        try check(Sys.ioctl(device.descriptor, CDmaBuf_DRM_IOCTL_VGEM_FENCE_SIGNAL, &request), "DRM_IOCTL_VGEM_FENCE_SIGNAL")
    }

    private func check(_ result: Result<CInt, Errno>, _ what: String) throws {
        if case .failure(let errno) = result {
            throw DmaBufError("drm", errno, "\(what) failed on \(path)")
        }
    }

    /// The driver's name from `DRM_IOCTL_VERSION`, or nil when `fd` is not a DRM node.
    static func driverName(_ fd: FileDescriptor) -> String? {
        precondition(MemoryLayout<DRMVersion>.size == 64 && MemoryLayout<DRMPrimeHandle>.size == 12
            && MemoryLayout<DRMModeCreateDumb>.size == 32 && MemoryLayout<DRMGemClose>.size == 8, "DRM uAPI layouts")
        var name = [CChar](repeating: 0, count: 64)
        return name.withUnsafeMutableBufferPointer { buffer -> String? in
            var version = DRMVersion(nameLength: buffer.count - 1, name: buffer.baseAddress)
            guard case .success = Sys.ioctl(fd, DRMVersion.request, &version) else { return nil }
            let length = min(version.nameLength, buffer.count - 1)
            return String(decoding: UnsafeRawBufferPointer(start: buffer.baseAddress, count: length), as: UTF8.self)
        }
    }
}

// uapi/drm/drm.h and drm_mode.h layouts. Swift lays out these structs exactly as C does (naturally aligned
// fields in order); `driverName` checks the sizes against the C ones before any request is made.

/// `_IOC(_IOC_READ|_IOC_WRITE, 'd', nr, size)`: DRM's DRM_IOWR.
func drmReadWrite(_ nr: UInt, size: Int) -> UInt { (3 << 30) | (UInt(size) << 16) | (UInt(UInt8(ascii: "d")) << 8) | nr }

/// `struct drm_version`.
struct DRMVersion {
    var major: Int32 = 0, minor: Int32 = 0, patchLevel: Int32 = 0
    var nameLength: Int = 0
    var name: UnsafeMutablePointer<CChar>? = nil
    var dateLength: Int = 0
    var date: UnsafeMutablePointer<CChar>? = nil
    var descriptionLength: Int = 0
    var description: UnsafeMutablePointer<CChar>? = nil
    init(nameLength: Int, name: UnsafeMutablePointer<CChar>?) { self.nameLength = nameLength; self.name = name }
    static let request = drmReadWrite(0x00, size: MemoryLayout<DRMVersion>.size)
}

/// `struct drm_prime_handle`.
struct DRMPrimeHandle {
    var handle: UInt32, flags: UInt32, fd: Int32
    static let handleToFD = drmReadWrite(0x2D, size: MemoryLayout<DRMPrimeHandle>.size)
    static let fdToHandle = drmReadWrite(0x2E, size: MemoryLayout<DRMPrimeHandle>.size)
}

/// `struct drm_mode_create_dumb`.
struct DRMModeCreateDumb {
    var height: UInt32, width: UInt32, bpp: UInt32, flags: UInt32 = 0, handle: UInt32 = 0, pitch: UInt32 = 0
    var size: UInt64 = 0
}

/// `struct drm_gem_close`.
struct DRMGemClose { var handle: UInt32, pad: UInt32 }
