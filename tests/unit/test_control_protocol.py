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
