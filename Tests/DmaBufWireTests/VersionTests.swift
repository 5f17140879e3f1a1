import DmaBufWire
import Testing

/// Protocol v2 (docs/PROTOCOL.md): negotiation, the negotiated version in every header, v1 encodings
/// unchanged, and the v2 messages' own refusals.
@Suite("Protocol versions") struct VersionTests {
    @Test("this build speaks 1...2 and hello always travels as v1")
    func helloIsV1() throws {
        #expect(WireLimits.supportedVersions == 1...2)
        #expect(WireLimits.currentVersion == 2)
        for version: UInt16 in [1, 2] {
            let hello = WireMessage.encode(Request.hello(Hello(client: "c")), requestID: 1, version: version)
            #expect(hello.u16(at: HeaderOffset.version) == 1)
            let reply = WireMessage.encode(Response.hello(HelloReply(version: version, server: "d", maximumMessageSize: 1,
                                                                      maximumDescriptors: 1, pageSize: 1, uid: 0, gid: 0, pid: 0)),
                                           requestID: 1, version: version)
            #expect(reply.u16(at: HeaderOffset.version) == 1)
            // Before negotiation the client decodes the reply without a version.
            #expect(responseError(reply) == nil)
        }
        // A hello in any other header is malformed, negotiated or not.
        var hello2 = WireMessage.encode(Request.hello(Hello(client: "c")), requestID: 1)
        hello2.setU16(2, at: HeaderOffset.version)
        #expect(requestError(hello2) == .versionMismatch(negotiated: 1, header: 2))
        // The default hello offers every version this build speaks.
        #expect(Hello(client: "c").minimumVersion == 1 && Hello(client: "c").maximumVersion == 2)
    }

    @Test("once negotiated, a header carrying another version is malformed", arguments: [UInt16(1), 2])
    func negotiatedVersionIsEnforced(_ negotiated: UInt16) {
        let other: UInt16 = negotiated == 1 ? 2 : 1
        let request = WireMessage.encode(Request.release(1), requestID: 1, version: other)
        #expect(requestError(request, version: negotiated) == .versionMismatch(negotiated: negotiated, header: other))
        #expect(requestError(request, version: other) == nil)
        let response = WireMessage.encode(Response.ok, requestID: 1, version: other)
        #expect(responseError(response, version: negotiated) == .versionMismatch(negotiated: negotiated, header: other))
        // A version this side does not speak is unsupported, negotiated or not.
        var seven = WireMessage.encode(Request.stats, requestID: 1, version: negotiated)
        seven.setU16(7, at: HeaderOffset.version)
        #expect(requestError(seven, version: negotiated) == .unsupportedVersion(7))
        #expect(requestError(seven) == .unsupportedVersion(7))
    }

    @Test("v1 encodings are unchanged: v2 fields are neither sent nor read in v1")
    func v1Unchanged() throws {
        let allocate = Request.allocate(AllocateRequest(size: 4096, heap: "system", tag: "t", cpuAccess: 2, fdFlags: 0, heapFlags: 5))
        let v1 = WireMessage.encode(allocate, requestID: 1, version: 1)
        let v2 = WireMessage.encode(allocate, requestID: 1, version: 2)
        #expect(v1.payload.count == 8 + 8 + 3 + 1)  // size, "system", "t", cpu_access
        #expect(v2.payload.count == 8 + 8 + 3 + 4 + 8)  // size, "system", "t", fd_flags, heap_flags
        #expect(v1.payload.last == 2)
        // v1 decodes with the defaults for what v1 cannot say; v2 drops cpu_access.
        #expect(try WireMessage.decodeRequest(v1, descriptors: 0).1
                == .allocate(AllocateRequest(size: 4096, heap: "system", tag: "t", cpuAccess: 2)))
        #expect(try WireMessage.decodeRequest(v2, descriptors: 0, version: 2).1
                == .allocate(AllocateRequest(size: 4096, heap: "system", tag: "t", fdFlags: 0, heapFlags: 5)))
        // A buffer described to a v1 client has no cgroup, memfd_owned_by_daemon or flags field.
        #expect(WireMessage.encodedSize(of: sampleBufferV2, version: 2)
                == WireMessage.encodedSize(of: sampleBufferV2, version: 1) + 2 + sampleBufferV2.cgroup.utf8.count + 1 + 4)
        let v1Buffer = WireMessage.encode(Response.buffer(sampleBufferV2), requestID: 1, descriptors: 1, version: 1)
        #expect(try WireMessage.decodeResponse(v1Buffer, descriptors: 1).1 == .buffer(sampleBuffer))
    }

    @Test("v1 cpu_access is still checked: 4 and above are malformed")
    func cpuAccessRange() {
        for value: UInt8 in [4, 0xFF] {
            let body = payload { w in w.u64(1); w.string("any"); w.string(""); w.u8(value) }
            #expect(requestError(frame(type: .allocate, payload: body)) == .invalidValue(field: "cpu_access", value: UInt64(value)))
        }
    }

    @Test("v2-only messages are unknown types in a v1 header")
    func v2OnlyTypes() {
        for type in MessageType.allCases where type.introducedIn == 2 {
            #expect(requestError(frame(type: type, version: 1, payload: [])) == .unknownType(type.rawValue), "\(type)")
            #expect(responseError(frame(type: type, descriptors: 1, version: 1, payload: []), descriptors: 1) == .unknownType(type.rawValue),
                    "\(type)")
        }
        #expect(Set(MessageType.allCases.filter { $0.introducedIn == 2 }) == [.allocateBatch, .releaseQuiet, .buffersReply])
    }

    @Test("allocate_batch takes 1...16 buffers", arguments: [UInt16(0), 1, 16, 17, .max])
    func batchCount(_ count: UInt16) {
        let body = payload { w in w.u16(count); w.u64(4096); w.string("system"); w.string(""); w.u32(2); w.u64(0) }
        let error = requestError(frame(type: .allocateBatch, version: 2, payload: body))
        switch count {
        case 0: #expect(error == .invalidValue(field: "count", value: 0))
        case 1...16: #expect(error == nil)
        default: #expect(error == .limitExceeded(field: "count", value: Int(count), limit: 16))
        }
    }

    @Test("release_quiet takes 1...4000 ids")
    func releaseQuietCount() {
        #expect(requestError(frame(type: .releaseQuiet, version: 2, payload: payload { $0.u32(0) }))
                == .invalidValue(field: "buffers", value: 0))
        let full = payload { w in w.u32(4000); for i in 0..<4000 { w.u64(UInt64(i)) } }
        #expect(requestError(frame(type: .releaseQuiet, version: 2, payload: full)) == nil)
        #expect(requestError(frame(type: .releaseQuiet, version: 2, payload: payload { $0.u32(4001) }))
                == .limitExceeded(field: "buffers", value: 4001, limit: 4000))
    }

    @Test("the buffers reply carries exactly one fd per buffer")
    func buffersReplyDescriptors() {
        let two = WireMessage.encode(Response.buffers([sampleBuffer, sampleBufferV2]), requestID: 1, descriptors: 2, version: 2)
        #expect(responseError(two, descriptors: 2) == nil)
        var one = two
        one.setU16(1, at: HeaderOffset.descriptorCount)
        #expect(responseError(one, descriptors: 1) == .wrongDescriptorCount(type: "buffersReply", expected: 2...2, actual: 1))
        let none = WireMessage.encode(Response.buffers([]), requestID: 1, descriptors: 0, version: 2)
        #expect(responseError(none) == .wrongDescriptorCount(type: "buffersReply", expected: 1...16, actual: 0))
        #expect(responseError(frame(type: .buffersReply, descriptors: 17, version: 2, payload: []), descriptors: 17)
                == .wrongDescriptorCount(type: "buffersReply", expected: 1...16, actual: 17))
    }

    @Test("fd_flags and udmabuf flags travel as sent: the daemon, not the decoder, refuses bad bits")
    func flagsAreTheDaemonsToRefuse() throws {
        #expect(FDFlags.valid == 0o2_000_003)
        #expect(FDFlags.default == 0o2_000_002)
        #expect(UDmabufFlags.valid == 1)
        let request = Request.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [], tag: "", flags: 0xFFFF_FFFF))
        let bytes = WireMessage.encode(request, requestID: 1, descriptors: 1, version: 2)
        #expect(try WireMessage.decodeRequest(bytes, descriptors: 1, version: 2).1 == request)
        // In v1 the flags are not on the wire: they decode as 0.
        let v1 = WireMessage.encode(request, requestID: 1, descriptors: 1, version: 1)
        #expect(try WireMessage.decodeRequest(v1, descriptors: 1).1
                == .createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [], tag: "", flags: 0)))
    }

    @Test("create_udmabuf_from_memfd: v1 carries one memfd; in v2 each range names one of 1...16 fds, and a bad index is malformed")
    func memfdIndices() throws {
        let two = Request.createUDmabufFromMemfd(UDmabufFromMemfdRequest(
            ranges: [ByteRange(offset: 0, size: 4096, memfd: 1), ByteRange(offset: 0, size: 4096)], tag: "l"))
        let bytes = WireMessage.encode(two, requestID: 1, descriptors: 2, version: 2)
        #expect(try WireMessage.decodeRequest(bytes, descriptors: 2, version: 2).1 == two)
        // The same bytes claiming one fd name a memfd that is not there.
        var one = bytes
        one.setU16(1, at: HeaderOffset.descriptorCount)
        #expect(requestError(one, descriptors: 1, version: 2) == .invalidValue(field: "memfd", value: 1))
        let v1 = WireMessage.encode(Request.createUDmabufFromMemfd(UDmabufFromMemfdRequest(ranges: [ByteRange(offset: 0, size: 4096)], tag: "")),
                                    requestID: 1, descriptors: 2, version: 1)
        #expect(requestError(v1, descriptors: 2, version: 1) == .wrongDescriptorCount(type: "createUDmabufFromMemfd", expected: 1...1, actual: 2))
        #expect(requestError(frame(type: .createUDmabufFromMemfd, descriptors: 17, version: 2, payload: []), descriptors: 17, version: 2)
                == .wrongDescriptorCount(type: "createUDmabufFromMemfd", expected: 1...16, actual: 17))
    }

    @Test("v2 buffer_info and layout carry flags (contiguous); v1 never sees them")
    func contiguityFlags() throws {
        let layout = Layout(buffer: 1, lease: 2, generation: 1, kind: .bufferPages, pageSize: 4096, firstPage: 0,
                            runs: [PageRun(start: 0, pages: 16)], flags: BufferFlags.contiguous)
        let v2 = WireMessage.encode(Response.layout(layout), requestID: 1, version: 2)
        let v1 = WireMessage.encode(Response.layout(layout), requestID: 1, version: 1)
        #expect(v2.count == v1.count + 4)
        guard case .layout(let back) = try WireMessage.decodeResponse(v2, descriptors: 0, version: 2).1 else { Issue.record("not a layout"); return }
        #expect(back.isContiguous)
        guard case .layout(let old) = try WireMessage.decodeResponse(v1, descriptors: 0, version: 1).1 else { Issue.record("not a layout"); return }
        #expect(old.flags == 0)
    }

    @Test("a v2 list page of the largest buffers still fits one message")
    func v2ListFits() throws {
        var big = sampleBufferV2
        big.tag = String(repeating: "t", count: 255); big.name = String(repeating: "n", count: 255)
        big.heap = String(repeating: "h", count: 255); big.cgroup = "..." + String(repeating: "c", count: 252)
        let size = WireMessage.encodedSize(of: big, version: 2)
        let fit = (WireLimits.maximumMessageSize - WireLimits.headerSize - 5) / size
        let bytes = WireMessage.encode(Response.list(Array(repeating: big, count: fit), more: true), requestID: 1, version: 2)
        #expect(bytes.count <= WireLimits.maximumMessageSize)
        #expect(responseError(bytes) == nil)
    }
}
