import DmaBuf
import DmaBufCLI
import DmaBufWire
import Testing

@Suite("Text formatters")
struct FormatterTests {
    @Test func textTableAlignsAndTrims() {
        var table = TextTable([.init("ID", .right), .init("NAME"), .init("SIZE", .right), .init("NOTE")])
        table.append(["7", "frame", "4 MiB", ""])
        table.append(["12", "a", "512 B", "shared"])
        table.append(["3"])
        #expect(table.render() == """
            ID  NAME    SIZE  NOTE
             7  frame  4 MiB
            12  a      512 B  shared
             3

            """)
        #expect(table.render(indent: "  ").hasPrefix("  ID  NAME"))
    }

    @Test func emptyTableIsTheHeader() {
        #expect(TextTable([.init("A"), .init("B")]).render() == "A  B\n")
    }

    @Test func humanUnits() {
        #expect(human(bytes: 0) == "0 B")
        #expect(human(bytes: 512) == "512 B")
        #expect(human(bytes: 4096) == "4 KiB")
        #expect(human(bytes: 1536 << 10) == "1.5 MiB")
        #expect(human(bytes: 1 << 30) == "1 GiB")
        #expect(human(milliseconds: 0) == "0 ms")
        #expect(human(milliseconds: 999) == "999 ms")
        #expect(human(milliseconds: 1000) == "1 s")
        #expect(human(milliseconds: 1500) == "1.5 s")
        #expect(human(milliseconds: 59_960) == "60 s")
        #expect(human(milliseconds: 125_000) == "2 min 5 s")
        #expect(human(milliseconds: 120_000) == "2 min")
        #expect(human(milliseconds: 3_780_000) == "1 h 3 min")
    }

    @Test func heaps() {
        #expect(format(heaps: Fixtures.heaps) == """
            HEAP     DEVICE                KIND     ALLOCATED  BUFFERS  TOTAL  FREE  MEMCG
            system   /dev/dma_heap/system  system       8 MiB        2      -     -  -
            udmabuf  /dev/udmabuf          udmabuf        0 B        0      -     -  -

            POLICY  HEAPS, IN ORDER OF PREFERENCE
            any     system, udmabuf
            camera  cma, system

            """)
    }

    @Test func heapsWithoutPolicies() {
        #expect(format(heaps: HeapsReply(heaps: [], policies: [])) == "HEAP  DEVICE  KIND  ALLOCATED  BUFFERS  TOTAL  FREE  MEMCG\n")
    }

    @Test func heapsV2() {
        let reply = HeapsReply(
            heaps: [HeapInfo(name: "cma", device: "linux,cma", kind: "cma", totalBytes: 64 << 20, freeBytes: 60 << 20),
                    HeapInfo(name: "system", device: "/dev/dma_heap/system", kind: "system", chargesMemcg: true)],
            policies: [], memAccounting: true)
        #expect(format(heaps: reply) == """
            HEAP    DEVICE                KIND    ALLOCATED  BUFFERS   TOTAL    FREE  MEMCG
            cma     linux,cma             cma           0 B        0  64 MiB  60 MiB  -
            system  /dev/dma_heap/system  system        0 B        0       -       -  charged
            dma_heap.mem_accounting=1: system heap allocations are charged to memory cgroups

            """)
    }

    @Test func buffers() {
        var revoked = Fixtures.buffer
        revoked.id = 8
        revoked.revoked = true
        #expect(format(buffers: [Fixtures.buffer, Fixtures.sharedOrphan, revoked]) == """
            ID  OWNER      HEAP       SIZE  HOLDERS  LEASES  STATE            CGROUP  NAME
             7  1000/4242  system    4 MiB        2       1  active           -       1000:4242:frame
            12  1001/99    udmabuf  64 KiB        0       0  orphaned,shared  -       1001:99:
             8  1000/4242  system    4 MiB        2       1  revoked          -       1000:4242:frame

            """)
    }

    @Test func info() {
        #expect(format(info: Fixtures.sharedOrphan) == """
            buffer 12
              inode:       777
              size:        64 KiB (65536 bytes)
              heap:        udmabuf
              tag:         -
              name:        1001:99:
              owner:       uid 1001, pid 99
              cgroup:      -
              generation:  2
              holders:     0
              leases:      0
              shared with: uid 1000
              state:       orphaned,shared
              memfd:       the client's

            """)
        #expect(format(info: Fixtures.buffer).contains("  tag:         frame\n  name:        1000:4242:frame\n"))
        #expect(format(info: Fixtures.buffer).contains("  shared with: -\n"))
    }

    @Test func layout() {
        #expect(format(layout: Fixtures.layout, leaseReleased: true) == """
            buffer 7 generation 1: 272 pages from page 0 in 2 runs of buffer-pages (page size 4 KiB)
            RUN  START  PAGES   BYTES
              0      0    256   1 MiB
              1    512     16  64 KiB
            lease 31 released

            """)
    }

    @Test func contiguousIsSaidNeverAddressed() {
        var layout = Fixtures.layout
        layout.runs = [PageRun(start: 0, pages: 4096)]
        layout.flags = BufferFlags.contiguous
        let text = format(layout: layout, leaseReleased: true)
        #expect(text.hasPrefix("buffer 7 generation 1: 4096 pages from page 0 in 1 run of buffer-pages (page size 4 KiB), physically contiguous\n"))
        #expect(!text.contains("ADDRESS"))
        var info = Fixtures.buffer
        info.flags = BufferFlags.contiguous
        #expect(format(info: info).contains("memory:") && format(info: info).contains("physically contiguous (CMA heap, by construction)"))
        #expect(!format(info: Fixtures.buffer).contains("contiguous"))
    }

    @Test func physicalLayoutShowsAddresses() {
        var layout = Fixtures.layout
        layout.kind = .physical
        layout.firstPage = 4
        layout.runs = [PageRun(start: 0x12345, pages: 512)]
        #expect(format(layout: layout, leaseReleased: false) == """
            buffer 7 generation 1: 512 pages from page 4 in 1 run of physical (page size 4 KiB)
            RUN  START  PAGES  BYTES  ADDRESS
              0  74565    512  2 MiB  0x12345000
            lease 31 NOT released

            """)
    }

    @Test func stats() {
        #expect(format(stats: Fixtures.stats) == """
            buffers:         3 (8.0 MiB)
            leases:          1
            clients:         2 connected
            pending fences:  2, oldest waiting 1.5 s
            failures:        4

            HEAP     ALLOCATED  BUFFERS  FAILURES
            system       8 MiB        2         1
            udmabuf      4 KiB        1         0

             UID  ALLOCATED  BUFFERS  QUOTA BYTES  QUOTA BUFFERS  REFUSALS
            1000      8 MiB        2        1 GiB           1024         3
            1001      4 KiB        1            -              -         0

            ERRNO   FAILURES
            ENOMEM         1
            EDQUOT         3

            """)
    }

    @Test func idleStatsHaveNoTables() {
        let idle = Stats(heaps: [], clients: [], failures: [], connectedClients: 1, buffers: 0, bytes: 0, leases: 0, pendingFences: 0,
                         oldestPendingFenceMilliseconds: 0)
        #expect(format(stats: idle) == """
            buffers:         0 (0 B)
            leases:          0
            clients:         1 connected
            pending fences:  0
            failures:        0

            """)
    }

    @Test func fence() {
        #expect(format(fence: FenceOutput(buffer: 7, firstPage: 0, pageCount: 16, access: "write", fences: 2, signaled: true, waitedMilliseconds: 12))
            == "buffer 7 pages 0:16 write: 2 fences, signalled after 12 ms\n")
        #expect(format(fence: FenceOutput(buffer: 7, firstPage: 4, pageCount: 0, access: "read", fences: 1, signaled: false, waitedMilliseconds: nil))
            == "buffer 7 pages 4: read: 1 fence, pending\n")
        #expect(format(fence: FenceOutput(buffer: 7, firstPage: 0, pageCount: 0, access: "read", fences: 0, signaled: true, waitedMilliseconds: nil))
            == "buffer 7 pages 0: read: no fences, nothing to wait for\n")
    }

    @Test func events() {
        #expect(describe(event: .leaseRevoked(lease: 3, buffer: 7, deadlineMilliseconds: 2000)) == "lease 3 on buffer 7 revoked, 2 s to release")
        #expect(describe(event: .leaseEnded(lease: 3, buffer: 7)) == "lease 3 on buffer 7 ended")
        #expect(describe(event: .bufferFreed(7)) == "buffer 7 freed")
        #expect(describe(event: .fenceSignaled(7)) == "fences on buffer 7 signalled")
    }
}
