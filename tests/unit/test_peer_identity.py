"""SPIFFE identities of HBONE peers: exactly one URI SAN, of our trust domain,
and a peer refused for its identity leaves an access-log record (issue 11, item 7)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from agent.proxy.counters import ConnectionLog, PodCounters
from agent.proxy.forward import DataPlane, PodProxy
from agent.proxy.tls import PeerIdentityError, check_client_identity, check_server_identity, make_context
from agent.proxy.tunnel import HbonePool
from agent.state.model import ClusterState
from tests.interop.certs import TestPKI

SERVER = "spiffe://cluster.local/ns/backend/sa/api"
CLIENT = "spiffe://cluster.local/ns/frontend/sa/web"
OTHER = "spiffe://cluster.local/ns/kube-system/sa/admin"


class FakeSsl:
    """What the checks read from an SSL object: ALPN and the peer's DER certificate."""

    def __init__(self, cert_path: str, alpn: str = "h2") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        self.der = x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).public_bytes(Encoding.DER)
        self.alpn = alpn

    def selected_alpn_protocol(self):
        return self.alpn

    def getpeercert(self, binary_form=False):
        return self.der


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


def test_one_uri_san_of_our_trust_domain_is_the_identity(pki):
    assert check_client_identity(FakeSsl(pki.issue("frontend", "web").cert_path), "cluster.local") == CLIENT
    check_server_identity(FakeSsl(pki.issue("backend", "api").cert_path), SERVER)


@pytest.mark.parametrize("uris", [
    [CLIENT, OTHER],                                   # the old check took the first that matched
    [OTHER, CLIENT],
    [CLIENT, CLIENT],                                  # the same one twice is still two SANs
    ["spiffe://evil.example/ns/frontend/sa/web", CLIENT],
])
def test_a_certificate_with_several_uri_sans_is_refused_both_ways(pki, uris):
    cert = pki.issue("frontend", "web", uris=uris).cert_path
    with pytest.raises(PeerIdentityError, match=f"client certificate has {len(uris)} URI SANs"):
        check_client_identity(FakeSsl(cert), "cluster.local")
    for expected in uris:
        with pytest.raises(PeerIdentityError, match=f"server certificate has {len(uris)} URI SANs"):
            check_server_identity(FakeSsl(cert), expected)


def test_another_trust_domain_and_no_identity_are_refused(pki):
    other = pki.issue("frontend", "web", trust_domain="evil.example").cert_path
    with pytest.raises(PeerIdentityError, match="no SPIFFE identity in trust domain cluster.local"):
        check_client_identity(FakeSsl(other), "cluster.local")
    with pytest.raises(PeerIdentityError, match="not the expected"):
        check_server_identity(FakeSsl(pki.issue("backend", "impostor").cert_path), SERVER)


def test_a_refusal_message_shows_at_most_three_sans(pki):
    uris = [f"spiffe://cluster.local/ns/n{i}/sa/{'x' * 300}" for i in range(50)]
    cert = pki.issue("frontend", "web", uris=uris).cert_path
    with pytest.raises(PeerIdentityError) as info:
        check_client_identity(FakeSsl(cert), "cluster.local")
    assert "50 URI SANs" in str(info.value) and "and 47 more" in str(info.value)
    assert len(str(info.value)) < 1000


class StaticTls:
    def __init__(self, ctx) -> None:
        self.ctx = ctx

    async def context(self, identity: str, server_side: bool):
        return self.ctx


def pod_proxy(sctx, records: list) -> PodProxy:
    plane = DataPlane(state=lambda: ClusterState.from_items([]), trust_domain="cluster.local",
                      tls=StaticTls(sctx), pool=HbonePool(), log=ConnectionLog(), access=records.append)
    return PodProxy("backend/api", SERVER, ["127.0.0.1"], {}, listeners=None, datapath=None, switcher=None,
                    counters=PodCounters(), plane=plane)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_peer_refused_for_its_identity_gets_an_access_log_record(pki, caplog, loop_kind):
    """mTLS succeeds (the chain is ours), the identity check refuses: one record says why."""
    from agent.eventloop import loop_factory
    _name, factory = loop_factory(loop_kind)
    root = Path(pki.root_path).read_bytes()
    server = pki.issue("backend", "api")
    sctx = make_context(True, Path(server.chain_path).read_bytes(), Path(server.key_path).read_bytes(), root)
    clients = {
        "several SANs": pki.issue("frontend", "web", uris=[CLIENT, OTHER]),
        "other trust domain": pki.issue("frontend", "web", trust_domain="evil.example"),
    }
    records: list = []

    async def attempt(client) -> bytes:
        cctx = make_context(False, Path(client.chain_path).read_bytes(), Path(client.key_path).read_bytes(), root)
        proxy = pod_proxy(sctx, records)
        loop = asyncio.get_running_loop()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            listener.setblocking(False)
            port = listener.getsockname()[1]
            dial = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname=""))
            conn, peer = await loop.sock_accept(listener)
            conn.setblocking(False)
            await asyncio.wait_for(proxy._hbone(conn, peer), 10)
            reader, writer = await asyncio.wait_for(dial, 10)
            try:
                return await asyncio.wait_for(reader.read(100), 10)   # closed on us
            except (ConnectionError, OSError):
                return b""
            finally:
                writer.close()

    with caplog.at_level(logging.INFO):
        for client in clients.values():
            with asyncio.Runner(loop_factory=factory) as runner:
                assert runner.run(attempt(client)) == b""
    outcomes = [r.outcome for r in records]
    assert len(outcomes) == 2, outcomes
    assert outcomes[0].startswith("refused: peer identity: client certificate has 2 URI SANs"), outcomes
    assert outcomes[1].startswith("refused: peer identity: client certificate has no SPIFFE identity "
                                  "in trust domain cluster.local"), outcomes
    assert all(r.direction == "hbone" and r.destination == "127.0.0.1:15008" for r in records)
    assert not [r for r in caplog.records if r.exc_info], "a refused peer is not a bug"
