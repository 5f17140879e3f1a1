import DmaBuf
import DmaBufWire
import Logging
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

extension Broker {
    /// Serves one decoded request. Throws ``WireError`` for refusals and ``DmaBufError`` for kernel errors;
    /// both become error replies.
    func handle(_ session: ClientSession, _ request: Request, fds: [SharedFD]) throws -> (Response, [SharedFD]) {
        let uid = session.credentials.uid
        switch request {
        case .hello(let hello):
            let version = min(hello.maximumVersion, WireLimits.supportedVersions.upperBound)
            guard version >= max(hello.minimumVersion, WireLimits.supportedVersions.lowerBound) else {
                throw WireError(errno: Errno.protocolNotSupported.rawValue, code: .unsupportedVersion,
                                message: "no common protocol version: client speaks \(hello.minimumVersion)...\(hello.maximumVersion), dmabufd \(WireLimits.supportedVersions) (EPROTONOSUPPORT); update the client or the daemon")
            }
            session.version = version
            session.clientName = hello.client
            return (.hello(HelloReply(version: version, server: "dmabufd", maximumMessageSize: UInt32(WireLimits.maximumMessageSize),
                                      maximumDescriptors: UInt16(WireLimits.maximumDescriptors), pageSize: UInt32(pageSize),
                                      uid: uid, gid: session.credentials.gid, pid: session.credentials.pid)), [])

        case .listHeaps:
            resolver.rescan()
            let heaps = resolver.heaps.map { heap -> HeapInfo in
                var info = heap
                let used = heapUsage[heap.name] ?? (0, 0)
                info.allocatedBytes = used.bytes
                info.buffers = used.buffers
                return info
            } + drmNodes.sorted().map { HeapInfo(name: "drm:" + ($0.split(separator: "/").last.map(String.init) ?? $0), device: $0, kind: "drm") }
            let policies = resolver.policies.keys.sorted().map { PolicyInfo(name: $0, chain: resolver.policies[$0]!) }
            return (.heaps(HeapsReply(heaps: heaps, policies: policies)), [])

        case .allocate(let a):
            try admit(session, size: a.size)
            var chain = resolver.chain(for: a.heap)
            if chain.isEmpty {
                resolver.rescan()
                chain = resolver.chain(for: a.heap)
            }
            guard !chain.isEmpty else {
                throw WireError(errno: Errno.noSuchFileOrDirectory.rawValue, code: .noHeap,
                                message: "no heap or policy named '\(a.heap)' is available (ENOENT); available: \(availableNames())")
            }
            var lastError: DmaBufError?
            for (logical, target) in chain {
                do {
                    let (buffer, memfd, runs) = try allocate(target, size: a.size, hugePages: false)
                    let record = try register(buffer, session: session, heap: logical, tag: a.tag, memfd: memfd, memfdRuns: runs)
                    return (.buffer(info(record)), [buffer.fd])
                } catch let error as DmaBufError {
                    heapFailures[logical, default: 0] += 1
                    logger.notice("allocation failed; trying the next heap", metadata: ["heap": "\(logical)", "error": "\(error)"])
                    lastError = error
                }
            }
            throw lastError!

        case .createUDmabuf(let u):
            try admit(session, size: u.size)
            guard resolver.chain(for: "udmabuf").first != nil else {
                throw WireError(errno: Errno.noSuchFileOrDirectory.rawValue, code: .noHeap,
                                message: "udmabuf is not available (ENOENT); the kernel needs CONFIG_UDMABUF")
            }
            let (buffer, memfd, runs) = try allocate(.udmabuf, size: u.size, hugePages: u.hugePages)
            let record = try register(buffer, session: session, heap: "udmabuf", tag: u.tag, memfd: memfd, memfdRuns: runs)
            return (.buffer(info(record)), [buffer.fd])

        case .createUDmabufFromMemfd(let u):
            let total = u.ranges.reduce(UInt64(0)) { $0 &+ $1.size }
            try admit(session, size: total)
            let memfd = Memfd(shared: fds[0])
            let device = try UDmabuf(devicePath: config.udmabufDevice)
            let buffer = try device.create(list: u.ranges.map { UDmabuf.Range(memfd: memfd.fd.descriptor, offset: $0.offset, size: $0.size) })
            let runs = PageRuns(memfdRanges: u.ranges.map { ($0.offset, $0.size) })
            let record = try register(buffer, session: session, heap: "udmabuf", tag: u.tag, memfd: memfd, memfdRuns: runs)
            return (.buffer(info(record)), [buffer.fd])

        case .importBuffer(let tag):
            let buffer: DmaBuffer
            do {
                buffer = try DmaBuffer(checking: fds[0])
            } catch {
                throw WireError(errno: Errno.badFileDescriptor.rawValue, code: .invalidArgument,
                                message: "import: the fd is not a dma-buf (EBADF); send a descriptor from a heap, udmabuf or PRIME export")
            }
            try admit(session, size: UInt64(try buffer.size()))
            let record = try register(buffer, session: session, heap: "import", tag: tag, memfd: nil, memfdRuns: nil, rename: false)
            // Every buffer reply carries the buffer, so a client can drop its own fd and keep the daemon's.
            return (.buffer(info(record)), [record.buffer.fd])

        case .share(let s):
            let record = try owned(s.buffer, by: session)
            if let target = s.uid { record.sharedWith.insert(target) }
            var token: UInt64?
            if s.oneTimeToken {
                var rng = SystemRandomNumberGenerator()
                var t: UInt64 = 0
                while t == 0 || tokens[t] != nil { t = rng.next() }
                tokens[t] = record.id
                token = t
            }
            return (.share(ShareReply(token: token)), [])

        case .fetch(let f):
            let record = try existing(f.buffer)
            var allowed = record.ownerUID == uid || uid == 0 || record.sharedWith.contains(uid)
            if !allowed, f.token != 0, tokens[f.token] == record.id {
                tokens[f.token] = nil
                allowed = true
            }
            guard allowed else {
                throw WireError(errno: Errno.permissionDenied.rawValue, code: .permissionDenied,
                                message: "buffer \(f.buffer) is not shared with uid \(uid) (EACCES); ask its owner to share it or for a token")
            }
            try notRevoked(record)
            if record.restored && record.ownerUID == uid {
                // The owner is back after a daemon restart: the buffer is its own again.
                record.restored = false
                record.ownerSession = session.id
                session.owned.insert(record.id)
            } else {
                session.fetched.insert(record.id)
            }
            return (.buffer(info(record)), [record.buffer.fd])

        case .release(let id):
            if session.owned.contains(id), let record = buffers[id] {
                session.owned.remove(id)
                record.ownerSession = nil
                maybeFree(record)
            } else if session.fetched.remove(id) == nil {
                throw WireError(errno: Errno.noSuchFileOrDirectory.rawValue, code: .notFound,
                                message: "this connection holds no buffer \(id) (ENOENT); list yours with `dmabufctl ls`")
            }
            return (.ok, [])

        case .list(let all, let after):
            if all && uid != 0 {
                throw WireError(errno: Errno.notPermitted.rawValue, code: .permissionDenied,
                                message: "listing every buffer is for root (EPERM); list your own without --all")
            }
            let records = all ? Array(buffers.values) : buffers.values.filter {
                $0.ownerSession == session.id || session.fetched.contains($0.id) || ($0.ownerUID == uid && $0.ownerSession == nil)
            }
            // As many as fit one message; the client asks again after the last id while `more` is set.
            var budget = WireLimits.maximumMessageSize - WireLimits.headerSize - 4 - 1
            var page: [BufferInfo] = []
            var more = false
            for record in records.filter({ $0.id > after }).sorted(by: { $0.id < $1.id }) {
                let item = info(record)
                let size = WireMessage.encodedSize(of: item, version: session.version ?? WireLimits.baseVersion)
                guard size <= budget, page.count < WireLimits.maximumListEntries else {
                    more = true
                    break
                }
                budget -= size
                page.append(item)
            }
            return (.list(page, more: more), [])

        case .info(let id):
            let record = try visible(id, to: session)
            return (.buffer(info(record)), [record.buffer.fd])

        case .stats:
            return (.stats(stats()), [])

        case .layout(let l):
            return (.layout(try layout(l, session: session)), [])

        case .releaseLease(let id):
            guard let lease = leases[id], lease.session == session.id else {
                throw WireError(errno: Errno.noSuchFileOrDirectory.rawValue, code: .notFound, message: "no lease \(id) held by this connection (ENOENT)")
            }
            if let fd = fds.first {
                let fence = try checkedFence(fd)
                let key = try watch(fence, buffer: lease.buffer, session: session.id, lease: id, interval: nil)
                lease.fences.insert(key)
            }
            lease.released = true
            session.leases.remove(id)
            lease.session = session.id
            maybeEndLease(lease)
            return (.ok, [])

        case .attachFence(let f):
            let record = try visible(f.buffer, to: session)
            try notRevoked(record)
            let range = try pages(f.firstPage, f.pageCount, of: record)
            let fence = try checkedFence(fds[0])
            let access: RangeAccess = f.access == .write ? .write : .read
            if range.lowerBound == 0 && range.upperBound == record.pages {
                // Whole-buffer fences also go into the dma-buf's reservation, so kernel drivers wait too.
                try record.buffer.importSyncFile(fence, access: f.access == .write ? .write : .read)
            }
            let key = nextFenceKey
            guard let interval = record.fences.insert(range, access: access, value: key) else {
                throw WireError(errno: Errno.invalidArgument.rawValue, code: .invalidArgument, message: "empty page range (EINVAL)")
            }
            _ = try watch(fence, buffer: record.id, session: session.id, lease: nil, interval: interval)
            return (.ok, [])

        case .beginAccess(let a):
            let record = try visible(a.buffer, to: session)
            try notRevoked(record)
            let range = try pages(a.firstPage, a.pageCount, of: record)
            let conflicts = record.fences.conflicts(with: range, access: a.access == .write ? .write : .read)
            let files = conflicts.compactMap { fences[$0.value]?.syncFile }
            guard let merged = try SyncFile.merge(files, name: "dmabufd-access") else {
                return (.access(AccessReply(fences: 0)), [])
            }
            return (.access(AccessReply(fences: UInt32(files.count))), [merged.fd])

        case .revoke(let r):
            let record = try existing(r.buffer)
            guard record.ownerUID == uid || uid == 0 else {
                throw WireError(errno: Errno.notPermitted.rawValue, code: .permissionDenied,
                                message: "only the owner or root may revoke buffer \(r.buffer) (EPERM)")
            }
            revoke(record, deadline: r.deadlineMilliseconds > 0 ? .milliseconds(Int64(r.deadlineMilliseconds)) : config.revokeDeadline)
            return (.ok, [])

        case .allocateBatch, .releaseQuiet:
            // Stub until the broker serves protocol v2's batch requests.
            throw WireError(errno: Errno.notSupported.rawValue, code: .invalidArgument,
                            message: "\(request.type) is not served yet (EOPNOTSUPP); use allocate and release")
        }
    }

    // MARK: - Admission

    /// Refuses requests that are too big, over quota, or would exhaust memory — before touching the kernel.
    func admit(_ session: ClientSession, size: UInt64) throws {
        let uid = session.credentials.uid
        guard size > 0 else {
            throw WireError(errno: Errno.invalidArgument.rawValue, code: .invalidArgument, message: "size 0 (EINVAL); ask for at least one byte")
        }
        guard size <= config.maxBufferSize else {
            throw WireError(errno: Errno.fileTooLarge.rawValue, code: .limit,
                            message: "\(ByteCount(Int(clamping: size))) exceeds max_buffer_size \(ByteCount(Int(config.maxBufferSize))) (EFBIG); ask for less or raise max_buffer_size in dmabufd.conf")
        }
        let quota = config.quota(for: uid)
        let used = usage[uid] ?? Usage()
        if used.bytes + size > quota.bytes || used.buffers + 1 > quota.buffers {
            usage[uid, default: Usage()].refusals += 1
            let what = used.bytes + size > quota.bytes
                ? "\(ByteCount(Int(used.bytes))) held + \(ByteCount(Int(size))) asked > \(ByteCount(Int(quota.bytes)))"
                : "\(used.buffers) buffers held, limit \(quota.buffers)"
            throw WireError(errno: Errno.diskQuotaExceeded.rawValue, code: .quotaExceeded,
                            message: "quota exceeded for uid \(uid): \(what) (EDQUOT); release buffers or raise quota.uid.\(uid) in dmabufd.conf")
        }
        guard session.owned.count < Int(config.maxBuffersPerClient) else {
            throw WireError(errno: Errno.diskQuotaExceeded.rawValue, code: .quotaExceeded,
                            message: "this connection holds \(session.owned.count) buffers, max_buffers_per_client (EDQUOT); release some")
        }
        if let available = memAvailable(), size > available / 2 {
            throw WireError(errno: Errno.noMemory.rawValue, code: .limit,
                            message: "\(ByteCount(Int(size))) would leave too little memory (\(ByteCount(Int(available))) available) (ENOMEM); ask for less")
        }
    }

    /// MemAvailable from /proc/meminfo, in bytes. Read on every admission, so it scans bytes: splitting the
    /// whole file into lines of Characters cost more than a small allocation itself.
    func memAvailable() -> UInt64? {
        guard let text = try? SmallFiles.read("/proc/meminfo") else { return nil }
        let bytes = Array(text.utf8)
        let key = Array("MemAvailable:".utf8)
        var lineStart = 0
        while lineStart + key.count <= bytes.count {
            if bytes[lineStart..<(lineStart + key.count)].elementsEqual(key) {
                var i = lineStart + key.count
                while i < bytes.count && bytes[i] == UInt8(ascii: " ") { i += 1 }
                var kb: UInt64 = 0
                var digits = 0
                while i < bytes.count, bytes[i] >= UInt8(ascii: "0"), bytes[i] <= UInt8(ascii: "9") {
                    kb = kb &* 10 &+ UInt64(bytes[i] - UInt8(ascii: "0"))
                    digits += 1
                    i += 1
                }
                return digits > 0 ? kb * 1024 : nil
            }
            guard let newline = bytes[lineStart...].firstIndex(of: UInt8(ascii: "\n")) else { break }
            lineStart = newline + 1
        }
        return nil
    }

    func allocate(_ target: HeapResolver.Target, size: UInt64, hugePages: Bool) throws -> (DmaBuffer, Memfd?, PageRuns?) {
        switch target {
        case .heap(let name):
            let heap = try DmaHeap(named: name, directory: config.heapDirectory)
            return (try heap.allocate(length: Int(size)), nil, nil)
        case .udmabuf:
            let unit = UInt64(hugePages ? 2 << 20 : pageSize)
            let rounded = (size + unit - 1) / unit * unit
            let memfd = try Memfd(name: "dmabufd", size: Int(rounded),
                                  flags: hugePages ? [.closeOnExec, .allowSealing, .hugeTLB] : [.closeOnExec, .allowSealing], seals: [.shrink])
            let device = try UDmabuf(devicePath: config.udmabufDevice)
            let buffer = try device.create(memfd: memfd.fd.descriptor, offset: 0, size: rounded)
            return (buffer, memfd, PageRuns(memfdRanges: [(0, rounded)]))
        }
    }

    /// Records a new buffer owned by `session`, names it `uid:pid:tag`, and charges its owner.
    func register(_ buffer: DmaBuffer, session: ClientSession, heap: String, tag: String, memfd: Memfd?, memfdRuns: PageRuns?,
                  rename: Bool = true) throws -> BufferRecord {
        let credentials = session.credentials
        var name = "\(credentials.uid):\(credentials.pid):\(tag)"
        while name.utf8.count > DmaBuffer.maximumNameLength { name.removeLast() }
        if rename { try? buffer.setName(name) } else { name = (try? buffer.info().name) ?? "" }
        let size = UInt64(try buffer.size())
        let record = BufferRecord(id: nextBufferID, buffer: buffer, size: size, inode: try buffer.inode(), heap: heap, tag: tag, name: name,
                                  ownerUID: credentials.uid, ownerPID: credentials.pid, ownerSession: session.id)
        nextBufferID += 1
        record.memfd = memfd
        record.memfdRuns = memfdRuns
        buffers[record.id] = record
        session.owned.insert(record.id)
        charge(record, sign: 1)
        logger.debug("buffer", metadata: ["id": "\(record.id)", "heap": "\(heap)", "size": "\(size)", "name": "\(name)"])
        return record
    }

    func charge(_ record: BufferRecord, sign: Int) {
        var used = usage[record.ownerUID] ?? Usage()
        var heap = heapUsage[record.heap] ?? (0, 0)
        if sign > 0 {
            used.bytes += record.size; used.buffers += 1
            heap.bytes += record.size; heap.buffers += 1
        } else {
            used.bytes -= min(used.bytes, record.size); used.buffers -= min(used.buffers, 1)
            heap.bytes -= min(heap.bytes, record.size); heap.buffers -= min(heap.buffers, 1)
        }
        usage[record.ownerUID] = used
        heapUsage[record.heap] = heap
    }

    // MARK: - Lookups

    func existing(_ id: BufferID) throws -> BufferRecord {
        guard let record = buffers[id], !record.draining else {
            throw WireError(errno: Errno.noSuchFileOrDirectory.rawValue, code: .notFound, message: "no buffer \(id) (ENOENT); it was released or never existed")
        }
        return record
    }

    func owned(_ id: BufferID, by session: ClientSession) throws -> BufferRecord {
        let record = try existing(id)
        guard record.ownerSession == session.id || session.credentials.uid == 0 else {
            throw WireError(errno: Errno.notPermitted.rawValue, code: .permissionDenied, message: "buffer \(id) is not yours (EPERM)")
        }
        return record
    }

    func visible(_ id: BufferID, to session: ClientSession) throws -> BufferRecord {
        let record = try existing(id)
        let uid = session.credentials.uid
        guard record.ownerUID == uid || uid == 0 || record.sharedWith.contains(uid) || session.fetched.contains(id) else {
            throw WireError(errno: Errno.permissionDenied.rawValue, code: .permissionDenied, message: "buffer \(id) is not shared with uid \(uid) (EACCES)")
        }
        return record
    }

    func notRevoked(_ record: BufferRecord) throws {
        if record.revoked {
            throw WireError(errno: Errno.staleNFSFileHandle.rawValue, code: .revoked,
                            message: "buffer \(record.id) was revoked (ESTALE); its pages are never published again: allocate a new one")
        }
    }

    func pages(_ first: UInt64, _ count: UInt64, of record: BufferRecord) throws -> Range<UInt64> {
        let end = count == 0 ? record.pages : first &+ count
        guard first < record.pages, end <= record.pages, end > first else {
            throw WireError(errno: Errno.invalidArgument.rawValue, code: .invalidArgument,
                            message: "pages [\(first), \(end)) are outside buffer \(record.id)'s \(record.pages) pages (EINVAL)")
        }
        return first..<end
    }

    func checkedFence(_ fd: SharedFD) throws -> SyncFile {
        do {
            return try SyncFile(checking: fd)
        } catch {
            throw WireError(errno: Errno.invalidArgument.rawValue, code: .invalidArgument,
                            message: "the fd is not a sync_file (EINVAL); send one from EXPORT_SYNC_FILE, SYNC_IOC_MERGE or a driver")
        }
    }

    func availableNames() -> String {
        let names = resolver.heaps.map(\.name) + resolver.policies.keys.sorted()
        return names.isEmpty ? "none" : names.joined(separator: ", ")
    }

    func info(_ record: BufferRecord) -> BufferInfo {
        BufferInfo(id: record.id, inode: record.inode, size: record.size, heap: record.heap, tag: record.tag, name: record.name,
                   ownerUID: record.ownerUID, ownerPID: record.ownerPID, generation: record.generation,
                   externalReferences: UInt32(record.externalReferences), leases: UInt32(record.leases.count),
                   sharedWith: record.sharedWith.sorted(), revoked: record.revoked, orphaned: record.ownerSession == nil)
    }

    func stats() -> Stats {
        let heapNames = Set(heapUsage.keys).union(heapFailures.keys)
        let heaps = heapNames.sorted().map { name in
            HeapStats(heap: name, bytes: heapUsage[name]?.bytes ?? 0, buffers: heapUsage[name]?.buffers ?? 0, failures: heapFailures[name] ?? 0)
        }
        let clients = usage.keys.sorted().map { uid in
            let used = usage[uid]!
            let quota = config.quota(for: uid)
            return ClientStats(uid: uid, bytes: used.bytes, buffers: used.buffers, quotaBytes: quota.bytes, quotaBuffers: quota.buffers, refusals: used.refusals)
        }
        let oldest = fences.values.map(\.since).min().map { ContinuousClock.now - $0 }
        let oldestMS = oldest.map { UInt64($0.wholeMilliseconds) } ?? 0
        return Stats(heaps: heaps, clients: clients, failures: failures.keys.sorted().map { ErrnoCount(errno: $0, count: failures[$0]!) },
                     connectedClients: UInt32(sessions.count), buffers: UInt32(buffers.count),
                     bytes: buffers.values.reduce(0) { $0 + $1.size }, leases: UInt32(leases.count),
                     pendingFences: UInt32(fences.count), oldestPendingFenceMilliseconds: oldestMS)
    }
}
