import DmaBufTestSupport
import DmaBuf
import Foundation
import Testing

@Suite struct PageRunsTests {
    @Test func appendMergesContinuingRuns() {
        var runs = PageRuns()
        runs.append(start: 10, pages: 2)
        runs.append(start: 12, pages: 3)  // continues {10, 2}
        runs.append(start: 20, pages: 1)
        runs.append(start: 21, pages: 0)  // nothing
        runs.append(start: 21, pages: 1)  // continues {20, 1}
        runs.append(start: 5, pages: 1)   // goes backwards: a new run
        #expect(runs.runs == [PageRun(start: 10, pages: 5), PageRun(start: 20, pages: 2), PageRun(start: 5, pages: 1)])
        #expect(runs.totalPages == 8)
        #expect(runs.count == 3)
        #expect(runs[1] == PageRun(start: 20, pages: 2))
        #expect(runs[1].end == 22)
        #expect(runs.runs.map(\.description) == ["{10, 5}", "{20, 2}", "{5, 1}"])
    }

    @Test func doesNotMergeOverlapOrGap() {
        var runs = PageRuns()
        runs.append(start: 0, pages: 4)
        runs.append(start: 3, pages: 2)  // overlaps the previous run: kept apart, in order
        runs.append(start: 6, pages: 1)  // gap of one page
        #expect(runs.runs.count == 3)
        #expect(runs.totalPages == 7)
    }

    @Test func buildsFromPagesAndRuns() {
        let fromPages = PageRuns(pages: [7, 8, 9, 3, 4, 100] as [UInt64])
        #expect(fromPages.runs == [PageRun(start: 7, pages: 3), PageRun(start: 3, pages: 2), PageRun(start: 100, pages: 1)])
        let fromRuns = PageRuns(runs: [PageRun(start: 1, pages: 1), PageRun(start: 2, pages: 2), PageRun(start: 9, pages: 0)])
        #expect(fromRuns.runs == [PageRun(start: 1, pages: 3)])
        #expect(PageRuns(pages: [] as [UInt64]).isEmpty)
        #expect(PageRuns().totalPages == 0)
    }

    @Test func pageAtIndex() {
        let runs = PageRuns(runs: [PageRun(start: 100, pages: 3), PageRun(start: 50, pages: 1), PageRun(start: 7, pages: 2)])
        let expected: [UInt64] = [100, 101, 102, 50, 7, 8]
        for (i, page) in expected.enumerated() { #expect(runs.page(at: UInt64(i)) == page) }
        #expect(runs.page(at: 6) == nil)
        #expect(runs.page(at: .max) == nil)
        #expect(PageRuns().page(at: 0) == nil)
    }

    @Test func sliceTrimsRuns() {
        let runs = PageRuns(runs: [PageRun(start: 100, pages: 3), PageRun(start: 50, pages: 1), PageRun(start: 7, pages: 2)])
        #expect(runs.slice(0..<6) == runs)
        #expect(runs.slice(1..<5).runs == [PageRun(start: 101, pages: 2), PageRun(start: 50, pages: 1), PageRun(start: 7, pages: 1)])
        #expect(runs.slice(3..<4).runs == [PageRun(start: 50, pages: 1)])
        #expect(runs.slice(5..<100).runs == [PageRun(start: 8, pages: 1)])  // past the end ignored
        #expect(runs.slice(2..<2).isEmpty)
        #expect(runs.slice(6..<9).isEmpty)
        #expect(runs.slice(1..<5).totalPages == 4)
        // A slice's own lookups work.
        #expect(runs.slice(1..<5).page(at: 3) == 7)
    }

    @Test func sliceRejoinsAcrossRunsThatContinue() {
        // Pieces that continue each other across a slice boundary come back as one run.
        let runs = PageRuns(runs: [PageRun(start: 0, pages: 2), PageRun(start: 10, pages: 2)])
        #expect(runs.slice(1..<3).runs == [PageRun(start: 1, pages: 1), PageRun(start: 10, pages: 1)])
    }

    @Test func sharesPages() {
        let a = PageRuns(runs: [PageRun(start: 10, pages: 5), PageRun(start: 100, pages: 1)])
        #expect(a.sharesPages(with: PageRuns(runs: [PageRun(start: 14, pages: 1)])))
        #expect(a.sharesPages(with: PageRuns(runs: [PageRun(start: 0, pages: 200)])))
        #expect(a.sharesPages(with: PageRuns(runs: [PageRun(start: 100, pages: 1)])))
        #expect(!a.sharesPages(with: PageRuns(runs: [PageRun(start: 15, pages: 85)])))  // exactly between
        #expect(!a.sharesPages(with: PageRuns(runs: [PageRun(start: 0, pages: 10), PageRun(start: 101, pages: 3)])))
        #expect(!a.sharesPages(with: PageRuns()))
        #expect(!PageRuns().sharesPages(with: PageRuns()))
        // Order in the buffer does not matter.
        let b = PageRuns(runs: [PageRun(start: 500, pages: 1), PageRun(start: 12, pages: 1)])
        #expect(a.sharesPages(with: b) && b.sharesPages(with: a))
    }

    @Test func runsIntersectingPageNumbers() {
        let runs = PageRuns(runs: [PageRun(start: 10, pages: 10), PageRun(start: 40, pages: 5), PageRun(start: 0, pages: 3)])
        #expect(runs.runs(intersecting: 15..<42) == [PageRun(start: 15, pages: 5), PageRun(start: 40, pages: 2)])
        #expect(runs.runs(intersecting: 0..<1) == [PageRun(start: 0, pages: 1)])
        #expect(runs.runs(intersecting: 20..<40).isEmpty)
    }

    @Test func memfdRangesLayout() {
        let runs = PageRuns(memfdRanges: [(offset: 8192, size: 8192), (offset: 16384, size: 4096), (offset: 0, size: 4096)], pageSize: 4096)
        #expect(runs.runs == [PageRun(start: 2, pages: 3), PageRun(start: 0, pages: 1)])
        #expect(PageRuns(memfdRanges: [], pageSize: 4096).isEmpty)
    }

    @Test func codableRoundTrip() throws {
        let runs = PageRuns(runs: [PageRun(start: 3, pages: 4), PageRun(start: 1, pages: 1)])
        let data = try JSONEncoder().encode(runs)
        let decoded = try JSONDecoder().decode(PageRuns.self, from: data)
        #expect(decoded == runs)
        #expect(decoded.totalPages == 5)
        #expect(decoded.page(at: 4) == 1)
        // Decoding re-merges runs that continue each other.
        let json = Data(#"{"runs":[{"start":1,"pages":2},{"start":3,"pages":1}]}"#.utf8)
        #expect(try JSONDecoder().decode(PageRuns.self, from: json).runs == [PageRun(start: 1, pages: 3)])
    }

    @Test func hashingFollowsEquality() {
        let a = PageRuns(pages: [1, 2, 3] as [UInt64])
        let b = PageRuns(runs: [PageRun(start: 1, pages: 1), PageRun(start: 2, pages: 2)])
        #expect(a == b)
        #expect(Set([a, b]).count == 1)
    }

    /// Random appends checked against a plain array of page numbers after every step; slices, lookups and
    /// overlap queries checked against the same model.
    @Test(arguments: [1 as UInt64, 42, 0xdead_beef])
    func matchesNaiveModel(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        var runs = PageRuns()
        var model: [UInt64] = []
        for step in 0..<3000 {
            // Mostly continue the last run, sometimes jump, sometimes append nothing.
            let start: UInt64
            switch rng.next() % 4 {
            case 0, 1: start = model.last.map { $0 + 1 } ?? 0
            case 2: start = UInt64.random(in: 0..<64, using: &rng)
            default: start = UInt64.random(in: 0..<1_000_000, using: &rng)
            }
            let pages = UInt64.random(in: 0..<6, using: &rng)
            runs.append(start: start, pages: pages)
            model += (0..<pages).map { start + $0 }

            if step % 100 == 99 || step < 20 {
                guard check(runs, against: model, rng: &rng) else {
                    Issue.record("diverged at step \(step) with seed \(seed)")
                    return
                }
            }
        }
        #expect(check(runs, against: model, rng: &rng))
    }

    private func check(_ runs: PageRuns, against model: [UInt64], rng: inout SplitMix64) -> Bool {
        var ok = true
        func require(_ condition: Bool, _ what: @autoclosure () -> String) {
            if !condition { ok = false; Issue.record(Comment(rawValue: what())) }
        }
        require(runs.totalPages == UInt64(model.count), "totalPages \(runs.totalPages) != \(model.count)")
        require(runs.flatMap { run in (0..<run.pages).map { run.start + $0 } } == model, "expansion differs")
        require(runs.allSatisfy { $0.pages > 0 }, "empty run")
        require(zip(runs.runs, runs.runs.dropFirst()).allSatisfy { $0.end != $1.start }, "runs not maximal")
        require(runs == PageRuns(pages: model), "differs from one-pass build")
        for _ in 0..<20 {
            let index = UInt64.random(in: 0...UInt64(model.count) + 2, using: &rng)
            require(runs.page(at: index) == (index < model.count ? model[Int(index)] : nil), "page(at: \(index))")
        }
        for _ in 0..<10 {
            let a = UInt64.random(in: 0...UInt64(model.count) + 3, using: &rng)
            let b = UInt64.random(in: 0...UInt64(model.count) + 3, using: &rng)
            let range = min(a, b)..<max(a, b)
            let lower = min(Int(range.lowerBound), model.count), upper = min(Int(range.upperBound), model.count)
            require(runs.slice(range) == PageRuns(pages: model[lower..<upper]), "slice \(range)")
        }
        // Overlap against a random small set of runs.
        let other = PageRuns(runs: (0..<3).map { _ in
            PageRun(start: UInt64.random(in: 0..<1_000_100, using: &rng), pages: UInt64.random(in: 1..<2000, using: &rng))
        })
        let otherPages = Set(other.flatMap { run in (0..<run.pages).map { run.start + $0 } })
        require(runs.sharesPages(with: other) == model.contains(where: otherPages.contains), "sharesPages")
        return ok
    }
}
