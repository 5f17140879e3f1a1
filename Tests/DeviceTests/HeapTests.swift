import DmaBuf

enum HeapTests {
    static let all: [DeviceTest] = [
        DeviceTest("heap.alloc-4k", requires: [.heap("system")]) {
            let heap = try DmaHeap(named: "system")
            let buffer = try heap.allocate(length: 4096)
            try expectEqual(try buffer.size(), 4096, "size")
            try expectEqual(try buffer.info().exporter, "system", "exporter")
        },
        DeviceTest("heap.len-0-einval", requires: [.heap("system")]) {
            let heap = try DmaHeap(named: "system")
            try expectError(.invalidArgument, "cannot allocate 0 bytes") { try heap.allocate(length: 0) }
        },
    ]
}

enum UDmabufTests { static let all: [DeviceTest] = [] }
enum DmaBufferTests { static let all: [DeviceTest] = [] }
enum FenceTests { static let all: [DeviceTest] = [] }
enum PageRunTests { static let all: [DeviceTest] = [] }
