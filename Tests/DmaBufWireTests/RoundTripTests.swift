import DmaBufWire
import Testing

@Suite("Round trips") struct RoundTripTests {
    @Test("the samples cover every request and response message type")
    func samplesCoverEveryType() {
        let requestTypes = Set(requestSamples.map(\.message.type))
        let responseTypes = Set(responseSamples.map(\.message.type))
        let allRequests = Set(MessageType.allCases.filter { $0.rawValue < 0x4000 })
        let allResponses = Set(MessageType.allCases.filter { $0.rawValue >= 0x4000 })
        #expect(requestTypes == allRequests)
        #expect(responseTypes == allResponses)
        #expect(Set(requestSamples.map(\.label)).count == requestSamples.count)
        #expect(Set(responseSamples.map(\.label)).count == responseSamples.count)
    }

    @Test("every request decodes to what was encoded", arguments: requestSamples)
    func request(_ sample: Sample<Request>) throws {
        let bytes = encoded(sample, requestID: 0xA1B2_C3D4)
        #expect(bytes.count >= WireLimits.headerSize)
        #expect(bytes.u32(at: HeaderOffset.magic) == WireLimits.magic)
        #expect(bytes.u16(at: HeaderOffset.version) == headerVersion(sample, type: sample.message.type))
        #expect(bytes.u16(at: HeaderOffset.type) == sample.message.type.rawValue)
        #expect(Int(bytes.u32(at: HeaderOffset.payloadLength)) == bytes.count - WireLimits.headerSize)
        #expect(Int(bytes.u16(at: HeaderOffset.descriptorCount)) == sample.descriptors)
        #expect(bytes.u16(at: HeaderOffset.reserved) == 0)

        let (header, decoded) = try WireMessage.decodeRequest(bytes, descriptors: sample.descriptors)
        #expect(decoded == sample.message)
        #expect(header.type == sample.message.type.rawValue)
        #expect(header.requestID == 0xA1B2_C3D4)
        #expect(header.version == headerVersion(sample, type: sample.message.type))
        #expect(Int(header.payloadLength) == bytes.count - WireLimits.headerSize)
        #expect(Int(header.descriptorCount) == sample.descriptors)
        #expect(WireMessage.descriptorRange(of: sample.message.type).contains(sample.descriptors))
        // Canonical: encoding the decoded value gives back the same bytes.
        #expect(WireMessage.encode(decoded, requestID: header.requestID, descriptors: sample.descriptors, version: sample.version) == bytes)
        // A request is never mistaken for a response.
        #expect(responseError(bytes, descriptors: sample.descriptors) == .unknownType(sample.message.type.rawValue))
    }

    @Test("every response decodes to what was encoded", arguments: responseSamples)
    func response(_ sample: Sample<Response>) throws {
        let bytes = encoded(sample, requestID: 0xA1B2_C3D4)
        #expect(bytes.u16(at: HeaderOffset.type) == sample.message.type.rawValue)
        #expect(Int(bytes.u32(at: HeaderOffset.payloadLength)) == bytes.count - WireLimits.headerSize)
        #expect(Int(bytes.u16(at: HeaderOffset.descriptorCount)) == sample.descriptors)

        let (header, decoded) = try WireMessage.decodeResponse(bytes, descriptors: sample.descriptors)
        #expect(decoded == sample.message)
        #expect(header.type == sample.message.type.rawValue)
        // Events go out with request id 0 whatever the caller passes; replies keep theirs.
        #expect(header.requestID == (sample.message.isEvent ? 0 : 0xA1B2_C3D4))
        #expect(Int(header.descriptorCount) == sample.descriptors)
        #expect(WireMessage.descriptorRange(of: sample.message.type).contains(sample.descriptors))
        #expect(header.version == headerVersion(sample, type: sample.message.type))
        #expect(WireMessage.encode(decoded, requestID: 0xA1B2_C3D4, descriptors: sample.descriptors, version: sample.version) == bytes)
        #expect(requestError(bytes, descriptors: sample.descriptors) == .unknownType(sample.message.type.rawValue))
    }

    @Test("the fds each request type requires")
    func requestDescriptorRanges() {
        for type in MessageType.allCases where type.rawValue < 0x4000 {
            let expected: ClosedRange<Int> = switch type {
            case .importBuffer, .attachFence: 1...1
            case .createUDmabufFromMemfd: 1...16
            case .releaseLease: 0...1
            default: 0...0
            }
            #expect(WireMessage.descriptorRange(of: type) == expected, "\(type)")
        }
    }

    @Test("the fds each response type requires")
    func responseDescriptorRanges() {
        for type in MessageType.allCases where type.rawValue >= 0x4000 {
            let expected: ClosedRange<Int> = switch type {
            case .bufferReply: 1...1
            case .accessReply: 0...1
            case .buffersReply: 1...16
            default: 0...0
            }
            #expect(WireMessage.descriptorRange(of: type) == expected, "\(type)")
        }
    }

    @Test("the header is exactly 20 bytes and a bodiless message is only a header")
    func headerSize() throws {
        #expect(WireLimits.headerSize == 20)
        for message in [Request.listHeaps, .stats] {
            let bytes = WireMessage.encode(message, requestID: 1)
            #expect(bytes.count == WireLimits.headerSize)
            #expect(try WireMessage.decodeRequest(bytes, descriptors: 0).1 == message)
        }
        #expect(WireMessage.encode(Response.ok, requestID: 1).count == WireLimits.headerSize)
        // "DMBF" in the first four bytes.
        #expect(Array(WireMessage.encode(Request.stats, requestID: 1).prefix(4)) == Array("DMBF".utf8))
    }

    @Test("the writer cuts an over-long string to 255 bytes on a character boundary, and it still decodes")
    func longStringsAreCut() throws {
        let ascii = String(repeating: "a", count: 300)
        let twoByte = String(repeating: "é", count: 200)  // 400 bytes; 127 whole characters fit.
        let fourByte = String(repeating: "🦀", count: 100)  // 400 bytes; 63 whole characters fit.
        for (tag, kept) in [(ascii, String(repeating: "a", count: 255)), (twoByte, String(repeating: "é", count: 127)),
                            (fourByte, String(repeating: "🦀", count: 63))] {
            let bytes = WireMessage.encode(Request.importBuffer(tag: tag), requestID: 1, descriptors: 1)
            let (_, decoded) = try WireMessage.decodeRequest(bytes, descriptors: 1)
            #expect(decoded == .importBuffer(tag: kept))
        }
    }

    @Test("lists at the entry limit round-trip")
    func listsAtTheLimit() throws {
        let ranges = (0..<UInt64(WireLimits.maximumListEntries)).map { ByteRange(offset: $0 * 4096, size: 4096) }
        let request = Request.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: ranges, tag: "many"))
        let bytes = WireMessage.encode(request, requestID: 1, descriptors: 1)
        #expect(bytes.count <= WireLimits.maximumMessageSize)
        #expect(try WireMessage.decodeRequest(bytes, descriptors: 1).1 == request)

        let runs = (0..<UInt64(WireLimits.maximumListEntries)).map { PageRun(start: $0 * 2, pages: 1) }
        let layout = Response.layout(Layout(buffer: 1, lease: 2, generation: 3, kind: .bufferPages, pageSize: 4096, firstPage: 0, runs: runs))
        let layoutBytes = WireMessage.encode(layout, requestID: 1)
        #expect(layoutBytes.count <= WireLimits.maximumMessageSize)
        #expect(try WireMessage.decodeResponse(layoutBytes, descriptors: 0).1 == layout)
    }
}
