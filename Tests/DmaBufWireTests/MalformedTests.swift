import DmaBufWire
import Testing

/// A string field's raw bytes, written without the writer's validation or cutting.
func rawString(_ w: inout WireWriter, _ bytes: [UInt8], declaredLength: Int? = nil) {
    w.u16(UInt16(declaredLength ?? bytes.count))
    for b in bytes { w.u8(b) }
}

func sample(_ label: String) -> Sample<Request> { requestSamples.first { $0.label == label }! }
func responseSample(_ label: String) -> Sample<Response> { responseSamples.first { $0.label == label }! }

/// The sample's encoding with payload byte `index` (negative: from the end) set to `value`.
func patched(_ bytes: [UInt8], payloadByte index: Int, to value: UInt8) -> [UInt8] {
    var copy = bytes
    copy[index >= 0 ? WireLimits.headerSize + index : copy.count + index] = value
    return copy
}

@Suite("Malformed messages") struct MalformedTests {
    // MARK: Size

    @Test("over 64 KiB is refused as oversize before anything else is read")
    func oversize() {
        // A well-formed header whose payload takes the message one byte over the limit.
        let over = frame(type: .stats, payload: [UInt8](repeating: 0, count: WireLimits.maximumMessageSize - WireLimits.headerSize + 1))
        #expect(over.count == WireLimits.maximumMessageSize + 1)
        #expect(requestError(over) == .oversize(WireLimits.maximumMessageSize + 1))
        #expect(responseError(over) == .oversize(WireLimits.maximumMessageSize + 1))
        // Garbage of that size is oversize too, not bad magic.
        let garbage = [UInt8](repeating: 0xFF, count: 1 << 20)
        #expect(requestError(garbage) == .oversize(1 << 20))
        #expect(responseError(garbage) == .oversize(1 << 20))
        // Exactly the limit is not oversize: here it fails later, on the bytes a stats request must not have.
        let atLimit = frame(type: .stats, payload: [UInt8](repeating: 0, count: WireLimits.maximumMessageSize - WireLimits.headerSize))
        #expect(atLimit.count == WireLimits.maximumMessageSize)
        #expect(requestError(atLimit) == .trailingBytes(WireLimits.maximumMessageSize - WireLimits.headerSize))
    }

    // MARK: Header

    @Test("bad magic", arguments: [UInt32(0), 0x4D42_4644 /* "DMBF" byte-swapped */, 0x4642_4D45, .max])
    func badMagic(_ magic: UInt32) {
        var request = encoded(requestSamples[0])
        request.setU32(magic, at: HeaderOffset.magic)
        #expect(requestError(request) == .badMagic(magic))
        var response = encoded(responseSamples[0])
        response.setU32(magic, at: HeaderOffset.magic)
        #expect(responseError(response) == .badMagic(magic))
        // Magic is checked before the rest of a short header.
        #expect(requestError(Array(request.prefix(4))) == .badMagic(magic))
    }

    @Test("unsupported versions", arguments: [UInt16(0), 3, 0x0100, .max])
    func badVersion(_ version: UInt16) {
        var request = encoded(requestSamples[0])
        request.setU16(version, at: HeaderOffset.version)
        #expect(requestError(request) == .unsupportedVersion(version))
        var response = encoded(responseSamples[0])
        response.setU16(version, at: HeaderOffset.version)
        #expect(responseError(response) == .unsupportedVersion(version))
    }

    @Test("unknown message types, and replies and requests sent the wrong way")
    func unknownType() {
        for type: UInt16 in [0x0000, 0x0014, 0x00FF, 0x3FFF, 0x4000, 0x4005, 0x7FFF, 0x8000, 0x8004, 0x8010, 0xFFFE] {
            var bytes = encoded(requestSamples[0])
            bytes.setU16(type, at: HeaderOffset.type)
            #expect(requestError(bytes) == .unknownType(type), "0x\(String(type, radix: 16))")
            #expect(responseError(bytes) == .unknownType(type), "0x\(String(type, radix: 16))")
        }
        // Every response and event type is unknown to the request decoder and vice versa.
        for type in MessageType.allCases {
            let bytes = frame(type: type, payload: [])
            if type.rawValue < 0x4000 {
                #expect(responseError(bytes) == .unknownType(type.rawValue), "\(type)")
            } else {
                #expect(requestError(bytes) == .unknownType(type.rawValue), "\(type)")
            }
        }
    }

    @Test("a payload length that disagrees with the bytes received")
    func lengthMismatch() {
        var longer = encoded(sample("allocate"))
        let n = longer.payload.count
        longer.setU32(UInt32(n + 1), at: HeaderOffset.payloadLength)
        #expect(requestError(longer) == .lengthMismatch(declared: n + 1, actual: n))
        var shorter = longer
        shorter.setU32(UInt32(n - 1), at: HeaderOffset.payloadLength)
        #expect(requestError(shorter) == .lengthMismatch(declared: n - 1, actual: n))
        var zero = longer
        zero.setU32(0, at: HeaderOffset.payloadLength)
        #expect(requestError(zero) == .lengthMismatch(declared: 0, actual: n))
        var huge = longer
        huge.setU32(.max, at: HeaderOffset.payloadLength)
        #expect(requestError(huge) == .lengthMismatch(declared: Int(UInt32.max), actual: n))
        var response = encoded(responseSample("ok-reply"))
        response.setU32(8, at: HeaderOffset.payloadLength)
        #expect(responseError(response) == .lengthMismatch(declared: 8, actual: 0))
    }

    // MARK: Descriptors

    @Test("the header's fd count must match the fds that arrived")
    func headerDescriptorCount() {
        for s in requestSamples {
            let bytes = encoded(s)
            for actual in [s.descriptors + 1, s.descriptors == 0 ? 2 : 0] {
                #expect(requestError(bytes, descriptors: actual)
                        == .wrongDescriptorCount(type: "header", expected: s.descriptors...s.descriptors, actual: actual), "\(s.label)")
            }
        }
        for s in responseSamples {
            let bytes = encoded(s)
            #expect(responseError(bytes, descriptors: s.descriptors + 1)
                    == .wrongDescriptorCount(type: "header", expected: s.descriptors...s.descriptors, actual: s.descriptors + 1))
        }
    }

    @Test("each request type refuses any other number of fds than it requires", arguments: requestSamples)
    func requestDescriptorCount(_ s: Sample<Request>) {
        let range = WireMessage.descriptorRange(of: s.message.type)
        for fds in [0, 1, 2, 3, WireLimits.maximumDescriptors] where !range.contains(fds) {
            // Header and ancillary data agree, but not with what the type requires.
            let bytes = WireMessage.encode(s.message, requestID: 1, descriptors: fds, version: s.version)
            #expect(requestError(bytes, descriptors: fds)
                    == .wrongDescriptorCount(type: "\(s.message.type)", expected: range, actual: fds), "\(s.label) with \(fds) fds")
        }
    }

    @Test("the request types that take an fd")
    func requestTypesThatTakeAnFd() {
        for (label, fds) in [("import", 0), ("import", 2), ("create-udmabuf-from-memfd", 0), ("attach-fence", 0), ("attach-fence", 2),
                             ("release-lease", 2), ("allocate", 1), ("begin-access", 1), ("hello", 1)] {
            let s = sample(label)
            let bytes = WireMessage.encode(s.message, requestID: 1, descriptors: fds)
            #expect(requestError(bytes, descriptors: fds)
                    == .wrongDescriptorCount(type: "\(s.message.type)", expected: WireMessage.descriptorRange(of: s.message.type),
                                             actual: fds))
        }
    }

    @Test("each response type refuses any other number of fds than it requires", arguments: responseSamples)
    func responseDescriptorCount(_ s: Sample<Response>) {
        let range = WireMessage.descriptorRange(of: s.message.type)
        for fds in [0, 1, 2, 3, WireLimits.maximumDescriptors] where !range.contains(fds) {
            let bytes = WireMessage.encode(s.message, requestID: 1, descriptors: fds, version: s.version)
            #expect(responseError(bytes, descriptors: fds)
                    == .wrongDescriptorCount(type: "\(s.message.type)", expected: range, actual: fds), "\(s.label) with \(fds) fds")
        }
    }

    @Test("an access reply carries an fd exactly when it has fences")
    func accessReplyDescriptors() {
        let withFences = WireMessage.encode(Response.access(AccessReply(fences: 3)), requestID: 1, descriptors: 0)
        #expect(responseError(withFences, descriptors: 0) == .wrongDescriptorCount(type: "accessReply", expected: 1...1, actual: 0))
        let none = WireMessage.encode(Response.access(AccessReply(fences: 0)), requestID: 1, descriptors: 1)
        #expect(responseError(none, descriptors: 1) == .wrongDescriptorCount(type: "accessReply", expected: 0...0, actual: 1))
    }

    // MARK: Payload

    @Test("bytes after the last field")
    func trailingBytes() {
        for s in requestSamples {
            for extra in [1, 7, 300] {
                let bytes = (encoded(s) + [UInt8](repeating: 0xAB, count: extra)).withFixedLength
                #expect(requestError(bytes, descriptors: s.descriptors) == .trailingBytes(extra), "\(s.label) + \(extra)")
            }
        }
        for s in responseSamples {
            let bytes = (encoded(s) + [0]).withFixedLength
            #expect(responseError(bytes, descriptors: s.descriptors) == .trailingBytes(1), "\(s.label)")
        }
    }

    static let invalidUTF8Strings: [[UInt8]] = [
        [0xFF],  // never valid
        [0x80],  // lone continuation byte
        [0xC3],  // sequence cut short
        [0x61, 0xE2, 0x82],  // sequence cut short at the end of the field
        [0xC0, 0x80],  // overlong NUL
        [0xE0, 0x80, 0xAF],  // overlong "/"
        [0xED, 0xA0, 0x80],  // UTF-16 surrogate
        [0xF4, 0x90, 0x80, 0x80],  // beyond U+10FFFF
        Array("tag-".utf8) + [0xFE],
    ]

    @Test("strings that are not UTF-8", arguments: invalidUTF8Strings)
    func invalidUTF8(_ bad: [UInt8]) {
        let requests: [(MessageType, String, [UInt8], Int)] = [
            (.hello, "client", payload { w in w.u16(1); w.u16(1); rawString(&w, bad) }, 0),
            (.allocate, "heap", payload { w in w.u64(1); rawString(&w, bad); w.string("t"); w.u8(3) }, 0),
            (.allocate, "tag", payload { w in w.u64(1); w.string("system"); rawString(&w, bad); w.u8(3) }, 0),
            (.createUDmabuf, "tag", payload { w in w.u64(1); rawString(&w, bad); w.bool(false) }, 0),
            (.createUDmabufFromMemfd, "tag", payload { w in w.u32(0); rawString(&w, bad) }, 1),
            (.importBuffer, "tag", payload { w in rawString(&w, bad) }, 1),
        ]
        for (type, field, body, fds) in requests {
            #expect(requestError(frame(type: type, descriptors: fds, payload: body), descriptors: fds) == .invalidUTF8(field: field),
                    "\(type).\(field)")
        }
        let responses: [(MessageType, String, [UInt8], Int)] = [
            (.helloReply, "server", payload { w in w.u16(1); rawString(&w, bad); w.u32(0); w.u16(0); w.u32(0); w.u32(0); w.u32(0); w.i32(0) }, 0),
            (.errorReply, "message", payload { w in w.i32(1); w.u16(1); rawString(&w, bad) }, 0),
            (.heapsReply, "device", payload { w in
                w.u32(1); w.string("system"); rawString(&w, bad); w.string("system"); w.u64(0); w.u32(0); w.u32(0)
            }, 0),
            (.heapsReply, "heap", payload { w in
                w.u32(0); w.u32(1); w.string("any"); w.u32(2); w.string("cma"); rawString(&w, bad)
            }, 0),
            (.bufferReply, "name", payload { w in
                w.u64(1); w.u64(2); w.u64(3); w.string("system"); w.string("t"); rawString(&w, bad)
                w.u32(0); w.i32(0); w.u32(0); w.u32(0); w.u32(0); w.u32(0); w.bool(false); w.bool(false)
            }, 1),
            (.statsReply, "errno", payload { w in w.u32(0); w.u32(0); w.u32(1); rawString(&w, bad); w.u32(1); for _ in 0..<8 { w.u32(0) } }, 0),
        ]
        for (type, field, body, fds) in responses {
            #expect(responseError(frame(type: type, descriptors: fds, payload: body), descriptors: fds) == .invalidUTF8(field: field),
                    "\(type).\(field)")
        }
    }

    @Test("a string longer than 255 bytes is refused before its bytes are read")
    func stringTooLong() {
        let limit = WireLimits.maximumStringLength
        // 255 bytes are fine.
        #expect(requestError(frame(type: .importBuffer, descriptors: 1, payload: payload { rawString(&$0, .init(repeating: 0x61, count: 255)) }),
                             descriptors: 1) == nil)
        // 256 bytes, all present.
        #expect(requestError(frame(type: .importBuffer, descriptors: 1, payload: payload { rawString(&$0, .init(repeating: 0x61, count: 256)) }),
                             descriptors: 1) == .limitExceeded(field: "tag", value: 256, limit: limit))
        // A declared length of 65535 with no bytes behind it: the limit, not truncation, is reported.
        #expect(requestError(frame(type: .hello, payload: payload { w in w.u16(1); w.u16(1); rawString(&w, [], declaredLength: 0xFFFF) }))
                == .limitExceeded(field: "client", value: 0xFFFF, limit: limit))
        #expect(responseError(frame(type: .errorReply, payload: payload { w in w.i32(1); w.u16(1); rawString(&w, [], declaredLength: 256) }))
                == .limitExceeded(field: "message", value: 256, limit: limit))
        #expect(responseError(frame(type: .heapsReply, payload: payload { w in
            w.u32(0); w.u32(1); w.string("p"); w.u32(1); rawString(&w, .init(repeating: 0x61, count: 300))
        })) == .limitExceeded(field: "heap", value: 300, limit: limit))
    }

    @Test("an array count over the entry limit is refused")
    func arrayCountOverLimit() {
        let limit = WireLimits.maximumListEntries
        for count in [UInt32(limit + 1), 1 << 20, .max] {
            let over = Int(count)
            #expect(requestError(frame(type: .createUDmabufFromMemfd, descriptors: 1, payload: payload { w in w.u32(count); w.string("t") }),
                                 descriptors: 1) == .limitExceeded(field: "ranges", value: over, limit: limit))
            #expect(responseError(frame(type: .layoutReply, payload: payload { w in
                w.u64(1); w.u64(1); w.u32(1); w.u8(0); w.u32(4096); w.u64(0); w.u32(count)
            })) == .limitExceeded(field: "runs", value: over, limit: limit))
            #expect(responseError(frame(type: .heapsReply, payload: payload { w in w.u32(count); w.u32(0) }))
                    == .limitExceeded(field: "heaps", value: over, limit: limit))
            #expect(responseError(frame(type: .heapsReply, payload: payload { w in w.u32(0); w.u32(count) }))
                    == .limitExceeded(field: "policies", value: over, limit: limit))
            #expect(responseError(frame(type: .heapsReply, payload: payload { w in w.u32(0); w.u32(1); w.string("any"); w.u32(count) }))
                    == .limitExceeded(field: "chain", value: over, limit: limit))
            #expect(responseError(frame(type: .listReply, payload: payload { w in w.u32(count) }))
                    == .limitExceeded(field: "buffers", value: over, limit: limit))
            #expect(responseError(frame(type: .statsReply, payload: payload { w in w.u32(count) }))
                    == .limitExceeded(field: "heaps", value: over, limit: limit))
            #expect(responseError(frame(type: .statsReply, payload: payload { w in w.u32(0); w.u32(count) }))
                    == .limitExceeded(field: "clients", value: over, limit: limit))
            #expect(responseError(frame(type: .statsReply, payload: payload { w in w.u32(0); w.u32(0); w.u32(count) }))
                    == .limitExceeded(field: "failures", value: over, limit: limit))
            #expect(responseError(frame(type: .bufferReply, descriptors: 1, payload: payload { w in
                w.u64(1); w.u64(2); w.u64(3); w.string("h"); w.string("t"); w.string("n"); for _ in 0..<5 { w.u32(0) }; w.u32(count)
            }), descriptors: 1) == .limitExceeded(field: "shared_with", value: over, limit: limit))
        }
    }

    @Test("an array count larger than the bytes left fails on the count, before any element is read or stored")
    func arrayCountBeyondRemainingBytes() {
        let limit = UInt32(WireLimits.maximumListEntries)
        // At the limit with nothing behind it. Were elements read first, the error would name "offset", not "ranges".
        #expect(requestError(frame(type: .createUDmabufFromMemfd, descriptors: 1, payload: payload { w in w.u32(limit) }), descriptors: 1)
                == .truncated(field: "ranges"))
        // Two ranges declared, one present (plus a tag): 16 + 3 bytes left cannot hold 32.
        #expect(requestError(frame(type: .createUDmabufFromMemfd, descriptors: 1, payload: payload { w in
            w.u32(2); w.u64(0); w.u64(4096); w.string("t")
        }), descriptors: 1) == .truncated(field: "ranges"))
        #expect(responseError(frame(type: .layoutReply, payload: payload { w in
            w.u64(1); w.u64(1); w.u32(1); w.u8(0); w.u32(4096); w.u64(0); w.u32(limit); for _ in 0..<100 { w.u8(0) }
        })) == .truncated(field: "runs"))
        #expect(responseError(frame(type: .listReply, payload: payload { w in w.u32(2); for _ in 0..<99 { w.u8(0) } }))
                == .truncated(field: "buffers"))
        #expect(responseError(frame(type: .heapsReply, payload: payload { w in w.u32(limit); w.u32(0) })) == .truncated(field: "heaps"))
        #expect(responseError(frame(type: .heapsReply, payload: payload { w in w.u32(0); w.u32(1); w.string("p"); w.u32(3); w.string("a") }))
                == .truncated(field: "chain"))
        #expect(responseError(frame(type: .statsReply, payload: payload { w in w.u32(0); w.u32(limit); for _ in 0..<31 { w.u8(0) } }))
                == .truncated(field: "clients"))
        // 4000 uids declared and one byte short of them: refused on the count, not after reading 3999 of them.
        #expect(responseError(frame(type: .bufferReply, descriptors: 1, payload: payload { w in
            w.u64(1); w.u64(2); w.u64(3); w.string("h"); w.string("t"); w.string("n"); for _ in 0..<5 { w.u32(0) }; w.u32(limit)
            for _ in 0..<(4 * Int(limit) - 1) { w.u8(0) }
        }), descriptors: 1) == .truncated(field: "shared_with"))
    }

    @Test("enumeration bytes outside their cases")
    func invalidEnumerations() {
        for raw: UInt8 in [4, 0x80, 0xFF] {
            #expect(requestError(patched(encoded(sample("allocate")), payloadByte: -1, to: raw))
                    == .invalidValue(field: "cpu_access", value: UInt64(raw)))
        }
        for raw: UInt8 in [0, 3, 0xFF] {
            #expect(requestError(patched(encoded(sample("attach-fence")), payloadByte: -1, to: raw), descriptors: 1)
                    == .invalidValue(field: "access", value: UInt64(raw)))
            #expect(requestError(patched(encoded(sample("begin-access")), payloadByte: -1, to: raw))
                    == .invalidValue(field: "access", value: UInt64(raw)))
        }
        for raw: UInt8 in [3, 0xFF] {
            // buffer(8) lease(8) generation(4), then kind.
            #expect(responseError(patched(encoded(responseSample("layout-reply")), payloadByte: 20, to: raw))
                    == .invalidValue(field: "kind", value: UInt64(raw)))
        }
        for code: UInt16 in [0, 13, 0x100, .max] {
            var bytes = encoded(responseSample("error-reply"))
            bytes.setU16(code, at: WireLimits.headerSize + 4)  // after errno
            #expect(responseError(bytes) == .invalidValue(field: "code", value: UInt64(code)))
        }
    }

    @Test("bool bytes other than 0 and 1", arguments: [UInt8(2), 0x80, 0xFF])
    func invalidBool(_ raw: UInt8) {
        let value = UInt64(raw)
        #expect(requestError(patched(encoded(sample("create-udmabuf")), payloadByte: -1, to: raw)) == .invalidValue(field: "huge_pages", value: value))
        #expect(requestError(patched(encoded(sample("share-uid")), payloadByte: 8, to: raw)) == .invalidValue(field: "uid", value: value))
        #expect(requestError(patched(encoded(sample("share-uid")), payloadByte: -1, to: raw))
                == .invalidValue(field: "one_time_token", value: value))
        #expect(requestError(patched(encoded(sample("list")), payloadByte: 0, to: raw)) == .invalidValue(field: "all", value: value))
        #expect(requestError(patched(encoded(sample("layout")), payloadByte: -1, to: raw)) == .invalidValue(field: "physical", value: value))
        #expect(responseError(patched(encoded(responseSample("share-reply-token")), payloadByte: 0, to: raw))
                == .invalidValue(field: "token", value: value))
        #expect(responseError(patched(encoded(responseSample("buffer-reply")), payloadByte: -2, to: raw), descriptors: 1)
                == .invalidValue(field: "revoked", value: value))
        #expect(responseError(patched(encoded(responseSample("buffer-reply")), payloadByte: -1, to: raw), descriptors: 1)
                == .invalidValue(field: "orphaned", value: value))
    }

    @Test("error descriptions name the problem")
    func descriptions() {
        #expect(WireDecodingError.truncated(field: "tag").description == "message ends inside field 'tag'")
        #expect(WireDecodingError.badMagic(0x1234).description.contains("0x1234"))
        #expect(WireDecodingError.unknownType(0xBEEF).description.contains("0xbeef"))
        #expect(WireDecodingError.wrongDescriptorCount(type: "importBuffer", expected: 1...1, actual: 0).description
                == "importBuffer carries 0 fds, expected 1")
        #expect(WireDecodingError.wrongDescriptorCount(type: "releaseLease", expected: 0...1, actual: 2).description
                == "releaseLease carries 2 fds, expected 0...1")
        #expect(WireDecodingError.oversize(70_000).description.contains("65536"))
    }
}
