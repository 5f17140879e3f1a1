// `dmabuf-device-tests --bench [OPTIONS]`: dmabufd's benchmarks, run by scripts/bench inside one VM boot.
//
// Every figure is a ratio against the raw kernel floor measured in the same boot by Benchmarks/floor.c,
// which runs as a coprocess: each round asks floor for the raw cost, then measures the same operation
// through a real dmabufd, so slow drift of the emulated machine hits both sides of a ratio alike. Each
// row prints the median of the per-round ratios and their min–max. Statistics are our own (median,
// min, max over rounds): ordo-one/benchmark would add little inside a TCG guest whose noise dwarfs its
// precision.
import DmaBufTestSupport
import CDmaBuf
import DmaBuf
import DmaBufClient
import DmaBufWire
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

enum Bench {
    struct Options {
        var floorPath = ""
        var rounds = 5
        var soakCycles = 10_000
        var p2Seconds = 3
        var only: Set<String> = []
        /// Row L1's C client (Benchmarks/clib_alloc.c); the row is left out without it.
        var clibPath = ""
        func wants(_ row: String) -> Bool { only.isEmpty || only.contains(row) }
    }

    static func main(_ arguments: [String]) -> Int32 {
        var options = Options()
        var i = 0
        func value() -> String? { i += 1; return i < arguments.count ? arguments[i] : nil }
        while i < arguments.count {
            switch arguments[i] {
            case "--floor": options.floorPath = value() ?? ""
            case "--rounds": options.rounds = value().flatMap { Int($0) } ?? options.rounds
            case "--soak": options.soakCycles = value().flatMap { Int($0) } ?? options.soakCycles
            case "--p2-seconds": options.p2Seconds = value().flatMap { Int($0) } ?? options.p2Seconds
            case "--clib": options.clibPath = value() ?? ""
            case "--only": options.only = Set((value() ?? "").split(separator: ",").map { String($0).uppercased() })
            default:
                Harness.warn("bench: unknown option \(arguments[i])")
                Harness.warn("usage: dmabuf-device-tests --bench --floor PATH [--rounds N] [--soak CYCLES] [--p2-seconds S] [--only P1,P1B,P2,P3,P4,P5,X,CMA,CLIB,SOAK,PHASES] [--clib PATH]")
                return 64
            }
            i += 1
        }
        guard !options.floorPath.isEmpty else {
            Harness.warn("bench: --floor PATH (the built Benchmarks/floor.c) is required")
            return 64
        }
        do {
            try run(options)
            return 0
        } catch {
            Harness.warn("bench: \(error)")
            return 1
        }
    }

    // MARK: - Setup

    static func run(_ options: Options) throws {
        guard geteuid() == 0 else { throw TestFailure(description: "run as root inside scripts/vm") }
        // The daemon keeps one fd per buffer: P5 holds 10 000.
        var limit = rlimit(rlim_cur: 65536, rlim_max: 65536)
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) != 0 { Harness.warn("bench: cannot raise RLIMIT_NOFILE") }
        Harness.writeFile("/proc/sys/vm/nr_hugepages", "40\n")
        for requirement in [Requirement.heap("system"), .udmabuf, .vgem, .hugePages(32)] {
            if let reason = requirement.unmetReason() { throw TestFailure(description: reason) }
        }
        let floor = try Floor(path: options.floorPath)
        defer { floor.stop() }

        let report = Report(rounds: options.rounds)
        Harness.say("dmabufd bench: kernel \(uname()), \(sysconf(Int32(_SC_NPROCESSORS_ONLN))) CPUs, \(options.rounds) rounds (+1 warm-up) per row")

        let config = """
            max_buffer_size = 64M
            quota.default.bytes = 4G
            quota.default.buffers = 20000
            max_buffers_per_client = 20000
            max_connections_per_uid = 256
            """
        let daemon = try BenchDaemon(config: config)
        defer { daemon.stop() }
        let connection = try daemon.connect()

        if options.only.contains("PHASES") { try phases(daemon) }
        if options.wants("P5") { try p5(daemon, connection, report) }
        if options.wants("P1") { try p1(floor, connection, report, rounds: options.rounds) }
        if options.wants("P1B") { try p1b(floor, config: config, report, rounds: options.rounds) }
        if options.wants("P2") {
            try p2(floor, daemon, report, rounds: options.rounds, seconds: options.p2Seconds, batch: 0)
            try p2(floor, daemon, report, rounds: options.rounds, seconds: options.p2Seconds, batch: 16)
        }
        if options.wants("P3") { try p3(connection, report, rounds: options.rounds) }
        if options.wants("P4") { try p4(floor, connection, report, rounds: options.rounds) }
        if options.wants("X") { try extras(floor, connection, report, rounds: options.rounds) }
        // Only kernels with a CMA heap (7.3-cma) have this row; elsewhere it is left out, and said so.
        if options.wants("CMA") {
            if CMAFacts.heapNames().isEmpty { Harness.say("bench: no CMA heap on this kernel: row C1 left out") }
            else { try cmaRow(floor, connection, report, rounds: options.rounds) }
        }
        if options.wants("CLIB") {
            if options.clibPath.isEmpty { Harness.say("bench: no --clib program: row L1 left out") }
            else { try clibRow(options.clibPath, socket: daemon.socketPath, connection, report, rounds: options.rounds) }
        }
        report.print()
        if options.wants("SOAK") && options.soakCycles > 0 {
            Harness.say("soak: \(options.soakCycles) abrupt-client cycles (the fault.abrupt-clients test, scaled up), seed 0x\(String(FaultRun.seed, radix: 16))")
            let outcome = try FaultRun.abruptClients(socketPath: daemon.socketPath, pid: daemon.pid, cycles: options.soakCycles,
                                                     seed: FaultRun.seed, useFences: true, otherConnections: 1)
            Harness.say("soak: \(outcome)")
        }
    }

    // MARK: - P1: allocation through the daemon against raw alloc + fd round trip

    static func p1(_ floor: Floor, _ connection: DmaBufConnection, _ report: Report, rounds: Int) throws {
        for (size, n) in [(4096, 101), (1 << 20, 31), (16 << 20, 9)] {
            var raw: [Double] = [], rawAlloc: [Double] = [], rawRT: [Double] = [], daemon: [Double] = [], empty: [Double] = []
            var books: [Double] = [], cbroker: [Double] = []
            for round in 0...rounds {
                let alloc = try floor.ask("alloc \(size) \(n)")
                let rt = try floor.ask("rt \(n)")
                // The broker floor: a minimal C broker doing the same syscalls (Benchmarks/floor.c).
                let cb = size == 4096 ? try floor.ask("cbroker \(n)") : 0
                let samples = try timedAllocations(connection, size: size, tag: "p1", n)
                var emptySamples: [Double] = []
                for _ in 0..<n {
                    let t0 = nowNS()
                    _ = try connection.list()
                    emptySamples.append(Double(nowNS() - t0))
                }
                let bookkeeping = size == 4096 ? try bookkeepingCost(n) : 0
                guard round > 0 else { continue }
                rawAlloc.append(alloc); rawRT.append(rt); raw.append(alloc + rt)
                daemon.append(median(samples))
                empty.append(median(emptySamples))
                books.append(bookkeeping)
                cbroker.append(cb / (alloc + rt))
            }
            let goal = size == 4096 ? 2.0 : size == 16 << 20 ? 1.05 : nil
            let floorText = size == 4096 ? "; C broker floor \(fmt(median(cbroker), 2))× [\(fmt(cbroker.min() ?? .nan, 2))–\(fmt(cbroker.max() ?? .nan, 2))]" : ""
            let extra = floorText + (size != 4096 ? "" : "; the daemon's kernel calls per allocation besides the ioctl and messages (name, fstat, and the release's fdinfo read), timed here: \(us(median(books)))")
            report.add("P1", "alloc \(ByteCount(size)) via dmabufd / (raw alloc + fd round trip)", ratios: zip(daemon, raw).map { $0 / $1 },
                       goal: goal.map { .atMost($0) },
                       detail: "daemon \(us(median(daemon))); raw alloc \(us(median(rawAlloc))) + RT \(us(median(rawRT))); empty request \(us(median(empty)))\(extra)")
        }
    }

    /// `n` allocations from the system heap, each timed to its reply (ns), closed and released before the
    /// next, with `pause` µs after each.
    static func timedAllocations(_ connection: DmaBufConnection, size: Int, tag: String, _ n: Int, pause: useconds_t = 0) throws -> [Double] {
        var samples: [Double] = []
        for _ in 0..<n {
            let t0 = nowNS()
            let buffer = try connection.allocate(size: size, heap: "system", tag: tag)
            samples.append(Double(nowNS() - t0))
            let id = buffer.info.id
            _ = consume buffer
            try connection.release(id)
            if pause > 0 { usleep(pause) }
        }
        return samples
    }

    // MARK: - C1: a 16 MiB CMA allocation through dmabufd against raw, in the same boot

    /// Raw: DMA_HEAP_IOCTL_ALLOC of 16 MiB on the CMA heap in this process (the heap fd opened once, as the
    /// floor does for the system heap) plus the floor's fd round trip; through dmabufd: `allocate` on the
    /// logical `cma` heap. Each buffer is freed before the next, so the 64 MiB region never fills.
    static func cmaRow(_ floor: Floor, _ connection: DmaBufConnection, _ report: Report, rounds: Int) throws {
        let size = 16 << 20, n = 5
        let heap = try DmaHeap(named: CMAFacts.heapNames().contains("default_cma_region") ? "default_cma_region" : CMAFacts.heapNames()[0])
        var raw: [Double] = [], rawAlloc: [Double] = [], rawRT: [Double] = [], daemon: [Double] = []
        for round in 0...rounds {
            var allocs: [Double] = [], samples: [Double] = []
            // Alternate which side goes first: a CMA allocation's cost depends on what the last free left
            // in the region (pages to migrate, per-CPU lists to drain), so a fixed order biases the ratio.
            for side in round % 2 == 0 ? [0, 1] : [1, 0] {
                for _ in 0..<n {
                    let t0 = nowNS()
                    if side == 0 {
                        let buffer = try heap.allocate(length: size)
                        allocs.append(Double(nowNS() - t0))
                        _ = consume buffer
                    } else {
                        let buffer = try connection.allocate(size: size, heap: "cma", tag: "c1")
                        samples.append(Double(nowNS() - t0))
                        let id = buffer.info.id
                        _ = consume buffer
                        try connection.release(id)
                    }
                }
            }
            let rt = try floor.ask("rt \(n)")
            guard round > 0 else { continue }
            rawAlloc.append(median(allocs)); rawRT.append(rt); raw.append(median(allocs) + rt)
            daemon.append(median(samples))
        }
        report.add("C1", "alloc 16 MiB from the CMA heap via dmabufd / (raw CMA alloc + fd round trip)", ratios: zip(daemon, raw).map { $0 / $1 },
                   goal: .atMost(1.05),
                   detail: "daemon \(us(median(daemon))); raw CMA alloc \(us(median(rawAlloc))) + RT \(us(median(rawRT)))")
    }

    /// What the daemon does per allocation besides the ioctl and the messages, repeated here to size it:
    /// name the buffer, fstat it (size and inode), and on release read its fdinfo (the reference count).
    /// Median ns of `n`.
    static func bookkeepingCost(_ n: Int) throws -> Double {
        let buffer = try DmaHeap(named: "system").allocate(length: 4096)
        var samples: [Double] = []
        for _ in 0..<n {
            let t0 = nowNS()
            try buffer.setName("0:1:p1")
            _ = try buffer.inode()
            _ = try buffer.info()
            samples.append(Double(nowNS() - t0))
        }
        return median(samples)
    }

    /// `--only PHASES` (diagnostic, not in the table): where a request's time goes, seen from the client:
    /// send until the reply is readable (the daemon's work and two wake-ups), the receive, the decode.
    static func phases(_ daemon: BenchDaemon) throws {
        let connection = try daemon.connect()
        let socket = connection.socket.descriptor
        func phase(_ request: Request) throws -> (Double, Double, Double) {
            var a: [Double] = [], b: [Double] = [], c: [Double] = []
            for i in 0..<41 {
                let t0 = nowNS()
                try UnixSocket.send(socket, bytes: WireMessage.encode(request, requestID: UInt32(1000 + i), version: connection.version))
                var p = [pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)]
                _ = poll(&p, 1, -1)
                let t1 = nowNS()
                let m = try UnixSocket.receive(socket, maxBytes: WireLimits.maximumMessageSize, maxFDs: 16)
                let t2 = nowNS()
                let (_, response) = try WireMessage.decodeResponse(m.bytes, descriptors: m.fds.count, version: connection.version)
                let t3 = nowNS()
                a.append(Double(t1 - t0)); b.append(Double(t2 - t1)); c.append(Double(t3 - t2))
                if case .buffer(let info) = response {
                    _ = consume m
                    try UnixSocket.send(socket, bytes: WireMessage.encode(.release(info.id), requestID: 1, version: connection.version))
                    _ = try UnixSocket.receive(socket, maxBytes: WireLimits.maximumMessageSize, maxFDs: 16)
                }
            }
            return (median(a), median(b), median(c))
        }
        for (name, request) in [("list", Request.list(all: false)), ("stats", .stats), ("info-missing", .info(999_999)),
                                ("alloc", .allocate(AllocateRequest(size: 4096, heap: "system", tag: "x"))),
                                ("list", Request.list(all: false)), ("alloc", .allocate(AllocateRequest(size: 4096, heap: "system", tag: "x")))] {
            let (wait, recv, decode) = try phase(request)
            Harness.say("PHASES \(name): send→readable \(us(wait)), recv \(us(recv)), decode \(us(decode))")
        }
    }

    // MARK: - P2: 64 clients alloc/free against one process's raw loop

    /// `batch` 0 (row P2): each operation one awaited `allocate` and one `release_quiet` (v2: no reply to
    /// wait for). `batch` N (row P2b): one `allocate_batch` of N and one `release_quiet` of those N, N
    /// operations. Fairness: the least-served client's operations over the mean.
    static func p2(_ floor: Floor, _ daemon: BenchDaemon, _ report: Report, rounds: Int, seconds: Int, batch: Int) throws {
        let clients = 64
        let connections = try (0..<clients).map { i in Handoff(try DmaBufConnection(path: daemon.socketPath, clientName: "p2-\(i)")) }
        var ratios: [Double] = [], daemonRates: [Double] = [], rawRates: [Double] = [], fairness: [Double] = [], cbroker: [Double] = []
        for round in 0...rounds {
            let raw = try floor.ask("allocfree 4096 \(seconds * 1000)")
            if batch == 0 { cbroker.append(try floor.ask("cbrokerp2 \(clients) \(seconds * 1000)") / raw) }
            let start = Locked(false)
            let deadlineBox = Locked(ContinuousClock.now)
            let threads = connections.map { client in
                BackgroundThread { () -> Int in
                    while !start.withLock({ $0 }) { usleep(1000) }
                    let deadline = deadlineBox.withLock { $0 }
                    var ops = 0
                    let connection = client.value
                    while ContinuousClock.now < deadline {
                        if batch == 0 {
                            let id = try connection.allocate(size: 4096, heap: "system", tag: "p2").info.id
                            try connection.releaseQuiet([id])
                            ops += 1
                        } else {
                            let ids = try connection.allocateBatch(count: batch, size: 4096, heap: "system", tag: "p2b").map(\.info.id)
                            try connection.releaseQuiet(ids)
                            ops += batch
                        }
                    }
                    return ops
                }
            }
            usleep(50_000)
            let began = ContinuousClock.now
            deadlineBox.withLock { $0 = began + .seconds(seconds) }
            start.withLock { $0 = true }
            let counts = try threads.map { try $0.join() }
            let elapsed = FaultRun.seconds(ContinuousClock.now - began)
            guard round > 0 else { continue }
            let rate = Double(counts.reduce(0, +)) / elapsed
            daemonRates.append(rate)
            rawRates.append(raw)
            ratios.append(rate / raw)
            let mean = Double(counts.reduce(0, +)) / Double(counts.count)
            fairness.append(Double(counts.min() ?? 0) / max(mean, 1))
        }
        let fair = median(fairness)
        let what = batch == 0 ? "64 clients allocate + release_quiet via dmabufd / one process's raw alloc/free (ops/s)"
            : "64 clients allocate_batch(\(batch)) + release_quiet via dmabufd / one process's raw alloc/free (buffers/s)"
        report.add(batch == 0 ? "P2" : "P2b", what, ratios: ratios, goal: batch == 0 ? .atLeast(0.25) : nil,
                   detail: "daemon \(fmt(median(daemonRates), 0)) ops/s; raw \(fmt(median(rawRates), 0)) ops/s; least client/mean \(fmt(fair, 2))"
                       + (batch == 0 ? " (≥0.50 \(fair >= 0.5 ? "met" : "MISSED")); C broker floor (64 client threads, alloc + release) \(fmt(median(Array(cbroker.dropFirst())), 2))×" : ""))
    }

    // MARK: - P1b: a pooled 16 MiB allocation

    /// Its own daemon with `pool = system 16M 4` (P1's daemon has no pool, so P1 16 MiB stays unpooled).
    /// Each sample allocates, releases, and gives the refill thread 150 ms to replace the buffer, so the
    /// next request finds the pool full and no refill running beside it.
    static func p1b(_ floor: Floor, config: String, _ report: Report, rounds: Int) throws {
        let size = 16 << 20, n = 9
        let daemon = try BenchDaemon(config: config + "\npool = system 16M 4\n", name: "pool")
        defer { daemon.stop() }
        let connection = try daemon.connect()
        usleep(1_000_000)
        var raw: [Double] = [], rawAlloc: [Double] = [], rawRT: [Double] = [], pooled: [Double] = []
        for round in 0...rounds {
            let alloc = try floor.ask("alloc \(size) \(n)")
            let rt = try floor.ask("rt \(n)")
            let samples = try timedAllocations(connection, size: size, tag: "p1b", n, pause: 150_000)
            guard round > 0 else { continue }
            rawAlloc.append(alloc); rawRT.append(rt); raw.append(alloc + rt)
            pooled.append(median(samples))
        }
        report.add("P1b", "pooled alloc 16 MiB via dmabufd (pool = system 16M 4) / (raw alloc + fd round trip)", ratios: zip(pooled, raw).map { $0 / $1 },
                   goal: .atMost(0.5), detail: "daemon \(us(median(pooled))); raw alloc \(us(median(rawAlloc))) + RT \(us(median(rawRT)))")
    }

    // MARK: - P3: page runs

    static func p3(_ connection: DmaBufConnection, _ report: Report, rounds: Int) throws {
        let perRun = MemoryLayout<PageRun>.stride
        let indexed = perRun + MemoryLayout<UInt64>.stride
        report.note("P3", "bytes per run: \(perRun) B per PageRun on the wire and in memory, \(indexed) B in PageRuns (run + offset index)")

        let huge = try connection.createUDmabuf(size: 64 << 20, tag: "p3-huge", hugePages: true)
        let t0 = nowNS()
        let layout = try connection.layout(huge.info.id, physical: true)
        let layoutTime = Double(nowNS() - t0)
        let pages = layout.runs.reduce(0) { $0 + $1.pages }
        report.note("P3", "64 MiB hugetlb udmabuf via dmabufd: \(layout.runs.count) physical run\(layout.runs.count == 1 ? "" : "s") for \(pages) pages (32 huge pages; goal ≤ 32), first layout \(us(layoutTime))")
        try connection.releaseLease(layout.lease)
        let hugeID = huge.info.id
        _ = consume huge
        try connection.release(hugeID)

        // 10^5 runs that never merge (every other page), queried with random 64-page windows.
        let runCount = 100_000
        var runs = PageRuns()
        for i in 0..<runCount { runs.append(start: UInt64(i) * 2 + 1_000_000, pages: 1 + UInt64(i % 3)) }
        var rng = SplitMix64(seed: 0x9A6E)
        var ratios: [Double] = [], sliceTimes: [Double] = [], scanTimes: [Double] = []
        for round in 0...rounds {
            let queries = (0..<200).map { _ -> Range<UInt64> in
                let first = UInt64.random(in: 0..<(runs.totalPages - 64), using: &rng)
                return first..<(first + 64)
            }
            var sink = 0
            let s0 = nowNS()
            for _ in 0..<10 { for q in queries { sink &+= runs.slice(q).count } }
            let slice = Double(nowNS() - s0) / Double(queries.count * 10)
            let l0 = nowNS()
            for q in queries.prefix(20) { sink &+= linearSlice(runs, q).count }
            let scan = Double(nowNS() - l0) / 20
            // The two must agree, or the comparison means nothing.
            for q in queries.prefix(20) where Array(runs.slice(q)) != linearSlice(runs, q) {
                throw TestFailure(description: "PageRuns.slice(\(q)) disagrees with the linear scan")
            }
            withExtendedLifetime(sink) {}
            guard round > 0 else { continue }
            ratios.append(slice / scan)
            sliceTimes.append(slice)
            scanTimes.append(scan)
        }
        report.add("P3", "PageRuns.slice of 64 pages at 10^5 runs / linear scan", ratios: ratios, goal: nil,
                   detail: "slice \(us(median(sliceTimes))); scan \(us(median(scanTimes)))")
    }

    /// The runs covering buffer pages `range`, found by walking every run from the start.
    static func linearSlice(_ runs: PageRuns, _ range: Range<UInt64>) -> [PageRun] {
        var result: [PageRun] = []
        var offset: UInt64 = 0
        for run in runs {
            let lower = max(offset, range.lowerBound), upper = min(offset + run.pages, range.upperBound)
            if lower < upper { result.append(PageRun(start: run.start + (lower - offset), pages: upper - lower)) }
            offset += run.pages
        }
        return result
    }

    // MARK: - P4: fence signal to lease end

    static func p4(_ floor: Floor, _ connection: DmaBufConnection, _ report: Report, rounds: Int) throws {
        let n = 8
        let buffer = try connection.allocate(size: 4096, heap: "system", tag: "p4")
        let shared = Handoff(connection)
        var ratios: [Double] = [], raws: [Double] = [], daemons: [Double] = [], cbFence: [Double] = []
        for round in 0...rounds {
            let raw = try floor.ask("fence \(n)")
            cbFence.append(try floor.ask("cbrokerfence \(n)") / raw)
            var samples: [Double] = []
            for _ in 0..<n {
                let lease = try connection.layout(buffer.info.id).lease
                let fence = try VgemFence.make()
                try connection.releaseLease(lease, fence: fence.syncFile)
                // The holder blocks on its socket in another thread; this one signals and starts the clock.
                let waiter = BackgroundThread { () -> UInt64 in
                    while true {
                        guard let event = try shared.value.nextEvent(timeout: .seconds(10)) else {
                            throw TestFailure(description: "no leaseEnded within 10 s")
                        }
                        if case .leaseEnded(let ended, _) = event, ended == lease { return nowNS() }
                    }
                }
                usleep(20_000)
                let t0 = nowNS()
                try fence.signal()
                let woke = try waiter.join()
                samples.append(Double(woke &- t0))
            }
            guard round > 0 else { continue }
            let daemon = median(samples)
            raws.append(raw); daemons.append(daemon); ratios.append(daemon / raw)
        }
        let id = buffer.info.id
        _ = consume buffer
        try connection.release(id)
        report.add("P4", "fence signal → holder gets leaseEnded via dmabufd / raw poll() wake", ratios: ratios, goal: .atMost(3),
                   detail: "daemon \(us(median(daemons))); raw \(us(median(raws))) (medians of \(n) per round); C broker floor (epoll on the sync_file, one message to a blocked holder) \(fmt(median(Array(cbFence.dropFirst())), 2))×")
    }

    // MARK: - P5: daemon memory

    static func p5(_ daemon: BenchDaemon, _ connection: DmaBufConnection, _ report: Report) throws {
        let count = 10_000
        usleep(200_000)
        let idle = ProcessProbe.statusKiB(daemon.pid)
        var ids: [BufferID] = []
        ids.reserveCapacity(count)
        let t0 = nowNS()
        for _ in 0..<count {
            let buffer = try connection.allocate(size: 4096, heap: "system", tag: "p5")
            ids.append(buffer.info.id)
        }
        let allocTime = Double(nowNS() - t0) / Double(count)
        let stats = try connection.stats()
        guard stats.buffers == UInt32(count) else { throw TestFailure(description: "P5: daemon tracks \(stats.buffers) buffers, expected \(count)") }
        let full = ProcessProbe.statusKiB(daemon.pid)
        let fds = ProcessProbe.openFDs(daemon.pid)
        let r0 = nowNS()
        for id in ids { try connection.release(id) }
        let releaseTime = Double(nowNS() - r0) / Double(count)
        try FaultRun.settle(connection)
        let after = ProcessProbe.statusKiB(daemon.pid)
        let perBuffer = Double(full - idle) * 1024 / Double(count)
        report.note("P5", "dmabufd VmRSS idle \(idle) KiB; with \(count) tracked 4 KiB buffers \(full) KiB (\(fds) fds) = \(fmt(perBuffer, 0)) B per buffer; "
            + "after releasing all \(after) KiB; alloc \(us(allocTime)), release \(us(releaseTime)) each")
    }

    // MARK: - Extras: udmabuf and physical layout through the daemon

    static func extras(_ floor: Floor, _ connection: DmaBufConnection, _ report: Report, rounds: Int) throws {
        let size = 1 << 20, n = 15
        var udmabuf: [Double] = [], layout: [Double] = [], rawU: [Double] = [], rawP: [Double] = [], ru: [Double] = [], rp: [Double] = []
        for round in 0...rounds {
            let rawCreate = try floor.ask("udmabuf \(size) \(n)")
            let rawPagemap = try floor.ask("pagemap \(size) \(n)")
            let rt = try floor.ask("rt \(n)")
            var creates: [Double] = [], layouts: [Double] = []
            for _ in 0..<n {
                let t0 = nowNS()
                let buffer = try connection.createUDmabuf(size: size, tag: "x")
                let t1 = nowNS()
                let l = try connection.layout(buffer.info.id, physical: true)
                layouts.append(Double(nowNS() - t1))
                creates.append(Double(t1 - t0))
                try connection.releaseLease(l.lease)
                let id = buffer.info.id
                _ = consume buffer
                try connection.release(id)
            }
            guard round > 0 else { continue }
            let u = median(creates), p = median(layouts)
            udmabuf.append(u); layout.append(p); rawU.append(rawCreate + rt); rawP.append(rawPagemap + rt)
            ru.append(u / (rawCreate + rt)); rp.append(p / (rawPagemap + rt))
        }
        report.add("X1", "udmabuf 1 MiB via dmabufd / (raw memfd+seal+UDMABUF_CREATE + fd RT)", ratios: ru, goal: nil,
                   detail: "daemon \(us(median(udmabuf))); raw \(us(median(rawU)))")
        report.add("X2", "first physical layout of 1 MiB via dmabufd / (raw mmap+pagemap read + RT)", ratios: rp, goal: nil,
                   detail: "daemon \(us(median(layout))); raw \(us(median(rawP)))")
    }
}

// MARK: - Reporting

final class Report {
    enum Goal {
        case atMost(Double), atLeast(Double)
        func met(_ value: Double) -> Bool {
            switch self {
            case .atMost(let g): value <= g
            case .atLeast(let g): value >= g
            }
        }
        var text: String {
            switch self {
            case .atMost(let g): "≤\(fmt(g, 2))×"
            case .atLeast(let g): "≥\(fmt(g, 2))×"
            }
        }
    }

    struct Row {
        var id: String
        var what: String
        var ratio: String
        var goal: String
        var detail: String
    }

    let rounds: Int
    private var rows: [Row] = []

    init(rounds: Int) { self.rounds = rounds }

    func add(_ id: String, _ what: String, ratios: [Double], goal: Goal?, detail: String) {
        let m = median(ratios)
        let ratio = "\(ratioText(m)) [\(ratioText(ratios.min() ?? .nan))–\(ratioText(ratios.max() ?? .nan))]"
        let verdict = goal.map { "\($0.text) \($0.met(m) ? "met" : "MISSED")" } ?? "-"
        rows.append(Row(id: id, what: what, ratio: ratio, goal: verdict, detail: detail))
        Harness.say("\(id) \(what): \(ratio) \(verdict); \(detail)")
    }

    func note(_ id: String, _ text: String) {
        rows.append(Row(id: id, what: text, ratio: "", goal: "", detail: ""))
        Harness.say("\(id) \(text)")
    }

    private func ratioText(_ value: Double) -> String {
        guard value.isFinite, value > 0, value < 0.01 else { return fmt(value, 2) }
        let exponent = Int(log10(value).rounded(.down))
        return "\(fmt(value / pow(10, Double(exponent)), 1))e\(exponent)"
    }

    /// The rows as markdown table lines, each prefixed `ROW ` so scripts/bench can gather the rows of
    /// several runs into one table.
    func print() {
        for row in rows {
            Harness.say("ROW | \(row.id) | \(row.what) | \(row.ratio) | \(row.goal) | \(row.detail) |")
        }
    }
}

func median(_ values: [Double]) -> Double {
    guard !values.isEmpty else { return .nan }
    let sorted = values.sorted()
    return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
}

func nowNS() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Nanoseconds as microseconds, `123.4 µs`.
func us(_ ns: Double) -> String { "\(fmt(ns / 1000, 1)) µs" }

func uname() -> String {
    var name = utsname()
    _ = Glibc.uname(&name)
    return withUnsafeBytes(of: name.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
}

// MARK: - The floor coprocess

/// Benchmarks/floor.c in `serve` mode: one command line in, one number out.
final class Floor {
    let pid: pid_t
    private let input: CInt
    private let output: CInt
    private var pending: [UInt8] = []

    init(path: String) throws {
        var toChild: [CInt] = [0, 0], fromChild: [CInt] = [0, 0]
        guard pipe(&toChild) == 0, pipe(&fromChild) == 0 else { throw TestFailure(description: "pipe failed") }
        for fd in toChild + fromChild { _ = CDmaBuf_fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, toChild[0], 0)
        posix_spawn_file_actions_adddup2(&actions, fromChild[1], 1)
        let argv = [strdup(path), strdup("serve"), nil]
        defer { argv.forEach { free($0) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, path, &actions, nil, argv, environ)
        close(toChild[0])
        close(fromChild[1])
        guard rc == 0 else { throw TestFailure(description: "cannot start \(path): \(Errno(rawValue: rc).name)") }
        pid = child
        input = toChild[1]
        output = fromChild[0]
    }

    /// Sends one command and returns its number.
    func ask(_ command: String) throws -> Double {
        let line = Array((command + "\n").utf8)
        guard line.withUnsafeBytes({ write(input, $0.baseAddress, $0.count) }) == line.count else {
            throw TestFailure(description: "floor: cannot send '\(command)'")
        }
        while true {
            if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let text = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                guard let value = Double(text), value >= 0 else { throw TestFailure(description: "floor: '\(command)' answered '\(text)'") }
                return value
            }
            var chunk = [UInt8](repeating: 0, count: 256)
            let n = chunk.withUnsafeMutableBytes { read(output, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw TestFailure(description: "floor exited during '\(command)'") }
            pending += chunk[0..<n]
        }
    }

    func stop() {
        _ = write(input, "quit\n", 5)
        close(input)
        close(output)
        _ = Harness.wait(pid)
    }
}

// MARK: - A daemon for benchmarks

/// dmabufd at notice level (TestDaemon logs at debug, which would be measured too).
final class BenchDaemon {
    let directory: String
    let socketPath: String
    let pid: pid_t
    private var stopped = false

    init(config: String, name: String = "main") throws {
        directory = "/tmp/dmabufd-bench-\(getpid())-\(name)"
        _ = mkdir(directory, 0o755)
        socketPath = directory + "/dmabufd.sock"
        Harness.writeFileCreating(directory + "/dmabufd.conf", """
            socket_mode = 0666
            fd_store = no
            state_directory = \(directory)
            log_level = notice
            \(config)
            """)
        let log = try FileDescriptor.open(directory + "/log", .writeOnly, options: [.create, .truncate], permissions: .ownerReadWrite)
        defer { try? log.close() }
        // DMABUFD_BENCH_DAEMON_PREFIX (e.g. `/usr/bin/strace -f -T -o /tmp/trace`) wraps the daemon for profiling.
        let prefix = FaultRun.environment("DMABUFD_BENCH_DAEMON_PREFIX").map { $0.split(separator: " ").map(String.init) } ?? []
        pid = try Harness.spawn(prefix + [Harness.binDirectory + "/dmabufd", "--config", directory + "/dmabufd.conf", "--socket", socketPath],
                                stdout: log, stderr: log)
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if (try? UnixSocket.connect(path: socketPath)) != nil { return }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                stopped = true
                throw TestFailure(description: "dmabufd exited at start: \(Harness.readFile(directory + "/log") ?? "")")
            }
            usleep(20_000)
        }
        throw TestFailure(description: "dmabufd did not start listening in 60 s")
    }

    func connect() throws -> DmaBufConnection { try DmaBufConnection(path: socketPath, clientName: "bench") }

    func stop() {
        guard !stopped else { return }
        stopped = true
        kill(pid, SIGTERM)
        _ = Harness.wait(pid)
    }

    deinit { stop() }
}
