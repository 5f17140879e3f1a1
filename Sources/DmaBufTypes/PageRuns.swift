// Pure value types shared by the kernel layer, the wire protocol and clients. This module imports nothing
// but the standard library, so the protocol (and its fuzzer) can use them without the kernel layer.

/// A run of consecutive pages: `pages` pages starting at page number `start` (a PFN or a file page index).
public struct PageRun: Sendable, Hashable, Codable, CustomStringConvertible {
    public var start: UInt64
    public var pages: UInt64

    public init(start: UInt64, pages: UInt64) {
        self.start = start
        self.pages = pages
    }

    /// One past the last page.
    public var end: UInt64 { start + pages }

    public var description: String { "{\(start), \(pages)}" }
}

/// A buffer's pages as compressed runs: one `{start, pages}` entry per contiguous stretch, in buffer order.
///
/// Built in one pass: ``append(start:pages:)`` extends the last run when the new one continues it, so no
/// second merging pass is ever needed. Buffer page `i` is found by binary search over the runs' offsets, so
/// slicing out pages `[a, b)` costs O(log n + k) for k runs returned.
public struct PageRuns: Sendable, Hashable, Codable, RandomAccessCollection {
    /// The runs, in buffer order.
    public private(set) var runs: [PageRun] = []
    /// `offsets[i]` is the buffer page at which `runs[i]` begins.
    private var offsets: [UInt64] = []
    /// The number of pages in all runs.
    public private(set) var totalPages: UInt64 = 0

    public init() {}

    /// Builds runs from page numbers in buffer order, in one pass.
    public init<S: Sequence>(pages: S) where S.Element == UInt64 {
        for page in pages { append(start: page, pages: 1) }
    }

    /// Builds runs from runs in buffer order; adjacent ones merge.
    public init<S: Sequence>(runs: S) where S.Element == PageRun {
        for run in runs { append(start: run.start, pages: run.pages) }
    }

    public var startIndex: Int { runs.startIndex }
    public var endIndex: Int { runs.endIndex }
    public subscript(position: Int) -> PageRun { runs[position] }

    /// Appends `pages` pages starting at `start`. When they continue the last run (`last.end == start`),
    /// the last run grows instead of a new one being added. Zero pages append nothing.
    public mutating func append(start: UInt64, pages: UInt64) {
        guard pages > 0 else { return }
        if let last = runs.last, last.end == start {
            runs[runs.count - 1].pages += pages
        } else {
            runs.append(PageRun(start: start, pages: pages))
            offsets.append(totalPages)
        }
        totalPages += pages
    }

    /// The page number behind buffer page `index`, or nil past the end.
    public func page(at index: UInt64) -> UInt64? {
        guard index < totalPages else { return nil }
        let i = runIndex(containing: index)
        return runs[i].start + (index - offsets[i])
    }

    /// The runs covering buffer pages `[range.lowerBound, range.upperBound)`, trimmed to the range.
    /// Pages past the end are ignored.
    public func slice(_ range: Range<UInt64>) -> PageRuns {
        let upper = Swift.min(range.upperBound, totalPages)
        guard range.lowerBound < upper else { return PageRuns() }
        var result = PageRuns()
        var i = runIndex(containing: range.lowerBound)
        var position = range.lowerBound
        while position < upper {
            let run = runs[i]
            let skip = position - offsets[i]
            let take = Swift.min(run.pages - skip, upper - position)
            result.append(start: run.start + skip, pages: take)
            position += take
            i += 1
        }
        return result
    }

    /// True when some page number appears in both `self` and `other` (e.g. two buffers sharing PFNs).
    /// Sorts both run lists: O((n + m) log(n + m)).
    public func sharesPages(with other: PageRuns) -> Bool {
        let a = runs.sorted { $0.start < $1.start }
        let b = other.runs.sorted { $0.start < $1.start }
        var i = 0, j = 0
        while i < a.count && j < b.count {
            if a[i].end <= b[j].start { i += 1 } else if b[j].end <= a[i].start { j += 1 } else { return true }
        }
        return false
    }

    /// The runs (trimmed) whose page numbers fall inside `pageNumbers`, in buffer order. Linear.
    public func runs(intersecting pageNumbers: Range<UInt64>) -> [PageRun] {
        runs.compactMap { run in
            let lower = Swift.max(run.start, pageNumbers.lowerBound)
            let upper = Swift.min(run.end, pageNumbers.upperBound)
            return lower < upper ? PageRun(start: lower, pages: upper - lower) : nil
        }
    }

    /// Binary search: the last run whose offset is ≤ `index`.
    private func runIndex(containing index: UInt64) -> Int {
        var low = 0, high = offsets.count
        while high - low > 1 {
            let mid = (low + high) / 2
            if offsets[mid] <= index { low = mid } else { high = mid }
        }
        return low
    }

    private enum CodingKeys: String, CodingKey { case runs }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        self.init(runs: try container.decode([PageRun].self, forKey: .runs))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(runs, forKey: .runs)
    }

    public static func == (lhs: PageRuns, rhs: PageRuns) -> Bool { lhs.runs == rhs.runs }
    public func hash(into hasher: inout Hasher) { hasher.combine(runs) }
}
