import DmaBufWire
import Foundation
import Testing

/// The libFuzzer seed corpus in Fuzz/corpus/wire: one file per sample message, each a descriptor-count
/// byte (the fuzz target takes `first byte % 3` as the fd count) followed by the message. These tests keep
/// the committed seeds in step with the encoder; to rewrite them after a protocol change, run
///
///     DMABUFD_WRITE_FUZZ_SEEDS=1 swift test --filter FuzzCorpusTests
enum FuzzCorpus {
    static let directory = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/corpus/wire", isDirectory: true)

    /// File name and contents of every seed. Request id 1 keeps them small and readable in a hex dump.
    static var seeds: [(name: String, bytes: [UInt8])] {
        requestSamples.map { ("request-\($0.label)", [UInt8($0.descriptors)] + encoded($0, requestID: 1)) }
            + responseSamples.map { ("response-\($0.label)", [UInt8($0.descriptors)] + encoded($0, requestID: 1)) }
    }

    static var writing: Bool { ProcessInfo.processInfo.environment["DMABUFD_WRITE_FUZZ_SEEDS"] == "1" }
}

@Suite("Fuzz corpus", .serialized) struct FuzzCorpusTests {
    @Test("the committed seeds are the current encodings of the samples")
    func seedsAreCurrent() throws {
        if FuzzCorpus.writing {
            try FileManager.default.createDirectory(at: FuzzCorpus.directory, withIntermediateDirectories: true)
            for seed in FuzzCorpus.seeds {
                try Data(seed.bytes).write(to: FuzzCorpus.directory.appendingPathComponent(seed.name))
            }
        }
        for seed in FuzzCorpus.seeds {
            let url = FuzzCorpus.directory.appendingPathComponent(seed.name)
            let committed = (try? Data(contentsOf: url)).map { [UInt8]($0) }
            #expect(committed == seed.bytes,
                    "\(url.path) is \(committed == nil ? "missing" : "stale"); rewrite with DMABUFD_WRITE_FUZZ_SEEDS=1 swift test --filter FuzzCorpusTests")
        }
    }

    @Test("every file in the corpus, seeds and saved findings alike, decodes or fails cleanly")
    func corpusFilesDecode() throws {
        let names = try FileManager.default.contentsOfDirectory(atPath: FuzzCorpus.directory.path).filter { !$0.hasPrefix(".") }
        #expect(names.count >= FuzzCorpus.seeds.count)
        var decoded = 0
        for name in names {
            let bytes = [UInt8](try Data(contentsOf: FuzzCorpus.directory.appendingPathComponent(name)))
            guard let first = bytes.first else { continue }
            let outcomes = decodeBothWays(Array(bytes.dropFirst()), descriptors: Int(first % 3))
            if outcomes.contains(.decoded) { decoded += 1 }
        }
        // Each seed is a valid request or response.
        #expect(decoded >= FuzzCorpus.seeds.count)
    }
}
