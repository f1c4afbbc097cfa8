"""A plain TCP socket as an asyncio transport with a read/write/half-close API.

Why not ``loop.sock_recv_into``/``loop.sock_sendall``: each of those waits
registers the socket with epoll and removes it again (two ``epoll_ctl``
calls and a future per read), and each connection kept a 256 KiB receive
buffer for its whole life, idle or not. The benchmark's profile of the
agent at max request rate showed that churn among the top costs
(bench/results.md), and 1000 idle meshed connections cost about half a
gigabyte of buffers.

Here the socket stays registered with epoll for its lifetime (an asyncio
transport), data arrives through ``BufferedProtocol`` into one scratch
buffer shared by every connection of the event loop, and is copied out at
once (``buffer_updated`` runs synchronously after the ``recv_into``, before
any other connection can use the scratch buffer). An idle connection holds
no receive buffer. Reading pauses while more than ``HIGH_WATER`` bytes are
queued and unread, so memory per connection stays bounded.

TCP semantics as ``copy.py`` needs them: EOF is reported as ``b""`` and the
transport stays open for our own sending side (half-close); a reset from
the peer raises ``ConnectionResetError`` on the next read or write;
``abort`` closes with SO_LINGER 0 so the peer sees a reset.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct

SCRATCH_SIZE = 256 * 1024
HIGH_WATER = 1024 * 1024      # unread bytes queued before reading pauses
LOW_WATER = 256 * 1024

# One per process: the agent runs one event loop, and the scratch buffer is
# only used between a recv_into and the copy that immediately follows it.
_scratch = bytearray(SCRATCH_SIZE)
_scratch_view = memoryview(_scratch)


class _AppProtocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._paused = False
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int):
        return _scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        self._chunks.append(bytes(_scratch_view[:nbytes]))
        self._queued += nbytes
        if self._queued >= HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._readable.set()

    def eof_received(self) -> bool:
        self._eof = True
        self._readable.set()
        return True            # keep the transport: our sending side may still be open

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None and self._error is None:
            self._error = exc
        self._eof = True
        self._readable.set()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()


class AppSocket:
    """Read, write, half-close and abort one connected TCP socket."""

    def __init__(self, transport: asyncio.Transport, proto: _AppProtocol) -> None:
        self.transport = transport
        self._p = proto

    @classmethod
    async def wrap(cls, sock: socket.socket) -> "AppSocket":
        """Take over a connected socket (closed with a reset if that fails)."""
        loop = asyncio.get_running_loop()
        try:
            set_nodelay(sock)
            transport, proto = await loop.connect_accepted_socket(_AppProtocol, sock=sock)
        except BaseException:
            abort(sock)
            raise
        return cls(transport, proto)

    def _raise_if_reset(self) -> None:
        err = self._p._error
        if err is not None:
            if isinstance(err, (ConnectionResetError, BrokenPipeError)):
                raise err
            raise ConnectionResetError(str(err))

    async def read(self) -> bytes:
        """The next chunk; b"" once the peer has sent FIN; raises ConnectionResetError."""
        p = self._p
        while not p._chunks:
            self._raise_if_reset()
            if p._eof:
                return b""
            p._readable.clear()
            await p._readable.wait()
        data = p._chunks.popleft()
        p._queued -= len(data)
        if p._paused and p._queued <= LOW_WATER and not p._lost:
            p._paused = False
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes | memoryview) -> None:
        """Queue ``data`` and wait while the kernel's and asyncio's buffers are full."""
        p = self._p
        self._raise_if_reset()
        if p._lost or self.transport.is_closing():
            raise BrokenPipeError("connection closed")
        self.transport.write(data)
        if not p._writable.is_set():
            await p._writable.wait()
            self._raise_if_reset()

    def write_eof(self) -> None:
        """Half-close: FIN after whatever is still queued."""
        if not self._p._lost and not self.transport.is_closing():
            try:
                self.transport.write_eof()
            except OSError:
                pass

    def close(self) -> None:
        self.transport.close()        # flushes what is queued, then closes

    def abort(self) -> None:
        """Close with a TCP reset instead of a FIN."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()


def set_nodelay(sock: socket.socket) -> None:
    """Turn Nagle off on a TCP socket that carries proxied data.

    asyncio only does this itself for sockets whose ``proto`` is
    IPPROTO_TCP; ``socket.socket(AF_INET, SOCK_STREAM)`` and the sockets
    accepted from it have proto 0, so without this every agent socket kept
    Nagle on. A small write then waits for the ACK of the previous one,
    which the receiver delays until it sends something itself: at a fixed
    request rate a reply waited for the client's *next* request (the
    benchmark measured ~4 ms at 1000 req/s over 4 connections).
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def abort(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
