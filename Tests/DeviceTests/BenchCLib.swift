// Row L1 of scripts/bench (issue 12): a C client's 4 KiB allocation through libdmabufd against the Swift
// client's, same daemon, same boot. Kept apart from BenchMode.swift's P rows.
import DmaBufClient

#if canImport(Glibc)
import Glibc
#endif

extension Bench {
    /// Each round: the Swift client's median of `n` timed `allocate` calls (each released after), and the
    /// C program's own median of `n` (`Benchmarks/clib_alloc.c`, libdmabufd linked statically, its connect
    /// and ten warm-ups untimed), in alternating order so that neither side always runs first. The row is
    /// the median of the per-round ratios C/Swift; the goal is issue 12's "at most 1.05×".
    static func clibRow(_ program: String, socket: String, _ connection: DmaBufConnection, _ report: Report, rounds: Int) throws {
        let n = 101
        var swift: [Double] = [], c: [Double] = []
        for round in 0...rounds {
            var cNS = 0.0, swiftNS = 0.0
            for side in round % 2 == 0 ? [0, 1] : [1, 0] {
                if side == 0 { swiftNS = try swiftAllocations(connection, n) } else { cNS = try clibAllocations(program, socket: socket, n) }
            }
            guard round > 0 else { continue }
            swift.append(swiftNS); c.append(cNS)
        }
        report.add("L1", "alloc 4 KiB via libdmabufd (C) / via DmaBufClient (Swift), same daemon", ratios: zip(c, swift).map { $0 / $1 },
                   goal: .atMost(1.05), detail: "C client \(us(median(c))); Swift client \(us(median(swift)))")
    }

    private static func swiftAllocations(_ connection: DmaBufConnection, _ n: Int) throws -> Double {
        var samples: [Double] = []
        for _ in 0..<n {
            let t0 = nowNS()
            let buffer = try connection.allocate(size: 4096, heap: "system", tag: "l1")
            samples.append(Double(nowNS() - t0))
            let id = buffer.info.id
            _ = consume buffer
            try connection.release(id)
        }
        return median(samples)
    }

    /// Runs the C program once; its stdout's `median_ns X` line.
    private static func clibAllocations(_ program: String, socket: String, _ n: Int) throws -> Double {
        let out = "/tmp/bench-clib-\(getpid()).out"
        let rc = Harness.run(["/bin/sh", "-c", "DMABUFD_SOCKET='\(socket)' '\(program)' \(n) 4096 > '\(out)' 2>&1"])
        let text = Harness.readFile(out) ?? ""
        unlink(out)
        guard rc == 0, let line = text.split(separator: "\n").first(where: { $0.hasPrefix("median_ns ") }),
              let ns = Double(line.dropFirst("median_ns ".count)) else {
            throw TestFailure(description: "\(program) exited \(rc): \(text)")
        }
        return ns
    }
}
