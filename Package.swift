// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "dmabufd",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "DmaBuf", targets: ["DmaBuf"]),
        .library(name: "DmaBufWire", targets: ["DmaBufWire"]),
        .library(name: "DmaBufClient", targets: ["DmaBufClient"]),
        .executable(name: "dmabufd", targets: ["dmabufd"]),
        .executable(name: "dmabufctl", targets: ["dmabufctl"]),
        .executable(name: "dmabufd-charge", targets: ["dmabufd-charge"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-system.git", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.6.0"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.1.0"),
    ],
    targets: [
        // C shim over the dma-buf uAPI: ioctl request numbers, flexible-array structs, CMSG, fcntl.
        .target(name: "CDmaBuf"),
        // dmabufd's start-up constructor: opens /proc/self/pagemap, then drops every capability.
        .target(name: "CDmabufdStart"),
        // The daemon's side of the charge helpers: posix_spawn, pidfd kill and reap, the cgroup.procs write.
        .target(name: "CDmabufdCharge", cSettings: [.define("_GNU_SOURCE")]),
        .systemLibrary(name: "CUdev", pkgConfig: "libudev", providers: [.apt(["libudev-dev"])]),
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        // Pure value types (page runs, errno names) shared by every layer; nothing but the stdlib.
        .target(name: "DmaBufTypes"),
        // Typed Swift layer over the kernel: heaps, udmabuf, dma-buf, sync_file, page runs. No libdrm, no libudev:
        // clients link it.
        .target(
            name: "DmaBuf",
            dependencies: [
                "CDmaBuf", "DmaBufTypes",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // The wire protocol: message types, the binary codec, limits. No I/O, nothing kernel-side.
        .target(name: "DmaBufWire", dependencies: ["DmaBufTypes"]),
        // Async client library over the protocol.
        .target(name: "DmaBufClient", dependencies: ["DmaBuf", "DmaBufWire"]),
        // The broker's service logic: event loop, accounting, quotas, leases, udev, systemd.
        .target(
            name: "DmaBufDaemon",
            dependencies: [
                "DmaBuf", "DmaBufWire", "CDmaBuf", "CUdev", "CSystemd", "CDmabufdCharge",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "HeapModule", package: "swift-collections"),
                .product(name: "DequeModule", package: "swift-collections"),
            ]
        ),
        .executableTarget(
            name: "dmabufd",
            dependencies: [
                "DmaBufDaemon", "CDmabufdStart", "DmaBuf",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // The charge helper dmabufd spawns into each client's memory cgroup: plain C, no Swift runtime.
        .executableTarget(name: "dmabufd-charge", cSettings: [.define("_GNU_SOURCE")]),
        .target(
            name: "DmaBufCLI",
            dependencies: [
                "DmaBuf", "DmaBufWire", "DmaBufClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "dmabufctl", dependencies: ["DmaBufCLI"]),
        // The README's demo: two client processes exchange a buffer through dmabufd.
        .executableTarget(name: "dmabuf-demo", dependencies: ["DmaBuf", "DmaBufClient", "DmaBufWire"], path: "Examples/Demo"),
        // Device tests: run on real dma-heap/udmabuf/vgem (in scripts/vm), skip with a reason elsewhere.
        .executableTarget(
            name: "dmabuf-device-tests",
            dependencies: ["DmaBuf", "DmaBufWire", "DmaBufClient", "DmaBufDaemon", "CDmaBuf", "DmaBufTestSupport"],
            path: "Tests/DeviceTests"
        ),
        // Shared by the tests: the seeded generator every randomized test replays with.
        .target(name: "DmaBufTestSupport", path: "Tests/Support"),
        .testTarget(name: "DmaBufTests", dependencies: ["DmaBuf", "CDmaBuf", "DmaBufTestSupport"]),
        .testTarget(name: "DmaBufWireTests", dependencies: ["DmaBufWire", "DmaBufTypes", "DmaBufTestSupport"]),
        .testTarget(name: "DmaBufDaemonTests", dependencies: ["DmaBufDaemon", "DmaBufWire", "DmaBuf", "DmaBufTypes", "CDmaBuf", "DmaBufTestSupport"]),
        .testTarget(name: "DmaBufCLITests", dependencies: ["DmaBufCLI", "DmaBufWire"]),
        .testTarget(name: "DmaBufClientTests", dependencies: ["DmaBufClient", "DmaBufWire", "DmaBuf"]),
        // libdmabufd's C codec, built as a C target so its tests compare bytes with DmaBufWire.
        .target(name: "CLibDmabufd", path: "libdmabufd", sources: ["src/wire.c", "src/client.c"], publicHeadersPath: "include",
                cSettings: [.define("_GNU_SOURCE")]),
        .testTarget(name: "CLibWireTests", dependencies: ["CLibDmabufd", "DmaBufWire", "DmaBufTestSupport"]),
    ]
)
