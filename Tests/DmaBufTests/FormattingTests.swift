import DmaBuf
import SystemPackage
import Testing

@Suite struct ByteCountTests {
    @Test(arguments: [
        (0, "0 B"), (1, "1 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1 KiB"), (4096, "4 KiB"),
        (1536, "1.5 KiB"), (1 << 20, "1 MiB"), (64 << 20, "64 MiB"), (3 << 29, "1.5 GiB"), (1 << 40, "1 TiB"),
        (1 << 50, "1024 TiB"), ((1 << 20) + 1, "1.0 MiB"), (-2048, "-2 KiB"),
    ])
    func format(bytes: Int, text: String) {
        #expect(ByteCount(bytes).description == text)
    }

    @Test(arguments: [
        ("4096", 4096), ("4K", 4096), ("4k", 4096), ("4KiB", 4096), ("4 KiB", 4096), ("4kb", 4096), ("1M", 1 << 20),
        ("1MiB", 1 << 20), ("1.5G", 3 << 29), ("2T", 2 << 40), ("  16 MiB ", 16 << 20), ("0", 0), ("1.5K", 1536),
        ("12b", 12), ("0.5M", 1 << 19),
    ] as [(String, Int)])
    func parse(text: String, bytes: Int) {
        #expect(ByteCount.parse(text) == bytes)
    }

    @Test(arguments: ["", "K", "abc", "-1", "1.5", "4Q", "4 K B", "1e3", "1..5M", "99999999999T"])
    func parseRejects(text: String) {
        #expect(ByteCount.parse(text) == nil)
    }

    @Test func parseAndFormatRoundTrip() {
        for bytes in [0, 1, 4096, 1 << 20, 3 << 20, 5 << 30] {
            #expect(ByteCount.parse(ByteCount(bytes).description) == bytes)
        }
    }
}

@Suite struct DmaBufErrorTests {
    @Test func descriptionWithErrnoAndFix() {
        let error = DmaBufError("udmabuf", .invalidArgument, "memfd lacks F_SEAL_SHRINK", fix: "create it with MFD_ALLOW_SEALING and add F_SEAL_SHRINK")
        #expect(error.description == "udmabuf: memfd lacks F_SEAL_SHRINK (EINVAL); create it with MFD_ALLOW_SEALING and add F_SEAL_SHRINK")
        #expect("\(error)" == error.description)
    }

    @Test func descriptionWithoutErrnoOrFix() {
        #expect(DmaBufError("pagemap", nil, "no entries").description == "pagemap: no entries")
        #expect(DmaBufError("drm", nil, "no vgem", fix: "modprobe vgem").description == "drm: no vgem; modprobe vgem")
        #expect(DmaBufError("drm", Errno(rawValue: 19), "no vgem").description == "drm: no vgem (ENODEV)")
        #expect(DmaBufError("x", Errno(rawValue: 4242), "odd").description == "x: odd (errno 4242)")
    }

    @Test func equality() {
        let a = DmaBufError("dma-buf", .badFileDescriptor, "not a dma-buf")
        #expect(a == DmaBufError("dma-buf", .badFileDescriptor, "not a dma-buf"))
        #expect(a != DmaBufError("dma-buf", .badFileDescriptor, "not a dma-buf", fix: "x"))
        #expect(a != DmaBufError("dma-buf", .invalidArgument, "not a dma-buf"))
    }
}

@Suite struct ErrnoNameTests {
    @Test(arguments: [
        (1, "EPERM"), (2, "ENOENT"), (9, "EBADF"), (12, "ENOMEM"), (13, "EACCES"), (16, "EBUSY"), (22, "EINVAL"),
        (25, "ENOTTY"), (28, "ENOSPC"), (32, "EPIPE"), (61, "ENODATA"), (62, "ETIME"), (77, "EBADFD"), (110, "ETIMEDOUT"),
    ] as [(CInt, String)])
    func names(raw: CInt, name: String) {
        #expect(Errno(rawValue: raw).name == name)
        #expect(Errno(name: name) == Errno(rawValue: raw))
    }

    @Test func namedSystemErrnos() {
        #expect(Errno.invalidArgument.name == "EINVAL")
        #expect(Errno.badFileDescriptorState.name == "EBADFD")
        #expect(Errno.badFileDescriptorState.rawValue == 77)
        #expect(Errno.timerExpired.name == "ETIME")
        #expect(Errno.timerExpired.rawValue == 62)
        #expect(Errno.timedOut.name == "ETIMEDOUT")
    }

    @Test func unknownNumbersAndNames() {
        #expect(Errno(rawValue: 999).name == "errno 999")
        #expect(Errno(rawValue: 0).name == "errno 0")
        #expect(Errno(name: "EFOO") == nil)
        #expect(Errno(name: "einval") == nil)  // C names are upper case
    }
}
