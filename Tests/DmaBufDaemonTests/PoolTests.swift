import DmaBuf
import DmaBufWire
import SystemPackage
import Testing
@testable import DmaBufDaemon

/// Warm pools (`pool = <heap> <size> <count>`): fresh buffers only, charged when handed out, bounded.
@Suite("Broker warm pools", .serialized)
struct PoolTests {
    static let mib: UInt64 = 1 << 20

    /// Pumps until every pool is full (the refill thread answers through the loop).
    static func waitFull(_ h: BrokerHarness, _ count: Int, size: UInt64 = mib) -> Bool {
        h.pump(until: { h.broker.pools.readyCounts.values.reduce(0, +) == count }, iterations: 400)
    }

    @Test func configParsesPoolsAndRefusesBadOnes() throws {
        let config = try DaemonConfig(parsing: "pool = system 16M 4\npool = linux,cma 5000 2\npool_max_bytes = 128M\n")
        #expect(config.pools == [PoolSpec(heap: "system", size: 16 << 20, count: 4), PoolSpec(heap: "linux,cma", size: 8192, count: 2)])
        #expect(config.poolMaxBytes == 128 << 20)
        for bad in ["pool = system 16M", "pool = system 0 4", "pool = system 4K 0", "pool = ../x 4K 1", "pool = system 4K many"] {
            #expect(throws: DaemonConfig.ParseError.self) { try DaemonConfig(parsing: bad) }
        }
    }

    @Test func servesFreshBuffersAndChargesOnHandOut() throws {
        try BrokerHarness.scenario({ $0.pools = [PoolSpec(heap: "system", size: Self.mib, count: 2)] }) { h in
            #expect(Self.waitFull(h, 2))
            #expect(h.broker.books.usage.isEmpty)  // pooled buffers count against no one
            let client = try h.connect()
            let (info, fd) = try client.allocate(Self.mib - 100)  // page-rounded to the pool's size
            #expect(h.broker.pools.served == 1 && info.size == Self.mib)
            #expect(h.broker.books.usage[1000]?.bytes == Self.mib)
            // Released, it is never pooled again: every buffer later served is a new file.
            _ = consume fd
            try client.expectOK(.release(info.id))
            #expect(Self.waitFull(h, 2))
            for _ in 0..<3 {
                let (again, _) = try client.allocate(Self.mib)
                #expect(again.inode != info.inode)
            }
            // The first came from a full pool; the others from it or, while it refilled, from the heap.
            #expect((2...4).contains(h.broker.pools.served))
            // Other sizes and other access modes are allocated as usual.
            let (other, _) = try client.allocate(2 * Self.mib)
            #expect(other.size == 2 * Self.mib)
            h.broker.pools.stop()
        }
    }

    @Test func readOnlyRequestsAreNotServedFromThePool() throws {
        try BrokerHarness.scenario({ $0.pools = [PoolSpec(heap: "system", size: Self.mib, count: 1)] }) { h in
            #expect(Self.waitFull(h, 1))
            let client = try h.connect(version: 2)
            let (reply, _) = try client.request(.allocate(AllocateRequest(size: Self.mib, heap: "system", tag: "", fdFlags: FDFlags.readOnly)))
            guard case .buffer = reply else { Issue.record("\(reply)"); return }
            #expect(h.broker.pools.served == 0)
            h.broker.pools.stop()
        }
    }

    @Test func stayWithinPoolMaxBytes() throws {
        try BrokerHarness.scenario({
            $0.pools = [PoolSpec(heap: "system", size: Self.mib, count: 8)]
            $0.poolMaxBytes = 3 * Self.mib
        }) { h in
            #expect(Self.waitFull(h, 3))
            h.pump(iterations: 20)
            #expect(h.broker.pools.readyCounts.values.reduce(0, +) == 3 && h.broker.pools.bytes == 3 * Self.mib)
            h.broker.pools.stop()
        }
    }

    /// Refills that come back after stop() (the loop's last turns at shutdown) are dropped: the byte count
    /// stays 0 and nothing traps (it subtracted their size from the 0 that stop() left).
    @Test func refillsAfterStopAreDropped() throws {
        try BrokerHarness.scenario({ $0.pools = [PoolSpec(heap: "system", size: Self.mib, count: 8)] }) { h in
            // Stopped while refills are out (bytes counts them before they are ready).
            let pools = h.broker.pools
            let outstanding = h.pump(until: { pools.bytes > UInt64(pools.readyCounts.values.reduce(0, +)) * Self.mib }, iterations: 400, waitMilliseconds: 0)
            pools.stop()
            if !outstanding { print("refillsAfterStopAreDropped: every refill finished before stop(); not tested") }
            h.pump(iterations: 50, waitMilliseconds: 1)
            #expect(h.broker.pools.bytes == 0 && h.broker.pools.readyCounts.values.reduce(0, +) == 0)
        }
    }

    /// A daemon started without pools gets them from a reload (SIGHUP).
    @Test func poolsAddedByReloadFill() throws {
        try BrokerHarness.scenario { h in
            var config = h.broker.config
            config.pools = [PoolSpec(heap: "system", size: Self.mib, count: 2)]
            h.broker.reload(config)
            #expect(Self.waitFull(h, 2))
            h.broker.pools.stop()
        }
    }

    /// With heap memory charged to cgroups, a pooled buffer would stay charged to dmabufd: pools stop serving.
    @Test func offWhenTheKernelChargesHeapMemory() throws {
        try BrokerHarness.scenario({ $0.pools = [PoolSpec(heap: "system", size: Self.mib, count: 2)] }) { h in
            #expect(Self.waitFull(h, 2))
            h.kernel.accounting = true
            h.broker.reload(h.broker.config)
            #expect(h.broker.pools.readyCounts.values.reduce(0, +) == 0)
            let client = try h.connect()
            _ = try client.allocate(Self.mib)
            #expect(h.broker.pools.served == 0)
            h.broker.pools.stop()
        }
    }
}
