// PageRun and PageRuns live in the leaf module DmaBufTypes so that DmaBufWire needs nothing kernel-side;
// re-exported here so code that imports DmaBuf keeps seeing them.
@_exported import DmaBufTypes

extension PageRuns {
    /// Runs of memfd page indices for a list of `(offset, size)` byte ranges, as a udmabuf made from them
    /// would lay them out. Offsets and sizes must be page-aligned.
    public init(memfdRanges: [(offset: UInt64, size: UInt64)], pageSize: Int = DmaBuf.pageSize) {
        self.init()
        let page = UInt64(pageSize)
        for range in memfdRanges {
            append(start: range.offset / page, pages: range.size / page)
        }
    }
}
