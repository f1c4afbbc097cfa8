"""Our HTTP/2 tunnel machinery over real TLS on loopback: flow control bounds
memory under a slow reader, resets cross the tunnel, pooling limits."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

from agent.proxy import hbone
from agent.proxy.copy import ByteCounter
from agent.proxy.h2conn import H2Connection, H2Stream, StreamReset
from agent.proxy.tls import check_client_identity, make_context
from agent.proxy.tunnel import HbonePool, PoolKey, bridge
from tests.interop.certs import TestPKI


def contexts(tmp_path):
    pki = TestPKI(tmp_path)
    server, client = pki.issue("backend", "api"), pki.issue("frontend", "web")
    root = Path(pki.root_path).read_bytes()
    sctx = make_context(True, Path(server.chain_path).read_bytes(), Path(server.key_path).read_bytes(), root)
    cctx = make_context(False, Path(client.chain_path).read_bytes(), Path(client.key_path).read_bytes(), root)
    return sctx, cctx, server.uri, client.uri


async def start_server(sctx, handler):
    loop = asyncio.get_running_loop()

    def verify(transport):
        return check_client_identity(transport.get_extra_info("ssl_object"), "cluster.local")

    server = await loop.create_server(lambda: H2Connection(False, on_request=handler, verify=verify),
                                      "127.0.0.1", 0, ssl=sctx)
    return server, server.sockets[0].getsockname()[1]


async def dial(address):
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, address)
    return sock


HEADERS = hbone.connect_request_headers(hbone.ConnectTarget("127.0.0.1", 9), ("198.18.0.2", 1), None)


def test_a_slow_reader_stops_the_sender_at_the_stream_window(tmp_path):
    sctx, cctx, server_id, client_id = contexts(tmp_path)

    async def main():
        streams: list[H2Stream] = []

        async def handler(stream):
            streams.append(stream)
            stream.respond(200)
            await asyncio.sleep(30)          # never reads until the test says so

        server, port = await start_server(sctx, handler)
        pool = HbonePool()
        stream, response = await pool.stream(PoolKey(client_id, server_id, ("127.0.0.1", port)), cctx, dial, HEADERS)
        assert hbone.response_status(response) == 200
        total = 32 * 1024 * 1024
        writer = asyncio.ensure_future(stream.write(b"x" * total))
        await asyncio.sleep(1.5)
        assert not writer.done()                             # the sender is held back ...
        buffered = streams[0].buffered()
        assert 0 < buffered <= hbone.STREAM_WINDOW           # ... after one stream window
        received = 0
        while received < total:                              # reading opens the window again
            received += len(await streams[0].read())
        await asyncio.wait_for(writer, 10)
        assert received == total
        await pool.close()
        server.close()
    asyncio.run(main())


def test_a_tcp_reset_crosses_the_tunnel_as_rst_stream_and_back(tmp_path):
    sctx, cctx, server_id, client_id = contexts(tmp_path)

    async def main():
        loop = asyncio.get_running_loop()
        app_listener = socket.socket()
        app_listener.bind(("127.0.0.1", 0))
        app_listener.listen()
        app_listener.setblocking(False)
        accepted = asyncio.ensure_future(loop.sock_accept(app_listener))
        server_bridge: list[asyncio.Task] = []

        async def handler(stream):
            upstream = await dial(app_listener.getsockname())
            stream.respond(200)
            task = asyncio.ensure_future(bridge(upstream, stream, ByteCounter()))
            server_bridge.append(task)
            await task

        server, port = await start_server(sctx, handler)
        pool = HbonePool()
        stream, _ = await pool.stream(PoolKey(client_id, server_id, ("127.0.0.1", port)), cctx, dial, HEADERS)
        client_app, client_side = socket.socketpair()
        client_side.setblocking(False)
        client_bridge = asyncio.ensure_future(bridge(client_side, stream, ByteCounter()))
        app_conn, _ = await accepted
        app_conn.setblocking(False)
        client_app.sendall(b"ping")
        assert await asyncio.wait_for(loop.sock_recv(app_conn, 10), 5) == b"ping"
        # The application behind the server resets its connection ...
        app_conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app_conn.close()
        assert await asyncio.wait_for(server_bridge[0], 5) == "reset"
        # ... and the client's application sees a reset too, not a clean end.
        assert await asyncio.wait_for(client_bridge, 5) == "reset"
        client_app.settimeout(2)
        try:
            data = client_app.recv(10)
            assert data == b"", data
        except ConnectionResetError:
            pass
        assert stream.reset_code is not None
        await pool.close()
        server.close()
        app_listener.close()
    asyncio.run(main())


def test_the_pool_opens_a_second_connection_past_100_streams(tmp_path):
    sctx, cctx, server_id, client_id = contexts(tmp_path)

    async def main():
        async def handler(stream):
            stream.respond(200)
            await stream.read()

        server, port = await start_server(sctx, handler)
        pool = HbonePool()
        key = PoolKey(client_id, server_id, ("127.0.0.1", port))
        streams = [await pool.stream(key, cctx, dial, HEADERS) for _ in range(101)]
        assert pool.connections_opened == 2 and pool.connections() == 2
        for stream, _ in streams:
            stream.end()
        await pool.close()
        server.close()
    asyncio.run(main())


def test_only_aes_gcm_suites_are_offered_and_accepted(tmp_path):
    import ssl
    from agent.proxy.tls import restrict_ciphersuites
    sctx, cctx, _, _ = contexts(tmp_path)
    for ctx in (sctx, cctx):
        suites = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"}
        assert suites == {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}

    def handshake(server_ctx, client_ctx):
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        import threading
        result = {}

        def serve():
            conn, _ = lst.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    result["server"] = tls.cipher()[0]
            except (ssl.SSLError, OSError) as exc:
                result["server"] = f"refused: {exc}"
        t = threading.Thread(target=serve)
        t.start()
        c = socket.create_connection(lst.getsockname())
        try:
            with client_ctx.wrap_socket(c) as tls:
                tls.recv(0)
                cipher = tls.cipher()[0]
        except (ssl.SSLError, OSError) as exc:
            cipher = f"refused: {exc}"
        t.join(5)
        lst.close()
        return cipher, result.get("server")

    assert handshake(sctx, cctx)[0] == "TLS_AES_256_GCM_SHA384"
    # A client that offers only ChaCha20-Poly1305 gets no handshake.
    pki = TestPKI(tmp_path / "chacha")
    files = pki.issue("frontend", "web")
    chacha = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    chacha.minimum_version = ssl.TLSVersion.TLSv1_3
    chacha.check_hostname = False
    chacha.verify_mode = ssl.CERT_NONE
    chacha.load_cert_chain(files.chain_path, files.key_path)
    restrict_ciphersuites(chacha, "TLS_CHACHA20_POLY1305_SHA256")
    client, server = handshake(sctx, chacha)
    assert client.startswith("refused") and server.startswith("refused"), (client, server)
