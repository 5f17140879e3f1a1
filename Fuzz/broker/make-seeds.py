#!/usr/bin/env python3
"""Writes the seed programs in Fuzz/corpus/broker/ for the broker fuzzer (Fuzz/FuzzBroker*.swift).

The byte layout follows FuzzBrokerProgram.swift: a config byte, then opcodes with their operands, read in
Swift's left-to-right argument order, and `send`'s own two bytes (client slot, fd-count mismatch) last.
Regenerate with `python3 Fuzz/broker/make-seeds.py` after changing that layout.
"""
import os, struct, sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus", "broker")
BOUNDARIES = [0, 1, 4095, 4096, 4097, 8192, 1 << 20, (1 << 30) - 1, 1 << 30, (1 << 30) + 1, 1 << 32]
NAMES = ["system", "linux,cma", "udmabuf", "any", "fallback", "cma", "", "physical", "..", "system\0x"]

def slot(s=0): return bytes([s])
def send(s=0, mismatch=3): return bytes([s, mismatch])
def bval(i): return bytes([4 * i])                     # boundaries[i]
def raw64(v): return bytes([3]) + struct.pack("<Q", v)
def pages(n): return bytes([2]) + struct.pack("<H", n)
def small(v): return bytes([1, v])
def name(i): return bytes([i])                         # names[i]
def rawtext(b, ctl=False): return bytes([240 if ctl else 200]) + struct.pack("<H", len(b)) + b
def pool(i=0): return bytes([i])                       # an id the broker handed out
def fd(kind, extra=b""): return bytes([kind]) + extra  # attachment(): kind % 10

FAKE_DMABUF = fd(0, b"\x00")
MEMFD = fd(1, b"\x01")
MEMFD_WRITE_SEAL = fd(12, b"\x08")                     # 12 % 10 == 2, seals[1] == [.write]
PIPE = fd(3, b"\x01")
FENCE = fd(4)
SIGNALLED = fd(5)
DEVNULL = fd(6)
SOCKET = fd(7)
HELD = fd(8)

def connect(s=0, uid=0): return bytes([0, s, uid])     # uid: 0 -> 1000, 1 -> 1001, 2 -> root
def hello(s=0): return bytes([27]) + send(s)
def hello_v(lo, hi, s=0): return bytes([1, lo, hi]) + name(6) + send(s)
def allocate(size, heap=0, tag=b"\xa0", s=0, mm=3, flags=b"\x00"): return bytes([3]) + size + name(heap) + tag + bytes([3]) + flags + send(s, mm)
def batch(count, size, heap=0, s=0, flags=b"\x00"): return bytes([28, count]) + size + name(heap) + bytes([0xa4]) + flags + send(s)
def release_quiet(ids, s=0): return bytes([29, len(ids)]) + b"".join(ids) + send(s)
def udmabuf(size, s=0): return bytes([4]) + size + bytes([0xa1, 0]) + send(s)
def from_memfd(ranges, attachment, s=0):
    body = bytes([5, len(ranges)])
    for off, size in ranges: body += off + size
    return body + bytes([0xa2, 0]) + attachment + send(s)
def import_buffer(attachment, s=0, mm=3): return bytes([6, 0xa3]) + attachment + send(s, mm)
def share(b=pool(), uid=None, token=False, s=0):
    return bytes([7]) + b + (bytes([1, uid]) if uid is not None else bytes([0])) + bytes([1 if token else 0]) + send(s)
def fetch(b=pool(), tok=None, s=0): return bytes([8]) + b + (bytes([0]) + tok if tok is not None else bytes([1])) + send(s)
def release(b=pool(), s=0): return bytes([9]) + b + send(s)
def list_(all_=True, s=0): return bytes([10, 1 if all_ else 0, 0]) + send(s)
def info(b=pool(), s=0): return bytes([11]) + b + send(s)
def stats(s=0): return bytes([12]) + send(s)
def layout(b=pool(), first=bval(0), count=bval(1), physical=False, s=0): return bytes([13]) + b + first + count + bytes([int(physical)]) + send(s)
def release_lease(l=pool(), fence=None, s=0): return bytes([14]) + l + (bytes([1]) + fence if fence else bytes([0])) + send(s)
def attach_fence(attachment, b=pool(), access=2, s=0): return bytes([15]) + b + bval(0) + bval(0) + bytes([access]) + attachment + send(s)
def begin_access(b=pool(), access=1, s=0): return bytes([16]) + b + bval(0) + bval(0) + bytes([access]) + send(s)
def revoke(b=pool(), deadline=1, s=0): return bytes([17]) + b + bytes([deadline]) + send(s)
def raw(data, nfds=0, header=None, s=0):
    head = bytes([1, header]) if header is not None else bytes([0])
    return bytes([18]) + slot(s) + head + struct.pack("<H", len(data)) + data + bytes([nfds]) + b"".join(DEVNULL for _ in range(nfds))
def mutated(which, edits, s=0):
    body = bytes([19]) + slot(s) + bytes([which, len(edits) - 1])
    for at, v in edits: body += bytes([at, v])
    return body + bytes([1]) + DEVNULL
def disconnect(s=0): return bytes([20, s])
def signal_all(): return bytes([21, 255])
def wait(ms=2): return bytes([22, ms])
def drop_held(s=0): return bytes([23, s])
def deaf(s=0): return bytes([24, s])
def kernel_fail(heap=0, errno=0): return bytes([25, 0, heap, errno])
def kernel_no_udmabuf(): return bytes([25, 2])
def flood(s=0, n=63, lists=True): return bytes([26, s, 1 if lists else 0, n])

PAGE = pages(1)
DEFAULTS = b"\x00"  # the config byte: no tight limits (see BrokerRun.config)
SEEDS = {
    "v2-batch-quiet": DEFAULTS + connect() + hello_v(1, 2) + batch(3, PAGE) + batch(0, PAGE) + batch(17, PAGE) + batch(2, bval(10)) + release_quiet([pool(0), pool(1)]) + list_(),
    "v2-flags": DEFAULTS + connect() + hello_v(2, 2) + allocate(PAGE, flags=b"\x01\xff\xff\xff\xff") + allocate(PAGE, flags=b"\x02" + bval(1)) + allocate(PAGE)
        + from_memfd([(bval(0), bval(3))], MEMFD) + stats() + release_quiet([raw64(2**64 - 1)]),
    "v2-v1-mixed": DEFAULTS + connect(0) + hello_v(1, 2) + connect(1, 1) + hello(1) + allocate(PAGE) + share(uid=1) + fetch(s=1) + allocate(PAGE, s=1, mm=3) + list_(s=1) + release_quiet([pool(0)]),
    "hello": DEFAULTS + connect() + hello(),
    "hello-versions": DEFAULTS + connect() + hello_v(0, 0) + connect(1) + hello_v(2, 250),
    "no-hello-timeout": b"\x10" + connect() + wait(2) + wait(2) + allocate(PAGE),
    "list-heaps": DEFAULTS + connect() + hello() + bytes([2]) + send(),
    "allocate-release": DEFAULTS + connect() + hello() + allocate(PAGE) + info() + release() + info(),
    "allocate-boundaries": DEFAULTS + connect() + hello() + b"".join(allocate(bval(i)) for i in range(11)) + allocate(raw64(2**64 - 1)) + allocate(raw64(2**63)),
    "allocate-heaps": DEFAULTS + connect() + hello() + b"".join(allocate(PAGE, heap=h) for h in range(10)),
    "allocate-tags": DEFAULTS + connect() + hello() + allocate(PAGE, tag=rawtext(b"a\x00b\x1b[31m\n")) + allocate(PAGE, tag=rawtext(b"x" * 40))
        + allocate(PAGE, tag=rawtext(b"\xff\xfe\xc0\x80", ctl=True)) + allocate(PAGE, tag=rawtext(b"y" * 260)),
    "quota": b"\x02" + connect() + hello() + b"".join(allocate(pages(4)) for _ in range(6)) + stats(),
    "udmabuf": DEFAULTS + connect() + hello() + udmabuf(PAGE) + udmabuf(bval(10)) + udmabuf(raw64(2**64 - 4096)) + layout(physical=True),
    "udmabuf-from-memfd": DEFAULTS + connect() + hello() + from_memfd([(bval(0), bval(3))], MEMFD) + from_memfd([(bval(3), bval(3)), (raw64(2**64 - 4096), bval(3))], MEMFD)
        + from_memfd([], MEMFD) + from_memfd([(bval(0), bval(3))], MEMFD_WRITE_SEAL) + from_memfd([(bval(0), bval(3))], PIPE),
    "import": DEFAULTS + connect() + hello() + import_buffer(FAKE_DMABUF) + import_buffer(MEMFD) + import_buffer(PIPE) + import_buffer(FENCE)
        + import_buffer(DEVNULL) + import_buffer(SOCKET) + list_(),
    "share-fetch": DEFAULTS + connect(0) + hello(0) + connect(1, 1) + hello(1) + allocate(PAGE) + share(uid=1) + fetch(s=1) + info(s=1) + release(s=1) + release(),
    "share-token": DEFAULTS + connect(0) + hello(0) + connect(1, 1) + hello(1) + allocate(PAGE) + share(token=True) + fetch(tok=pool(0), s=1) + fetch(tok=pool(0), s=1),
    "share-limits": b"\x28" + connect(0) + hello(0) + allocate(PAGE) + b"".join(share(uid=u) for u in range(5)) + b"".join(share(token=True) for _ in range(4)),
    "layout-lease": DEFAULTS + connect() + hello() + allocate(pages(4)) + layout(first=bval(1), count=bval(2)) + layout(first=raw64(2**64 - 1), count=bval(2))
        + layout(count=raw64(2**63)) + release_lease(pool(0)) + release_lease(pool(0)),
    "lease-fence": DEFAULTS + connect() + hello() + allocate(pages(2)) + layout() + release_lease(pool(0), fence=FENCE) + wait() + signal_all() + wait(),
    "attach-fence": DEFAULTS + connect() + hello() + allocate(pages(2)) + attach_fence(FENCE) + begin_access() + attach_fence(SIGNALLED, access=1) + wait() + signal_all() + begin_access(access=2),
    "attach-fence-kinds": DEFAULTS + connect() + hello() + allocate(PAGE) + attach_fence(PIPE) + attach_fence(MEMFD) + attach_fence(HELD) + attach_fence(DEVNULL),
    "fence-limits": b"\x08" + connect() + hello() + allocate(PAGE) + b"".join(attach_fence(FENCE) for _ in range(5)) + b"".join(layout() for _ in range(4)),
    "revoke": DEFAULTS + connect(0) + hello(0) + connect(1, 1) + hello(1) + allocate(PAGE) + share(uid=1) + fetch(s=1) + layout(s=1) + revoke(deadline=1) + wait(2) + wait(2) + info(),
    "revoke-disconnect": b"\x80" + connect(0) + hello(0) + connect(1, 1) + hello(1) + allocate(PAGE) + share(uid=1) + fetch(s=1) + layout(s=1)
        + revoke(deadline=0) + disconnect(1) + wait(2) + disconnect(0),
    "revoke-long": DEFAULTS + connect() + hello() + allocate(PAGE) + layout() + bytes([17, 0, 255]) + struct.pack("<I", 2**32 - 1) + send() + disconnect(),
    "root-physical": DEFAULTS + connect(0, 2) + hello() + udmabuf(pages(2)) + layout(physical=True) + stats() + list_(),
    "physical-denied": DEFAULTS + connect() + hello() + udmabuf(pages(2)) + layout(physical=True),
    "disconnect-holding": DEFAULTS + connect() + hello() + allocate(PAGE) + allocate(PAGE) + layout() + attach_fence(FENCE) + disconnect() + wait(),
    "connections": b"\x01" + connect(0) + connect(1) + connect(2) + connect(3) + hello(3) + stats(3),
    "deaf-flood": b"\x04" + connect() + hello() + allocate(PAGE) + deaf() + flood() + flood() + deaf() + stats(),
    "flood-stats": DEFAULTS + connect() + hello() + flood(lists=False) + flood(lists=False),
    "raw-garbage": DEFAULTS + connect() + raw(b"\x00" * 3) + raw(b"\xff" * 64, nfds=2) + raw(b"", nfds=1) + hello(),
    "raw-header": DEFAULTS + connect() + hello() + raw(struct.pack("<Q", 4096) + b"\x06system\x01t", header=3) + raw(b"\xff\xff\xff\xff", header=7, nfds=3),
    "mutated": DEFAULTS + connect() + hello() + mutated(0, [(12, 0xff)]) + mutated(2, [(20, 1), (21, 0)]) + mutated(5, [(24, 0xff), (25, 0xff)]) + mutated(7, [(4, 2)]),
    "fd-count-mismatch": DEFAULTS + connect() + hello() + allocate(PAGE, mm=0) + b"\x00" + import_buffer(FAKE_DMABUF, mm=1) + allocate(PAGE, mm=2) + stats(),
    "kernel-failures": DEFAULTS + connect() + hello() + kernel_fail(0, 0) + allocate(PAGE, heap=4) + kernel_no_udmabuf() + udmabuf(PAGE) + allocate(PAGE, heap=4) + bytes([25, 1]) + allocate(PAGE),
    "kernel-heaps-gone": DEFAULTS + connect() + hello() + allocate(PAGE, heap=1) + bytes([25, 3]) + bytes([25, 3]) + allocate(PAGE, heap=1) + bytes([2]) + send() + info(),
    "mem-available": DEFAULTS + connect() + hello() + bytes([25, 4, 0]) + bval(1) + allocate(PAGE) + bytes([25, 4, 1]) + allocate(PAGE),
    "list-after": DEFAULTS + connect() + hello() + allocate(PAGE) + allocate(PAGE) + allocate(PAGE) + bytes([10, 0, 1]) + pool(1) + send() + bytes([10, 1, 1]) + raw64(2**64 - 1) + send(),
    "release-twice-other": DEFAULTS + connect(0) + hello(0) + connect(1, 1) + hello(1) + allocate(PAGE) + release(s=1) + release() + release() + info(s=1),
    "many-buffers": b"\x20" + connect() + hello() + b"".join(allocate(PAGE) for _ in range(4)) + udmabuf(PAGE),
    "hold-then-drop": DEFAULTS + connect() + hello() + allocate(PAGE) + allocate(PAGE) + drop_held() + release(pool(0)) + release(pool(1)) + wait(),
    "keep-fds-disconnect": DEFAULTS + connect() + hello() + allocate(PAGE) + udmabuf(PAGE) + disconnect() + wait(2),
}

# Inputs that showed a broker bug: written to Fuzz/corpus/broker-findings/ (see its README), not seeds.
FINDINGS = {
    "import-own-buffer-never-freed": DEFAULTS + connect() + hello() + allocate(PAGE) + import_buffer(HELD) + list_() + drop_held(),
}

def main():
    os.makedirs(OUT, exist_ok=True)
    for name_, body in SEEDS.items():  # each starts with its config byte
        with open(os.path.join(OUT, name_), "wb") as f:
            f.write(body)
    findings = os.path.join(OUT, "..", "broker-findings")
    os.makedirs(findings, exist_ok=True)
    for name_, body in FINDINGS.items():
        with open(os.path.join(findings, name_), "wb") as f:
            f.write(body)
    print(f"{len(SEEDS)} seeds in {os.path.normpath(OUT)}", file=sys.stderr)

main()
