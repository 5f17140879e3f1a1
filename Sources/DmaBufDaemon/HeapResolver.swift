import DmaBuf
import DmaBufWire

#if canImport(Glibc)
import Glibc
#endif

/// Maps the names clients use to the kernel's heaps, and policies to fallback chains.
///
/// Logical names: `system`, `system-uncached`, `cma` (the first of `default_cma_region`, `linux,cma`,
/// `reserved` that exists; every CMA region is also reachable as `cma:<kernel name>`), `udmabuf`
/// (memfd-backed, via `/dev/udmabuf`), and any other heap by its kernel name.
public struct HeapResolver: Sendable {
    /// One allocatable target.
    public enum Target: Sendable, Equatable {
        case heap(kernelName: String)
        case udmabuf
    }

    public private(set) var heaps: [HeapInfo] = []
    private var targets: [String: Target] = [:]
    public let policies: [String: [String]]
    let heapDirectory: String
    let udmabufDevice: String
    /// When the kernel's heaps were last read into this resolver.
    public private(set) var scannedAt = ContinuousClock.now

    /// The default CMA region's names, best first: `default_cma_region` is its name since 6.17, `linux,cma`
    /// a devicetree board's, and `reserved` the legacy alias (DMABUF_HEAPS_CMA_LEGACY) of the same memory
    /// as `default_cma_region`, so it is only a fallback for older kernels.
    static let cmaAliases = ["default_cma_region", "linux,cma", "reserved"]

    /// - Parameters: heaps, udmabuf: what the kernel backend found (``KernelBackend/rescan()``).
    public init(policies: [String: [String]], heapDirectory: String, udmabufDevice: String, heaps: [String], udmabuf: Bool) {
        self.policies = policies
        self.heapDirectory = heapDirectory
        self.udmabufDevice = udmabufDevice
        update(heaps: heaps, udmabuf: udmabuf)
    }

    /// Takes the kernel's current heap names and udmabuf availability. Returns true when something changed.
    @discardableResult
    public mutating func update(heaps names: [String], udmabuf: Bool) -> Bool {
        var heaps: [HeapInfo] = []
        var targets: [String: Target] = [:]
        for name in names {
            let kind: String
            if name == "system" { kind = "system" }
            else if name == "system-uncached" || name == "system_uncached" { kind = "system-uncached" }
            else if HeapResolver.cmaAliases.contains(name) || name.contains("cma") { kind = "cma" }
            else { kind = "other" }
            let logical = kind == "cma" ? "cma:\(name)" : (kind == "system-uncached" ? "system-uncached" : name)
            heaps.append(HeapInfo(name: logical, device: "\(heapDirectory)/\(name)", kind: kind))
            targets[logical] = .heap(kernelName: name)
            targets[name] = .heap(kernelName: name)
        }
        if let cma = HeapResolver.cmaAliases.first(where: names.contains) ?? names.first(where: { $0.contains("cma") }) {
            heaps.append(HeapInfo(name: "cma", device: "\(heapDirectory)/\(cma)", kind: "cma"))
            targets["cma"] = .heap(kernelName: cma)
        }
        if udmabuf {
            heaps.append(HeapInfo(name: "udmabuf", device: udmabufDevice, kind: "udmabuf"))
            targets["udmabuf"] = .udmabuf
        }
        let changed = heaps != self.heaps
        scannedAt = .now
        self.heaps = heaps
        self.targets = targets
        return changed
    }

    /// The targets to try, in order, for a heap or policy name. Missing heaps are left out; an empty
    /// result means nothing by that name exists now.
    public func chain(for name: String) -> [(logical: String, target: Target)] {
        if let chain = policies[name] {
            return chain.compactMap { logical in targets[logical].map { (logical, $0) } }
        }
        return targets[name].map { [(name, $0)] } ?? []
    }

    /// True when the logical or kernel heap name `name` is a CMA heap, whose buffers are physically contiguous.
    public func isCMA(_ name: String) -> Bool {
        guard case .heap(let kernelName) = targets[name] else { return false }
        return heaps.contains { $0.kind == "cma" && $0.device == "\(heapDirectory)/\(kernelName)" }
    }

    /// True when `name` is a policy rather than a heap.
    public func isPolicy(_ name: String) -> Bool { policies[name] != nil }
}

extension Broker {
    /// The least time between two rescans a request asks for. A name that matches no heap (or a listing,
    /// without hotplug monitoring) would otherwise reread /dev/dma_heap and reopen every device per
    /// request: CPU a client could spend for the daemon. Hotplug events and reloads rescan at once.
    static let minimumRescanInterval: Duration = .seconds(1)

    /// Rescans unless the last scan was less than ``minimumRescanInterval`` ago. True when it rescanned.
    @discardableResult
    func rescanHeapsIfDue() -> Bool {
        guard ContinuousClock.now - resolver.scannedAt >= Broker.minimumRescanInterval else { return false }
        rescanHeaps()
        return true
    }
}
