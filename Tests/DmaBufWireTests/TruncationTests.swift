import DmaBufWire
import Testing

/// An independent description of each payload's layout, used to predict which field a truncated payload
/// ends in. It restates the protocol field by field (names as the decoder reports them), so it also pins
/// the layouts: a change to a message's fields breaks the size check below.
indirect enum Field {
    /// A fixed-size integer, bool or enum byte.
    case fixed(String, Int)
    /// A string: u16 length then `bytes` UTF-8 bytes, all reported under one name.
    case string(String, bytes: Int)
    /// A u32 count, then elements; the decoder refuses a count whose `minimum`-byte elements cannot fit.
    case array(String, minimum: Int, [[Field]])

    static func string(_ name: String, _ value: String) -> Field { .string(name, bytes: value.utf8.count) }

    var size: Int {
        switch self {
        case .fixed(_, let n): n
        case .string(_, let n): 2 + n
        case .array(_, _, let elements): 4 + elements.reduce(0) { $0 + $1.reduce(0) { $0 + $1.size } }
        }
    }
}

/// The field a payload cut to `cut` bytes ends inside, or nil when the cut is past the last field.
func fieldEnding(_ fields: [Field], at cut: Int, offset: inout Int) -> String? {
    for field in fields {
        switch field {
        case .fixed(let name, _), .string(let name, _):
            if cut < offset + field.size { return name }
            offset += field.size
        case .array(let name, let minimum, let elements):
            if cut < offset + 4 { return name }
            offset += 4
            if cut - offset < elements.count * minimum { return name }
            for element in elements {
                if let name = fieldEnding(element, at: cut, offset: &offset) { return name }
            }
        }
    }
    return nil
}

func layout(of request: Request, version: UInt16 = 1) -> [Field] {
    switch request {
    case .hello(let h): [.fixed("minimum_version", 2), .fixed("maximum_version", 2), .string("client", h.client)]
    case .listHeaps, .stats: []
    case .allocate(let a) where version >= 2:
        [.fixed("size", 8), .string("heap", a.heap), .string("tag", a.tag), .fixed("fd_flags", 4), .fixed("heap_flags", 8)]
    case .allocate(let a): [.fixed("size", 8), .string("heap", a.heap), .string("tag", a.tag), .fixed("cpu_access", 1)]
    case .allocateBatch(let a):
        [.fixed("count", 2), .fixed("size", 8), .string("heap", a.heap), .string("tag", a.tag), .fixed("fd_flags", 4), .fixed("heap_flags", 8)]
    case .releaseQuiet(let ids): [.array("buffers", minimum: 8, ids.map { _ in [.fixed("buffer", 8)] })]
    case .createUDmabuf(let u): [.fixed("size", 8), .string("tag", u.tag), .fixed("huge_pages", 1)]
    case .createUDmabufFromMemfd(let u):
        [.array("ranges", minimum: version >= 2 ? 17 : 16,
                u.ranges.map { _ in [.fixed("offset", 8), .fixed("size", 8)] + (version >= 2 ? [.fixed("memfd", 1)] : []) }), .string("tag", u.tag)]
            + (version >= 2 ? [.fixed("flags", 4)] : [])
    case .importBuffer(let tag): [.string("tag", tag)]
    case .share(let s): [.fixed("buffer", 8), .fixed("uid", s.uid == nil ? 1 : 5), .fixed("one_time_token", 1)]
    case .fetch: [.fixed("buffer", 8), .fixed("token", 8)]
    case .release, .info: [.fixed("buffer", 8)]
    case .list: [.fixed("all", 1), .fixed("after", 8)]
    case .layout: [.fixed("buffer", 8), .fixed("first_page", 8), .fixed("page_count", 8), .fixed("physical", 1)]
    case .releaseLease: [.fixed("lease", 8)]
    case .attachFence, .beginAccess: [.fixed("buffer", 8), .fixed("first_page", 8), .fixed("page_count", 8), .fixed("access", 1)]
    case .revoke: [.fixed("buffer", 8), .fixed("deadline_ms", 4)]
    }
}

func layout(of b: BufferInfo, version: UInt16 = 1) -> [Field] {
    [.fixed("id", 8), .fixed("inode", 8), .fixed("size", 8), .string("heap", b.heap), .string("tag", b.tag), .string("name", b.name),
     .fixed("owner_uid", 4), .fixed("owner_pid", 4), .fixed("generation", 4), .fixed("external_references", 4), .fixed("leases", 4),
     .array("shared_with", minimum: 4, b.sharedWith.map { _ in [.fixed("uid", 4)] }), .fixed("revoked", 1), .fixed("orphaned", 1)]
        + (version >= 2 ? [.string("cgroup", b.cgroup), .fixed("memfd_owned_by_daemon", 1), .fixed("flags", 4)] : [])
}

func layout(of response: Response, version: UInt16 = 1) -> [Field] {
    switch response {
    case .hello(let h):
        [.fixed("version", 2), .string("server", h.server), .fixed("maximum_message_size", 4), .fixed("maximum_descriptors", 2),
         .fixed("page_size", 4), .fixed("uid", 4), .fixed("gid", 4), .fixed("pid", 4)]
    case .heaps(let h):
        [.array("heaps", minimum: version >= 2 ? 35 : 18, h.heaps.map {
            [.string("name", $0.name), .string("device", $0.device), .string("kind", $0.kind), .fixed("allocated_bytes", 8), .fixed("buffers", 4)]
                + (version >= 2 ? [.fixed("total_bytes", 8), .fixed("free_bytes", 8), .fixed("charges_memcg", 1)] : [])
         }),
         .array("policies", minimum: 6, h.policies.map {
            [.string("name", $0.name), .array("chain", minimum: 2, $0.chain.map { [.string("heap", $0)] })]
         })] + (version >= 2 ? [.fixed("mem_accounting", 1)] : [])
    case .buffer(let b): layout(of: b, version: version)
    case .buffers(let items): [.array("buffers", minimum: 57, items.map { layout(of: $0, version: version) })]
    case .share(let s): [.fixed("token", s.token == nil ? 1 : 9)]
    case .ok: []
    case .list(let items, _):
        [.array("buffers", minimum: version >= 2 ? 57 : 50, items.map { layout(of: $0, version: version) }), .fixed("more", 1)]
    case .stats(let s):
        [.array("heaps", minimum: 18, s.heaps.map { [.string("heap", $0.heap), .fixed("bytes", 8), .fixed("buffers", 4), .fixed("failures", 4)] }),
         .array("clients", minimum: 32, s.clients.map { _ in
            [.fixed("uid", 4), .fixed("bytes", 8), .fixed("buffers", 4), .fixed("quota_bytes", 8), .fixed("quota_buffers", 4), .fixed("refusals", 4)]
         }),
         .array("failures", minimum: 6, s.failures.map { [.string("errno", $0.errno), .fixed("count", 4)] }),
         .fixed("connected_clients", 4), .fixed("buffers", 4), .fixed("bytes", 8), .fixed("leases", 4), .fixed("pending_fences", 4),
         .fixed("oldest_pending_fence_ms", 8)]
            + (version >= 2 ? [.array("cgroups", minimum: 26, s.cgroups.map {
                [.string("cgroup", $0.cgroup), .fixed("bytes", 8), .fixed("buffers", 4), .fixed("quota_bytes", 8), .fixed("refusals", 4)]
              })] : [])
    case .layout(let l):
        [.fixed("buffer", 8), .fixed("lease", 8), .fixed("generation", 4), .fixed("kind", 1), .fixed("page_size", 4), .fixed("first_page", 8),
         .array("runs", minimum: 16, l.runs.map { _ in [.fixed("start", 8), .fixed("pages", 8)] })]
            + (version >= 2 ? [.fixed("flags", 4)] : [])
    case .access: [.fixed("fences", 4)]
    case .error(let e): [.fixed("errno", 4), .fixed("code", 2), .string("message", e.message)]
    case .leaseRevoked: [.fixed("lease", 8), .fixed("buffer", 8), .fixed("deadline_ms", 4)]
    case .leaseEnded: [.fixed("lease", 8), .fixed("buffer", 8)]
    case .bufferFreed, .fenceSignaled: [.fixed("buffer", 8)]
    }
}

@Suite("Truncated messages") struct TruncationTests {
    static let headerFields: [(field: String, end: Int)] = [
        ("magic", 4), ("version", 6), ("type", 8), ("request_id", 12), ("payload_length", 16), ("fd_count", 18), ("reserved", 20),
    ]

    @Test("fewer than 20 header bytes: truncated in the header field the bytes end in")
    func shortHeader() {
        for sample in [encoded(requestSamples[0]), encoded(responseSamples[0])] {
            for n in 0..<WireLimits.headerSize {
                let expected = Self.headerFields.first { n < $0.end }!.field
                let prefix = Array(sample.prefix(n))
                #expect(requestError(prefix) == .truncated(field: expected), "\(n) bytes")
                #expect(responseError(prefix) == .truncated(field: expected), "\(n) bytes")
            }
        }
        // A lone header of a bodiless type is a whole message.
        #expect(requestError(Array(WireMessage.encode(Request.stats, requestID: 1).prefix(20))) == nil)
    }

    @Test("the layout descriptions agree with the encoder's sizes")
    func layoutsMatchTheEncoder() {
        for sample in requestSamples {
            #expect(layout(of: sample.message, version: sample.version).reduce(0) { $0 + $1.size } == encoded(sample).payload.count, "\(sample.label)")
        }
        for sample in responseSamples {
            #expect(layout(of: sample.message, version: sample.version).reduce(0) { $0 + $1.size } == encoded(sample).payload.count, "\(sample.label)")
        }
    }

    @Test("a request cut inside any field, with a header that agrees, is truncated in that field", arguments: requestSamples)
    func truncatedRequestPayload(_ sample: Sample<Request>) {
        let bytes = encoded(sample)
        let fields = layout(of: sample.message, version: sample.version)
        for cut in 0..<bytes.payload.count {
            var offset = 0
            let expected = fieldEnding(fields, at: cut, offset: &offset)
            let message = Array(bytes.prefix(WireLimits.headerSize + cut)).withFixedLength
            #expect(expected != nil)
            #expect(requestError(message, descriptors: sample.descriptors) == .truncated(field: expected ?? "?"),
                    "\(sample.label) cut at payload byte \(cut)")
        }
    }

    @Test("a response cut inside any field, with a header that agrees, is truncated in that field", arguments: responseSamples)
    func truncatedResponsePayload(_ sample: Sample<Response>) {
        let bytes = encoded(sample)
        let fields = layout(of: sample.message, version: sample.version)
        for cut in 0..<bytes.payload.count {
            var offset = 0
            let expected = fieldEnding(fields, at: cut, offset: &offset)
            let message = Array(bytes.prefix(WireLimits.headerSize + cut)).withFixedLength
            #expect(expected != nil)
            #expect(responseError(message, descriptors: sample.descriptors) == .truncated(field: expected ?? "?"),
                    "\(sample.label) cut at payload byte \(cut)")
        }
    }

    @Test("a payload cut short under the original header is a length mismatch")
    func truncatedUnderOriginalHeader() {
        for sample in requestSamples where !encoded(sample).payload.isEmpty {
            let bytes = encoded(sample)
            let n = bytes.payload.count
            for cut in [0, n / 2, n - 1] {
                #expect(requestError(Array(bytes.prefix(WireLimits.headerSize + cut)), descriptors: sample.descriptors)
                        == .lengthMismatch(declared: n, actual: cut), "\(sample.label)")
            }
        }
        for sample in responseSamples where !encoded(sample).payload.isEmpty {
            let bytes = encoded(sample)
            let n = bytes.payload.count
            #expect(responseError(Array(bytes.dropLast()), descriptors: sample.descriptors)
                    == .lengthMismatch(declared: n, actual: n - 1), "\(sample.label)")
        }
    }
}
