// libFuzzer entry point for the broker's request *handling* (issue 9). Not part of the SwiftPM package:
// scripts/fuzz-broker builds DmaBufDaemon and its dependencies with -sanitize=fuzzer,address and
// -enable-testing into .build-fuzz, then compiles this file, FuzzBrokerProgram.swift and the host tests'
// FakeKernel.swift (unchanged, straight from Tests/DmaBufDaemonTests) into the fuzzer executable.
//
// Each input is a short program (see FuzzBrokerProgram.swift) run against a fresh Broker on a fresh
// EventLoop with a fresh FakeKernel, its clients on socket pairs in this process. After the program every
// client closes, every fake fence is signalled and the loop runs until the broker reports idle; then the
// books must be at baseline (no buffers, charges, leases, fences, tokens, sessions, per-uid counts) and,
// once the broker and its loop are gone, the process must have exactly the fds it had before the input.
// A violation traps, so libFuzzer saves the input.
//
// Nothing here sleeps: time on the broker's loop is advanced, not waited for (EventLoop.advanceTime), so
// hello timeouts, drain retries and revocation deadlines fire at once; the closer threads are waited for
// on a condition, not polled; and the fd check is one /proc/self/fd listing. An input costs its CPU only
// (about 1 ms with ASan on this project's build machines).

import DmaBuf
import DmaBufWire
import Logging
@testable import DmaBufDaemon

#if canImport(Glibc)
import Glibc
#endif

/// Set once: a broken pipe on a client socket the broker closed is an EPIPE, not a dead fuzzer.
private let ignoreSIGPIPE: Void = { _ = signal(SIGPIPE, SIG_IGN) }()

/// The fd closer shared by every input's broker: its threads exit once their uid's queue is empty.
let fuzzCloser = FDCloser()

private let timing = getenv("FUZZ_BROKER_TIMING") != nil

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzBroker(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    _ = ignoreSIGPIPE
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let fdsBefore = openFDCount()
    do {
        let t0 = ContinuousClock.now
        let run = try BrokerRun(ByteReader(bytes))
        run.execute()
        let t1 = ContinuousClock.now
        run.finish()
        let t2 = ContinuousClock.now
        if timing { print("fuzz-broker timing: execute \(t1 - t0), finish \(t2 - t1)\n", terminator: "") }
    } catch {
        fatalError("fuzz-broker: could not set up a broker: \(error)")
    }
    let t3 = ContinuousClock.now
    expectFDs(back: fdsBefore)
    if timing { print("fuzz-broker timing: fds \(ContinuousClock.now - t3)\n", terminator: "") }
    return 0
}

/// Waits for the closer threads to close what they were handed (their own uid's fds each; a fuzz input
/// has no fd whose close blocks), then requires exactly the start count.
private func expectFDs(back fdsBefore: Int) {
    fuzzCloser.waitUntilIdle()
    let now = openFDCount()
    if now != fdsBefore {
        let links = FakeKernel.openFDs().map { "\($0) -> \(readLink($0))" }.joined(separator: ", ")
        fatalError("fuzz-broker: fds not back to baseline: \(now) open, \(fdsBefore) before the input: \(links)")
    }
}

func openFDCount() -> Int { FakeKernel.openFDs().count }

func readLink(_ fd: CInt) -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    let n = readlink("/proc/self/fd/\(fd)", &buffer, 255)
    return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
}

/// Reads an input front to back; past the end everything reads as zero, so every input is a program.
struct ByteReader {
    private let bytes: [UInt8]
    private var index = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    var atEnd: Bool { index >= bytes.count }
    mutating func byte() -> UInt8 {
        defer { index += 1 }
        return index < bytes.count ? bytes[index] : 0
    }
    mutating func u16() -> UInt16 { UInt16(byte()) | UInt16(byte()) << 8 }
    mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }
    /// Up to `limit` raw bytes, the count first.
    mutating func chunk(limit: Int) -> [UInt8] {
        let n = min(Int(u16()), limit)
        return (0..<n).map { _ in byte() }
    }
}
