import CDmaBuf
import DmaBuf
import Testing

@Suite struct ShimConstantTests {
    @Test func ioctlRequestNumbers() {
        // The numbers the kernel headers produce for x86-64, checked against the uAPI by hand.
        #expect(CDmaBuf_DMA_HEAP_IOCTL_ALLOC == 0xc018_4800)
        #expect(CDmaBuf_UDMABUF_CREATE == 0x4018_7542)
        #expect(CDmaBuf_UDMABUF_CREATE_LIST == 0x4008_7543)
        #expect(CDmaBuf_DMA_BUF_IOCTL_SYNC == 0x4008_6200)
        #expect(CDmaBuf_DMA_BUF_IOCTL_EXPORT_SYNC_FILE == 0xc008_6202)
        #expect(CDmaBuf_DMA_BUF_IOCTL_IMPORT_SYNC_FILE == 0x4008_6203)
        #expect(CDmaBuf_SYNC_IOC_MERGE == 0xc030_3e03)
        #expect(CDmaBuf_SYNC_IOC_FILE_INFO == 0xc038_3e04)
        #expect(CDmaBuf_DRM_IOCTL_VGEM_FENCE_ATTACH == 0xc010_6441)
        #expect(CDmaBuf_DRM_IOCTL_VGEM_FENCE_SIGNAL == 0x4008_6442)
    }
}
