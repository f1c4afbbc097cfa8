"""Bytes moved from callback to callback: the data path's two ends and the pipe between them.

A proxied connection has two ends: an application-side TCP socket
(``TcpEnd``) and either another TCP socket (plaintext: ``copy.splice``) or
an HBONE stream (``h2conn.H2Stream``, ``tunnel.bridge``). Each end
implements the same small interface, ``End``:

* ``send(data)`` / ``send_eof()`` / ``send_reset()``: what the other end
  received is delivered here, in the event loop callback that received it;
* ``pause_reading(reason)`` / ``resume_reading(reason)``: backpressure from
  the other end (its socket buffer is full, its HTTP/2 window is closed).

No coroutine runs per chunk: an application socket's ``buffer_updated``
hands its bytes straight to the other end's ``send``, which writes them to
its transport (or into h2) at once. Coroutines are only used to set a
connection up and to wait for its end (``Pipe.done``). Why: the earlier
design woke a coroutine through an ``asyncio.Event`` for every chunk on
every hop, and those wake-ups were among the top costs of the agent's
profile at max request rate (bench/notes.md).

Memory per connection stays bounded: a ``TcpEnd`` reads into one scratch
buffer shared by the event loop and copies out only what it passes on;
when the receiving end cannot take more (asyncio's ``pause_writing``, a
closed HTTP/2 window) the sending end stops reading
(``transport.pause_reading``), so at most one read (256 KiB) plus the
transport's high-water mark is queued per direction.

TCP semantics kept: a FIN becomes a half-close on the other end, a reset
(or a connection lost with an error) becomes a reset on the other end.
Application sockets carry ``SO_LINGER 0`` from the moment they are wrapped,
so if the agent dies the kernel resets them instead of sending a FIN that
an application could take for a complete stream (issue 11, item 4); an
orderly close turns lingering back to normal just before the socket is
closed, so the FIN and any queued bytes still go out.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol

SCRATCH_SIZE = 256 * 1024
# Write buffer limits of an application-side transport. The event loops'
# default (64 KiB) is below one read (256 KiB): every bulk read paused and
# resumed the other end's reading, two epoll_ctl calls per chunk. Queued
# bytes per direction stay bounded by WRITE_HIGH plus one read.
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024

# One per process: the agent runs one event loop, and the scratch buffer is
# only used between a recv_into and the copy that immediately follows it.
_scratch = bytearray(SCRATCH_SIZE)
_scratch_view = memoryview(_scratch)



def scratch() -> memoryview:
    """The shared read buffer, for other protocols of the same loop
    (``h2conn.H2Connection``): whatever is read into it must be consumed
    or copied before the callback that read it returns."""
    return _scratch_view


LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


class End(Protocol):
    """One side of a proxied connection, as the other side sees it."""

    def send(self, data: bytes) -> None: ...
    def send_eof(self) -> None: ...
    def send_reset(self) -> None: ...
    def pause_reading(self, reason: str) -> None: ...
    def resume_reading(self, reason: str) -> None: ...


class Pipe:
    """Two ends of one proxied connection: byte counts and how it ended.

    ``done`` resolves with ``"closed"`` when both ends finished in order
    (each direction saw its FIN / END_STREAM and was flushed) or with
    ``"reset"`` as soon as either end was reset.
    """

    __slots__ = ("done", "counter", "totals", "reset", "ends", "_open")

    def __init__(self, counter, totals=None) -> None:
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.counter = counter
        self.totals = totals
        self.reset = False
        self.ends: tuple = ()
        self._open = 2

    def abort(self) -> None:
        """Reset both ends now (drain deadline, a policy that now denies it)."""
        for end in self.ends:
            end.send_reset()

    def count(self, attr: str, n: int) -> None:
        setattr(self.counter, attr, getattr(self.counter, attr) + n)
        if self.totals is not None:
            setattr(self.totals, attr, getattr(self.totals, attr) + n)

    def finished(self, reset: bool) -> None:
        """One end is done (both its directions, or reset)."""
        if reset:
            self.reset = True
        self._open -= 1
        if not self.done.done() and (self.reset or self._open <= 0):
            self.done.set_result("reset" if self.reset else "closed")


class TcpEnd(asyncio.BufferedProtocol):
    """An application-side (or upstream) TCP socket as one end of a pipe.

    ``attr`` names the counter the bytes read from this socket advance
    (``"sent"`` for the pod's application, ``"received"`` for its peer).
    """

    __slots__ = ("pipe", "attr", "peer", "transport", "read_eof", "wrote_eof", "finished",
                 "_resetting", "_pausers", "_early")

    def __init__(self, pipe: Pipe, attr: str) -> None:
        self.pipe = pipe
        self.attr = attr
        self.peer: End | None = None
        # Set by connection_made before any End method runs (pause_reading
        # still tolerates its absence).
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.read_eof = False        # the socket's peer sent FIN
        self.wrote_eof = False       # we sent FIN (half-close)
        self.finished = False
        self._resetting = False
        self._pausers: set[str] | None = None
        self._early: list[bytes] | None = []   # read before the other end was attached

    def attach(self, peer: End) -> None:
        """Connect the other end; what arrived before is handed over now."""
        self.peer = peer
        early, self._early = self._early, None
        for data in early or ():
            peer.send(data)
        if self.read_eof:
            peer.send_eof()
        if self.finished and self.pipe.reset:
            peer.send_reset()
        self.resume_reading("unattached")

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)

    def get_buffer(self, sizehint: int):
        return _scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(_scratch_view[:nbytes])
        self.pipe.count(self.attr, nbytes)
        if self.peer is None:
            self._early.append(data)  # type: ignore[union-attr]  # a list until attach() sets peer
            self.pause_reading("unattached")
            return
        self.peer.send(data)

    def eof_received(self) -> bool:
        self.read_eof = True
        if self.peer is not None:
            self.peer.send_eof()
        self._maybe_close()
        return True            # keep the transport: our sending side may still be open

    def connection_lost(self, exc: Exception | None) -> None:
        orderly = exc is None and not self._resetting and self.read_eof and self.wrote_eof
        if orderly:
            # The last moment before asyncio closes the socket: a normal
            # close from here on, so the FIN is not turned into a reset.
            _set_linger(self.transport, _LINGER_OFF)
        if self.finished:
            return
        self.finished = True
        if not orderly and self.peer is not None:
            self.peer.send_reset()
        self.pipe.finished(reset=not orderly)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading("tcp-full")

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading("tcp-full")

    # -- End: what the other side delivers ---------------------------------

    def send(self, data: bytes) -> None:
        if not self.finished and not self.transport.is_closing():
            self.transport.write(data)

    def send_eof(self) -> None:
        if self.finished or self.wrote_eof:
            return
        self.wrote_eof = True
        if not self.transport.is_closing():
            try:
                self.transport.write_eof()
            except OSError:
                pass
        self._maybe_close()

    def send_reset(self) -> None:
        if self.finished or self._resetting:
            return
        self._resetting = True
        self.transport.abort()       # SO_LINGER 0 is set: the peer sees a reset

    def pause_reading(self, reason: str) -> None:
        if not self._pausers and not self.finished:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass
        if self._pausers is None:
            self._pausers = set()
        self._pausers.add(reason)

    def resume_reading(self, reason: str) -> None:
        if not self._pausers or reason not in self._pausers:
            return
        self._pausers.discard(reason)
        if not self._pausers and not self.finished and not self.read_eof:
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    # -- helpers -------------------------------------------------------------

    def _maybe_close(self) -> None:
        if self.read_eof and self.wrote_eof and not self.transport.is_closing():
            self.transport.close()   # flushes what is queued, then connection_lost(None)

    def abort(self) -> None:
        """Cut this end and, through it, the other (cancellation, policy)."""
        self.send_reset()


async def wrap(sock: socket.socket, pipe: Pipe, attr: str) -> TcpEnd:
    """Take over a connected socket as a ``TcpEnd`` (reset if that fails)."""
    loop = asyncio.get_running_loop()
    try:
        set_nodelay(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        _transport, end = await loop.connect_accepted_socket(lambda: TcpEnd(pipe, attr), sock=sock)
    except BaseException:
        abort(sock)
        raise
    return end


def _set_linger(transport, value: bytes) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
        except OSError:
            pass


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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass
    sock.close()
