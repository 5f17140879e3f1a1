import DmaBufTestSupport
import DmaBufWire
import Testing

/// What a successful decode must satisfy: the value re-encodes to the canonical form of the input (the
/// input with the reserved header field zeroed, and the request id zeroed for events), and that decodes
/// to an equal value. The fuzz target (Fuzz/FuzzDecoder.swift) checks the same.
func canonical(_ bytes: [UInt8], event: Bool) -> [UInt8] {
    var copy = bytes
    copy.setU16(0, at: HeaderOffset.reserved)
    if event { copy.setU32(0, at: HeaderOffset.requestID) }
    return copy
}

enum Outcome: Hashable, CustomStringConvertible {
    case decoded, failed(String)
    var description: String { switch self { case .decoded: "decoded"; case .failed(let kind): kind } }
}

func kind(_ error: WireDecodingError) -> String {
    switch error {
    case .truncated: "truncated"
    case .limitExceeded: "limitExceeded"
    case .trailingBytes: "trailingBytes"
    case .invalidUTF8: "invalidUTF8"
    case .invalidValue: "invalidValue"
    case .badMagic: "badMagic"
    case .unsupportedVersion: "unsupportedVersion"
    case .versionMismatch: "versionMismatch"
    case .unknownType: "unknownType"
    case .lengthMismatch: "lengthMismatch"
    case .wrongDescriptorCount: "wrongDescriptorCount"
    case .oversize: "oversize"
    }
}

/// Decodes `bytes` as a request and as a response, checking any success as above.
func decodeBothWays(_ bytes: [UInt8], descriptors: Int, sourceLocation: SourceLocation = #_sourceLocation) -> [Outcome] {
    var outcomes: [Outcome] = []
    do {
        let (header, request) = try WireMessage.decodeRequest(bytes, descriptors: descriptors)
        let again = WireMessage.encode(request, requestID: header.requestID, descriptors: descriptors, version: header.version)
        #expect(again == canonical(bytes, event: false), "request re-encodes differently: \(bytes)", sourceLocation: sourceLocation)
        #expect((try? WireMessage.decodeRequest(again, descriptors: descriptors).1) == request, sourceLocation: sourceLocation)
        outcomes.append(.decoded)
    } catch {
        outcomes.append(.failed(kind(error)))
    }
    do {
        let (header, response) = try WireMessage.decodeResponse(bytes, descriptors: descriptors)
        let again = WireMessage.encode(response, requestID: header.requestID, descriptors: descriptors, version: header.version)
        #expect(again == canonical(bytes, event: response.isEvent), "response re-encodes differently: \(bytes)", sourceLocation: sourceLocation)
        #expect((try? WireMessage.decodeResponse(again, descriptors: descriptors).1) == response, sourceLocation: sourceLocation)
        outcomes.append(.decoded)
    } catch {
        outcomes.append(.failed(kind(error)))
    }
    return outcomes
}

/// Applies one random mutation: the edits a fuzzer makes, plus the boundary values lengths and counts care about.
func mutate(_ bytes: inout [UInt8], _ rng: inout SplitMix64) {
    let interesting8: [UInt8] = [0, 1, 2, 3, 0x7F, 0x80, 0xC3, 0xED, 0xFF]
    let interesting32: [UInt32] = [0, 1, 2, 16, 255, 256, 3_999, 4_000, 4_001, 0xFFFF, 0x1_0000, 0x7FFF_FFFF, .max]
    switch Int.random(in: 0..<8, using: &rng) {
    case 0:  // flip 1 to 4 bits
        guard !bytes.isEmpty else { return }
        for _ in 0...Int.random(in: 0...3, using: &rng) {
            bytes[Int.random(in: bytes.indices, using: &rng)] ^= 1 << UInt8.random(in: 0..<8, using: &rng)
        }
    case 1:  // overwrite a byte
        guard !bytes.isEmpty else { return }
        bytes[Int.random(in: bytes.indices, using: &rng)] =
            Bool.random(using: &rng) ? interesting8.randomElement(using: &rng)! : UInt8.random(in: 0...255, using: &rng)
    case 2:  // truncate
        bytes.removeLast(Int.random(in: 0...bytes.count, using: &rng))
    case 3:  // insert 1 to 16 random bytes
        let at = Int.random(in: 0...bytes.count, using: &rng)
        bytes.insert(contentsOf: (0..<Int.random(in: 1...16, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }, at: at)
    case 4:  // delete a range
        guard !bytes.isEmpty else { return }
        let start = Int.random(in: bytes.indices, using: &rng)
        bytes.removeSubrange(start..<min(bytes.count, start + Int.random(in: 1...16, using: &rng)))
    case 5:  // duplicate a chunk in place
        guard !bytes.isEmpty else { return }
        let start = Int.random(in: bytes.indices, using: &rng)
        let chunk = bytes[start..<min(bytes.count, start + Int.random(in: 1...32, using: &rng))]
        bytes.insert(contentsOf: chunk, at: Int.random(in: 0...bytes.count, using: &rng))
    case 6:  // a boundary value in a u16 or u32 (string lengths, counts)
        let value = interesting32.randomElement(using: &rng)!
        let width = Bool.random(using: &rng) ? 2 : 4
        guard bytes.count >= width else { return }
        let at = Int.random(in: 0...(bytes.count - width), using: &rng)
        for i in 0..<width { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
    default:  // splice in the start of another sample's payload
        let other = Bool.random(using: &rng) ? encoded(requestSamples.randomElement(using: &rng)!).payload
                                             : encoded(responseSamples.randomElement(using: &rng)!).payload
        let at = Int.random(in: 0...bytes.count, using: &rng)
        bytes.replaceSubrange(at..<min(bytes.count, at + other.count), with: other.prefix(Int.random(in: 0...other.count, using: &rng)))
    }
}

@Suite("Randomized mutation") struct RandomizedTests {
    @Test("SplitMix64 gives the reference sequence")
    func splitMix() {
        // Reference values for seed 1234567 (from the published C implementation).
        var rng = SplitMix64(seed: 1_234_567)
        #expect([rng.next(), rng.next(), rng.next()] == [6_457_827_717_110_365_317, 3_203_168_211_198_807_973, 9_817_491_932_198_370_423])
    }

    @Test("50,000 mutated encodings either decode canonically or throw WireDecodingError")
    func mutations() {
        var rng = SplitMix64(seed: 0xD3AB_0FD5_2026_0001)
        let seeds = requestSamples.map { (encoded($0), $0.descriptors) } + responseSamples.map { (encoded($0), $0.descriptors) }
        var outcomes: [Outcome: Int] = [:]
        for _ in 0..<50_000 {
            var (bytes, descriptors) = seeds.randomElement(using: &rng)!
            for _ in 0...Int.random(in: 0...2, using: &rng) { mutate(&bytes, &rng) }
            // Usually repair the header's length so the mutation reaches the payload decoder.
            if bytes.count >= WireLimits.headerSize, Int.random(in: 0..<4, using: &rng) != 0 { bytes = bytes.withFixedLength }
            if Int.random(in: 0..<4, using: &rng) == 0 { descriptors = Int.random(in: 0...2, using: &rng) }
            for outcome in decodeBothWays(bytes, descriptors: descriptors) { outcomes[outcome, default: 0] += 1 }
        }
        let summary = outcomes.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        print("wire mutations: \(summary)")
        #expect(outcomes.values.reduce(0, +) == 100_000)
        // The mutations reach every stage of the decoder, not just the header checks.
        for expected: Outcome in [.decoded, .failed("truncated"), .failed("trailingBytes"), .failed("invalidValue"), .failed("invalidUTF8"),
                                  .failed("limitExceeded"), .failed("lengthMismatch"), .failed("unknownType"),
                                  .failed("wrongDescriptorCount"), .failed("badMagic"), .failed("unsupportedVersion")] {
            #expect(outcomes[expected, default: 0] > 0, "no mutation ended in \(expected)")
        }
    }

    @Test("random bytes, and random bytes behind a valid header, never trap")
    func randomBytes() {
        var rng = SplitMix64(seed: 42)
        for i in 0..<5_000 {
            let payload = (0..<Int.random(in: 0...96, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let type = MessageType.allCases.randomElement(using: &rng)!
            let fds = Int.random(in: 0...2, using: &rng)
            let bytes = i.isMultiple(of: 2) ? frame(type: type, descriptors: fds, payload: payload) : payload
            _ = decodeBothWays(bytes, descriptors: fds)
        }
    }
}
