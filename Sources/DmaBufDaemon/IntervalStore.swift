import DmaBufTypes
/// Page-range bookkeeping for fences: which entries overlap `[a, b)`, and which of
/// those an access must wait for.
///
/// An AVL tree keyed by `(range.lowerBound, id)`, with nodes held in one array and
/// linked by `Int` slots, so a node costs no allocation or reference counting of its own.
/// Each node also carries the largest `upperBound` in its subtree, once over all entries
/// and once over writes only: a query skips any subtree whose entries all end at or
/// before the query's start, and a read query skips subtrees that hold no write that far.
///
/// Complexity, for `n` entries:
/// - `insert`, `remove`: O(log n) worst case (AVL height ≤ 1.44 log₂ n), plus an expected
///   O(1) dictionary operation. `remove` finds its node through an `id → slot`
///   dictionary and keeps the array dense by moving the last node into the freed slot.
/// - `overlapping`, `conflicts`: every subtree the search enters holds at least one
///   result, so the cost is the union of the root-to-result paths. That is O(log n + k)
///   for the entries that start inside the query range (they are contiguous in key
///   order), and O(log n + k·log(n/k)) in the worst case, when results that start
///   before the query are scattered among many entries that end before it. A strict
///   O(log n + k) bound for those would need a priority search tree, whose rebalancing
///   is not worth its complexity for per-buffer fence sets.
/// - `removeAll(where:)`: O(n) to evaluate the predicate, then either m·O(log n) for
///   `m` removals, or an O(n) rebuild when that is cheaper.
/// - `entries`: O(n).
///
/// A value type: copies share storage until one is mutated (copy-on-write), so keep the
/// store uniquely referenced, or the first mutation after a copy costs O(n).
public struct IntervalStore<Value> {
    public typealias ID = UInt64

    public struct Entry {
        public let id: ID
        public let range: Range<UInt64>
        public let access: AccessMode
        public let value: Value
    }

    struct Node {
        var lower: UInt64
        var upper: UInt64
        var id: ID
        /// Largest `upper` in this subtree: lets a query for `[a, b)` prune a subtree once
        /// this is `<= a`.
        var maxUpper: UInt64
        /// As `maxUpper`, over writes only; 0 when the subtree holds no write. 0 is safe
        /// as "none" because every stored range is non-empty, so every `upper` is ≥ 1.
        var maxWriteUpper: UInt64
        var left: Int
        var right: Int
        var height: Int
        var access: AccessMode
        var value: Value
    }

    /// Dense: slots `0..<count` are exactly the live entries.
    var nodes: [Node] = []
    var slotByID: [ID: Int] = [:]
    var root: Int = IntervalStore.noSlot
    /// Starts at 1 so that 0 is never a valid id and can mean "none" to callers.
    var nextID: ID = 1

    static var noSlot: Int { -1 }

    public init() {}

    public var count: Int { nodes.count }
    public var isEmpty: Bool { nodes.isEmpty }

    /// Inserts an entry. Returns its id, which is larger than every id issued before by
    /// this store and is never reused; returns nil, consuming no id, when `range` is
    /// empty, because an empty range covers no pages and could never conflict.
    /// O(log n).
    public mutating func insert(_ range: Range<UInt64>, access: AccessMode, value: Value) -> ID? {
        guard !range.isEmpty else { return nil }
        let id = nextID
        nextID += 1
        let slot = nodes.count
        nodes.append(Node(lower: range.lowerBound, upper: range.upperBound, id: id,
                          maxUpper: range.upperBound,
                          maxWriteUpper: access.writes ? range.upperBound : 0,
                          left: Self.noSlot, right: Self.noSlot, height: 1,
                          access: access, value: value))
        slotByID[id] = slot
        root = insert(slot, into: root)
        return id
    }

    /// Removes the entry with `id`, returning it, or nil if there is none (already
    /// removed, or never issued). O(log n).
    @discardableResult
    public mutating func remove(_ id: ID) -> Entry? {
        guard let slot = slotByID.removeValue(forKey: id) else { return nil }
        let removed = entry(at: slot)
        unlink(slot: slot)
        return removed
    }

    /// The entry with `id`, if it is stored. Expected O(1).
    public func entry(_ id: ID) -> Entry? {
        slotByID[id].map(entry(at:))
    }

    /// Entries overlapping `range`, in `(range.lowerBound, id)` order: `[a, b)` and
    /// `[c, d)` overlap iff `a < d && c < b`. An empty `range` covers no pages and
    /// overlaps nothing, even inside an entry. See the type's notes for the cost.
    public func overlapping(_ range: Range<UInt64>) -> [Entry] {
        collect(range, writesOnly: false)
    }

    /// Entries an access of `access` to `range` must wait for, in
    /// `(range.lowerBound, id)` order: a write waits for every overlapping entry, a read
    /// only for overlapping writes. A read query prunes by the writes-only bound, so its
    /// cost follows the number of writes it returns, not of the reads it passes over.
    public func conflicts(with range: Range<UInt64>, access: AccessMode) -> [Entry] {
        collect(range, writesOnly: !access.writes)
    }

    /// Removes every entry for which `predicate` is true and returns them in
    /// `(range.lowerBound, id)` order. The predicate runs exactly once per entry, and every
    /// call happens before anything is removed, so a throwing predicate leaves the store
    /// untouched.
    ///
    /// O(n) predicate calls, then min(m·log n, n) work for `m` removals: a sweep that
    /// drops most entries (a batch of signalled fences) rebuilds the tree in O(n) rather
    /// than rebalancing it m times.
    @discardableResult
    public mutating func removeAll(where predicate: (Entry) throws -> Bool) rethrows -> [Entry] {
        var kept: [Int] = []
        kept.reserveCapacity(nodes.count)
        var removed: [Entry] = []
        for slot in inorderSlots() {
            let e = entry(at: slot)
            if try predicate(e) {
                removed.append(e)
            } else {
                kept.append(slot)
            }
        }
        guard !removed.isEmpty else { return [] }
        if removed.count * height(root) < nodes.count {
            for e in removed {
                // By id, not by the slots seen above: each removal moves a node to another slot.
                unlink(slot: slotByID.removeValue(forKey: e.id)!)
            }
        } else {
            rebuild(keeping: kept)
        }
        return removed
    }

    /// Every entry, in `(range.lowerBound, id)` order. O(n).
    public var entries: [Entry] {
        inorderSlots().map(entry(at:))
    }
}

extension IntervalStore: Sendable where Value: Sendable {}
extension IntervalStore.Entry: Sendable where Value: Sendable {}
extension IntervalStore.Node: Sendable where Value: Sendable {}
extension IntervalStore.Entry: Equatable where Value: Equatable {}
extension IntervalStore.Entry: Hashable where Value: Hashable {}

// MARK: - Tree maintenance

extension IntervalStore {
    @inline(__always)
    func entry(at slot: Int) -> Entry {
        Entry(id: nodes[slot].id, range: nodes[slot].lower..<nodes[slot].upper,
              access: nodes[slot].access, value: nodes[slot].value)
    }

    @inline(__always)
    func height(_ slot: Int) -> Int {
        slot == Self.noSlot ? 0 : nodes[slot].height
    }

    /// Recomputes the node's derived fields from its children, which must be current.
    @inline(__always)
    mutating func refresh(_ slot: Int) {
        let l = nodes[slot].left, r = nodes[slot].right
        var h = 0
        var m = nodes[slot].upper
        var w = nodes[slot].access.writes ? nodes[slot].upper : 0
        if l != Self.noSlot {
            h = nodes[l].height
            m = Swift.max(m, nodes[l].maxUpper)
            w = Swift.max(w, nodes[l].maxWriteUpper)
        }
        if r != Self.noSlot {
            h = Swift.max(h, nodes[r].height)
            m = Swift.max(m, nodes[r].maxUpper)
            w = Swift.max(w, nodes[r].maxWriteUpper)
        }
        nodes[slot].height = h + 1
        nodes[slot].maxUpper = m
        nodes[slot].maxWriteUpper = w
    }

    /// Which child of a node; AVL rotations and rebalancing are written once, for either side.
    enum Side {
        case left, right
        var opposite: Side { self == .left ? .right : .left }
    }

    @inline(__always)
    func child(_ slot: Int, _ side: Side) -> Int {
        side == .left ? nodes[slot].left : nodes[slot].right
    }

    @inline(__always)
    mutating func setChild(_ slot: Int, _ side: Side, _ child: Int) {
        if side == .left { nodes[slot].left = child } else { nodes[slot].right = child }
    }

    /// Rotates the subtree at `slot` toward `side`: its child on the other side becomes the root.
    /// Returns the new root.
    mutating func rotate(_ slot: Int, toward side: Side) -> Int {
        let pivot = child(slot, side.opposite)
        setChild(slot, side.opposite, child(pivot, side))
        setChild(pivot, side, slot)
        refresh(slot)
        refresh(pivot)
        return pivot
    }

    /// Refreshes `slot` and restores the AVL condition there; returns the subtree's new root.
    mutating func rebalance(_ slot: Int) -> Int {
        refresh(slot)
        let balance = height(nodes[slot].left) - height(nodes[slot].right)
        guard balance > 1 || balance < -1 else { return slot }
        let heavy: Side = balance > 1 ? .left : .right
        let inner = child(slot, heavy)
        // A heavy child leaning inward is first turned outward (the double rotation).
        if height(child(inner, heavy)) < height(child(inner, heavy.opposite)) {
            setChild(slot, heavy, rotate(inner, toward: heavy))
        }
        return rotate(slot, toward: heavy.opposite)
    }

    mutating func insert(_ new: Int, into slot: Int) -> Int {
        if slot == Self.noSlot { return new }
        // The new id is the largest issued, so on equal lower bounds it goes right.
        if nodes[new].lower < nodes[slot].lower {
            let child = insert(new, into: nodes[slot].left)
            nodes[slot].left = child
        } else {
            let child = insert(new, into: nodes[slot].right)
            nodes[slot].right = child
        }
        return rebalance(slot)
    }

    /// Unlinks the node with key `(lower, id)`, which must be in the subtree; its slot
    /// still holds the node afterwards. Returns the subtree's new root.
    mutating func delete(lower: UInt64, id: ID, from slot: Int) -> Int {
        precondition(slot != Self.noSlot, "IntervalStore: id \(id) indexed but not in tree")
        if id == nodes[slot].id {
            let l = nodes[slot].left, r = nodes[slot].right
            if l == Self.noSlot { return r }
            if r == Self.noSlot { return l }
            // Relink the successor into this position instead of copying its payload,
            // so slots keep meaning the same entry and the id index stays valid.
            var successor = Self.noSlot
            let newRight = detachMin(from: r, into: &successor)
            nodes[successor].left = l
            nodes[successor].right = newRight
            return rebalance(successor)
        }
        if (lower, id) < (nodes[slot].lower, nodes[slot].id) {
            let child = delete(lower: lower, id: id, from: nodes[slot].left)
            nodes[slot].left = child
        } else {
            let child = delete(lower: lower, id: id, from: nodes[slot].right)
            nodes[slot].right = child
        }
        return rebalance(slot)
    }

    mutating func detachMin(from slot: Int, into minimum: inout Int) -> Int {
        let l = nodes[slot].left
        if l == Self.noSlot {
            minimum = slot
            return nodes[slot].right
        }
        let child = detachMin(from: l, into: &minimum)
        nodes[slot].left = child
        return rebalance(slot)
    }

    /// Takes the node at `slot` out of the tree and the array; the caller has already
    /// dropped its id from `slotByID`.
    mutating func unlink(slot: Int) {
        root = delete(lower: nodes[slot].lower, id: nodes[slot].id, from: root)
        releaseSlot(slot)
    }

    /// Replaces the tree with a perfectly balanced one over the nodes in `sorted` (slots
    /// in key order), in O(n). Splitting at the midpoint gives sibling subtrees whose
    /// sizes, and so heights, differ by at most one: a valid AVL tree.
    mutating func rebuild(keeping sorted: [Int]) {
        var fresh: [Node] = []
        fresh.reserveCapacity(sorted.count)
        for slot in sorted { fresh.append(nodes[slot]) }
        nodes = fresh
        slotByID.removeAll(keepingCapacity: true)
        for slot in nodes.indices { slotByID[nodes[slot].id] = slot }
        root = build(nodes.startIndex, nodes.endIndex)
    }

    mutating func build(_ lo: Int, _ hi: Int) -> Int {
        guard lo < hi else { return Self.noSlot }
        let mid = lo + (hi - lo) / 2
        let l = build(lo, mid)
        let r = build(mid + 1, hi)
        nodes[mid].left = l
        nodes[mid].right = r
        refresh(mid)
        return mid
    }

    /// Frees the slot of an unlinked node by moving the last node into it, so `nodes`
    /// stays dense and the removed value is released now rather than when the slot is
    /// reused. The moved node's parent is found by descending with its key: O(log n).
    mutating func releaseSlot(_ slot: Int) {
        let last = nodes.count - 1
        if slot != last {
            let key = (nodes[last].lower, nodes[last].id)
            if root == last {
                root = slot
            } else {
                var parent = root
                while true {
                    if key < (nodes[parent].lower, nodes[parent].id) {
                        if nodes[parent].left == last { nodes[parent].left = slot; break }
                        parent = nodes[parent].left
                    } else {
                        if nodes[parent].right == last { nodes[parent].right = slot; break }
                        parent = nodes[parent].right
                    }
                }
            }
            nodes.swapAt(slot, last)
            slotByID[nodes[slot].id] = slot
        }
        nodes.removeLast()
    }

    func inorderSlots() -> [Int] {
        var out: [Int] = []
        out.reserveCapacity(nodes.count)
        var stack: [Int] = []
        stack.reserveCapacity(height(root))
        var slot = root
        while slot != Self.noSlot || !stack.isEmpty {
            while slot != Self.noSlot {
                stack.append(slot)
                slot = nodes[slot].left
            }
            slot = stack.removeLast()
            out.append(slot)
            slot = nodes[slot].right
        }
        return out
    }

    func collect(_ range: Range<UInt64>, writesOnly: Bool) -> [Entry] {
        var out: [Entry] = []
        guard !range.isEmpty else { return out }
        collect(root, range.lowerBound, range.upperBound, writesOnly, into: &out)
        return out
    }

    func collect(_ slot: Int, _ a: UInt64, _ b: UInt64, _ writesOnly: Bool, into out: inout [Entry]) {
        guard slot != Self.noSlot else { return }
        let reach = writesOnly ? nodes[slot].maxWriteUpper : nodes[slot].maxUpper
        // Nothing below ends after `a`: nothing below can overlap.
        guard reach > a else { return }
        collect(nodes[slot].left, a, b, writesOnly, into: &out)
        // This node and everything to its right start at or after `b`.
        guard nodes[slot].lower < b else { return }
        if nodes[slot].upper > a && (!writesOnly || nodes[slot].access.writes) {
            out.append(entry(at: slot))
        }
        collect(nodes[slot].right, a, b, writesOnly, into: &out)
    }
}

// MARK: - Self-check

extension IntervalStore {
    /// Describes the first broken structural invariant, or nil when the tree is sound.
    /// O(n); for tests, which otherwise could only see wrong answers, not their cause.
    func invariantViolation() -> String? {
        var seen = [Bool](repeating: false, count: nodes.count)
        var reached = 0
        // Returns (height, maxUpper, maxWriteUpper) of the subtree, or a description.
        func check(_ slot: Int, above: (UInt64, ID)?, below: (UInt64, ID)?) -> Result<(Int, UInt64, UInt64), Failure> {
            if slot == Self.noSlot { return .success((0, 0, 0)) }
            guard nodes.indices.contains(slot) else { return .failure(Failure("slot \(slot) out of bounds")) }
            guard !seen[slot] else { return .failure(Failure("slot \(slot) reached twice")) }
            seen[slot] = true
            reached += 1
            let n = nodes[slot]
            let key = (n.lower, n.id)
            if let above, !(above < key) { return .failure(Failure("id \(n.id) out of key order (left bound)")) }
            if let below, !(key < below) { return .failure(Failure("id \(n.id) out of key order (right bound)")) }
            guard n.lower < n.upper else { return .failure(Failure("id \(n.id) has an empty range")) }
            guard n.id < nextID else { return .failure(Failure("id \(n.id) not below nextID \(nextID)")) }
            guard slotByID[n.id] == slot else { return .failure(Failure("id \(n.id) indexed at \(String(describing: slotByID[n.id])), lives at \(slot)")) }
            let l: (Int, UInt64, UInt64), r: (Int, UInt64, UInt64)
            switch check(n.left, above: above, below: key) {
            case .success(let v): l = v
            case .failure(let f): return .failure(f)
            }
            switch check(n.right, above: key, below: below) {
            case .success(let v): r = v
            case .failure(let f): return .failure(f)
            }
            guard abs(l.0 - r.0) <= 1 else { return .failure(Failure("id \(n.id) unbalanced: \(l.0) vs \(r.0)")) }
            let h = Swift.max(l.0, r.0) + 1
            let m = Swift.max(n.upper, l.1, r.1)
            let w = Swift.max(n.access.writes ? n.upper : 0, l.2, r.2)
            guard n.height == h else { return .failure(Failure("id \(n.id) height \(n.height), expected \(h)")) }
            guard n.maxUpper == m else { return .failure(Failure("id \(n.id) maxUpper \(n.maxUpper), expected \(m)")) }
            guard n.maxWriteUpper == w else { return .failure(Failure("id \(n.id) maxWriteUpper \(n.maxWriteUpper), expected \(w)")) }
            return .success((h, m, w))
        }
        if case .failure(let f) = check(root, above: nil, below: nil) { return f.description }
        guard reached == nodes.count else { return "\(nodes.count - reached) slots unreachable from the root" }
        guard slotByID.count == nodes.count else { return "index holds \(slotByID.count) ids for \(nodes.count) nodes" }
        return nil
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }
}
