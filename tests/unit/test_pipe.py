"""The callback data path (agent/proxy/appsock.py, H2Stream's pipe mode) on
real sockets: backpressure, coalesced writes, orderly ends and crash resets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from agent.proxy import hbone
from agent.proxy.copy import ByteCounter, splice
from agent.proxy.h2conn import H2Connection, H2Stream
from agent.proxy.tunnel import HbonePool, PoolKey, bridge
from tests.unit.test_h2_tunnel import HEADERS, contexts, dial, start_server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(bytes(data))

    def is_closing(self):
        return False

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return default


class NullEnd:
    def __init__(self):
        self.paused: set[str] = set()

    def send(self, data): pass
    def send_eof(self): pass
    def send_reset(self): pass
    def pause_reading(self, reason): self.paused.add(reason)
    def resume_reading(self, reason): self.paused.discard(reason)


def test_streams_sending_in_one_turn_share_one_write():
    async def main():
        conn = H2Connection(client_side=True, name="t")
        transport = FakeTransport()
        conn.connection_made(transport)
        streams = []
        for _ in range(3):
            sid = conn.h2.get_next_available_stream_id()
            conn.h2.send_headers(sid, HEADERS)
            stream = H2Stream(conn, sid)
            conn.streams[sid] = stream
            stream.peer = NullEnd()
            streams.append(stream)
        conn.flush()
        before = len(transport.writes)
        for i, stream in enumerate(streams):
            stream.send(b"x" * (100 + i))       # three application reads in one turn
        assert len(transport.writes) == before  # nothing written yet ...
        await asyncio.sleep(0)
        assert len(transport.writes) == before + 1   # ... then one write for all three
        assert sum(100 + i for i in range(3)) < len(transport.writes[-1])
    asyncio.run(main())


def test_a_closed_window_pauses_the_sender_and_an_update_resumes_it():
    async def main():
        conn = H2Connection(client_side=True, name="t")
        conn.connection_made(FakeTransport())
        sid = conn.h2.get_next_available_stream_id()
        conn.h2.send_headers(sid, HEADERS)
        stream = H2Stream(conn, sid)
        conn.streams[sid] = stream
        source = NullEnd()
        stream.peer = source
        window = conn.h2.local_flow_control_window(sid)      # the peer's default 65535
        stream.send(b"a" * (window + 10))
        assert "h2-window" in source.paused and stream._pending
        stream.send_eof()                                   # waits behind the pending bytes
        assert not stream.local_ended
        # The peer opens the window (stream and connection).
        conn.h2.remote_settings.acknowledge()
        from hyperframe.frame import WindowUpdateFrame
        for target in (0, sid):
            frame = WindowUpdateFrame(target)
            frame.window_increment = 100
            conn.h2._receive_frame(frame)
        stream._window_opened()
        assert not stream._pending and "h2-window" not in source.paused
        assert stream.local_ended                           # the FIN went after the last byte
    asyncio.run(main())


def test_a_slow_application_holds_back_the_peer_by_the_stream_window(tmp_path):
    """The server bridges a stream to an app that does not read: the client's
    writer stalls once the app's socket buffers, the transport's high-water
    mark and one stream window are full; reading lets everything through."""
    sctx, cctx, server_id, client_id = contexts(tmp_path)

    async def main():
        app_end, agent_end = socket.socketpair()
        agent_end.setblocking(False)
        app_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        bridged = []

        async def handler(stream):
            stream.respond(200)
            bridged.append(stream)
            await bridge(agent_end, stream, ByteCounter(), sock_is_app=False)

        server, port = await start_server(sctx, handler)
        pool = HbonePool()
        stream, _ = await pool.stream(PoolKey(client_id, server_id, ("127.0.0.1", port)), cctx, dial, HEADERS)
        total = 64 * 1024 * 1024
        writer = asyncio.ensure_future(stream.write(b"y" * total))
        await asyncio.sleep(1.5)
        assert not writer.done()
        server_stream = bridged[0]
        transport = server_stream.peer.transport
        queued = transport.get_write_buffer_size()
        assert server_stream._held > 0 or queued > 0        # acknowledgements are being held back
        assert queued <= hbone.STREAM_WINDOW + 1024 * 1024   # bounded: one window + one frame
        app_end.setblocking(False)
        loop = asyncio.get_running_loop()
        got = 0
        while got < total:
            chunk = await asyncio.wait_for(loop.sock_recv(app_end, 1 << 20), 10)
            assert chunk
            got += len(chunk)
        await asyncio.wait_for(writer, 10)
        assert got == total
        stream.end()
        await pool.close()
        server.close()
        app_end.close()
    asyncio.run(main())


def test_orderly_end_delivers_every_byte_then_fin():
    async def main():
        loop = asyncio.get_running_loop()
        app_end, app = socket.socketpair()
        peer, peer_end = socket.socketpair()
        for s in (app_end, app, peer, peer_end):
            s.setblocking(False)
        task = asyncio.ensure_future(splice(app, peer, ByteCounter()))
        payload = os.urandom(8 * 1024 * 1024)

        async def send():
            await loop.sock_sendall(app_end, payload)
            app_end.shutdown(socket.SHUT_WR)
        sender = asyncio.ensure_future(send())
        peer_end.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            chunk = await loop.sock_recv(peer_end, 1 << 20)
            if not chunk:
                break
            got += chunk
        await sender
        assert bytes(got) == payload            # all of it, then a clean EOF, no reset
        assert await asyncio.wait_for(task, 5) == "closed"
        assert await loop.sock_recv(app_end, 10) == b""
    asyncio.run(main())


CRASHING_PROXY = textwrap.dedent("""
    import asyncio, socket, sys
    from agent.proxy.copy import ByteCounter, splice

    async def main():
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        print(lst.getsockname()[1], flush=True)
        app, _ = lst.accept()
        up = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
        app.setblocking(False)
        up.setblocking(False)
        print("spliced", flush=True)
        await splice(app, up, ByteCounter())

    asyncio.run(main())
""")


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_killed_proxy_resets_both_applications_instead_of_ending_their_streams(tmp_path, loop_kind):
    """Issue 11, item 4: a crash must never hand an application a FIN."""
    script = tmp_path / "proxy.py"
    text = CRASHING_PROXY
    if loop_kind == "uvloop":
        text = text.replace("asyncio.run(main())", "import uvloop\nuvloop.run(main())")
    script.write_text(text)
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen()
    proc = subprocess.Popen([sys.executable, str(script), str(upstream.getsockname()[1])],
                            stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    try:
        port = int(proc.stdout.readline())
        app = socket.create_connection(("127.0.0.1", port))
        server, _ = upstream.accept()
        assert proc.stdout.readline().strip() == "spliced"
        app.sendall(b"part of a stream")
        server.settimeout(5)
        assert server.recv(100) == b"part of a stream"
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        for sock in (app, server):
            sock.settimeout(5)
            with pytest.raises(ConnectionResetError):
                data = sock.recv(100)
                raise AssertionError(f"expected a reset, got {data!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        upstream.close()


def test_a_window_update_for_a_stream_h2_already_closed_drops_its_pending_bytes():
    """h2 handles a whole read before its events: a WINDOW_UPDATE may be
    handled for a stream whose RST_STREAM came in the same read. The pending
    bytes are dropped and the connection lives on (it used to die on an
    IndexError, taking every other stream with it)."""
    async def main():
        conn = H2Connection(client_side=True, name="t")
        conn.connection_made(FakeTransport())
        sid = conn.h2.get_next_available_stream_id()
        conn.h2.send_headers(sid, HEADERS)
        stream = H2Stream(conn, sid)
        conn.streams[sid] = stream
        stream.peer = NullEnd()
        stream.send(b"a" * (conn.h2.local_flow_control_window(sid) + 10))
        assert stream._pending
        import h2.exceptions
        from hyperframe.frame import WindowUpdateFrame
        for target in (0, sid):
            update = WindowUpdateFrame(target)
            update.window_increment = 1000
            conn.h2._receive_frame(update)

        def closed(*_a, **_k):                  # h2 closed the stream in the same read
            raise h2.exceptions.StreamClosedError(sid)
        conn.h2.send_data = closed
        stream._window_opened()                 # ... before we hear of the reset
        assert not stream._pending and not conn.closed
    asyncio.run(main())
