// Kernel-layer inputs that come from clients (issue 9): no value a caller passes may trap or wrap.
import DmaBufTestSupport
import DmaBuf
import SystemPackage
import Testing

@Suite struct HostileInputTests {
    @Test func wholeMillisecondsSaturates() {
        #expect(Duration.seconds(Int64.max).wholeMilliseconds == Int64.max)
        #expect(Duration.seconds(Int64.min).wholeMilliseconds == Int64.min)
        #expect(Duration.milliseconds(1500).wholeMilliseconds == 1500)
        #expect(Duration.nanoseconds(999_999).wholeMilliseconds == 0)
    }

    @Test func smallFilesAreBounded() throws {
        let scratch = try ScratchDirectory()
        defer { scratch.remove() }
        try scratch.write("big", String(repeating: "x", count: 10_000))
        #expect(try SmallFiles.read(scratch.path + "/big").count == 10_000)
        #expect(throws: Errno.fileTooLarge) { try SmallFiles.read(scratch.path + "/big", maximumBytes: 4096) }
    }

    @Test func randomFdInfoNeverTraps() {
        // Any bytes after the kernel's lines: the kernel's values stand, whatever the name holds.
        var rng = SplitMix64(seed: 9)
        let alphabet = Array("count:size:exp_name:\t\n\r 0123456789-".utf8)
        for _ in 0..<2000 {
            let length = Int(rng.next() % 64)
            let tail = (0..<length).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] }
            let text = "size:\t8192\ncount:\t4\nexp_name:\tudmabuf\nname:\t" + String(decoding: tail, as: UTF8.self)
            let info = FdInfo(parsing: text)
            #expect(info.count == 4 && info.size == 8192 && info.exporter == "udmabuf" && info.unexpected.isEmpty)
        }
    }
}
