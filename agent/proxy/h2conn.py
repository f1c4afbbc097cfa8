"""HTTP/2 connections and streams for HBONE, on asyncio transports (TLS).

A thin shell around the sans-IO ``h2`` state machine:

* one ``H2Connection`` protocol per TLS connection, client or server side;
* ``H2Stream``: read/write/end/reset for one CONNECT tunnel.

Flow control is honoured both ways. Received data is acknowledged to the
peer only when the consumer reads it, so a slow reader stops the sender
after one stream window (4 MiB) per stream and one connection window
(16 MiB) per connection: memory stays bounded. Writes wait for the peer's
window and for the transport to drain.

A peer that breaks the protocol gets a GOAWAY and the connection closes;
that never touches other connections.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
from hyperframe.frame import DataFrame, GoAwayFrame, RstStreamFrame

from agent import heap
from agent.observe.problems import ProblemLog, problem_key
from agent.proxy import appsock, limits
from agent.proxy.hbone import CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW

log = logging.getLogger(__name__)
# What a peer can make happen once per connection or stream is said once a
# minute per distinct problem (digits folded), never once per event.
_problems = ProblemLog(log)

DEFAULT_WINDOW = 65535
# A DATA frame's header: length (24 bits, as 16 + 8), type 0, flags, stream id.
_DATA_HEADER = struct.Struct(">HBBBL")
_END_STREAM = 0x1
# Payloads from this size on go to the transport as they are, behind their
# own 9-byte header (one more, small TLS record); smaller ones are joined
# to their header, which costs less than the extra record.
SEPARATE_PAYLOAD = 16 * 1024
# DATA frames from this size on are read straight into a buffer of their own
# (H2Connection._take_body): below it h2's frame buffer costs less than the
# bookkeeping.
BIG_DATA = 64 * 1024
_PADDED = 0x8
# Buffers for large DATA frames' bodies, shared by the loop's connections:
# reading into memory used before costs no page faults (a fresh megabyte per
# frame was ~10 % of the receiving agent's time). At most POOL_SIZE of
# MAX_FRAME_SIZE each; the pool empties when the agent goes quiet
# (agent/heap.py).
POOL_SIZE = 4
_pool: list[bytearray] = []


def _body_buffer(length: int) -> memoryview:
    """A writable buffer of ``length`` bytes that nothing else refers to."""
    for buf in _pool:
        # Free when only the pool, this loop's name and getrefcount's argument
        # refer to it: any memoryview still alive (a transport holding bytes
        # it could not send yet, a queued chunk) keeps one more reference.
        if sys.getrefcount(buf) == 3:
            return memoryview(buf)[:length]
    if len(_pool) < POOL_SIZE:
        buf = bytearray(MAX_FRAME_SIZE)
        _pool.append(buf)
        return memoryview(buf)[:length]
    return memoryview(bytearray(length))


def _empty_pool() -> None:
    _pool.clear()


heap.on_quiet(_empty_pool)
TLS_WRITE_HIGH = 2 * 1024 * 1024
TLS_WRITE_LOW = 512 * 1024


def _retrieved(fut: asyncio.Future) -> None:
    """A future nobody may await (a stream's response, a connection's
    readiness): its exception is expected, not an error to report."""
    if not fut.cancelled():
        fut.exception()


class _HboneH2(h2.connection.H2Connection):
    """h2's connection with two changes, both for RFC 9113.

    1. A graceful GOAWAY (NO_ERROR) leaves open streams working, as RFC 9113
    6.8 says it should.

    Stock h2 treats any received GOAWAY as the end of the connection: it
    drops queued output and refuses to send on streams that are still open,
    which would cut every tunnel of a draining peer. This overrides the one
    private hook h2 dispatches GOAWAY frames to (checked against h2 4.x);
    errors other than NO_ERROR keep h2's behaviour.

    2. A request over the stream limit, or a malformed one, is refused
    alone (``_receive_headers_frame``).
    """

    refused_streams = 0
    # h2 remembers this many closed streams per connection to tell a late
    # frame from a protocol error. Its default (65,536) let one peer make a
    # connection hold ~11 MB by opening and ending streams (the soak run and
    # a flood of refused CONNECTs, docs/SECURITY.md); 4,096 covers any frame
    # still in flight when a stream closes.
    MAX_CLOSED_STREAMS = 4096

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # What goes to the transport, in order: h2's own serialised frames
        # and DATA frames as (header, payload) without a copy.
        self._out: list = []

    def _prepare_for_sending(self, frames):
        """DATA frames skip h2's serialisation; every other frame goes the usual way.

        h2 turns a DATA frame into bytes by copying its payload three times
        (``serialize`` joins header and body, ``_data_to_send += ...``
        appends to a bytearray, ``data_to_send`` copies that out): for bulk
        transfers this was ~30 % of the sending agent's time (bench/notes.md).
        h2 still does all the bookkeeping in ``send_data``/``end_stream``
        (state machines, both flow-control windows, frame-size checks); only
        the bytes are produced here: a 9-byte header in front of the
        payload, queued after whatever h2 had queued before, so the order on
        the wire is the order of the calls. We never send padded DATA.
        """
        for frame in frames:
            if frame.__class__ is DataFrame and not frame.pad_length and "PADDED" not in frame.flags:
                data = frame.data
                n = len(data)
                flags = _END_STREAM if "END_STREAM" in frame.flags else 0
                header = _DATA_HEADER.pack(n >> 8, n & 0xFF, 0, flags, frame.stream_id)
                out = self._out
                if self._data_to_send:
                    out.append(self._data_to_send)
                    self._data_to_send = bytearray()
                if n >= SEPARATE_PAYLOAD:
                    out.append(header)
                    out.append(data)
                else:
                    out.append(header + data if n else header)
            else:
                self._data_to_send += frame.serialize()

    def take_output(self) -> list:
        """Everything queued for the wire, as a list of bytes-like pieces in order."""
        out = self._out
        if self._data_to_send:
            out.append(self._data_to_send)
            self._data_to_send = bytearray()
        self._out = []
        return out

    def data_to_send(self, amount: int | None = None) -> bytes:
        if self._out:
            self._data_to_send = bytearray(b"".join(self.take_output()))
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        self._out = []
        super().clear_outbound_data_buffer()

    def receive_data_frame(self, frame: DataFrame) -> list:
        """One whole DATA frame that was read outside h2's frame buffer
        (``H2Connection._take_body``), with ``receive_data``'s handling of a
        protocol error: the connection is terminated and the error raised."""
        try:
            return self._receive_frame(frame)
        except h2.exceptions.ProtocolError as exc:
            self._terminate_connection(exc.error_code)
            raise

    def _receive_frame(self, frame):
        """DATA frames skip h2's trace line, whose argument is computed eagerly.

        h2 calls ``logger.trace("Received frame: %s", repr(frame))`` for every
        frame even when nothing logs, and hyperframe's DATA ``repr`` hex-encodes
        the whole payload before cutting it to 20 characters: 2 MB of hex for a
        1 MiB frame, 37 % of the receiving agent's time in the bulk profile
        (bench/notes.md). For DATA, h2's own ``_receive_frame`` reduces to the
        two calls below: ``_receive_data_frame`` handles a closed stream itself
        and raises nothing that ``_receive_frame`` would catch (h2 4.x; the
        unit tests of tests/unit/test_h2_tunnel.py and test_pipe.py cover DATA
        on open, ended and reset streams). Every other frame goes the usual way.
        """
        if frame.__class__ is DataFrame:
            frames, events = self._receive_data_frame(frame)
            self._prepare_for_sending(frames)
            return events
        return super()._receive_frame(frame)

    def _receive_goaway_frame(self, frame):
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def _receive_headers_frame(self, frame):
        """Errors that concern one request refuse that stream, not the connection.

        Stock h2 answers a request over MAX_CONCURRENT_STREAMS and a malformed
        request (a CONNECT with ``:path``, a header with whitespace) with a
        connection error: GOAWAY, and every stream in flight is lost. RFC 9113
        5.1.2 and 8.1.1 make both stream errors: RST_STREAM(REFUSED_STREAM)
        and RST_STREAM(PROTOCOL_ERROR). The header block is always decoded
        first, so the HPACK state stays in step with the peer's; an HPACK
        error stays a connection error. (Checked against h2 4.x internals:
        ``highest_inbound_stream_id``, ``_closed_streams``; see
        tests/unit/test_h2_limits.py.)
        """
        sid = frame.stream_id
        new = sid not in self.streams
        if (new and not self.config.client_side and sid > self.highest_inbound_stream_id
                and self.open_inbound_streams + 1 > self.local_settings.max_concurrent_streams):
            h2.connection._decode_headers(self.decoder, frame.data)
            self.highest_inbound_stream_id = sid
            self._closed_streams[sid] = h2.stream.StreamClosedBy.SEND_RST_STREAM
            rst = RstStreamFrame(sid)
            rst.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
            self.refused_streams += 1
            return [rst], []
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError:
            if not (new and sid in self.streams) or self.config.client_side:
                raise
            # Decoded, the stream exists, and its request is malformed.
            self.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            self.refused_streams += 1
            return [], []


class StreamReset(ConnectionError):
    """The peer reset the stream (RST_STREAM) or the connection went away."""


class H2Stream:
    """One CONNECT stream.

    Two ways to use it. Attached to another end of a pipe (``attach``, the
    data path: ``tunnel.bridge``), received DATA goes straight to that end
    from the connection's ``data_received`` and is acknowledged to the peer
    at once unless that end asked to pause (then the acknowledgement waits:
    the peer stops after one stream window); bytes given to ``send`` go into
    h2 at once, or wait for the window while the other end stops reading.
    Not attached, ``read()``/``write()`` are coroutines (tests, simple uses).
    """

    # An idle tunnelled connection holds one of these per agent: slots, and
    # the futures, events and queues only some uses need are made on demand.
    __slots__ = ("conn", "id", "request_headers", "response", "task", "responded", "_chunks",
                 "_readable", "_window", "remote_ended", "local_ended", "reset_code", "closed",
                 "peer", "pipe", "attr", "_pending", "_eof_pending", "_pausers", "_held", "_finished")

    def __init__(self, conn: H2Connection, stream_id: int, client: bool = False) -> None:
        self.conn = conn
        self.id = stream_id
        self.request_headers: list[tuple[str, str]] = []
        self.response: asyncio.Future | None = None    # client side: the response headers
        if client:
            self.response = conn._loop.create_future()
            self.response.add_done_callback(_retrieved)
        self.task: asyncio.Task | None = None      # server side: the request's handler
        self.responded = False
        self._chunks: collections.deque[tuple[bytes, int]] = _NO_QUEUE   # made when needed
        self._readable: asyncio.Event | None = None    # read()/write() only
        self._window: asyncio.Event | None = None
        self.remote_ended = False
        self.local_ended = False
        self.reset_code: int | None = None
        self.closed = False
        # Pipe mode (attach): the other end, the counter attribute for bytes
        # received here, and what waits for the peer's window.
        self.peer: appsock.End | None = None
        self.pipe: appsock.Pipe | None = None
        self.attr = ""
        self._pending: collections.deque[memoryview] = _NO_QUEUE
        self._eof_pending = False
        self._pausers: set[str] = _NO_PAUSERS
        self._held = 0               # received bytes not yet acknowledged (paused)
        self._finished = False

    def _wake(self) -> None:
        """Wake a read()/write() coroutine, if one ever waited."""
        if self._readable is not None:
            self._readable.set()
        if self._window is not None:
            self._window.set()

    # -- pipe mode -------------------------------------------------------------

    def attach(self, peer, pipe, attr: str) -> None:
        """Connect the other end of the pipe; data that arrived before goes now."""
        self.peer, self.pipe, self.attr = peer, pipe, attr
        if not self.conn._can_write.is_set():
            peer.pause_reading("h2-conn")
        while self._chunks:
            data, flow_len = self._chunks.popleft()
            pipe.count(attr, len(data))
            peer.send(data)
            self._held += flow_len
        if self.reset_code is not None:
            self._finish(reset=True)
            peer.send_reset()
            return
        self._release_held()
        if self.remote_ended:
            peer.send_eof()
        self._maybe_finish()

    def send(self, data: bytes) -> None:
        if self.reset_code is not None or self.conn.closed or self.local_ended:
            return
        if data.__class__ is not bytes:
            data = bytes(data)         # the frames keep views of it until written
        if self._pending:
            self._pending.append(memoryview(data))
            return
        rest = self._push(memoryview(data), data)
        if rest:
            self._pending = collections.deque((rest,))
            self.peer.pause_reading("h2-window")  # type: ignore[union-attr]  # send() is the attached peer's

    def _push(self, view: memoryview, whole: bytes | None = None) -> memoryview:
        """Send as much of ``view`` as the windows allow; returns the rest."""
        conn = self.conn
        try:
            while view:
                size = conn.sendable(self.id)
                if size <= 0:
                    break
                # No copy: the views are of immutable bytes (``send`` is given
                # bytes), and a DATA frame's payload goes to the transport as
                # it is (``_HboneH2._prepare_for_sending``).
                if size >= len(view):
                    conn.h2.send_data(self.id, whole if whole is not None else view)
                    view = view[len(view):]
                else:
                    conn.h2.send_data(self.id, view[:size])
                    view = view[size:]
                whole = None
        except h2.exceptions.StreamClosedError:
            # h2 handles a whole read before we see its events: the peer's
            # RST_STREAM may already have closed the stream while a WINDOW_UPDATE
            # of the same read is being handled. Its StreamReset event follows
            # and resets the other end; what was pending is dropped with it.
            self._pending = _NO_QUEUE
            view = view[len(view):]
        conn.schedule_flush()
        return view

    def _window_opened(self) -> None:
        if self.peer is None:
            if self._window is not None:
                self._window.set()
            return
        pending = self._pending
        while pending and self.reset_code is None and not self.conn.closed:
            rest = self._push(pending[0])
            if rest:
                pending[0] = rest
                return                 # still waiting for the window; the peer stays paused
            if pending:                # (_push empties it when h2 already closed the stream)
                pending.popleft()
        if pending or self.reset_code is not None:
            return
        self.peer.resume_reading("h2-window")
        if self._eof_pending:
            self._eof_pending = False
            self.end()

    def send_eof(self) -> None:
        if self._pending:
            self._eof_pending = True
        else:
            self.end()

    def send_reset(self) -> None:
        self.reset(h2.errors.ErrorCodes.CONNECT_ERROR)

    def pause_reading(self, reason: str) -> None:
        if self._pausers is _NO_PAUSERS:
            self._pausers = set()
        self._pausers.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._pausers:
            self._pausers.discard(reason)
            if not self._pausers:
                self._release_held()

    def _release_held(self) -> None:
        if self._held and not self._pausers:
            held, self._held = self._held, 0
            self.conn._consumed(self.id, held)

    def _finish(self, reset: bool) -> None:
        if not self._finished and self.pipe is not None:
            self._finished = True
            self.pipe.finished(reset)

    def _maybe_finish(self) -> None:
        if self.remote_ended and self.local_ended and self.reset_code is None:
            self._finish(reset=False)

    # -- receiving ---------------------------------------------------------

    def _feed(self, data: bytes, flow_len: int) -> None:
        peer = self.peer
        if peer is None:
            if data.__class__ is memoryview:  # type: ignore[comparison-overlap]  # _body_done's, h2 says bytes
                data = data.tobytes()      # a pooled body buffer: queued chunks keep their own
            if not self._chunks:
                self._chunks = collections.deque()
            self._chunks.append((data, flow_len))
            if self._readable is not None:
                self._readable.set()
            return
        self.pipe.count(self.attr, len(data))  # type: ignore[union-attr]  # attach() sets peer and pipe
        peer.send(data)
        if self._pausers:
            self._held += flow_len
        else:
            self.conn._consumed(self.id, flow_len, flush=False)

    def _end(self) -> None:
        self.remote_ended = True
        if self.peer is not None:
            self.peer.send_eof()
            self._maybe_finish()
        else:
            self._wake()

    def _reset(self, code: int) -> None:
        self.reset_code = code
        self._wake()
        if self.response is not None and not self.response.done():
            self.response.set_exception(StreamReset(f"stream {self.id} reset by peer (code {code})"))
        if self.peer is not None:
            self._finish(reset=True)
            self.peer.send_reset()

    async def read(self) -> bytes:
        """Next chunk of data; b"" at END_STREAM; raises StreamReset."""
        while True:
            if self._chunks:
                data, flow_len = self._chunks.popleft()
                self.conn._consumed(self.id, flow_len)
                return data
            if self.reset_code is not None:
                raise StreamReset(f"stream {self.id} reset (code {self.reset_code})")
            if self.remote_ended:
                return b""
            if self._readable is None:
                self._readable = asyncio.Event()
            self._readable.clear()
            await self._readable.wait()

    def buffered(self) -> int:
        return sum(len(d) for d, _ in self._chunks)

    # -- sending -----------------------------------------------------------

    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self.reset_code is not None or self.conn.closed:
                raise StreamReset(f"stream {self.id} is reset")
            size = self.conn.sendable(self.id)
            if size <= 0:
                if self._window is None:
                    self._window = asyncio.Event()
                self._window.clear()
                await self._window.wait()
                continue
            chunk = data if size >= len(view) and isinstance(data, bytes) and len(view) == len(data) \
                else view[:size].tobytes()
            self.conn.h2.send_data(self.id, chunk)
            self.conn.flush()
            view = view[size:]
            await self.conn.drain()

    def end(self) -> None:
        if self.local_ended or self.reset_code is not None or self.conn.closed:
            return
        self.local_ended = True
        try:
            self.conn.h2.end_stream(self.id)
            self.conn.schedule_flush()
        except h2.exceptions.H2Error:
            pass
        self._maybe_finish()
        self.conn._maybe_forget(self)

    def reset(self, code: int = h2.errors.ErrorCodes.CONNECT_ERROR) -> None:
        if self.reset_code is not None or self.conn.closed:
            if self.peer is not None:
                self._finish(reset=True)
            return
        self.reset_code = code
        try:
            self.conn.h2.reset_stream(self.id, code)
            self.conn.schedule_flush()
        except h2.exceptions.H2Error:
            pass
        self._wake()
        self._pending = _NO_QUEUE
        self._finish(reset=True)
        self.conn._forget(self)

    def respond(self, status: int, headers: Sequence[tuple[str, str]] = (), end: bool = False) -> None:
        """Server side: send the response headers."""
        self.conn.h2.send_headers(self.id, [(":status", str(status)), *headers], end_stream=end)
        self.responded = True
        if end:
            self.local_ended = True
        self.conn.flush()


# Shared empty stand-ins (typed Any: each stands in for an empty set, deque or
# list, and is only read, or tested for truth, until replaced by a real one).
_NO_PAUSERS: Any = frozenset()
_NO_QUEUE: Any = ()          # an empty queue until a stream needs one (most never do)
_NO_HEADERS: Any = ()

RequestHandler = Callable[[H2Stream], Awaitable[None]]


class H2Connection(asyncio.BufferedProtocol):
    """One HTTP/2 connection carrying HBONE streams.

    A buffered protocol: the transport (TLS) decrypts into a buffer we hand
    it. Usually that is the loop's shared scratch buffer, and h2's frame
    buffer copies from it. When a large DATA frame's header has been read,
    its body gets a buffer of its own and the transport decrypts straight
    into it (``_take_body``): the payload is then not copied by h2's frame
    buffer three times (append, slice, ``tobytes``), which was most of the
    receiving agent's time in bulk transfers (bench/notes.md).
    """

    def __init__(self, client_side: bool, on_request: RequestHandler | None = None,
                 name: str = "", verify: Callable[[asyncio.BaseTransport], str] | None = None) -> None:
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.h2 = _HboneH2(config=config)
        self.h2.local_settings = h2.settings.Settings(client=client_side, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS_PER_CONNECTION,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # h2 sized its inbound frame check from the default settings when it
        # was built; replacing local_settings does not update it, and the
        # peer may send 1 MiB frames as soon as it has read our SETTINGS.
        self.h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self.client_side = client_side
        self.on_request = on_request
        self.name = name
        self.verify = verify
        self.peer_identity = ""
        self.streams: dict[int, H2Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.goaway_received = False
        self.goaway_sent = False
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future = self._loop.create_future()
        self.ready: asyncio.Future = self._loop.create_future()
        self.ready.add_done_callback(_retrieved)
        self.last_activity = self._loop.time()
        self.frames_received = False           # any HTTP/2 bytes from the peer yet
        self.streams_idle_since: float | None = self.last_activity
        self._budgets = {
            "PING": limits.Budget(limits.PING_BURST, limits.PING_RATE),
            "SETTINGS": limits.Budget(limits.SETTINGS_BURST, limits.SETTINGS_RATE),
            "early stream resets": limits.Budget(limits.EARLY_RESET_BURST, limits.EARLY_RESET_RATE),
            "refused streams": limits.Budget(limits.REFUSED_BURST, limits.REFUSED_RATE),
        }
        self._refused_seen = 0
        self.calmed = ""                       # why we sent GOAWAY ENHANCE_YOUR_CALM
        self._can_write = asyncio.Event()
        self._can_write.set()         # cleared while the TLS transport's buffer is full
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self._pings: dict[bytes, asyncio.Future] = {}
        # A large DATA frame being read into its own buffer: the body, how
        # much of it has arrived, its stream and flags.
        self._body: memoryview | None = None
        self._body_filled = 0
        self._body_stream = 0
        self._body_flags = 0

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)     # a TLS transport: loop.create_server/connect
        self.transport = transport
        # Room for a few DATA frames of several streams before every stream's
        # other end is paused (the default 64 KiB is a quarter of one read).
        transport.set_write_buffer_limits(high=TLS_WRITE_HIGH, low=TLS_WRITE_LOW)
        if self.verify is not None:
            # Checked before a single HTTP/2 byte is sent or read: a peer
            # without an acceptable identity never gets a stream served.
            try:
                self.peer_identity = self.verify(transport)
            except Exception as exc:
                # forward.py's record of the refusal goes to the access log.
                log.debug("%s: refused peer: %s", self.name, exc)
                self.closed = True
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(str(exc)))
                if not self.done.done():
                    self.done.set_result(True)
                transport.abort()
                return
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.flush()
        if not self.ready.done():
            self.ready.set_result(True)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return self._body[self._body_filled:]
        return appsock.scratch()

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is None:
            view = appsock.scratch()[:nbytes]
            # At a frame boundary (h2 holds nothing): a large DATA frame's
            # start goes straight into its own buffer. Otherwise h2's frame
            # buffer copies it before anything else runs.
            if (self.h2.incoming_buffer._data or self.closed
                    or not self._begin_body(view, nbytes)):
                self.data_received(view)
            else:
                self.last_activity = self._loop.time()
            return
        self._body_filled += nbytes
        if self._body_filled >= len(self._body):
            self._body_done()

    def data_received(self, data) -> None:
        if self.closed:
            return
        if self._body is not None:
            # Not through get_buffer (a plain call): fill the body, and what
            # follows it goes the usual way.
            view = memoryview(data)
            take = min(len(view), len(self._body) - self._body_filled)
            self._body[self._body_filled:self._body_filled + take] = view[:take]
            self._body_filled += take
            if self._body_filled >= len(self._body):
                self._body_done()
            if take < len(view):
                self.data_received(view[take:])
            return
        self.last_activity = self._loop.time()
        self.frames_received = True
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._handle(events)
        if not self.closed:
            self._take_body()

    def _protocol_error(self, exc: Exception) -> None:
        _problems.report(logging.WARNING, problem_key("h2 protocol error", str(exc)),
                         "%s: HTTP/2 protocol error from peer: %s; closing", self.name, exc)
        self.flush()
        self._abort_all()
        if self.transport:
            self.transport.close()

    def _take_body(self) -> None:
        """Read the large DATA frame that h2's buffer has begun into a buffer of its own.

        After ``receive_data`` h2's frame buffer holds only an incomplete
        frame, starting at a frame boundary; ``buffer_updated`` also calls
        ``_begin_body`` directly when a read starts at a frame boundary
        (h2's buffer empty), so that the first part of the frame is not
        copied into h2's buffer on the way. When the frame is a large,
        unpadded DATA frame for one of our streams (and no header block is
        open, and the HTTP/2 preface is done), its body moves to a buffer
        of its exact length, which ``get_buffer`` hands to the transport
        until it is full. h2 then handles the frame as if its frame buffer
        had produced it (``_body_done``), with the same checks. What a peer
        can make us hold does not change: h2's buffer would hold the same
        frame, and its length was checked against our maximum frame size
        (1 MiB). This reads h2 4.x's ``FrameBuffer`` internals (``_data``,
        ``_preamble_len``, ``_headers_buffer``); tests/unit/test_h2_frames.py
        holds the result to stock h2's over every way of cutting the bytes.
        """
        data = self.h2.incoming_buffer._data
        if len(data) >= 9:
            with memoryview(data) as view:
                taken = self._begin_body(view, len(data))
            if taken:
                del data[:]

    def _begin_body(self, view: memoryview, n: int) -> bool:
        """``view[:n]`` starts with a frame header: take the frame's body if it qualifies."""
        if n < 9 or view[3] != 0:
            return False
        fb = self.h2.incoming_buffer
        if fb._preamble_len or fb._headers_buffer:
            return False
        length = (view[0] << 16) | (view[1] << 8) | view[2]
        flags = view[4]
        if length < BIG_DATA or length > self.h2.max_inbound_frame_size or flags & _PADDED:
            return False
        have = n - 9
        stream_id = int.from_bytes(view[5:9], "big") & 0x7FFFFFFF
        stream = self.streams.get(stream_id)
        if have >= length or stream is None or stream.reset_code is not None:
            return False
        body = _body_buffer(length)
        body[:have] = view[9:n]
        self._body, self._body_filled = body, have
        self._body_stream, self._body_flags = stream_id, flags
        return True

    def _body_done(self) -> None:
        # Called once the body _take_body started is complete: it is set.
        body, self._body = cast(memoryview, self._body), None
        frame = DataFrame(self._body_stream)
        frame.data = body  # type: ignore[assignment]  # hyperframe takes any buffer
        frame.body_len = len(body)
        if self._body_flags & _END_STREAM:
            frame.flags.add("END_STREAM")
        self.last_activity = self._loop.time()
        try:
            events = self.h2.receive_data_frame(frame)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._handle(events)

    def _handle(self, events) -> None:
        for event in events:
            try:
                self._dispatch(event)
            except Exception as exc:
                # A failure while handling one stream's event costs that stream,
                # never the connection and the other streams on it.
                sid = getattr(event, "stream_id", 0) or 0
                _problems.report(logging.ERROR, problem_key("h2 event", type(event).__name__,
                                                            type(exc).__name__, str(exc)),
                                 "%s: handling %s failed: %s: %s", self.name, type(event).__name__,
                                 type(exc).__name__, exc)
                stream = self.streams.get(sid)
                if stream is None:
                    raise
                stream._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            if self.closed:
                return
        if self.h2.refused_streams != self._refused_seen:
            n = self.h2.refused_streams - self._refused_seen
            self._refused_seen = self.h2.refused_streams
            if not self._budgets["refused streams"].spend(self.last_activity, n):
                self._calm("refused streams")
                return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._body = None
        self._abort_all()

    def pause_writing(self) -> None:
        # The TLS transport's buffer is full: every attached stream's other
        # end stops reading until it drains (bounded memory per connection).
        self._can_write.clear()
        for stream in list(self.streams.values()):
            if stream.peer is not None:
                stream.peer.pause_reading("h2-conn")

    def resume_writing(self) -> None:
        self._can_write.set()
        for stream in list(self.streams.values()):
            if stream.peer is not None:
                stream.peer.resume_reading("h2-conn")

    # -- events ------------------------------------------------------------

    def _dispatch(self, event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.reset_code is not None:
                # Not ours any more: give the window back so the connection lives on.
                self._consumed(event.stream_id, event.flow_controlled_length, flush=False)
                return
            stream._feed(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.RequestReceived):
            stream = H2Stream(self, event.stream_id)
            # header_encoding="utf-8": h2 hands over str pairs, which its types cannot say.
            stream.request_headers = list(cast("list[tuple[str, str]]", event.headers))
            self.streams[event.stream_id] = stream
            self.streams_idle_since = None
            if event.stream_ended:
                stream._end()
            if self.on_request is None or self.goaway_sent:
                stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
                self.streams.pop(event.stream_id, None)
                return
            task = asyncio.ensure_future(self._serve(stream))
            stream.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream and stream.response is not None and not stream.response.done():
                stream.response.set_result(list(event.headers))
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream:
                stream._end()
                self._maybe_forget(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream:
                self._stream_gone()
                if not self.client_side and not stream.responded:
                    # Reset before we answered: stop its handler, so that no
                    # upstream connection is opened for it (rapid reset), and
                    # count it against the peer's budget.
                    if stream.task is not None and stream.peer is None:
                        stream.task.cancel()
                    if not self._budgets["early stream resets"].spend(self.last_activity):
                        stream._reset(event.error_code)
                        self._calm("early stream resets")
                        return
                stream._reset(event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in list(self.streams.values()):
                    stream._window_opened()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._window_opened()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in list(self.streams.values()):
                stream._window_opened()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_received = True
            # last_stream_id speaks of streams the *receiver* opened: only a
            # client has streams the peer may not have seen (RFC 9113 6.8).
            if self.client_side:
                last = event.last_stream_id or 0
                for sid, stream in list(self.streams.items()):
                    if sid > last:
                        stream._reset(h2.errors.ErrorCodes.REFUSED_STREAM)
            if not self.streams and self.transport:
                self.transport.close()
        elif isinstance(event, h2.events.PingAckReceived):
            fut = self._pings.pop(event.ping_data, None)
            if fut and not fut.done():
                fut.set_result(True)
        elif isinstance(event, h2.events.PingReceived) and not self._budgets["PING"].spend(self.last_activity):
            self._calm("PING")
        if (isinstance(event, h2.events.RemoteSettingsChanged)
                and not self._budgets["SETTINGS"].spend(self.last_activity)):
            self._calm("SETTINGS")

    async def _serve(self, stream: H2Stream) -> None:
        try:
            await self.on_request(stream)  # type: ignore[misc]  # _dispatch serves only with on_request set
        except asyncio.CancelledError:
            stream.reset(h2.errors.ErrorCodes.CANCEL)
        except Exception as exc:
            # One line, not a traceback: a peer can make handlers fail at
            # will, and the log must not grow with it.
            _problems.report(logging.ERROR, problem_key("stream handler", type(exc).__name__, str(exc)),
                             "%s: stream %d handler failed: %s: %s", self.name, stream.id,
                             type(exc).__name__, exc)
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            stream.closed = True
            stream.task = None         # an open tunnel keeps no finished task alive
            stream.request_headers = _NO_HEADERS   # read by the handler; ~1 KB an open tunnel need not keep
            self._maybe_forget(stream)

    def _maybe_forget(self, stream: H2Stream) -> None:
        if stream.remote_ended and (stream.local_ended or stream.reset_code is not None):
            self._forget(stream)

    def _forget(self, stream: H2Stream) -> None:
        """The stream is over on our side: it no longer counts against capacity."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self._stream_gone()
        if (self.goaway_received or self.goaway_sent) and not self.streams and self.transport:
            self.flush()
            self.transport.close()

    def _stream_gone(self) -> None:
        if not self.streams:
            self.streams_idle_since = self._loop.time()

    def _calm(self, what: str) -> None:
        """The peer ran a budget dry: GOAWAY ENHANCE_YOUR_CALM, then close."""
        if self.closed:
            return
        self.calmed = what
        _problems.report(logging.WARNING, ("h2 budget", what),
                         "%s: peer exceeded its %s budget; GOAWAY ENHANCE_YOUR_CALM", self.name, what)
        # h2 has already queued its answers to the whole read (a PING ACK per
        # PING): they are dropped, the peer gets only the GOAWAY.
        self.h2.clear_outbound_data_buffer()
        try:
            self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        except h2.exceptions.H2Error:
            pass
        self.flush()
        self._abort_all()
        if self.transport is not None:
            self.transport.close()

    async def serve(self, preface_seconds: float = limits.PREFACE_SECONDS,
                    idle_seconds: float = limits.IDLE_SECONDS) -> None:
        """Server side: run until the connection ends, closing it when the
        peer sends no HTTP/2 preface within ``preface_seconds`` or keeps it
        open without a stream for ``idle_seconds`` (PINGs do not count)."""
        loop = self._loop
        started = loop.time()
        while not self.done.done():
            now = loop.time()
            if not self.frames_received:
                wait = started + preface_seconds - now
                why = f"no HTTP/2 preface within {preface_seconds:g}s"
            elif self.streams_idle_since is not None:
                wait = self.streams_idle_since + idle_seconds - now
                why = f"no stream for {idle_seconds:g}s"
            else:
                wait = idle_seconds
                why = ""
            if wait <= 0 and why:
                log.debug("%s: closing: %s", self.name, why)
                self.close()
                break
            await asyncio.wait([self.done], timeout=max(wait, 0.05))
        await self.done

    def _abort_all(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in list(self.streams.values()):
            stream._reset(h2.errors.ErrorCodes.CANCEL)
        self.streams.clear()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_result(False)
        self._can_write.set()
        if not self.done.done():
            self.done.set_result(True)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection closed before it was ready"))

    # -- helpers for streams -----------------------------------------------

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self.h2.take_output()
        if out and self.transport is not None and not self.transport.is_closing():
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)

    def schedule_flush(self) -> None:
        """Write what h2 has queued at the end of this event-loop turn.

        Every stream of the connection that sends in the same turn (and the
        WINDOW_UPDATEs for data received in it) then goes out as one TLS
        write: fewer records and one send() instead of one per message.
        """
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    async def drain(self) -> None:
        await self._can_write.wait()

    def sendable(self, stream_id: int) -> int:
        try:
            return min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
        except (h2.exceptions.StreamClosedError, KeyError):
            return -1

    def _consumed(self, stream_id: int, flow_len: int, flush: bool = True) -> None:
        """Give ``flow_len`` bytes of window back to the peer.

        ``flush=False``: the caller is inside ``data_received``, which writes
        once when all events of that read are handled.
        """
        if flow_len and not self.closed:
            try:
                self.h2.acknowledge_received_data(flow_len, stream_id)
            except (h2.exceptions.StreamClosedError, KeyError):
                self.h2.increment_flow_control_window(flow_len)   # the connection's share
            except h2.exceptions.H2Error:
                pass
            if flush:
                self.schedule_flush()

    # -- client side -------------------------------------------------------

    def capacity(self) -> int:
        """How many more streams this connection may open now."""
        if self.closed or self.goaway_received or self.goaway_sent:
            return 0
        limit = min(MAX_STREAMS_PER_CONNECTION, self.h2.remote_settings.max_concurrent_streams)
        return limit - len(self.streams)

    async def open_stream(self, headers: list[tuple[str, str]]) -> tuple[H2Stream, list]:
        """Send a request; returns the stream and the response headers."""
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, stream_id, client=True)
        self.streams[stream_id] = stream
        self.h2.send_headers(stream_id, headers, end_stream=False)
        self.flush()
        self.last_activity = self._loop.time()
        try:
            response = await stream.response  # type: ignore[misc]  # client=True: set in __init__
            stream.response = None     # answered: an open tunnel need not keep the headers
        except BaseException:
            # Timed out or cancelled (or reset): the stream must not keep
            # counting against this connection's capacity.
            stream.reset(h2.errors.ErrorCodes.CANCEL)
            raise
        return stream, response

    async def ping(self, timeout: float) -> bool:
        import os
        data = os.urandom(8)
        fut = asyncio.get_running_loop().create_future()
        self._pings[data] = fut
        try:
            self.h2.ping(data)
            self.flush()
            return await asyncio.wait_for(fut, timeout)
        except (TimeoutError, h2.exceptions.H2Error):
            return False
        finally:
            self._pings.pop(data, None)

    def goaway(self) -> None:
        """Graceful: tell the peer to open no new streams; open ones may finish.

        ``h2``'s ``close_connection`` moves its state machine to CLOSED, after
        which even open streams cannot send, so the GOAWAY frame is written
        here directly and h2 keeps serving the streams already open.
        """
        if self.closed or self.goaway_sent or self.transport is None:
            return
        self.goaway_sent = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = 0
        self.flush()
        self.transport.write(frame.serialize())
        if not self.streams:
            self.transport.close()

    def close(self) -> None:
        """Now: GOAWAY and close, cutting whatever is still open."""
        if not self.closed:
            try:
                self.h2.close_connection()
                self.flush()
            except h2.exceptions.H2Error:
                pass
        if self.transport is not None:
            self.transport.close()
