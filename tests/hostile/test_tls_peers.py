"""Bad certificates and TLS variants on 15008: refused before any stream,
each with an access-log line (issue 11, item 7), and the mesh keeps serving."""

from __future__ import annotations

import ssl

import pytest

from tests.hostile.conftest import APP_PORT, CLIENT_ID
from tests.hostile.h2peer import RawH2, client_context
from tests.interop.certs import TestPKI
from tests.lab.conftest import wait_for

ADMIN_ID = "spiffe://cluster.local/ns/kube-system/sa/admin"

# name -> (certificate maker, TLS options, what the agent's record says)
PEERS = {
    "self-signed root": (lambda h: TestPKI(h.tmp / "self-signed").issue("mesh", "client"), {},
                         "TLS handshake failed"),
    "expired": (lambda h: h.pki.issue("mesh", "client", expired=True), {}, "TLS handshake failed"),
    "no client certificate": (lambda h: None, {}, "TLS handshake failed"),
    "TLS 1.2": (lambda h: h.client, {"tls12": True}, "TLS handshake failed"),
    "other trust domain": (lambda h: h.pki.issue("mesh", "client", trust_domain="evil.example"), {},
                           "peer identity: client certificate has no SPIFFE identity in trust domain"),
    "several URI SANs": (lambda h: h.pki.issue("mesh", "client", uris=[CLIENT_ID, ADMIN_ID]), {},
                         "peer identity: client certificate has 2 URI SANs"),
}


def attempt(hostile, certs, tls: dict) -> tuple[int, str]:
    """One TLS connection and a CONNECT; (our local port, how it ended). Never a 200."""
    ctx = client_context(certs.chain_path if certs else None, certs.key_path if certs else None,
                         hostile.lab.ca_root, **tls)
    sock = hostile.dial(hostile.server_ip, 15008)
    port = sock.getsockname()[1]
    try:
        tls_sock = ctx.wrap_socket(sock)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        return port, f"handshake: {type(exc).__name__}"
    peer = RawH2(tls_sock)
    try:
        sid = peer.stream_id()
        peer.send(peer.connect(sid, f"{hostile.server_ip}:{APP_PORT}"))
        got = peer.read(5.0, until=lambda r: sid in r.statuses())
        assert got.statuses().get(sid) != 200, got
        assert got.closed, f"the connection stayed open: {got}"
        return port, got.closed
    finally:
        peer.close()


@pytest.mark.parametrize("name", list(PEERS))
def test_bad_certificates_and_tls_variants_are_refused_and_access_logged(hostile, probe, name):
    make, tls, reason = PEERS[name]
    accepts = hostile.app_accepts()
    port, ended = attempt(hostile, make(hostile), tls)
    assert hostile.app_accepts() == accepts, "a refused peer reached the application"
    src = f"src.addr={hostile.outsider_ip}:{port} "
    try:      # the agent writes its record once it has seen the connection end, maybe after us
        wait_for(lambda: any(src in line for line in hostile.agent.log_since(probe)), 5.0, "the access line")
    except AssertionError:
        pass
    access, other = hostile.agent.split(hostile.agent.log_since(probe))
    mine = [line for line in access if src in line]
    assert len(mine) == 1, (ended, access)
    assert "direction=hbone" in mine[0] and "outcome=refused" in mine[0] and reason in mine[0], mine[0]
    assert len(other) <= 3, other                   # at most a line or two for a new problem
    assert not [line for line in other if "Traceback" in line or "ERROR" in line], other
