import DmaBuf
import DmaBufWire

extension Broker {
    // MARK: - Closing what clients sent

    /// Closes what a message carried. Kinds identified without blocking (dma-buf, sync_file, memfd: their
    /// release runs kernel code only, never a client's filesystem, socket or driver) are dropped here,
    /// on the loop, at once; a request that kept one holds its own reference. Every other fd goes to the
    /// closer, counted against the sender's uid (`max_closing_fds_per_uid`).
    func retireClientFDs(_ fds: consuming [SharedFD], uid: UInt32) {
        let all = fds
        var unidentified: [SharedFD] = []
        for fd in all {
            switch kernel.kind(of: fd) {
            case .dmaBuf, .syncFile, .memfd: continue
            case .other: unidentified.append(fd)
            }
        }
        _ = consume all
        closer.retire(unidentified, uid: uid)
    }

    /// True while the next message from `uid` fits its closing bound even if it carries nothing but
    /// unidentified fds: as many as the kernel delivers with one message (SCM_MAX_FD, 253), the ones past
    /// what a message may carry included, since those are closed through the closer as well.
    /// A uid at its bound is not read until its closes finish; other uids are read as before. A uid with
    /// nothing in flight is always read, so a bound below one message's fds still lets every uid in.
    func closerHasRoom(for uid: UInt32) -> Bool {
        let inFlight = closer.inFlight(uid: uid)
        return inFlight == 0 || inFlight + UnixSocket.maximumDescriptors <= Int(config.maxClosingFDsPerUID)
    }
}
