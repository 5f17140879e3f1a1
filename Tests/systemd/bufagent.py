#!/usr/bin/python3
"""A dmabufd client for Tests/systemd/run-in-vm, driven one line at a time over stdin/stdout.

It starts `dmabuf-device-tests --child daemon-agent` (Tests/DeviceTests/DaemonChildren.swift), which
speaks dmabufd's protocol through DmaBufClient and takes text commands over a SOCK_SEQPACKET pair
on its fd 3, and adds what the agent cannot do: writing a known pattern into a buffer the agent
holds (the buffer's fd is taken from the agent with pidfd_getfd(2) and mapped).

Commands (one per line; each answers one line, `ok ...` or `err ...`):
  spawn                 start an agent                       -> ok PID
  connect PATH          agent: connect to the daemon         -> ok SERVER_UID
  alloc SIZE [HEAP]     agent: allocate and hold             -> ok ID INODE
  fill INODE            write the pattern into the agent's buffer with that inode
                                                             -> ok SUM (byte sum of the pattern)
  fetch ID              agent: fetch by id and hold          -> ok INODE SUM (byte sum read back)
  release ID            agent: release                       -> ok
  kill                  SIGKILL the agent and reap it        -> ok
  quit                  kill the agent (if any) and exit
"""

import ctypes
import mmap
import os
import select
import signal
import socket
import struct
import sys

SYS_pidfd_getfd = 438
DMA_BUF_IOCTL_SYNC = 0x40086200  # _IOW('b', 0, struct dma_buf_sync { __u64 flags; })
DMA_BUF_SYNC_WRITE = 2
DMA_BUF_SYNC_START = 0
DMA_BUF_SYNC_END = 4

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def pattern(size):
    """Byte i is (i * 7 + 13) mod 251: its period (251) is not a divisor of the page size."""
    block = bytes((i * 7 + 13) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


class Agent:
    def __init__(self, binary):
        self.binary = binary
        self.sock = None
        self.pid = None

    def spawn(self):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(theirs.fileno(), 3, inheritable=True)
                os.execv(self.binary, [self.binary, "--child", "daemon-agent"])
            finally:
                os._exit(127)
        theirs.close()
        self.sock, self.pid = mine, pid
        return "ok %d" % pid

    def ask(self, text, timeout=60):
        if self.sock is None:
            return "err ENOTCONN no agent (spawn first)"
        self.sock.send(text.encode())
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return "err ETIMEDOUT no reply from the agent within %ds" % timeout
        data = self.sock.recv(4096)
        if not data:
            return "err EPIPE the agent exited"
        return data.decode(errors="replace").replace("\n", " ")

    def fd_with_inode(self, inode):
        """The agent's fd number whose file has `inode` (a dma-buf), or None."""
        base = "/proc/%d/fd" % self.pid
        for name in os.listdir(base):
            path = os.path.join(base, name)
            try:
                # dma-bufs link to "/dmabuf:NAME"; anon inodes and pipes can have small inodes too.
                if os.readlink(path).startswith("/dmabuf:") and os.stat(path).st_ino == inode:
                    return int(name)
            except OSError:
                continue
        return None

    def fill(self, inode):
        target = self.fd_with_inode(inode)
        if target is None:
            return "err ENOENT the agent holds no fd with inode %d" % inode
        pidfd = os.pidfd_open(self.pid)
        try:
            fd = libc.syscall(SYS_pidfd_getfd, pidfd, target, 0)
            if fd < 0:
                e = ctypes.get_errno()
                return "err %s pidfd_getfd: %s" % (os.strerror(e), os.strerror(e))
        finally:
            os.close(pidfd)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            data = pattern(size)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                import fcntl
                fcntl.ioctl(fd, DMA_BUF_IOCTL_SYNC, struct.pack("Q", DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE))
                m[:] = data
                fcntl.ioctl(fd, DMA_BUF_IOCTL_SYNC, struct.pack("Q", DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE))
            finally:
                m.close()
            return "ok %d" % (sum(data) & 0xFFFFFFFFFFFFFFFF)
        finally:
            os.close(fd)

    def kill(self):
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
        if self.sock is not None:
            self.sock.close()
        self.sock, self.pid = None, None
        return "ok"


def main():
    if len(sys.argv) != 2:
        print("usage: bufagent.py PATH/TO/dmabuf-device-tests", file=sys.stderr)
        return 64
    agent = Agent(sys.argv[1])
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "quit":
                break
            elif words[0] == "spawn":
                agent.kill()
                reply = agent.spawn()
            elif words[0] == "kill":
                reply = agent.kill()
            elif words[0] == "fill":
                reply = agent.fill(int(words[1]))
            else:
                reply = agent.ask(" ".join(words))
        except Exception as e:  # report, keep serving
            reply = "err EIO %s: %s" % (type(e).__name__, e)
        print(reply, flush=True)
    agent.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
