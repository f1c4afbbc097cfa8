"""Parsers behind live enrolment's network-namespace discovery (text from a real 6.18 kernel)."""

import os

import pytest

from agent.enrol.discover import (NetnsView, default_gateway_v4, default_gateway_v6, local_ipv4,
                                  local_ipv6, match)

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 2 0 2
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 198.18.250.0/24 2 0 2
        +-- 198.18.250.0/29 2 0 2
           |-- 198.18.250.0
              /24 link UNICAST
           |-- 198.18.250.7
              /32 host LOCAL
        |-- 198.18.250.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 2 0 2
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 198.18.250.0/24 2 0 2
           |-- 198.18.250.7
              /32 host LOCAL
           |-- 198.18.251.9
              /32 host LOCAL
        |-- 198.18.250.255
           /32 link BROADCAST
"""

IF_INET6 = """\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
fd000198001800000000000000000005 04 40 00 80     eth0
"""

ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
v0\t00000000\t01FA12C6\t0003\t0\t0\t0\t00000000\t0\t0\t0
v0\t00FA12C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""

IPV6_ROUTE = """\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000198001800000000000000000001 00000400 00000003 00000000 00000003     eth0
"""


def test_ipv4_addresses_are_host_local_leaves_without_loopback():
    assert local_ipv4(FIB_TRIE) == {"198.18.250.7", "198.18.251.9"}


def test_ipv6_addresses_skip_loopback_and_link_local():
    assert local_ipv6(IF_INET6) == {"fd00:198:18::5"}


@pytest.mark.parametrize("text,expected", [
    (ROUTE, ["198.18.250.1"]),
    (ROUTE.splitlines()[0] + "\n", []),
    ("", []),
    ("header\nv0 zz 01FA12C6 0003 0 0 0 00000000 0 0 0\n", []),
])
def test_default_gateway_v4(text, expected):
    assert default_gateway_v4(text) == expected


def test_default_gateway_v6():
    assert default_gateway_v6(IPV6_ROUTE) == ["fd00:198:18::1"]
    assert default_gateway_v6("") == []


def _view(path, *addrs, gws=()):
    return NetnsView(path, frozenset(addrs), tuple(gws))


@pytest.mark.parametrize("views,ips,expected", [
    ([_view("/run/netns/a", "198.18.1.2", gws=["198.18.1.1"])], ["198.18.1.2"],
     ("/run/netns/a", ["198.18.1.2"], ["198.18.1.1"])),
    ([_view("/run/netns/a", "198.18.1.2")], ["198.18.1.3"], None),
    ([], ["198.18.1.3"], None),
    ([_view("/run/netns/a", "198.18.1.2")], [], None),
    # dual stack: the IPv4 address is listed first
    ([_view("/proc/7/ns/net", "fd00:198:18::5", "198.18.1.2")], ["fd00:198:18::5", "198.18.1.2"],
     ("/proc/7/ns/net", ["198.18.1.2", "fd00:198:18::5"], [])),
    # the pod's IP in two namespaces: ambiguous, never guessed
    ([_view("/run/netns/a", "198.18.1.2"), _view("/run/netns/b", "198.18.1.2")], ["198.18.1.2"],
     "ambiguous"),
])
def test_match(views, ips, expected):
    result = match(views, ips)
    if expected is None:
        assert result is None
    elif expected == "ambiguous":
        assert isinstance(result, str) and "2 network namespaces" in result
    else:
        assert (result.path, result.ips, result.gateways) == expected


def test_candidates_one_path_per_namespace_pinned_names_first(tmp_path):
    from agent.enrol.discover import _candidates
    pinned = tmp_path / "netns"
    pinned.mkdir()
    (pinned / "pod-a").write_text("")
    proc = tmp_path / "proc"
    for pid in ("10", "11", "12"):
        (proc / pid / "ns").mkdir(parents=True)
    os.link(pinned / "pod-a", proc / "10" / "ns" / "net")    # pod-a's pause process
    (proc / "11" / "ns" / "net").write_text("")
    os.link(proc / "11" / "ns" / "net", proc / "12" / "ns" / "net")   # two processes, one namespace
    (proc / "self").mkdir()
    found = sorted(_candidates(str(proc), [str(pinned), str(tmp_path / "absent")]).values())
    assert found == sorted([str(pinned / "pod-a"), str(proc / "11" / "ns" / "net")])
