"""The admin/metrics/readiness HTTP server over real loopback sockets, and its pure parts."""

import asyncio
import json
import logging

import pytest

from agent.observe.admin import REDACTED, AdminServer, HttpError, parse_head, scrub
from agent.observe.metrics import Metrics, labels_for

LOCAL = ("127.0.0.1", 0)
KEY_PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
EC_PEM = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----\n"
CERT_PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"


async def http(port: int, raw: bytes, half_close: bool = False, timeout: float = 5.0):
    """Send raw bytes, read to EOF; (status, headers, body) or None if closed without a response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if half_close:
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return status, headers, body


def get(port, path):
    return http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def post(port, path, body=b""):
    return http(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)


class Agent:
    """The callables the daemon would supply."""

    def __init__(self):
        self.metrics = Metrics()
        self.ready = (False, "waiting for the cluster state")
        self.dump = {}
        self.shutdowns = 0
        self.scrapes = 0

    def readiness(self):
        return self.ready

    def config_dump(self):
        return self.dump

    def shutdown(self):
        self.shutdowns += 1

    def before_scrape(self):
        self.scrapes += 1
        self.metrics.tcp.sync_live()


def run_with_server(test, agent=None, **kwargs):
    agent = agent or Agent()

    async def main():
        server = AdminServer(agent.metrics.registry, kwargs.pop("readiness", agent.readiness),
                             agent.config_dump, kwargs.pop("shutdown", agent.shutdown),
                             metrics_addr=LOCAL, ready_addr=LOCAL, admin_addr=LOCAL,
                             before_scrape=agent.before_scrape, **kwargs)
        await server.start()
        try:
            await test(server, server.ports, agent)
        finally:
            await server.close()

    asyncio.run(main())


def test_ports_are_distinct_and_default_binds():
    async def check(server, ports, agent):
        assert set(ports) == {"metrics", "ready", "admin"}
        assert len(set(ports.values())) == 3 and all(ports.values())
    run_with_server(check)
    server = AdminServer(None, lambda: (True, ""), dict, lambda: None)
    assert server.listeners["admin"].addr == ("127.0.0.1", 15000)
    assert server.listeners["metrics"].addr == ("0.0.0.0", 15020)
    assert server.listeners["ready"].addr == ("0.0.0.0", 15021)


@pytest.mark.parametrize("path", ["/metrics", "/stats/prometheus"])
def test_metrics_endpoint(path):
    async def check(server, ports, agent):
        labels = labels_for("source", None, "spiffe://cluster.local/ns/a/sa/b", None, None, "a/svc", True, "-")
        counted = [7, 9]
        agent.metrics.tcp.connection(labels, totals=lambda: tuple(counted))
        status, headers, body = await get(ports["metrics"], path)
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        assert "istio_tcp_connections_opened_total{" in text
        assert 'destination_service="svc.a.svc.cluster.local"' in text
        assert "_created" not in text
        assert "process_resident_memory_bytes" in text
        # the scrape brought the live connection's bytes up to date
        line = next(l for l in text.splitlines() if l.startswith("istio_tcp_received_bytes_total{"))
        assert line.endswith(" 7.0")
        assert agent.scrapes == 1
        counted[0] = 70
        _, _, body = await get(ports["metrics"], path)
        line = next(l for l in body.decode().splitlines() if l.startswith("istio_tcp_received_bytes_total{"))
        assert line.endswith(" 70.0")
    run_with_server(check)


@pytest.mark.parametrize("port_name, method, path, status", [
    ("metrics", "POST", "/metrics", 405),
    ("metrics", "GET", "/config_dump", 404),         # admin endpoints only on the admin port
    ("metrics", "GET", "/", 404),
    ("ready", "GET", "/metrics", 404),
    ("ready", "POST", "/healthz/ready", 405),
    ("admin", "GET", "/quitquitquit", 405),
    ("admin", "POST", "/config_dump", 405),
    ("admin", "GET", "/nope", 404),
    ("admin", "PUT", "/logging", 405),
    ("admin", "DELETE", "/nope", 405),
    ("admin", "GET", "/", 200),
])
def test_routing_errors(port_name, method, path, status):
    async def check(server, ports, agent):
        raw = f"{method} {path} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode()
        got, headers, body = await http(ports[port_name], raw)
        assert got == status, body
        if status == 405:
            assert "allow" in headers
        assert agent.shutdowns == 0
    run_with_server(check)


def test_readiness_transitions():
    async def check(server, ports, agent):
        status, _, body = await get(ports["ready"], "/healthz/ready")
        assert (status, body) == (503, b"waiting for the cluster state\n")
        agent.ready = (True, "ready: 3 pods captured")
        status, _, body = await get(ports["ready"], "/healthz/ready")
        assert (status, body) == (200, b"ready: 3 pods captured\n")
        agent.ready = (False, "BPF programs detached")
        status, _, body = await get(ports["ready"], "/healthz/ready")
        assert (status, body) == (503, b"BPF programs detached\n")
    run_with_server(check)


def test_readiness_errors_and_async():
    state = {"mode": "raise"}

    async def readiness():
        if state["mode"] == "raise":
            raise RuntimeError("state source broken")
        return True, "ok"

    async def check(server, ports, agent):
        status, _, body = await get(ports["ready"], "/healthz/ready")
        assert status == 503 and b"state source broken" in body
        state["mode"] = "ok"
        status, _, body = await get(ports["ready"], "/healthz/ready")
        assert (status, body) == (200, b"ok\n")
    run_with_server(check, readiness=readiness)


@pytest.mark.parametrize("value, expected", [
    ({"private_key": "abc"}, {"private_key": REDACTED}),
    ({"Private_Key_File": "/etc/key"}, {"Private_Key_File": REDACTED}),
    ({"key_pem": "x", "tls": {"cert_key_pem": 1}}, {"key_pem": REDACTED, "tls": {"cert_key_pem": REDACTED}}),
    ({"cert_chain": CERT_PEM, "pem": KEY_PEM}, {"cert_chain": CERT_PEM, "pem": REDACTED}),
    ([{"a": [EC_PEM, "fine"]}], [{"a": [REDACTED, "fine"]}]),
    ({"raw": KEY_PEM.encode()}, {"raw": REDACTED}),
    ({"key": "spiffe://x", "keys": 3, "n": None, "ok": True}, {"key": "spiffe://x", "keys": 3, "n": None, "ok": True}),
    ((1, "two"), [1, "two"]),
    ({3: "int key"}, {"3": "int key"}),
])
def test_scrub(value, expected):
    assert scrub(value) == expected


def test_scrub_objects_via_str():
    class Secret:
        def __str__(self):
            return KEY_PEM
    assert scrub({"thing": Secret()}) == {"thing": REDACTED}


def test_config_dump_never_shows_private_keys():
    async def check(server, ports, agent):
        agent.dump = {
            "node": "n1",
            "certificates": [{"identity": "spiffe://cluster.local/ns/a/sa/b", "cert_chain": [CERT_PEM],
                              "private_key": KEY_PEM, "key_pem": KEY_PEM}],
            "nested": {"deeper": [{"whatever": EC_PEM}], "privateKeyPem": "x"},
            "blob": KEY_PEM.encode(),
        }
        status, headers, body = await get(ports["admin"], "/config_dump")
        assert status == 200 and headers["content-type"] == "application/json"
        assert b"PRIVATE KEY" not in body and b"MIIEvQ" not in body and b"MHcCAQ" not in body
        dump = json.loads(body)
        assert dump["node"] == "n1"
        assert dump["certificates"][0]["cert_chain"] == [CERT_PEM]
        assert dump["certificates"][0]["private_key"] == REDACTED
        assert dump["nested"] == {"deeper": [{"whatever": REDACTED}], "privateKeyPem": REDACTED}
    run_with_server(check)


def test_config_dump_async_and_failure():
    calls = {"n": 0}

    async def dump():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("secret detail " + KEY_PEM)
        return {"ok": True}

    agent = Agent()
    agent.config_dump = dump

    async def check(server, ports, agent):
        status, _, body = await get(ports["admin"], "/config_dump")
        assert (status, json.loads(body)) == (200, {"ok": True})
        status, _, body = await get(ports["admin"], "/config_dump")
        assert status == 500 and b"PRIVATE KEY" not in body and b"RuntimeError" in body
        status, _, _ = await get(ports["admin"], "/config_dump")
        assert status == 200
    run_with_server(check, agent)


@pytest.fixture
def restore_levels():
    names = ["", "agent", "agent.proxy", "agent.proxy.forward", "access"]
    for name in names[2:]:
        logging.getLogger(name)      # make sure they exist, as the agent's modules create them
    saved = {n: logging.getLogger(n or None).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n or None).setLevel(level)


def test_logging_levels(restore_levels):
    async def check(server, ports, agent):
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("agent.proxy").setLevel(logging.NOTSET)
        status, _, body = await get(ports["admin"], "/logging")
        shown = json.loads(body)
        assert status == 200 and shown["level"] == "info"
        assert shown["loggers"]["agent.proxy.forward"] == "info"
        status, _, body = await post(ports["admin"], "/logging?agent.proxy=debug")
        assert status == 200
        assert logging.getLogger("agent.proxy").level == logging.DEBUG
        assert logging.getLogger("agent.proxy.forward").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger().level == logging.INFO
        assert json.loads(body)["loggers"]["agent.proxy.forward"] == "debug"
        status, _, body = await post(ports["admin"], "/logging?level=warning")
        assert status == 200 and json.loads(body)["level"] == "warning"
        assert logging.getLogger().level == logging.WARNING
        status, _, body = await post(ports["admin"], "/logging?access=off")
        assert status == 200 and json.loads(body)["loggers"]["access"] == "off"
        status, _, _ = await post(ports["admin"], "/logging?level=DEBUG")
        assert status == 200 and logging.getLogger().level == logging.DEBUG
    run_with_server(check)


@pytest.mark.parametrize("query, message", [
    ("", b"give level="),
    ("?level=loud", b"unknown level 'loud'"),
    ("?no.such.logger.anywhere=debug", b"unknown logger 'no.such.logger.anywhere'"),
    # all or nothing: a bad pair stops the good one
    ("?agent.proxy=error&level=nope", b"unknown level 'nope'"),
])
def test_logging_errors(restore_levels, query, message):
    async def check(server, ports, agent):
        logging.getLogger("agent.proxy").setLevel(logging.INFO)
        status, _, body = await post(ports["admin"], "/logging" + query)
        assert status == 400 and message in body, body
        assert logging.getLogger("agent.proxy").level == logging.INFO
    run_with_server(check)


def test_quitquitquit_sync():
    async def check(server, ports, agent):
        status, _, body = await post(ports["admin"], "/quitquitquit")
        assert (status, body) == (200, b"OK\n")
        await asyncio.sleep(0)
        assert agent.shutdowns == 1
        status, _, _ = await post(ports["admin"], "/quitquitquit")     # once only
        assert status == 200 and agent.shutdowns == 1
    run_with_server(check)


def test_quitquitquit_async():
    stopped = asyncio.Event

    async def check(server, ports, agent):
        event = stopped()

        async def shutdown():
            event.set()
        server.shutdown = shutdown
        status, _, _ = await post(ports["admin"], "/quitquitquit")
        assert status == 200
        await asyncio.wait_for(event.wait(), 2)
    run_with_server(check)


GARBAGE = [
    (b"garbage\r\n\r\n", 400),
    (b"\x00\xff\xfe\r\n\r\n", 400),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"get /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n", 400),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 413),
    (b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n", 400),   # one request per connection
    (b"GET /metrics HTTP/1.1\r\nHost: x", 400),                            # incomplete head, then EOF
    (b"POST /logging HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", 400),     # short body, then EOF
]


@pytest.mark.parametrize("raw, status", GARBAGE)
def test_garbage_then_still_serving(raw, status):
    async def check(server, ports, agent):
        for port in ports.values():
            got = await http(port, raw, half_close=True)
            assert got is not None and got[0] == status, (port, got)
        assert (await get(ports["metrics"], "/metrics"))[0] == 200
        assert (await get(ports["ready"], "/healthz/ready"))[0] == 503
        assert (await get(ports["admin"], "/logging"))[0] == 200
        assert agent.shutdowns == 0
    run_with_server(check)


def test_silent_and_slow_clients():
    async def check(server, ports, agent):
        # connect and leave: no response, no harm
        assert await http(ports["admin"], b"", half_close=True) is None
        # a client that never finishes its head gets 408
        got = await http(ports["admin"], b"GET /logging HTTP/1.1\r\n")
        assert got[0] == 408
        # abrupt reset mid-request
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["admin"])
        writer.write(b"GET /log")
        await writer.drain()
        writer.transport.abort()
        assert (await get(ports["admin"], "/logging"))[0] == 200
    run_with_server(check, request_timeout=0.3)


def test_many_concurrent_scrapes():
    async def check(server, ports, agent):
        results = await asyncio.gather(*(get(ports["metrics"], "/metrics") for _ in range(30)))
        assert all(r[0] == 200 for r in results)
    run_with_server(check)


def test_close_with_idle_client_open():
    async def check(server, ports, agent):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["admin"])
        writer.write(b"GET /")
        await writer.drain()
        await asyncio.sleep(0.05)
        await asyncio.wait_for(server.close(), 3)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
    run_with_server(check)


@pytest.mark.parametrize("head, expected", [
    (b"GET /metrics HTTP/1.1", ("GET", "/metrics", {})),
    (b"POST /logging?level=debug HTTP/1.0\r\nHost: a\r\nContent-Length: 0",
     ("POST", "/logging?level=debug", {"host": "a", "content-length": "0"})),
    (b"GET / HTTP/1.1\r\nAccept: a\r\naccept: b", ("GET", "/", {"accept": "a, b"})),
])
def test_parse_head(head, expected):
    assert parse_head(head) == expected


@pytest.mark.parametrize("head, status", [
    (b"", 400), (b"GET  /x HTTP/1.1", 400), (b"GET /x HTTP/1.1 extra", 400),
    (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b", 400), (b"GET /x HTTP/3", 505),
    (b"GET /x HTTP/1.1\r\n: novalue", 400), (b"GET /\xe9 HTTP/1.1", 400),
])
def test_parse_head_errors(head, status):
    with pytest.raises(HttpError) as err:
        parse_head(head)
    assert err.value.status == status


def test_oversized_request_answered_without_reset():
    """The client is still sending when the server rejects: the 431/413 must arrive intact."""
    async def check(server, ports, agent):
        for raw, status in [(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 200000 + b"\r\n\r\n", 431),
                            (b"POST /logging HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"b" * 100000, 413)]:
            got = await http(ports["admin"], raw)
            assert got is not None and got[0] == status
        assert (await get(ports["admin"], "/logging"))[0] == 200
    run_with_server(check)
