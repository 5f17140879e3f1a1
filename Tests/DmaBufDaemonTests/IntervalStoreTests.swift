import DmaBufTypes
import DmaBufTestSupport
import Testing
@testable import DmaBufDaemon

private func ids<V>(_ entries: [IntervalStore<V>.Entry]) -> [UInt64] { entries.map(\.id) }

@Suite("IntervalStore")
struct IntervalStoreTests {
    // MARK: Unit cases

    @Test func adjacentRangesDoNotOverlap() throws {
        var store = IntervalStore<String>()
        let a = try store.added(0..<4, access: .write, value: "a")
        let b = try store.added(4..<8, access: .write, value: "b")
        #expect(ids(store.overlapping(0..<4)) == [a])
        #expect(ids(store.overlapping(4..<8)) == [b])
        #expect(ids(store.conflicts(with: 4..<8, access: .write)) == [b])
        #expect(ids(store.conflicts(with: 0..<4, access: .read)) == [a])
        #expect(ids(store.overlapping(3..<5)) == [a, b])
        #expect(store.overlapping(8..<100).isEmpty)
        #expect(store.invariantViolation() == nil)
    }

    @Test func readReadNeverConflicts() throws {
        var store = IntervalStore<Int>()
        let r = try store.added(0..<10, access: .read, value: 1)
        #expect(store.conflicts(with: 5..<6, access: .read).isEmpty)
        #expect(store.conflicts(with: 0..<10, access: .read).isEmpty)
        // The read is still there: it overlaps, it just doesn't block another read.
        #expect(ids(store.overlapping(5..<6)) == [r])
    }

    @Test func readAndWriteConflictBothWays() throws {
        var writeFirst = IntervalStore<Int>()
        let w = try writeFirst.added(10..<20, access: .write, value: 0)
        #expect(ids(writeFirst.conflicts(with: 15..<25, access: .read)) == [w])

        var readFirst = IntervalStore<Int>()
        let r = try readFirst.added(10..<20, access: .read, value: 0)
        #expect(ids(readFirst.conflicts(with: 5..<11, access: .write)) == [r])
    }

    @Test func writeWriteConflicts() throws {
        var store = IntervalStore<Int>()
        let w1 = try store.added(0..<100, access: .write, value: 1)
        let w2 = try store.added(50..<60, access: .write, value: 2)
        let r = try store.added(55..<56, access: .read, value: 3)
        #expect(ids(store.conflicts(with: 59..<61, access: .write)) == [w1, w2])
        // A write waits for everything overlapping, reads included; a read only for writes.
        #expect(ids(store.conflicts(with: 55..<56, access: .write)) == [w1, w2, r])
        #expect(ids(store.conflicts(with: 55..<56, access: .read)) == [w1, w2])
    }

    @Test func removal() throws {
        var store = IntervalStore<String>()
        let a = try store.added(0..<10, access: .write, value: "a")
        let b = try store.added(5..<15, access: .read, value: "b")
        let removedA = store.remove(a)
        let removed = try #require(removedA)
        #expect(removed.id == a && removed.range == 0..<10 && removed.access == .write && removed.value == "a")
        #expect(store.count == 1)
        #expect(store.remove(a) == nil)
        #expect(store.remove(9_999) == nil)
        #expect(store.entry(a) == nil)
        #expect(store.entry(b)?.value == "b")
        #expect(ids(store.overlapping(0..<100)) == [b])
        #expect(store.conflicts(with: 0..<100, access: .read).isEmpty)
        #expect(store.invariantViolation() == nil)
    }

    @Test func idsAreMonotonicAndNeverReused() throws {
        var store = IntervalStore<Int>()
        var last: UInt64 = 0
        for i in 0..<50 {
            let id = try store.added(UInt64(i)..<UInt64(i + 1), access: .read, value: i)
            #expect(id > last)
            last = id
            if i.isMultiple(of: 2) { store.remove(id) }
        }
        store.removeAll { _ in true }
        let next = try store.added(0..<1, access: .write, value: 0)
        #expect(next > last)
    }

    @Test func removeAllWhere() throws {
        var store = IntervalStore<Int>()
        var inserted: [UInt64] = []
        for i in 0..<10 {
            inserted.append(try store.added(UInt64(i * 10)..<UInt64(i * 10 + 15),
                                                      access: i.isMultiple(of: 3) ? .write : .read, value: i))
        }
        var calls = 0
        let removed = store.removeAll { calls += 1; return $0.value.isMultiple(of: 2) }
        #expect(calls == 10)
        #expect(removed.map(\.value) == [0, 2, 4, 6, 8])
        #expect(store.entries.map(\.value) == [1, 3, 5, 7, 9])
        #expect(store.removeAll { _ in false }.isEmpty)
        #expect(store.count == 5)
        #expect(ids(store.overlapping(0..<200)) == [inserted[1], inserted[3], inserted[5], inserted[7], inserted[9]])
        #expect(store.invariantViolation() == nil)
    }

    @Test func throwingPredicateLeavesStoreUntouched() throws {
        struct Stop: Error {}
        var store = IntervalStore<Int>()
        for i in 0..<20 { _ = store.insert(UInt64(i)..<UInt64(i + 2), access: .write, value: i) }
        #expect(throws: Stop.self) {
            try store.removeAll { entry in
                if entry.value == 15 { throw Stop() }
                return true
            }
        }
        #expect(store.count == 20)
        #expect(store.invariantViolation() == nil)
    }

    @Test func emptyRangesAreRejectedAndOverlapNothing() throws {
        var store = IntervalStore<Int>()
        #expect(store.insert(5..<5, access: .write, value: 0) == nil)
        #expect(store.isEmpty)
        let first = try store.added(0..<10, access: .write, value: 1)
        #expect(first == 1, "a rejected insert consumes no id")
        // An empty query covers no pages, even when it sits inside an entry.
        #expect(store.overlapping(5..<5).isEmpty)
        #expect(store.conflicts(with: 5..<5, access: .write).isEmpty)
    }

    @Test func entriesAreSortedByLowerBoundThenID() throws {
        var store = IntervalStore<Int>()
        let c = try store.added(7..<8, access: .read, value: 0)
        let a1 = try store.added(1..<9, access: .write, value: 0)
        let a2 = try store.added(1..<2, access: .read, value: 0)
        let b = try store.added(3..<4, access: .read, value: 0)
        #expect(ids(store.entries) == [a1, a2, b, c])
    }

    @Test func removalReleasesTheValue() throws {
        final class Token {}
        var store = IntervalStore<Token>()
        weak var weakToken: Token?
        var keep: [UInt64] = []
        do {
            let token = Token()
            weakToken = token
            let id = try store.added(0..<1, access: .write, value: token)
            // Later inserts so the removed node's slot is not the last one.
            for i in 1..<8 { keep.append(try store.added(UInt64(i)..<UInt64(i + 1), access: .read, value: Token())) }
            store.remove(id)
        }
        #expect(weakToken == nil)
        #expect(store.count == keep.count)
        #expect(store.invariantViolation() == nil)
    }

    @Test func copiesAreIndependent() throws {
        var original = IntervalStore<Int>()
        let id = try original.added(0..<10, access: .write, value: 1)
        var copy = original
        copy.remove(id)
        _ = copy.insert(20..<30, access: .read, value: 2)
        #expect(ids(original.entries) == [id])
        #expect(copy.entries.map(\.value) == [2])
    }

    // MARK: Randomized model test

    private struct ModelEntry {
        let id: UInt64
        let range: Range<UInt64>
        let access: AccessMode
        let value: UInt64
    }

    private static func overlaps(_ x: Range<UInt64>, _ y: Range<UInt64>) -> Bool {
        !x.isEmpty && !y.isEmpty && x.lowerBound < y.upperBound && y.lowerBound < x.upperBound
    }

    /// Mostly short ranges with some long ones, so queries see both scattered and
    /// nested overlaps; `allowEmpty` also yields empty ranges now and then.
    private static func randomRange(_ rng: inout SplitMix64, allowEmpty: Bool) -> Range<UInt64> {
        let lower = UInt64.random(in: 0..<1000, using: &rng)
        if allowEmpty && UInt64.random(in: 0..<40, using: &rng) == 0 { return lower..<lower }
        let maxLength: UInt64
        switch UInt64.random(in: 0..<100, using: &rng) {
        case 0..<70: maxLength = 16
        case 70..<95: maxLength = 200
        default: maxLength = 1000
        }
        let upper = Swift.min(1000, lower + UInt64.random(in: 1...maxLength, using: &rng))
        return lower..<upper
    }

    /// A predicate must give the same answer however often it is asked, so it hashes the
    /// id with a salt instead of drawing from the generator.
    private static func mix(_ x: UInt64) -> UInt64 {
        var g = SplitMix64(seed: x)
        return g.next()
    }

    @Test(arguments: [1, 2, 0xDEAD_BEEF, 0x0123_4567_89AB_CDEF, 42] as [UInt64])
    func matchesNaiveModel(seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        var store = IntervalStore<UInt64>()
        var model: [ModelEntry] = []
        var lastID: UInt64 = 0
        let operations = 20_000

        for step in 0..<operations {
            // Drift the mix so the store grows to about a thousand entries, shrinks, and
            // regrows: both small trees and deep ones get exercised.
            let phase = (step / 2_500) % 3
            let insertWeight: UInt64 = [600, 150, 450][phase]
            let removeWeight: UInt64 = phase == 1 ? 350 : 250
            let roll = UInt64.random(in: 0..<1000, using: &rng)  // per mille

            if roll < insertWeight {
                let range = Self.randomRange(&rng, allowEmpty: true)
                let access: AccessMode = Bool.random(using: &rng) ? .read : .write
                let value = rng.next()
                let id = store.insert(range, access: access, value: value)
                if range.isEmpty {
                    #expect(id == nil)
                } else {
                    let id = try #require(id)
                    #expect(id > lastID)
                    lastID = id
                    model.append(ModelEntry(id: id, range: range, access: access, value: value))
                }
            } else if roll < insertWeight + removeWeight {
                // Remove an existing id, or now and then one that is gone or never was.
                if !model.isEmpty && UInt64.random(in: 0..<10, using: &rng) != 0 {
                    let index = Int.random(in: model.indices, using: &rng)
                    let expected = model.remove(at: index)
                    let removedEntry = store.remove(expected.id)
                    let removed = try #require(removedEntry)
                    #expect(removed.id == expected.id && removed.range == expected.range
                            && removed.access == expected.access && removed.value == expected.value)
                } else {
                    let bogus = UInt64.random(in: 0...(lastID + 5), using: &rng)
                    let present = model.contains { $0.id == bogus }
                    #expect((store.remove(bogus) != nil) == present)
                    model.removeAll { $0.id == bogus }
                }
            } else if roll < 997 {
                let range = Self.randomRange(&rng, allowEmpty: true)
                let access: AccessMode = Bool.random(using: &rng) ? .read : .write
                let hits = model.filter { Self.overlaps($0.range, range) }
                let blocking = hits.filter { access == .write || $0.access == .write }
                let overlapping = store.overlapping(range)
                let conflicts = store.conflicts(with: range, access: access)
                #expect(Set(overlapping.map(\.id)) == Set(hits.map(\.id)), "seed \(seed) step \(step) overlapping \(range)")
                #expect(overlapping.count == hits.count)
                #expect(Set(conflicts.map(\.id)) == Set(blocking.map(\.id)), "seed \(seed) step \(step) \(access) \(range)")
                #expect(conflicts.count == blocking.count)
                // Results come in (lowerBound, id) order.
                #expect(overlapping.map { [$0.range.lowerBound, $0.id] }.lexicographicallySorted())
            } else {
                // Remove a random share, usually small (the store must keep growing),
                // sometimes most or all of it, so both the one-by-one path and the
                // rebuild path run.
                let salt = rng.next()
                let percent: UInt64 = [1, 1, 2, 3, 10, 50, 100][Int.random(in: 0..<7, using: &rng)]
                let doomed: (UInt64) -> Bool = { Self.mix($0 ^ salt) % 100 < percent }
                var calls = 0
                let removed = store.removeAll { calls += 1; return doomed($0.id) }
                #expect(calls == model.count)
                let expected = model.filter { doomed($0.id) }
                model.removeAll { doomed($0.id) }
                #expect(Set(removed.map(\.id)) == Set(expected.map(\.id)))
                #expect(removed.count == expected.count)
                #expect(store.invariantViolation() == nil, "seed \(seed) step \(step) after removeAll")
            }

            #expect(store.count == model.count)
            if step % 250 == 0 {
                let violation = store.invariantViolation()
                #expect(violation == nil, "seed \(seed) step \(step)")
                if violation != nil { return }
                let sorted = model.sorted { ($0.range.lowerBound, $0.id) < ($1.range.lowerBound, $1.id) }
                #expect(ids(store.entries) == sorted.map(\.id))
            }
        }
        #expect(store.invariantViolation() == nil)
    }

    // MARK: Scale (structure and answers, not timing)

    @Test func hundredThousandEntries() throws {
        var rng = SplitMix64(seed: 0x5CA1E)
        var store = IntervalStore<UInt32>()
        let span: UInt64 = 1 << 24
        for i in 0..<100_000 {
            let lower = UInt64.random(in: 0..<span, using: &rng)
            let length = UInt64.random(in: 0..<100, using: &rng) == 0
                ? UInt64.random(in: 1...(span / 8), using: &rng)
                : UInt64.random(in: 1...64, using: &rng)
            _ = try store.added(lower..<(lower + length),
                                         access: Bool.random(using: &rng) ? .read : .write,
                                         value: UInt32(i))
        }
        #expect(store.count == 100_000)
        #expect(store.invariantViolation() == nil)
        // AVL: height ≤ 1.4405·log₂(n + 2) − 0.3277, i.e. 24 for n = 100,000.
        #expect(store.height(store.root) <= 24)

        let all = store.entries
        var checked = 0
        for q in 0..<1_000 {
            let lower = UInt64.random(in: 0..<span, using: &rng)
            let range = lower..<(lower + UInt64.random(in: 1...4096, using: &rng))
            let access: AccessMode = q.isMultiple(of: 2) ? .read : .write
            let overlapping = store.overlapping(range)
            let conflicts = store.conflicts(with: range, access: access)
            #expect(conflicts.count <= overlapping.count)
            #expect(overlapping.allSatisfy { Self.overlaps($0.range, range) })
            if q.isMultiple(of: 20) {
                let expected = all.filter { Self.overlaps($0.range, range) }
                #expect(ids(overlapping) == ids(expected))
                #expect(ids(conflicts) == ids(expected.filter { access == .write || $0.access == .write }))
                checked += 1
            }
        }
        #expect(checked == 50)

        // Drop about half in one sweep (the rebuild path) and check the structure again.
        let removed = store.removeAll { $0.value.isMultiple(of: 2) }
        #expect(removed.count == 50_000)
        #expect(store.invariantViolation() == nil)
    }
}

private extension IntervalStore {
    /// Inserts a range the test knows is non-empty. (`#require` can't wrap a mutating call
    /// directly: it would decompose it into a call on an immutable copy.)
    mutating func added(_ range: Range<UInt64>, access: AccessMode, value: Value) throws -> ID {
        let id = insert(range, access: access, value: value)
        return try #require(id)
    }
}

private extension Array where Element == [UInt64] {
    func lexicographicallySorted() -> Bool {
        zip(self, dropFirst()).allSatisfy { $0.lexicographicallyPrecedes($1) }
    }
}
