import DmaBuf
import DmaBufCLI
import DmaBufWire
import Foundation
import Testing

@Suite("JSON output")
struct JSONOutputTests {
    @Test func bufferKeysAndValues() throws {
        let object = try jsonObject(try encodeJSON(Fixtures.buffer))
        #expect(Set(object.keys) == [
            "id", "inode", "size", "heap", "tag", "name", "ownerUID", "ownerPID", "generation", "externalReferences", "leases",
            "sharedWith", "revoked", "orphaned", "cgroup", "memfdOwnedByDaemon", "flags",
        ])
        #expect(object["id"] as? Int == 7)
        #expect(object["size"] as? Int == 4 << 20)
        #expect(object["name"] as? String == "1000:4242:frame")
        #expect(object["externalReferences"] as? Int == 2)
        #expect(object["revoked"] as? Bool == false)
    }

    @Test func keysAreSortedAndSlashesUnescaped() throws {
        let text = try encodeJSON(Fixtures.heaps)
        #expect(text.contains("\"/dev/dma_heap/system\""))
        #expect(text.hasSuffix("}\n"))
        let keys = text.split(separator: "\n").filter { $0.hasPrefix("  \"") }.map { $0.split(separator: "\"")[1] }
        #expect(keys == ["heaps", "memAccounting", "policies"])
        let heap = try #require(((try jsonObject(text))["heaps"] as? [[String: Any]])?.first)
        #expect(Set(heap.keys) == ["name", "device", "kind", "allocatedBytes", "buffers", "totalBytes", "freeBytes", "chargesMemcg"])
        #expect(heap["allocatedBytes"] as? Int == 8 << 20)
    }

    @Test func bufferList() throws {
        let object = try jsonObject(try encodeJSON(BufferListOutput(buffers: [Fixtures.buffer, Fixtures.sharedOrphan])))
        let buffers = try #require(object["buffers"] as? [[String: Any]])
        #expect(buffers.map { $0["id"] as? Int } == [7, 12])
        #expect(buffers[1]["sharedWith"] as? [Int] == [1000])
    }

    @Test func stats() throws {
        let object = try jsonObject(try encodeJSON(Fixtures.stats))
        #expect(Set(object.keys) == [
            "heaps", "clients", "failures", "connectedClients", "buffers", "bytes", "leases", "pendingFences",
            "oldestPendingFenceMilliseconds", "cgroups",
        ])
        #expect(object["oldestPendingFenceMilliseconds"] as? Int == 1500)
        let client = try #require((object["clients"] as? [[String: Any]])?.first)
        #expect(Set(client.keys) == ["uid", "bytes", "buffers", "quotaBytes", "quotaBuffers", "refusals"])
        let failure = try #require((object["failures"] as? [[String: Any]])?.first)
        #expect(failure["errno"] as? String == "ENOMEM")
    }

    @Test func layoutUsesKindNames() throws {
        let object = try jsonObject(try encodeJSON(LayoutOutput(Fixtures.layout, leaseReleased: true)))
        #expect(Set(object.keys) == ["buffer", "lease", "leaseReleased", "generation", "kind", "pageSize", "firstPage", "pages", "runs", "contiguous"])
        #expect(object["contiguous"] as? Bool == false)
        #expect(object["kind"] as? String == "buffer-pages")
        #expect(object["pages"] as? Int == 272)
        #expect(object["leaseReleased"] as? Bool == true)
        let runs = try #require(object["runs"] as? [[String: Int]])
        #expect(runs == [["start": 0, "pages": 256], ["start": 512, "pages": 16]])
        #expect(RunKind.allCases.map(\.name) == ["buffer-pages", "memfd-pages", "physical"])
    }

    @Test func fenceOmitsWaitForStatus() throws {
        let status = try jsonObject(try encodeJSON(FenceOutput(buffer: 7, firstPage: 0, pageCount: 0, access: "read", fences: 1, signaled: false, waitedMilliseconds: nil)))
        #expect(Set(status.keys) == ["buffer", "firstPage", "pageCount", "access", "fences", "signaled"])
        let wait = try jsonObject(try encodeJSON(FenceOutput(buffer: 7, firstPage: 0, pageCount: 0, access: "read", fences: 1, signaled: true, waitedMilliseconds: 3)))
        #expect(wait["waitedMilliseconds"] as? Int == 3)
    }

    @Test func roundTripsThroughTheProtocolTypes() throws {
        let decoded = try JSONDecoder().decode(Stats.self, from: Data(try encodeJSON(Fixtures.stats).utf8))
        #expect(decoded == Fixtures.stats)
    }
}

/// Checks text against the OpenMetrics 1.0 text format, as much of it as dmabufctl uses: metadata before
/// samples, one TYPE per family, counter samples suffixed `_total`, UNIT matching the name's suffix, label
/// syntax and escapes, numeric values, and the final `# EOF`. Returns the problems found.
func openMetricsProblems(_ text: String) -> [String] {
    var problems: [String] = []
    guard text.hasSuffix("# EOF\n") else { return ["does not end with '# EOF\\n'"] }
    let lines = text.dropLast().split(separator: "\n", omittingEmptySubsequences: false)
    var families: [String: String] = [:]
    var current: (name: String, type: String)?
    var sawSample = Set<String>()
    func validName(_ name: Substring) -> Bool {
        guard let first = name.first, first.isLetter || first == "_" || first == ":" else { return false }
        return name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == ":") }
    }
    for (index, line) in lines.enumerated() {
        let n = index + 1
        if line == "# EOF" {
            if n != lines.count { problems.append("line \(n): # EOF before the end") }
            continue
        }
        if line.hasPrefix("# ") {
            let parts = line.split(separator: " ", maxSplits: 3)
            guard parts.count >= 3 else { problems.append("line \(n): short metadata"); continue }
            let name = String(parts[2])
            if !validName(parts[2]) || !name.hasPrefix("dmabufd_") { problems.append("line \(n): bad family name \(name)") }
            switch parts[1] {
            case "TYPE":
                let type = parts.count > 3 ? String(parts[3]) : ""
                if !["gauge", "counter", "unknown", "info", "stateset", "histogram", "summary", "gaugehistogram"].contains(type) {
                    problems.append("line \(n): bad type \(type)")
                }
                if families[name] != nil { problems.append("line \(n): family \(name) repeated") }
                if type == "counter" && name.hasSuffix("_total") { problems.append("line \(n): counter family ends in _total") }
                families[name] = type
                current = (name, type)
            case "UNIT":
                let unit = parts.count > 3 ? String(parts[3]) : ""
                if current?.name != name { problems.append("line \(n): UNIT for another family") }
                if !name.hasSuffix("_" + unit) { problems.append("line \(n): \(name) does not end with _\(unit)") }
            case "HELP":
                if current?.name != name { problems.append("line \(n): HELP for another family") }
                if sawSample.contains(name) { problems.append("line \(n): metadata after samples") }
            default:
                problems.append("line \(n): unknown metadata \(parts[1])")
            }
            continue
        }
        guard let family = current else { problems.append("line \(n): sample before any TYPE"); continue }
        sawSample.insert(family.name)
        let nameEnd = line.firstIndex(where: { $0 == "{" || $0 == " " }) ?? line.endIndex
        let sampleName = String(line[..<nameEnd])
        let expected = family.type == "counter" ? family.name + "_total" : family.name
        if sampleName != expected { problems.append("line \(n): sample \(sampleName) in family \(family.name)") }
        var rest = line[nameEnd...]
        if rest.first == "{" {
            // label="value" pairs, values with \\, \" and \n escapes only.
            var i = rest.index(after: rest.startIndex)
            var ok = false
            while i < rest.endIndex {
                let keyEnd = rest[i...].firstIndex(of: "=") ?? rest.endIndex
                guard keyEnd < rest.endIndex, validName(rest[i..<keyEnd]), rest.index(after: keyEnd) < rest.endIndex,
                      rest[rest.index(after: keyEnd)] == "\"" else { break }
                var j = rest.index(keyEnd, offsetBy: 2)
                var closed = false
                while j < rest.endIndex {
                    if rest[j] == "\\" {
                        let next = rest.index(after: j)
                        guard next < rest.endIndex, ["\\", "\"", "n"].contains(rest[next]) else { break }
                        j = rest.index(after: next)
                        continue
                    }
                    if rest[j] == "\"" { closed = true; break }
                    if rest[j] == "\n" { break }
                    j = rest.index(after: j)
                }
                guard closed else { break }
                i = rest.index(after: j)
                if i < rest.endIndex && rest[i] == "," { i = rest.index(after: i); continue }
                if i < rest.endIndex && rest[i] == "}" { ok = true; rest = rest[rest.index(after: i)...] }
                break
            }
            if !ok { problems.append("line \(n): bad labels"); continue }
        }
        guard rest.first == " ", Double(rest.dropFirst()) != nil else { problems.append("line \(n): bad value '\(rest)'"); continue }
    }
    return problems
}

@Suite("OpenMetrics output")
struct OpenMetricsTests {
    @Test func validExposition() {
        let text = openMetrics(stats: Fixtures.stats)
        #expect(openMetricsProblems(text) == [])
        #expect(text.hasSuffix("\n# EOF\n"))
        #expect(text.contains("# TYPE dmabufd_buffers gauge\n# HELP dmabufd_buffers "))
    }

    @Test func samples() {
        let text = openMetrics(stats: Fixtures.stats)
        for line in [
            "dmabufd_buffers 3", "dmabufd_allocated_bytes 8392704", "dmabufd_leases 1", "dmabufd_connected_clients 2",
            "dmabufd_pending_fences 2", "dmabufd_oldest_pending_fence_seconds 1.5",
            #"dmabufd_heap_allocated_bytes{heap="system"} 8388608"#, #"dmabufd_heap_buffers{heap="udmabuf"} 1"#,
            #"dmabufd_heap_allocation_failures_total{heap="system"} 1"#, #"dmabufd_client_allocated_bytes{uid="1000"} 8388608"#,
            #"dmabufd_client_quota_bytes{uid="1000"} 1073741824"#, #"dmabufd_client_quota_buffers{uid="1000"} 1024"#,
            #"dmabufd_client_refusals_total{uid="1000"} 3"#, #"dmabufd_failures_total{errno="EDQUOT"} 3"#,
            "# UNIT dmabufd_oldest_pending_fence_seconds seconds", "# TYPE dmabufd_failures counter",
        ] {
            #expect(text.split(separator: "\n").contains(Substring(line)), "missing: \(line)")
        }
        // uid 1001 has no quota (0): no quota samples for it.
        #expect(!text.contains(#"dmabufd_client_quota_bytes{uid="1001"}"#))
        // every sample line names a dmabufd_ metric
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            #expect(line.hasPrefix("dmabufd_"), "\(line)")
        }
    }

    @Test func emptyStatsStillValid() {
        let idle = Stats(heaps: [], clients: [], failures: [], connectedClients: 0, buffers: 0, bytes: 0, leases: 0, pendingFences: 0,
                         oldestPendingFenceMilliseconds: 0)
        let text = openMetrics(stats: idle)
        #expect(openMetricsProblems(text) == [])
        #expect(text.contains("dmabufd_oldest_pending_fence_seconds 0\n"))
    }

    @Test func labelValuesAreEscaped() {
        var stats = Fixtures.stats
        stats.heaps = [HeapStats(heap: "we\"ird\\heap\nname", bytes: 1, buffers: 1, failures: 0)]
        let text = openMetrics(stats: stats)
        #expect(text.contains(#"dmabufd_heap_buffers{heap="we\"ird\\heap\nname"} 1"#))
        #expect(openMetricsProblems(text) == [])
    }

    @Test func validatorCatchesMistakes() {
        #expect(!openMetricsProblems("dmabufd_x 1\n").isEmpty)
        #expect(!openMetricsProblems("# TYPE dmabufd_x counter\ndmabufd_x 1\n# EOF\n").isEmpty)
        #expect(!openMetricsProblems("# TYPE dmabufd_x gauge\ndmabufd_x{a=\"b} 1\n# EOF\n").isEmpty)
        #expect(!openMetricsProblems("# TYPE dmabufd_x gauge\n# UNIT dmabufd_x bytes\ndmabufd_x 1\n# EOF\n").isEmpty)
        #expect(openMetricsProblems("# TYPE dmabufd_x_bytes gauge\n# UNIT dmabufd_x_bytes bytes\ndmabufd_x_bytes{a=\"b\",c=\"d\"} 1\n# EOF\n") == [])
    }

    @Test(arguments: [(0, "0"), (1, "0.001"), (10, "0.01"), (1500, "1.5"), (61_234, "61.234"), (2000, "2")])
    func secondsAreExactDecimals(milliseconds: UInt64, text: String) {
        var stats = Fixtures.stats
        stats.oldestPendingFenceMilliseconds = milliseconds
        #expect(openMetrics(stats: stats).contains("dmabufd_oldest_pending_fence_seconds \(text)\n"))
    }
}
