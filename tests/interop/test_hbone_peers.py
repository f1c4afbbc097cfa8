"""Our HBONE client and server pieces against independent peers, on loopback.

* our client (HbonePool + bridge) -> nghttpx (HTTP/2 CONNECT proxy) -> tinyproxy -> echo
* Node's http2 client -> our server (H2Connection + check_connect + bridge) -> echo
The lab tests exercise the same code inside pods; these pin the wire protocol.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest

from agent.proxy import hbone
from agent.proxy.copy import ByteCounter
from agent.proxy.h2conn import H2Connection, H2Stream
from agent.proxy.tls import PeerIdentityError, check_client_identity, make_context
from agent.proxy.tunnel import HbonePool, PoolKey, bridge
from tests.interop.certs import TestPKI
from tests.interop.peers import echo_server, free_port, nghttpx_hbone_server, node_hbone_client

needs_nghttpx = pytest.mark.skipif(not (shutil.which("nghttpx") and shutil.which("tinyproxy")),
                                   reason="nghttpx/tinyproxy not installed")
needs_node = pytest.mark.skipif(not shutil.which("node"), reason="node not installed")


def client_context(pki: TestPKI, files) -> ssl.SSLContext:
    return make_context(False, Path(files.chain_path).read_bytes(), Path(files.key_path).read_bytes(),
                        Path(pki.root_path).read_bytes())


async def dial(address):
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, address)
    return sock


@needs_nghttpx
def test_our_client_tunnels_through_nghttpx(tmp_path):
    pki = TestPKI(tmp_path)
    client = pki.issue("frontend", "website")
    server = pki.issue("backend", "api")
    with echo_server() as echo, nghttpx_hbone_server(server, pki.root_path, listen=("127.0.0.1", free_port()),
                                                     target_ports=[echo.port]) as nghttpx:
        async def main():
            loop = asyncio.get_running_loop()
            pool = HbonePool()
            ctx = client_context(pki, client)
            key = PoolKey(client.uri, server.uri, ("127.0.0.1", nghttpx.port))
            results = []
            for i in range(3):
                app, agent_side = socket.socketpair()
                agent_side.setblocking(False)
                app.setblocking(False)
                headers = hbone.connect_request_headers(hbone.ConnectTarget("127.0.0.1", echo.port),
                                                        ("198.18.0.9", 4000 + i), {"namespace": "frontend"})
                stream, response = await pool.stream(key, ctx, dial, headers)
                assert hbone.response_status(response) == 200
                counter = ByteCounter()
                task = asyncio.ensure_future(bridge(agent_side, stream, counter))
                message = f"hello {i} ".encode() * 1000
                await loop.sock_sendall(app, message)
                got = b""
                while len(got) < len(message):
                    got += await loop.sock_recv(app, 65536)
                results.append(got == message)
                assert counter.sent == len(message) and counter.received == len(message)
                # nghttpx does not pass half-close on: close the stream ourselves.
                stream.reset()
                app.close()
                assert await asyncio.wait_for(task, 5) == "reset"
            assert results == [True, True, True]
            assert pool.connections_opened == 1          # three streams, one pooled connection
            await pool.close()
        asyncio.run(main())


@needs_nghttpx
def test_our_client_refuses_a_server_with_another_identity(tmp_path):
    pki = TestPKI(tmp_path)
    client = pki.issue("frontend", "website")
    impostor = pki.issue("backend", "not-api")
    with echo_server() as echo, nghttpx_hbone_server(impostor, pki.root_path, listen=("127.0.0.1", free_port()),
                                                     target_ports=[echo.port]) as nghttpx:
        async def main():
            pool = HbonePool()
            key = PoolKey(client.uri, "spiffe://cluster.local/ns/backend/sa/api", ("127.0.0.1", nghttpx.port))
            headers = hbone.connect_request_headers(hbone.ConnectTarget("127.0.0.1", echo.port), ("198.18.0.9", 1), None)
            with pytest.raises(PeerIdentityError, match="not the expected spiffe://cluster.local/ns/backend/sa/api"):
                await pool.stream(key, client_context(pki, client), dial, headers)
            assert pool.connections() == 0
        asyncio.run(main())
        assert echo.peers == []


class OurServer:
    """Our server-side pieces on a loopback port, in a thread with its own loop."""

    def __init__(self, pki: TestPKI, files, app_port: int) -> None:
        self.ctx = make_context(True, Path(files.chain_path).read_bytes(), Path(files.key_path).read_bytes(),
                                Path(pki.root_path).read_bytes())
        self.app_port = app_port
        self.port = free_port()
        self.refusals: list[str] = []
        self.identities: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self):
        loop = asyncio.get_running_loop()

        def verify(transport):
            return check_client_identity(transport.get_extra_info("ssl_object"), "cluster.local")

        async def handle(stream: H2Stream):
            checked = hbone.check_connect(stream.request_headers, ["127.0.0.1"], agent_ports=frozenset())
            if isinstance(checked, hbone.Refusal):
                self.refusals.append(checked.reason)
                stream.respond(checked.status, end=True)
                return
            self.identities.append(stream.conn.peer_identity)
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (checked.ip, checked.port))
            stream.respond(200, [("baggage", "k8s.namespace.name=backend")])
            await bridge(sock, stream, ByteCounter())

        def factory():
            return H2Connection(False, on_request=handle, name="test-server", verify=verify)

        self.server = await loop.create_server(factory, "127.0.0.1", self.port, ssl=self.ctx)
        self.ready.set()
        self.stopped = loop.create_future()
        await self.stopped
        self.server.close()

    def close(self):
        self.loop.call_soon_threadsafe(self.stopped.set_result, None)
        self.thread.join(5)


@needs_node
def test_node_client_through_our_server(tmp_path):
    pki = TestPKI(tmp_path)
    server_files = pki.issue("backend", "api")
    client_files = pki.issue("frontend", "website")
    with echo_server() as echo:
        ours = OurServer(pki, server_files, echo.port)
        try:
            result = node_hbone_client(("127.0.0.1", ours.port), f"127.0.0.1:{echo.port}", pki.root_path,
                                       client_files, expect_san=server_files.uri, message="interop" * 100)
            assert result["returncode"] == 0, result
            assert result["status"] == 200 and result["body"] == "interop" * 100   # half-close propagated
            assert ours.identities == [client_files.uri]
            # Non-CONNECT and a foreign authority are refused with 400.
            result = node_hbone_client(("127.0.0.1", ours.port), f"198.18.77.7:{echo.port}", pki.root_path,
                                       client_files, message="x")
            assert result["status"] == 400
            assert "not an address of this pod" in ours.refusals[-1]
            # A client from another CA never gets a stream.
            stranger = pki.issue("frontend", "website", other_root=True)
            result = node_hbone_client(("127.0.0.1", ours.port), f"127.0.0.1:{echo.port}", pki.root_path,
                                       stranger, message="x")
            assert result["returncode"] == 2
            # An expired client certificate neither.
            expired = pki.issue("frontend", "website", expired=True)
            result = node_hbone_client(("127.0.0.1", ours.port), f"127.0.0.1:{echo.port}", pki.root_path,
                                       expired, message="x")
            assert result["returncode"] == 2
            # Nor one from another trust domain under the same root.
            foreign = pki.issue("frontend", "website", trust_domain="other.example")
            result = node_hbone_client(("127.0.0.1", ours.port), f"127.0.0.1:{echo.port}", pki.root_path,
                                       foreign, message="x")
            assert result["returncode"] == 2
            assert len(ours.identities) == 1
        finally:
            ours.close()
