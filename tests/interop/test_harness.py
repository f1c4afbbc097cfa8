"""The interop harness proven against itself, on loopback (no lab, no product code)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import time

import h2.config
import h2.connection
import h2.events
import pytest

from .certs import TestPKI
from .peers import (NGHTTPX, NODE, TINYPROXY, PeerStartError, echo_server, free_port, hostport,
                    nghttpx_hbone_server, node_hbone_client, node_hbone_server)

needs_node = pytest.mark.skipif(not shutil.which(NODE), reason="node (20+) not on PATH")
needs_nghttpx = pytest.mark.skipif(not (shutil.which(NGHTTPX) and shutil.which(TINYPROXY)),
                                   reason="nghttpx/tinyproxy not installed (make setup)")

pytestmark = pytest.mark.timeout(30)

SERVER = ("istio-system", "ztunnel")


@pytest.fixture
def pki():
    with tempfile.TemporaryDirectory(prefix="hbone-pki-") as d:
        yield TestPKI(d)


@pytest.fixture
def spawned():
    """A spawn function recording every Popen, checked for exit at teardown."""
    procs: list[subprocess.Popen] = []

    def spawn(argv, **kw):
        p = subprocess.Popen(argv, **kw)
        procs.append(p)
        return p

    spawn.procs = procs
    yield spawn
    alive = [p.args for p in procs if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not alive, f"harness left processes running: {alive}"


def loopback():
    return ("127.0.0.1", free_port())


# ---------------------------------------------------------------- a Python h2 HBONE client


def h2_connect(port: int, authority: str, ca: str, cert=None, *, message: bytes, expect: int,
               headers=(), timeout: float = 5.0) -> dict:
    """HBONE by hand: TLS 1.3, ALPN h2, no SNI, CONNECT; read ``expect`` echoed bytes, then close.

    (No END_STREAM is sent: nghttpx would not pass it on anyway.)
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE identities are URIs: the SAN is checked below
    ctx.load_verify_locations(ca)
    if cert is not None:
        ctx.load_cert_chain(cert.chain_path, cert.key_path)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with ctx.wrap_socket(raw, server_hostname=None) as tls:  # server_hostname=None: no SNI
        out = {"alpn": tls.selected_alpn_protocol(), "version": tls.version(),
               "peer_san": [v for k, v in tls.getpeercert().get("subjectAltName", ()) if k == "URI"],
               "status": None, "body": b""}
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                     header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority), *headers])
        tls.sendall(conn.data_to_send())
        sent = False
        while len(out["body"]) < expect:
            data = tls.recv(65536)
            if not data:
                out["eof"] = True
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    out["status"] = int(dict(ev.headers)[":status"])
                    if out["status"] == 200 and not sent:
                        conn.send_data(sid, message)
                        sent = True
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    out["body"] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                    out["ended"] = type(ev).__name__
                    expect = 0
            tls.sendall(conn.data_to_send())
        conn.close_connection()
        tls.sendall(conn.data_to_send())
    return out


# ---------------------------------------------------------------- tests


@needs_nghttpx
def test_python_h2_client_through_nghttpx_and_tinyproxy(pki, spawned):
    srv_cert, cli_cert = pki.issue(*SERVER), pki.issue("default", "sleep")
    with echo_server() as echo, \
            nghttpx_hbone_server(srv_cert, pki.root_path, loopback(), [echo.port], spawn=spawned) as ng:
        msg = b"hello through nghttpx\n"
        got = h2_connect(ng.port, echo.address, pki.root_path, cli_cert, message=msg, expect=len(msg),
                         headers=[("forwarded", "for=10.0.0.1"), ("baggage", "k8s.pod.name=sleep"),
                                  ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
        assert (got["alpn"], got["version"]) == ("h2", "TLSv1.3")
        assert got["peer_san"] == [srv_cert.uri]
        assert got["status"] == 200, ng.log()
        assert got["body"] == msg
        assert echo.received == [msg] and len(echo.peers) == 1
        assert echo.peers[0][0] == "127.0.0.1"  # tinyproxy dialled the target
        # a port tinyproxy is not allowed to CONNECT to is refused
        bad = h2_connect(ng.port, hostport("127.0.0.1", free_port()), pki.root_path, cli_cert,
                         message=b"x", expect=1)
        assert bad["status"] not in (None, 200), ng.log()
        assert "Refused CONNECT method on port" in ng.tinyproxy_log()
        assert f'"CONNECT {echo.address} HTTP/2" 200 h2 TLSv1.3' in ng.access_log(), ng.log()
    assert all(p.poll() is not None for p in spawned.procs)


@needs_node
def test_node_client_to_node_server_to_echo(pki, spawned):
    srv_cert, cli_cert = pki.issue(*SERVER), pki.issue("default", "sleep")
    with echo_server() as echo, \
            node_hbone_server(srv_cert, pki.root_path, ("127.0.0.1", 0), spawn=spawned) as srv:
        got = node_hbone_client(("127.0.0.1", srv.port), echo.address, pki.root_path, cli_cert,
                                expect_san=srv_cert.uri, message="hello node\n",
                                forwarded="for=10.0.0.1", baggage="k8s.namespace.name=default",
                                spawn=spawned)
        assert got["returncode"] == 0, got
        assert got["status"] == 200 and got["body"] == "hello node\n"  # half-close went round trip
        assert got["peer_san"] == srv_cert.uri
        (rec,) = srv.wait_records(1)
        assert rec["peer_san"] == cli_cert.uri
        assert rec["authority"] == echo.address
        assert (rec["forwarded"], rec["baggage"]) == ("for=10.0.0.1", "k8s.namespace.name=default")
        assert rec["sni"] is None  # the client sends no SNI
        assert rec["status"] == 200
        assert echo.received == [b"hello node\n"]

        # --read-bytes mode; a refused target is 503; a non-allowed address 403
        got = node_hbone_client(("127.0.0.1", srv.port), echo.address, pki.root_path, cli_cert,
                                message="abcdef", read_bytes=6, spawn=spawned)
        assert (got["returncode"], got["body"]) == (0, "abcdef"), got
        got = node_hbone_client(("127.0.0.1", srv.port), hostport("127.0.0.1", free_port()),
                                pki.root_path, cli_cert, message="x", spawn=spawned)
        assert (got["returncode"], got["status"]) == (1, 503), got
        got = node_hbone_client(("127.0.0.1", srv.port), "192.0.2.1:80", pki.root_path, cli_cert,
                                message="x", spawn=spawned)
        assert (got["returncode"], got["status"]) == (1, 403), got


@needs_node
def test_node_server_refuses_client_cert_from_other_root(pki, spawned):
    srv_cert = pki.issue(*SERVER)
    stranger = pki.issue("default", "sleep", other_root=True)
    with echo_server() as echo, \
            node_hbone_server(srv_cert, pki.root_path, ("127.0.0.1", 0), spawn=spawned) as srv:
        got = node_hbone_client(("127.0.0.1", srv.port), echo.address, pki.root_path, stranger,
                                message="x", spawn=spawned)
        assert got["returncode"] == 2 and "status" not in got, got
        assert got["error"], got  # "...alert unknown ca" or "read ECONNRESET": a race
        assert srv.wait_records(1, key="tls_error"), srv.log()
        assert srv.streams() == [] and echo.peers == []


@needs_node
def test_node_client_expect_san_mismatch_fails(pki, spawned):
    srv_cert, cli_cert = pki.issue(*SERVER), pki.issue("default", "sleep")
    with echo_server() as echo, \
            node_hbone_server(srv_cert, pki.root_path, ("127.0.0.1", 0), spawn=spawned) as srv:
        wrong = "spiffe://cluster.local/ns/istio-system/sa/not-ztunnel"
        got = node_hbone_client(("127.0.0.1", srv.port), echo.address, pki.root_path, cli_cert,
                                expect_san=wrong, message="x", spawn=spawned)
        assert got["returncode"] == 2 and "status" not in got, got
        assert wrong in got["error"] and got["peer_san"] == srv_cert.uri, got
        time.sleep(0.1)
        assert srv.streams() == [] and echo.peers == []


@needs_node
@needs_nghttpx
def test_nghttpx_refuses_client_without_or_with_foreign_certificate(pki, spawned):
    srv_cert, cli_cert = pki.issue(*SERVER), pki.issue("default", "sleep")
    stranger = pki.issue("default", "sleep", other_root=True)
    expired = pki.issue("default", "sleep", expired=True)
    with echo_server() as echo, \
            nghttpx_hbone_server(srv_cert, pki.root_path, loopback(), [echo.port], spawn=spawned) as ng:
        for cert in (None, stranger, expired):
            got = node_hbone_client(("127.0.0.1", ng.port), echo.address, pki.root_path, cert,
                                    message="x", read_bytes=1, spawn=spawned)
            assert got["returncode"] == 2 and "status" not in got, (cert, got)
        assert echo.peers == []
        # and the Node client itself works through nghttpx (with --read-bytes: no half-close there)
        got = node_hbone_client(("127.0.0.1", ng.port), echo.address, pki.root_path, cli_cert,
                                expect_san=srv_cert.uri, message="via nghttpx", read_bytes=11,
                                spawn=spawned)
        assert (got["returncode"], got["status"], got["body"]) == (0, 200, "via nghttpx"), (got, ng.log())


@needs_nghttpx
def test_nghttpx_start_failure_is_reported_and_cleaned(pki, spawned):
    srv_cert = pki.issue(*SERVER)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(PeerStartError) as exc, \
                nghttpx_hbone_server(srv_cert, pki.root_path, busy.getsockname(), spawn=spawned):
            pass
    assert "nghttpx exited" in str(exc.value)
    assert all(p.poll() is not None for p in spawned.procs)
