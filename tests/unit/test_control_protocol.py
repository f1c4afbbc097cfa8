"""The control-socket request parser: every request shape and every refusal."""

import json

import pytest

from agent.control import CniAdd, CniDel, ProtocolError, StatusRequest, parse_request

ADD = {"op": "cni-add", "namespace": "backend", "name": "api-0", "uid": "u-1",
       "container_id": "c-1", "netns": "/run/netns/p1", "interface": "eth0",
       "ips": ["198.18.1.5/24"], "gateways": ["198.18.1.1"]}


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_cni_add_is_decoded_with_prefix_lengths_dropped():
    req = parse_request(line(ADD))
    assert req == CniAdd("backend", "api-0", "u-1", "c-1", "/run/netns/p1", "eth0",
                         ("198.18.1.5",), ("198.18.1.1",))


def test_cni_add_accepts_ipv6_and_defaults_interface():
    obj = dict(ADD, ips=["198.18.1.5/24", "fd00:198:18::5/64"])
    del obj["interface"]
    req = parse_request(line(obj))
    assert req.ips == ("198.18.1.5", "fd00:198:18::5")
    assert req.interface == "eth0"


def test_cni_del_and_status():
    assert parse_request(line({"op": "cni-del", "namespace": "a", "name": "b"})) == CniDel("a", "b", "", "")
    assert parse_request(b'{"op": "status"}') == StatusRequest()


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe garbage", "not JSON"),
    (b"not json at all", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"op": "reboot"}', "unknown op 'reboot'"),
    (b"{}", "unknown op None"),
    (line(dict(ADD, netns="relative/path")), "absolute path"),
    (line(dict(ADD, ips=[])), "'ips' is required"),
    (line(dict(ADD, ips="198.18.1.5")), "list of addresses"),
    (line(dict(ADD, ips=["198.18.1.500/24"])), "not an IP address"),
    (line(dict(ADD, ips=[5])), "non-string"),
    (line(dict(ADD, namespace=7)), "'namespace' must be a string"),
    (line(dict(ADD, name="")), "'name' is required"),
    (line(dict(ADD, name="x" * 5000)), "not a plausible value"),
    (line(dict(ADD, netns="/run/netns/a\x00b")), "not a plausible value"),
    (line(dict(ADD, gateways=["nope"])), "'gateways': 'nope' is not an IP address"),
    (line({"op": "cni-del", "namespace": "a"}), "'name' is required"),
])
def test_bad_requests_are_refused_with_a_specific_reason(raw, message):
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(")):
        parse_request(raw)


# -- hostile input: bounded before json parses it (issue 11, item 7) -------------------

NESTED_60K = b"[" * 30000 + b"]" * 30000


@pytest.mark.parametrize("raw, message", [
    (NESTED_60K, "nested deeper than 8 levels"),
    (b'{"op": "status", "x": ' + b"[" * 9 + b"]" * 9 + b"}", "nested deeper than 8 levels"),
    (b'{"op": "status", "n": ' + b"9" * 5000 + b"}", "more than 32 digits"),
    (b'{"op": "status", "n": 1' + b"0" * 40 + b".5}", "more than 32 digits"),
    (b'{"op": "status", "pad": "' + b"x" * 70000 + b'"}', "more than the 65536 allowed"),
])
def test_hostile_requests_are_refused_before_parsing(raw, message):
    with pytest.raises(ProtocolError, match=message):
        parse_request(raw)


def test_brackets_and_digits_inside_strings_do_not_count():
    obj = dict(ADD, name="[[[[[[[[[[{{{{{{{{{{" + "1" * 100)
    assert parse_request(line(obj)).name == obj["name"]


def test_the_server_answers_60k_of_nesting_with_a_specific_error_line(tmp_path, caplog):
    """The request gets one error line back; the log gets a warning, not a RecursionError."""
    import asyncio
    import logging
    import socket as socketlib

    from agent.control import ControlServer, request

    async def handler(req):
        return {"ok": True, "op": type(req).__name__}

    async def main():
        server = ControlServer(str(tmp_path / "agent.sock"), handler)
        await server.start()
        loop = asyncio.get_running_loop()

        def send(raw: bytes) -> bytes:
            with socketlib.socket(socketlib.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(server.path)
                s.sendall(raw + b"\n")
                return s.makefile("rb").readline()

        try:
            nested = await loop.run_in_executor(None, send, NESTED_60K)
            huge = await loop.run_in_executor(None, send, b'{"op": "status", "n": ' + b"9" * 5000 + b"}")
            ok = await loop.run_in_executor(None, request, server.path, {"op": "status"})
        finally:
            await server.close()
        return json.loads(nested), json.loads(huge), ok

    with caplog.at_level(logging.DEBUG):
        nested, huge, ok = asyncio.run(main())
    assert nested == {"ok": False, "error": "request refused: nested deeper than 8 levels"}
    assert huge == {"ok": False, "error": "request refused: a number of more than 32 digits"}
    assert ok == {"ok": True, "op": "StatusRequest"}         # the socket still serves
    assert not [r for r in caplog.records if r.exc_info or "Recursion" in r.getMessage()]
