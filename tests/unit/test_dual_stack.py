"""Dual-stack decisions without a kernel: lab addressing, conflist, Service IPs,
the peer family of an outbound connection and which listener an IPv6 address gets."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from agent.capture.inpod import PodListeners
from agent.proxy.forward import _same_family
from lab import model
from lab.lab import Lab
from lab.model import ManifestError
from lab.network import NetworkBuilder
from lab.store import LabSettings, LabStore

LAB_V6 = ipaddress.ip_network("fd00:198:18::/48")


@pytest.mark.parametrize("slot, index, subnet, underlay", [
    (0, 0, "fd00:198:18::/64", "fd00:198:18:ff00::1"),
    (0, 1, "fd00:198:18:1::/64", "fd00:198:18:ff00::2"),
    (2, 3, "fd00:198:18:13::/64", "fd00:198:18:ff02::4"),
    (31, 7, "fd00:198:18:ff::/64", "fd00:198:18:ff1f::8"),
])
def test_ipv6_addressing_stays_inside_the_test_range(slot, index, subnet, underlay):
    assert model.pod_subnet6(slot, index) == subnet
    assert model.underlay_ip6(slot, index) == underlay
    assert ipaddress.ip_network(subnet).subnet_of(LAB_V6)
    assert ipaddress.ip_address(underlay) in LAB_V6
    assert ipaddress.ip_network(model.service_cidr6(slot)).subnet_of(LAB_V6)
    assert model.pod_gateway6(slot, index) == str(ipaddress.ip_network(subnet).network_address + 1)


def test_ipv6_ranges_of_all_labs_and_nodes_never_overlap():
    nets = [ipaddress.ip_network(model.pod_subnet6(s, i)) for s in range(model.MAX_SLOTS)
            for i in range(model.MAX_NODES)]
    nets += [ipaddress.ip_network(model.service_cidr6(s)) for s in range(model.MAX_SLOTS)]
    nets += [ipaddress.ip_network(f"{model.underlay_ip6(s, 0)}/64", strict=False) for s in range(model.MAX_SLOTS)]
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize("spec, dual", [
    ({}, False),
    ({"ipFamilyPolicy": "SingleStack"}, False),
    ({"ipFamilyPolicy": "PreferDualStack"}, True),
    ({"ipFamilyPolicy": "RequireDualStack"}, True),
    ({"ipFamilies": ["IPv4"]}, False),
    ({"ipFamilies": ["IPv4", "IPv6"]}, True),
])
def test_which_services_ask_for_dual_stack(spec, dual):
    assert model.wants_dual_stack(spec) is dual


def _rec(dual: bool) -> dict:
    node = {"pod_subnet": "198.18.16.0/24"}
    if dual:
        node["pod_subnet6"] = model.pod_subnet6(2, 0)
    return {"slot": 2, "service_cidr": model.service_cidr(2), "nodes": {"node1": node}}


@pytest.mark.parametrize("dual, policy, ips", [
    (False, None, ["198.19.136.1"]),
    (False, "PreferDualStack", ["198.19.136.1"]),           # an IPv4 lab: single stack, as the API server
    (True, None, ["198.19.136.1"]),
    (True, "PreferDualStack", ["198.19.136.1", "fd00:198:18:fe02::1"]),
])
def test_cluster_ips_of_a_service(dual, policy, ips):
    svc = {"kind": "Service", "metadata": {"name": "s", "namespace": "default"}, "spec": {}}
    if policy:
        svc["spec"]["ipFamilyPolicy"] = policy
    Lab._assign_cluster_ip(svc, [], _rec(dual))
    assert svc["spec"]["clusterIPs"] == ips and svc["spec"]["clusterIP"] == ips[0]


def test_a_second_dual_stack_service_gets_the_next_ipv6_and_an_update_keeps_its_own():
    items: list[dict] = []
    first = {"kind": "Service", "metadata": {"name": "a", "namespace": "default"},
             "spec": {"ipFamilyPolicy": "PreferDualStack"}}
    Lab._assign_cluster_ip(first, items, _rec(True))
    items.append(first)
    second = {"kind": "Service", "metadata": {"name": "b", "namespace": "default"},
              "spec": {"ipFamilyPolicy": "PreferDualStack"}}
    Lab._assign_cluster_ip(second, items, _rec(True))
    assert second["spec"]["clusterIPs"][1] == "fd00:198:18:fe02::2"
    again = {"kind": "Service", "metadata": {"name": "a", "namespace": "default"},
             "spec": {"ipFamilyPolicy": "PreferDualStack"}}
    Lab._assign_cluster_ip(again, items, _rec(True))
    assert again["spec"]["clusterIPs"] == first["spec"]["clusterIPs"]


def test_require_dual_stack_in_an_ipv4_lab_is_refused():
    svc = {"kind": "Service", "metadata": {"name": "s", "namespace": "default"},
           "spec": {"ipFamilyPolicy": "RequireDualStack"}}
    with pytest.raises(ManifestError):
        Lab._assign_cluster_ip(svc, [], _rec(False))


@pytest.mark.parametrize("dual, ranges, routes", [
    (False, [[{"subnet": "198.18.16.0/24"}]], [{"dst": "0.0.0.0/0"}]),
    (True, [[{"subnet": "198.18.16.0/24"}], [{"subnet": "fd00:198:18:10::/64"}]],
     [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]),
])
def test_node_conflist_has_a_second_host_local_range_only_when_dual_stack(tmp_path, dual, ranges, routes):
    builder = NetworkBuilder(LabStore("u", tmp_path), LabSettings(ambient_cni=False, dual_stack=dual))
    n = {"pod_subnet": "198.18.16.0/24"}
    if dual:
        n["pod_subnet6"] = model.pod_subnet6(2, 0)
    ipam = builder.conflist("node1", n)["plugins"][0]["ipam"]
    assert ipam["ranges"] == ranges and ipam["routes"] == routes


def test_node_object_lists_both_pod_cidrs_and_addresses():
    node = model.node_object("n", "198.19.2.1", "198.18.16.0/24", None, "fd00:198:18:10::/64",
                             "fd00:198:18:ff02::1")
    assert node["spec"]["podCIDRs"] == ["198.18.16.0/24", "fd00:198:18:10::/64"]
    assert [a["address"] for a in node["status"]["addresses"]] == ["198.19.2.1", "fd00:198:18:ff02::1", "n"]
    assert model.node_object("n", "198.19.2.1", "198.18.16.0/24")["spec"]["podCIDRs"] == ["198.18.16.0/24"]


@pytest.mark.parametrize("pod_ips, peer, source", [
    (["198.18.1.5", "fd00:198:18:1::5"], "127.0.0.1", "198.18.1.5"),
    (["198.18.1.5", "fd00:198:18:1::5"], "::1", "fd00:198:18:1::5"),     # IPv6 connect on [::1]:15001
    (["fd00:198:18:1::5", "198.18.1.5"], "127.0.0.1", "198.18.1.5"),
    (["198.18.1.5"], "::1", "::1"),                                     # no IPv6 address: what we saw
    ([], "127.0.0.1", "127.0.0.1"),
])
def test_outbound_source_is_the_pods_address_of_the_connections_family(pod_ips, peer, source):
    assert _same_family(pod_ips, peer) == source


def test_ipv6_addresses_get_the_ipv6_listeners_when_the_pod_has_them():
    socks = [socket.socket(socket.AF_INET), socket.socket(socket.AF_INET),
             socket.socket(socket.AF_INET6), socket.socket(socket.AF_INET6)]
    try:
        v4_in, v4_hb, v6_in, v6_hb = socks
        both = PodListeners(-1, 1, [], v4_in, v4_hb, v6_in, v6_hb)
        assert both.for_ip("198.18.1.5") == (v4_in, v4_hb)
        assert both.for_ip("fd00:198:18:1::5") == (v6_in, v6_hb)
        assert set(both.all()) == set(socks)
        # Without IPv6 listeners the IPv4 ones are named: sk_assign fails, sk_lookup drops.
        only4 = PodListeners(-1, 1, [], v4_in, v4_hb)
        assert only4.for_ip("fd00:198:18:1::5") == (v4_in, v4_hb)
        assert only4.all() == [v4_in, v4_hb]
    finally:
        for s in socks:
            s.close()


# /proc/net/if_inet6 and /proc/net/ipv6_route of a lab pod (fd00:198:18:1::5 on eth0,
# default route via the bridge's fd00:198:18:1::1), as the kernel prints them.
POD_IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fd000198001800010000000000000005 02 40 00 80     eth0
fe80000000000000a8bbccfffedd0011 02 40 20 80     eth0
"""
POD_IPV6_ROUTE = (
    "fd000198001800010000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "fd000198001800010000000000000001 00000400 00000003 00000000 00000003     eth0\n")


@pytest.mark.parametrize("ips, expected", [
    (["fd00:198:18:1::5"], ["fd00:198:18:1::5"]),                      # an IPv6-only pod
    (["FD00:198:18:1:0::5"], ["fd00:198:18:1::5"]),                    # any spelling of it
    (["198.18.1.5", "fd00:198:18:1::5"], ["198.18.1.5", "fd00:198:18:1::5"]),
    (["fd00:198:18:1::6"], None),
    (["fe80::a8bb:ccff:fedd:11"], None),                               # link-local is nobody's pod IP
])
def test_discovery_matches_a_pod_by_its_ipv6_address(ips, expected):
    from agent.enrol.discover import NetnsView, default_gateway_v6, local_ipv6, match
    addrs = local_ipv6(POD_IF_INET6) | ({"198.18.1.5"} if len(ips) == 2 else set())
    view = NetnsView("/run/netns/p", frozenset(addrs), tuple(default_gateway_v6(POD_IPV6_ROUTE)))
    found = match([view], ips)
    if expected is None:
        assert found is None
    else:
        assert found.path == "/run/netns/p" and found.ips == expected
        assert found.gateways == ["fd00:198:18:1::1"]     # the IPv6 probe source


def test_lab_up_offers_dual_stack():
    import subprocess
    import sys
    from pathlib import Path
    done = subprocess.run([sys.executable, "-m", "lab", "up", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert "--dual-stack" in done.stdout
