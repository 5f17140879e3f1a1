// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "dmabufd",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "DmaBuf", targets: ["DmaBuf"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system.git", from: "1.4.0"),
    ],
    targets: [
        // C shim over the dma-buf uAPI: ioctl request numbers, flexible-array structs, CMSG, fcntl.
        .target(name: "CDmaBuf"),
        .systemLibrary(name: "CUdev", pkgConfig: "libudev", providers: [.apt(["libudev-dev"])]),
        .systemLibrary(name: "CDrm", pkgConfig: "libdrm", providers: [.apt(["libdrm-dev"])]),
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        // Typed Swift layer over the kernel: heaps, udmabuf, dma-buf, sync_file, page runs.
        .target(
            name: "DmaBuf",
            dependencies: [
                "CDmaBuf", "CDrm",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .testTarget(name: "DmaBufTests", dependencies: ["DmaBuf", "CDmaBuf"]),
    ]
)
