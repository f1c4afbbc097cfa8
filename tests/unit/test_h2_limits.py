"""What one HTTP/2 peer may make the HBONE server do, over real TLS on loopback.

The peer here is a raw h2 client (not our H2Connection), so it can do what
a hostile or broken peer does: open too many streams, send malformed
requests, reset streams at once, flood PINGs, or never speak at all.
"""

from __future__ import annotations

import asyncio
import socket

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from agent.proxy import limits
from agent.proxy.h2conn import H2Connection
from agent.proxy.limits import Budget
from tests.unit.test_h2_tunnel import contexts


def connect_headers(authority="127.0.0.1:9", extra=()):
    return [(":method", "CONNECT"), (":authority", authority), *extra]


class RawPeer:
    """A raw h2 client over TLS: sends what it is told, collects events."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                      header_encoding="utf-8"))
        self.events: list = []

    @classmethod
    async def open(cls, port, cctx, preface=True):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname="")
        peer = cls(reader, writer)
        if preface:
            peer.h2.initiate_connection()
            peer.flush()
        return peer

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def pump(self, until, timeout=5.0):
        """Read and collect events until ``until(events)`` or EOF; returns whether it held."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not until(self.events):
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except (asyncio.TimeoutError, ConnectionError):
                return until(self.events)
            if not data:
                return until(self.events)
            try:
                self.events.extend(self.h2.receive_data(data))
            except h2.exceptions.ProtocolError:
                return until(self.events)
            self.flush()
        return True

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]

    def close(self):
        self.writer.close()


async def serve(sctx, handler, **serve_args):
    loop = asyncio.get_running_loop()
    conns: list[H2Connection] = []
    tasks = []

    def factory():
        conn = H2Connection(False, on_request=handler, name="test server")
        conns.append(conn)
        return conn

    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=sctx)

    def watch():
        for conn in conns:
            if not getattr(conn, "_watched", False):
                conn._watched = True
                tasks.append(asyncio.ensure_future(conn.serve(**serve_args)))
    return server, server.sockets[0].getsockname()[1], conns, watch


def test_a_stream_over_the_limit_is_refused_alone_and_the_connection_lives(tmp_path):
    sctx, cctx, _, _ = contexts(tmp_path)

    async def main():
        async def handler(stream):
            stream.respond(200)
            await asyncio.sleep(30)

        server, port, _conns, _ = await serve(sctx, handler)
        peer = await RawPeer.open(port, cctx)
        # The peer ignores our MAX_CONCURRENT_STREAMS (100) and opens 101.
        peer.h2.remote_settings.max_concurrent_streams = 1000
        ids = []
        for _ in range(101):
            sid = peer.h2.get_next_available_stream_id()
            peer.h2.send_headers(sid, connect_headers())
            ids.append(sid)
        peer.flush()
        assert await peer.pump(lambda ev: len([e for e in ev if isinstance(e, h2.events.ResponseReceived)]) >= 100
                               and any(isinstance(e, h2.events.StreamReset) for e in ev))
        resets = peer.of(h2.events.StreamReset)
        assert [(r.stream_id, r.error_code) for r in resets] == [(ids[-1], h2.errors.ErrorCodes.REFUSED_STREAM)]
        assert not peer.of(h2.events.ConnectionTerminated)
        # The connection still serves: end one stream, then a new one is answered.
        peer.h2.reset_stream(ids[0], h2.errors.ErrorCodes.CANCEL)
        sid = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(sid, connect_headers())
        peer.flush()
        assert await peer.pump(lambda ev: any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid
                                              for e in ev))
        peer.close()
        server.close()
    asyncio.run(main())


@pytest.mark.parametrize("bad", [
    [(":path", "/x")],                      # CONNECT must not carry :path (RFC 9113 8.5)
    [("x-bad", " leading whitespace")],     # field value with leading whitespace
])
def test_a_malformed_request_resets_only_its_stream(tmp_path, bad):
    sctx, cctx, _, _ = contexts(tmp_path)

    async def main():
        async def handler(stream):
            stream.respond(200)
            await asyncio.sleep(30)

        server, port, _conns, _ = await serve(sctx, handler)
        peer = await RawPeer.open(port, cctx)
        good = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(good, connect_headers())
        peer.flush()
        assert await peer.pump(lambda ev: any(isinstance(e, h2.events.ResponseReceived) for e in ev))
        # Our own client would refuse to send this: write it past h2's checks.
        peer.h2.config.validate_outbound_headers = False
        peer.h2.config.normalize_outbound_headers = False
        sid = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(sid, connect_headers(extra=bad))
        peer.flush()
        assert await peer.pump(lambda ev: any(isinstance(e, h2.events.StreamReset) for e in ev))
        reset = peer.of(h2.events.StreamReset)[0]
        assert (reset.stream_id, reset.error_code) == (sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        assert not peer.of(h2.events.ConnectionTerminated)
        peer.h2.send_data(good, b"still here")    # the first stream is untouched
        peer.flush()
        await asyncio.sleep(0.2)
        assert not peer.of(h2.events.ConnectionTerminated)
        peer.close()
        server.close()
    asyncio.run(main())


def test_a_stream_reset_before_the_answer_never_reaches_upstream(tmp_path):
    sctx, cctx, _, _ = contexts(tmp_path)

    async def main():
        started, connected, cancelled = [], [], []
        gate = asyncio.Event()

        async def handler(stream):
            started.append(stream.id)
            try:
                await gate.wait()                 # stands for connecting to the app
            except asyncio.CancelledError:
                cancelled.append(stream.id)
                raise
            connected.append(stream.id)
            stream.respond(200)

        server, port, conns, _ = await serve(sctx, handler)
        peer = await RawPeer.open(port, cctx)
        sid = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(sid, connect_headers())
        peer.flush()
        for _ in range(100):
            if started:
                break
            await asyncio.sleep(0.01)
        peer.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        peer.flush()
        for _ in range(100):
            if cancelled:
                break
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.sleep(0.05)
        assert started == [sid] and cancelled == [sid] and connected == []
        assert not conns[0].closed                # one reset is no offence
        peer.close()
        server.close()
    asyncio.run(main())


def test_rapid_reset_flood_ends_in_enhance_your_calm(tmp_path):
    sctx, cctx, _, _ = contexts(tmp_path)

    async def main():
        upstream = []

        async def handler(stream):
            await asyncio.sleep(0.5)              # connecting to the app
            upstream.append(stream.id)
            stream.respond(200)

        server, port, conns, _ = await serve(sctx, handler)
        peer = await RawPeer.open(port, cctx)
        for _ in range(limits.EARLY_RESET_BURST + 100):
            sid = peer.h2.get_next_available_stream_id()
            peer.h2.send_headers(sid, connect_headers())
            peer.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        peer.flush()
        assert await peer.pump(lambda ev: any(isinstance(e, h2.events.ConnectionTerminated) for e in ev))
        goaway = peer.of(h2.events.ConnectionTerminated)[0]
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        await asyncio.sleep(0.7)
        assert upstream == []                     # not one reset stream went upstream
        assert conns[0].calmed == "early stream resets"
        peer.close()
        server.close()
    asyncio.run(main())


def test_ping_flood_ends_in_enhance_your_calm(tmp_path):
    sctx, cctx, _, _ = contexts(tmp_path)

    async def main():
        async def handler(stream):
            stream.respond(200)

        server, port, conns, _ = await serve(sctx, handler)
        peer = await RawPeer.open(port, cctx)
        for i in range(limits.PING_BURST * 3):
            peer.h2.ping(i.to_bytes(8, "big"))
        peer.flush()
        assert await peer.pump(lambda ev: any(isinstance(e, h2.events.ConnectionTerminated) for e in ev))
        assert peer.of(h2.events.ConnectionTerminated)[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        # The answers h2 queued for the flood are dropped with the connection.
        assert len(peer.of(h2.events.PingAckReceived)) <= limits.PING_BURST
        peer.close()
        server.close()
    asyncio.run(main())


def test_silent_and_idle_connections_are_closed(tmp_path):
    sctx, cctx, _, _ = contexts(tmp_path)

    async def main():
        async def handler(stream):
            stream.respond(200, end=True)

        server, port, conns, watch = await serve(sctx, handler, preface_seconds=0.3, idle_seconds=0.6)
        silent = await RawPeer.open(port, cctx, preface=False)      # TLS, then nothing
        idle = await RawPeer.open(port, cctx)                       # preface, never a stream
        await asyncio.sleep(0.1)
        watch()
        assert await silent.pump(lambda ev: False, timeout=3) is False
        assert conns[0].done.done()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(asyncio.shield(conns[1].done), 3)
        assert loop.time() - t0 >= 0.3            # not before the idle time
        for p in (silent, idle):
            p.close()
        server.close()
    asyncio.run(main())


def test_budget_refills_at_its_rate():
    b = Budget(burst=3, rate=2.0)
    assert [b.spend(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.spend(0.5) and not b.spend(0.5)      # 0.5 s at 2/s: one token back
    assert b.spend(10.0, cost=3) and not b.spend(10.0)   # never more than the burst


def test_data_on_a_stream_we_reset_keeps_the_connection_and_its_window(tmp_path):
    """DATA that was in flight when we reset a stream: h2 answers it, the
    connection window comes back, and the connection keeps serving."""
    sctx, cctx, _, _ = contexts(tmp_path)

    async def main():
        async def handler(stream):
            if stream.id == 1:
                stream.reset()                    # refuse the first one at once
                return
            stream.respond(200)
            got = 0
            while got < 200_000:
                chunk = await stream.read()
                if not chunk:
                    break
                got += len(chunk)
            stream.end()

        server, port, conns, _ = await serve(sctx, handler)
        peer = await RawPeer.open(port, cctx)
        first = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(first, connect_headers())
        peer.flush()
        assert await peer.pump(lambda ev: any(isinstance(e, h2.events.StreamReset) for e in ev))
        # The peer had more to say on it, before it saw the reset: 60 KB.
        from hyperframe.frame import DataFrame
        frame = DataFrame(first)
        frame.data = b"z" * 16384
        for _ in range(4):
            peer.writer.write(frame.serialize())
        # A second stream must still get its 200 KB through (needs the connection window).
        second = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(second, connect_headers())
        peer.flush()
        assert await peer.pump(lambda ev: any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == second
                                              for e in ev))
        sent = 0
        while sent < 200_000:
            window = min(peer.h2.local_flow_control_window(second), 16384)
            if window <= 0:
                assert await peer.pump(lambda ev: peer.h2.local_flow_control_window(second) > 0)
                continue
            peer.h2.send_data(second, b"w" * window)
            sent += window
            peer.flush()
        peer.h2.end_stream(second)
        peer.flush()
        assert await peer.pump(lambda ev: any(isinstance(e, h2.events.StreamEnded) and e.stream_id == second
                                              for e in ev))
        assert not peer.of(h2.events.ConnectionTerminated) and not conns[0].closed
        peer.close()
        server.close()
    asyncio.run(main())


def test_closed_streams_remembered_per_connection_are_bounded():
    """A peer that opens and ends streams by the tens of thousands (or has
    them refused) must not grow the connection's memory of closed streams
    past a bound (h2's default 65,536 cost ~11 MB per connection)."""
    from agent.proxy.h2conn import _HboneH2
    server = _HboneH2(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    for _ in range(6000):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, connect_headers(), end_stream=True)
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, [(":status", "200")], end_stream=True)
        client.receive_data(server.data_to_send())
    assert len(server._closed_streams) <= _HboneH2.MAX_CLOSED_STREAMS == 4096
