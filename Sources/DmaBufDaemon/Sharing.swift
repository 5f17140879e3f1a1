import DmaBuf
import DmaBufWire
import SystemPackage

extension Broker {
    // MARK: - Sharing family: share, fetch, revoke

    func share(_ session: ClientSession, _ s: ShareRequest) throws -> ShareReply {
        let record = try owned(s.buffer, by: session)
        if let target = s.uid, !record.sharedWith.contains(target) {
            guard record.sharedWith.count < Int(config.maxSharesPerBuffer),
                  perUID[record.ownerUID, default: UIDCounts()].shares < Int(config.maxSharesPerUID) else {
                throw Refusal(.noBufferSpace, .limit, "buffer \(record.id) is shared with \(record.sharedWith.count) uids (max_shares_per_buffer \(config.maxSharesPerBuffer), max_shares_per_uid \(config.maxSharesPerUID))",
                              fix: "use one-time tokens, or share fewer buffers")
            }
            record.sharedWith.insert(target)
            perUID[record.ownerUID, default: UIDCounts()].shares += 1
        }
        guard s.oneTimeToken else { return ShareReply(token: nil) }
        guard session.tokens < Int(config.maxTokensPerClient), perUID[session.uid, default: UIDCounts()].tokens < Int(config.maxTokensPerUID) else {
            throw Refusal(.noBufferSpace, .limit, "too many unused tokens (max_tokens_per_client \(config.maxTokensPerClient), max_tokens_per_uid \(config.maxTokensPerUID))",
                          fix: "wait until tokens are used or the buffers freed")
        }
        var rng = SystemRandomNumberGenerator()
        var token: UInt64 = 0
        while token == 0 || tokens[token] != nil { token = rng.next() }
        tokens[token] = (record.id, session.id, session.uid)
        record.tokens.insert(token)
        session.tokens += 1
        perUID[session.uid, default: UIDCounts()].tokens += 1
        return ShareReply(token: token)
    }

    /// Forgets a token (used, or its buffer freed), giving back its place under the bounds.
    func dropToken(_ token: UInt64) {
        guard let entry = tokens.removeValue(forKey: token) else { return }
        buffers[entry.buffer]?.tokens.remove(token)
        if let session = sessionsByID[entry.session] { session.tokens -= 1 }
        perUID[entry.uid, default: UIDCounts()].tokens -= 1
        cleanUID(entry.uid)
    }

    func fetch(_ session: ClientSession, _ f: FetchRequest) throws -> (Response, [SharedFD]) {
        let record = try existing(f.buffer)
        let uid = session.uid
        let granted = record.ownerUID == uid || uid == 0 || record.sharedWith.contains(uid)
        let byToken = !granted && f.token != 0 && tokens[f.token]?.buffer == record.id
        guard granted || byToken else {
            throw Refusal(.permissionDenied, .permissionDenied, "buffer \(f.buffer) is not shared with uid \(uid)", fix: "ask its owner to share it or for a token")
        }
        try notRevoked(record)
        // Used up only once the fetch will succeed: a refused fetch leaves the token as it was.
        if byToken { dropToken(f.token) }
        if record.restored && record.ownerUID == uid {
            // The owner is back after a daemon restart: the buffer is its own again.
            record.restored = false
            record.ownerSession = session.id
            session.owned.insert(record.id)
        } else {
            session.fetched.insert(record.id)
        }
        return (.buffer(info(record, for: session)), [record.fd])
    }

    func revoke(_ session: ClientSession, _ r: RevokeRequest) throws {
        let record = try existing(r.buffer)
        guard record.ownerUID == session.uid || session.uid == 0 else {
            throw Refusal(.notPermitted, .permissionDenied, "only the owner or root may revoke buffer \(r.buffer)")
        }
        revoke(record, deadline: try revokeDeadline(milliseconds: r.deadlineMilliseconds))
    }

    // MARK: - Lookups

    func existing(_ id: BufferID) throws -> BufferRecord {
        guard let record = buffers[id], !record.draining else {
            throw Refusal(.noSuchFileOrDirectory, .notFound, "no buffer \(id)", fix: "it was released or never existed")
        }
        return record
    }

    func owned(_ id: BufferID, by session: ClientSession) throws -> BufferRecord {
        let record = try existing(id)
        guard record.ownerSession == session.id || session.uid == 0 else {
            throw Refusal(.notPermitted, .permissionDenied, "buffer \(id) is not yours")
        }
        return record
    }

    func visible(_ id: BufferID, to session: ClientSession) throws -> BufferRecord {
        let record = try existing(id)
        let uid = session.uid
        guard record.ownerUID == uid || uid == 0 || record.sharedWith.contains(uid) || session.fetched.contains(id) else {
            throw Refusal(.permissionDenied, .permissionDenied, "buffer \(id) is not shared with uid \(uid)")
        }
        return record
    }

    func notRevoked(_ record: BufferRecord) throws {
        if record.revoked {
            throw Refusal(.staleNFSFileHandle, .revoked, "buffer \(record.id) was revoked", fix: "its pages are never published again: allocate a new one")
        }
    }
}
