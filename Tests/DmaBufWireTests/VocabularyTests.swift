import DmaBufWire
import Testing

/// The shared vocabulary (DmaBufTypes) and the one refusal wording.
@Suite("Vocabulary") struct VocabularyTests {
    @Test("a refusal reads 'cause (ENAME); fix' and keeps its errno and code")
    func refusal() {
        let e = WireError.refusal(122, code: .quotaExceeded, cause: "uid 1000 is over its quota of 1 GiB", fix: "release buffers")
        #expect(e.message == "uid 1000 is over its quota of 1 GiB (EDQUOT); release buffers")
        #expect(e.errno == 122 && e.code == .quotaExceeded && e.errnoName == "EDQUOT")
        #expect(WireError.refusal(22, code: .invalidArgument, cause: "size 0").message == "size 0 (EINVAL)")
        #expect(WireError.refusal(9999, code: .internal, cause: "odd").message == "odd (errno 9999)")
        struct FakeErrno: RawRepresentable { var rawValue: Int32 }
        #expect(WireError.refusal(FakeErrno(rawValue: 95), code: .invalidArgument, cause: "x", fix: "y").message == "x (EOPNOTSUPP); y")
    }

    @Test("errno names both ways")
    func errnoNames() {
        #expect(ErrnoNames.name(2) == "ENOENT")
        #expect(ErrnoNames.code(named: "EDQUOT") == 122)
        #expect(ErrnoNames.code(named: "ENOPE") == nil)
        for (code, name) in ErrnoNames.table { #expect(ErrnoNames.code(named: name) == code) }
    }

    @Test("durations: one grammar for config files and command lines")
    func durations() {
        let cases: [(String, Duration?)] = [
            ("5", .seconds(5)), ("5s", .seconds(5)), ("5sec", .seconds(5)), ("250ms", .milliseconds(250)), ("1.5s", .milliseconds(1500)),
            ("2m", .seconds(120)), ("2min", .seconds(120)), ("1h", .seconds(3600)), (" 10ms\t", .milliseconds(10)), ("0", .zero),
            ("", nil), ("ms", nil), ("-1s", nil), ("5x", nil), ("1e3", nil), ("nan", nil), ("١٢s", nil), ("99999999999999999h", nil),
        ]
        for (text, expected) in cases { #expect(DurationText.parse(text) == expected, "'\(text)'") }
    }

    @Test("trimming: spaces, tabs, CR and LF at both ends, nothing else")
    func trimming() {
        #expect(" \t a b \r\n".trimmingWhitespace() == "a b")
        #expect("\r\n".trimmingWhitespace() == "")
        #expect("\u{00A0}x\u{00A0}".trimmingWhitespace() == "\u{00A0}x\u{00A0}")
        #expect("x"[...].trimmingWhitespace() == "x")
    }

    @Test("one access vocabulary: conflicts, and the wire carries read or write only")
    func access() throws {
        #expect(!AccessMode.read.conflicts(with: .read))
        #expect(AccessMode.read.conflicts(with: .write) && AccessMode.readWrite.conflicts(with: .read))
        let request = Request.beginAccess(AccessRequest(buffer: 1, access: .readWrite))
        let bytes = WireMessage.encode(request, requestID: 1)
        #expect(try WireMessage.decodeRequest(bytes, descriptors: 0).1 == .beginAccess(AccessRequest(buffer: 1, access: .write)))
        var three = bytes
        three[three.count - 1] = 3
        #expect(requestError(three) == .invalidValue(field: "access", value: 3))
    }
}
