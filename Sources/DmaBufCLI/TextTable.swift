/// A plain-text table: a header row and aligned columns separated by two spaces, no trailing blanks.
///
/// ```
/// ID  HEAP    SIZE
///  7  system  4 MiB
/// ```
public struct TextTable: Sendable, Equatable {
    public enum Alignment: Sendable, Equatable { case left, right }

    public struct Column: Sendable, Equatable {
        public var title: String
        public var alignment: Alignment
        public init(_ title: String, _ alignment: Alignment = .left) {
            self.title = title
            self.alignment = alignment
        }
    }

    public var columns: [Column]
    public private(set) var rows: [[String]] = []

    public init(_ columns: [Column]) { self.columns = columns }

    /// Adds a row; missing cells are blank, extra cells are dropped. Cells are escaped (``printable(_:)``):
    /// a tag or name cannot break a row, a column or the terminal.
    public mutating func append(_ cells: [String]) {
        rows.append((0..<columns.count).map { $0 < cells.count ? printable(cells[$0]) : "" })
    }

    /// The table, each line ended by a newline, each prefixed by `indent`.
    public func render(indent: String = "") -> String {
        let all = [columns.map(\.title)] + rows
        let widths = columns.indices.map { i in all.map { $0[i].count }.max() ?? 0 }
        var text = ""
        for row in all {
            var line = indent
            for (i, cell) in row.enumerated() {
                let pad = String(repeating: " ", count: widths[i] - cell.count)
                if i > 0 { line += "  " }
                line += columns[i].alignment == .right ? pad + cell : cell + pad
            }
            while line.last == " " { line.removeLast() }
            text += line + "\n"
        }
        return text
    }
}
