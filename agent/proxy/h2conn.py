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
from typing import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from agent.proxy.hbone import CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 65535


class _GracefulGoawayH2(h2.connection.H2Connection):
    """h2's connection, except that a graceful GOAWAY (NO_ERROR) leaves open
    streams working, as RFC 9113 6.8 says it should.

    Stock h2 treats any received GOAWAY as the end of the connection: it
    drops queued output and refuses to send on streams that are still open,
    which would cut every tunnel of a draining peer. This overrides the one
    private hook h2 dispatches GOAWAY frames to (checked against h2 4.x);
    errors other than NO_ERROR keep h2's behaviour.
    """

    def _receive_goaway_frame(self, frame):
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class StreamReset(ConnectionError):
    """The peer reset the stream (RST_STREAM) or the connection went away."""


class H2Stream:
    def __init__(self, conn: "H2Connection", stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.request_headers: list[tuple[str, str]] = []
        self.response: asyncio.Future = asyncio.get_running_loop().create_future()
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._readable = asyncio.Event()
        self._window = asyncio.Event()
        self.remote_ended = False
        self.local_ended = False
        self.reset_code: int | None = None
        self.closed = False

    # -- receiving ---------------------------------------------------------

    def _feed(self, data: bytes, flow_len: int) -> None:
        self._chunks.append((data, flow_len))
        self._readable.set()

    def _end(self) -> None:
        self.remote_ended = True
        self._readable.set()

    def _reset(self, code: int) -> None:
        self.reset_code = code
        self._readable.set()
        self._window.set()
        if not self.response.done():
            self.response.set_exception(StreamReset(f"stream {self.id} reset by peer (code {code})"))

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
                self._window.clear()
                await self._window.wait()
                continue
            # Whole bytes objects go as they are (no copy); a slice is copied
            # because h2 keeps what it is given until it is serialised.
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
            self.conn.flush()
        except h2.exceptions.H2Error:
            pass

    def reset(self, code: int = h2.errors.ErrorCodes.CONNECT_ERROR) -> None:
        if self.reset_code is not None or self.conn.closed:
            return
        self.reset_code = code
        try:
            self.conn.h2.reset_stream(self.id, code)
            self.conn.flush()
        except h2.exceptions.H2Error:
            pass
        self._readable.set()
        self._window.set()

    def respond(self, status: int, headers: list[tuple[str, str]] = (), end: bool = False) -> None:
        """Server side: send the response headers."""
        self.conn.h2.send_headers(self.id, [(":status", str(status)), *headers], end_stream=end)
        if end:
            self.local_ended = True
        self.conn.flush()


RequestHandler = Callable[[H2Stream], Awaitable[None]]


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying HBONE streams."""

    def __init__(self, client_side: bool, on_request: RequestHandler | None = None,
                 name: str = "", verify: Callable[[asyncio.BaseTransport], str] | None = None) -> None:
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.h2 = _GracefulGoawayH2(config=config)
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
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.last_activity = asyncio.get_running_loop().time()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._tasks: set[asyncio.Task] = set()
        self._pings: dict[bytes, asyncio.Future] = {}

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.verify is not None:
            # Checked before a single HTTP/2 byte is sent or read: a peer
            # without an acceptable identity never gets a stream served.
            try:
                self.peer_identity = self.verify(transport)
            except Exception as exc:
                log.warning("%s: refused peer: %s", self.name, exc)
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

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = asyncio.get_running_loop().time()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("%s: HTTP/2 protocol error from peer: %s; closing", self.name, exc)
            self.flush()
            self._abort_all()
            if self.transport:
                self.transport.close()
            return
        for event in events:
            self._dispatch(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._abort_all()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- events ------------------------------------------------------------

    def _dispatch(self, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            stream = H2Stream(self, event.stream_id)
            stream.request_headers = list(event.headers)
            self.streams[event.stream_id] = stream
            if event.stream_ended:
                stream._end()
            if self.on_request is None or self.goaway_sent:
                stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
                self.streams.pop(event.stream_id, None)
                return
            task = asyncio.ensure_future(self._serve(stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream and not stream.response.done():
                stream.response.set_result(list(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None or stream.reset_code is not None:
                # Not ours any more: give the window back so the connection lives on.
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id) \
                    if event.stream_id in self.h2.streams else None
                return
            stream._feed(event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream:
                stream._end()
                self._maybe_forget(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream:
                stream._reset(event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            targets = self.streams.values() if event.stream_id == 0 else \
                [s for s in (self.streams.get(event.stream_id),) if s]
            for stream in targets:
                stream._window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream._window.set()
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

    async def _serve(self, stream: H2Stream) -> None:
        try:
            await self.on_request(stream)
        except Exception:
            log.exception("%s: stream %d handler failed", self.name, stream.id)
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            stream.closed = True
            self._maybe_forget(stream)

    def _maybe_forget(self, stream: H2Stream) -> None:
        if stream.remote_ended and (stream.local_ended or stream.reset_code is not None):
            self.streams.pop(stream.id, None)
            if (self.goaway_received or self.goaway_sent) and not self.streams and self.transport:
                self.transport.close()

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
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        await self._can_write.wait()

    def sendable(self, stream_id: int) -> int:
        try:
            return min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
        except (h2.exceptions.StreamClosedError, KeyError):
            return -1

    def _consumed(self, stream_id: int, flow_len: int) -> None:
        if flow_len and not self.closed:
            try:
                self.h2.acknowledge_received_data(flow_len, stream_id)
            except (h2.exceptions.StreamClosedError, KeyError):
                self.h2.increment_flow_control_window(flow_len)   # the connection's share
            except h2.exceptions.H2Error:
                pass
            self.flush()

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
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        self.h2.send_headers(stream_id, headers, end_stream=False)
        self.flush()
        self.last_activity = asyncio.get_running_loop().time()
        response = await stream.response
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
        except (asyncio.TimeoutError, h2.exceptions.H2Error):
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
