import DmaBuf
import DmaBufWire
import SystemPackage
import Testing
@testable import DmaBufDaemon

/// The refusals of docs/PROTOCOL.md that the other suites do not reach, each through the broker. The
/// checklist of every request and refusal, with the test that covers each, is at the end of this file.
@Suite("Broker protocol checklist", .serialized)
struct ChecklistTests {
    @Test func unknownHeapOrPolicyIsNoHeap() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect()
            try client.expectRefusal(.allocate(AllocateRequest(size: 4096, heap: "nonesuch", tag: "")), .noSuchFileOrDirectory, .noHeap, "nonesuch")
            h.kernel.udmabuf = false
            h.broker.rescanHeaps()
            try client.expectRefusal(.createUDmabuf(UDmabufRequest(size: 4096, tag: "", hugePages: false)), .noSuchFileOrDirectory, .noHeap, "udmabuf")
            h.kernel.udmabuf = true
            h.broker.rescanHeaps()
        }
    }

    @Test func unknownIdsAreNotFound() throws {
        try BrokerHarness.scenario { h in
            let client = try h.connect()
            for request: Request in [.fetch(FetchRequest(buffer: 999)), .info(999), .revoke(RevokeRequest(buffer: 999)),
                                     .layout(LayoutRequest(buffer: 999)), .beginAccess(AccessRequest(buffer: 999, access: .read)),
                                     .releaseLease(999)] {
                try client.expectRefusal(request, .noSuchFileOrDirectory, .notFound)
            }
        }
    }

    /// `allocate_batch` with count 0 and an empty `release_quiet` are malformed: error, then disconnect.
    @Test func emptyBatchAndEmptyReleaseQuietAreMalformed() throws {
        try BrokerHarness.scenario { h in
            for request: Request in [.allocateBatch(AllocateBatchRequest(count: 0, size: 4096, heap: "system", tag: "")), .releaseQuiet([])] {
                let client = try h.connect(version: 2)
                try client.sendRaw(WireMessage.encode(request, requestID: 7, version: 2))
                guard let (_, reply, _) = try client.receive(), case .error(let error) = reply else { Issue.record("\(request) not refused"); continue }
                #expect(error.code == .malformed && error.errno == Errno.badMessage.rawValue, "\(error)")
                #expect(h.pump(until: { client.isClosed() }))
            }
        }
    }

    /// The per-uid halves of the lease, token, fence and share bounds: two connections of one uid.
    @Test func perUidBounds() throws {
        try BrokerHarness.scenario({
            $0.maxLeasesPerUID = 1; $0.maxTokensPerUID = 1; $0.maxFencesPerUID = 1; $0.maxSharesPerUID = 1
        }) { h in
            let a = try h.connect(), b = try h.connect()
            let (mine, _) = try a.allocate()
            let (other, _) = try b.allocate()
            _ = try a.request(.layout(LayoutRequest(buffer: mine.id)))
            try b.expectRefusal(.layout(LayoutRequest(buffer: other.id)), .noBufferSpace, .limit, "max_leases_per_uid")
            _ = try a.request(.share(ShareRequest(buffer: mine.id, oneTimeToken: true)))
            try b.expectRefusal(.share(ShareRequest(buffer: other.id, oneTimeToken: true)), .noBufferSpace, .limit, "max_tokens_per_uid")
            _ = try a.request(.share(ShareRequest(buffer: mine.id, uid: 2000)))
            try b.expectRefusal(.share(ShareRequest(buffer: other.id, uid: 2000)), .noBufferSpace, .limit, "max_shares_per_uid")
            let pending = FakeFence()
            try a.expectOK(.attachFence(FenceAttachRequest(buffer: mine.id, access: .write)), fds: [pending.fd])
            try b.expectRefusal(.attachFence(FenceAttachRequest(buffer: other.id, access: .write)), fds: [FakeFence().fd], .noBufferSpace, .limit, "max_fences_per_uid")
            pending.signal()
            h.pump(until: { h.broker.fences.isEmpty })
        }
    }
}

// Checklist: every request and refusal of docs/PROTOCOL.md, and the host test that holds the broker to it
// (R: RequestTests, B: BoundsTests, V: VersionTwoTests, C: ChecklistTests, F: FDStoreTests).
//
// hello ............ negotiate R.helloNegotiatesAndReportsThePeer; no common version R.helloWithoutCommonVersion…;
//                    first message not hello R.firstMessageMustBeHello; no hello in time R.silentPeerIsClosedAfterHelloTimeout
// malformed ........ R.malformedMessageGetsAnErrorAndADisconnect, R.headerVersionNotSpoken…, C.emptyBatchAndEmptyReleaseQuiet…
// list_heaps ....... R.listHeapsNamesHeapsPoliciesAndUsage, V.heapsAndStatsCarryTotalsAndCgroups
// allocate ......... R.allocateReturnsTheBufferNamedAndCharged, R.allocateFallsBack…, R.allocateReportsTheKernelsError…;
//                    EINVAL size 0 / tag, EFBIG max_buffer_size, ENOMEM MemAvailable B.allocationRefusals; EDQUOT
//                    B.quotaBytesAndPerConnectionBuffers; ENOENT no_heap C.unknownHeapOrPolicyIsNoHeap; EINVAL fd_flags /
//                    heap_flags V.allocateChecksFdAndHeapFlags; EMFILE fd_store_max F
// allocate_batch ... V.allocateBatchIsAllOrNothing (EDQUOT, kernel ENOMEM, all or nothing); count 0 C
// create_udmabuf ... R.createUDmabufUsesADaemonMemfd; no udmabuf C.unknownHeapOrPolicyIsNoHeap
// create_udmabuf_from_memfd R.createUDmabufFromAClientMemfd; ranges, list_limit, size_limit_mb, not a memfd
//                    B.memfdRangesAreCheckedBeforeTheKernel; flags V.bufferInfoCarriesCgroupAndMemfdOwnership
// import ........... R.importAccountsAForeignDmaBuf; EBADF not a dma-buf B.importRefusesWhatIsNotADmaBuf; EEXIST
//                    R.importOfABufferTheDaemonHoldsIsRefused
// share / fetch .... R.shareGrantsAUidAndFetchHandsTheBufferOver, R.oneTimeTokenWorksOnce, R.shareOfSomeoneElses…
//                    (EPERM), R.aRefusedFetchLeavesTheTokenUnused (EACCES), ESTALE revoked R.revokedBufferInfoCarriesNoFd;
//                    ENOBUFS tokens/shares B.leaseTokenAndShareBounds, C.perUidBounds; ENOENT C.unknownIdsAreNotFound
// release .......... R.releaseFreesAndUnchargesOnce (and ENOENT); release_quiet V.releaseQuietHasNoReply…, empty C
// list / info / stats R.listShowsOwnBuffersPagedAndAllIsForRoot (EPERM --all), R.infoReadsReferencesAndRefusesRevoked,
//                    R.statsForNonRootShowsOnlyTheCallersUid, V.v1ClientsKeepV1Encodings
// layout ........... R.layoutPublishesRunsUnderALease, R.physicalLayoutOnly… (EPERM, EOPNOTSUPP), B.pageRangesCannotOverflow;
//                    ENOBUFS leases B.leaseTokenAndShareBounds, C.perUidBounds
// release_lease .... R.fenceOnALeaseReleaseEndsItWithOneMessage, R.aReleasedLeaseCannotBeReleasedAgain… (ENOENT)
// attach_fence ..... R.attachFenceHoldsPagesUntilItSignals; EPERM / EINVAL / ENOBUFS B.fenceRefusals, C.perUidBounds
// begin_access ..... R.beginAccessWithoutConflictsCarriesNoFd, B.fenceRefusals
// revoke ........... R.revokeWarnsHoldersThenEndsTheirLeases, B.revokingManyLeases…, B.revokeRacingADisconnect…; ENOENT C
// connections ...... EMFILE per uid / in total B.connectionsPerUidAndInTotal; outbox B.unreadRepliesStopReadingNotTheConnection
