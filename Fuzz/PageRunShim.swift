// Stand-in for DmaBuf.PageRun, the one DmaBuf type DmaBufWire uses, so that the fuzz target can be built
// from the DmaBufWire sources alone (see scripts/fuzz for why). It must stay identical to the declaration
// in Sources/DmaBuf/PageRuns.swift: scripts/fuzz compares the two and refuses to build when they differ.

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
