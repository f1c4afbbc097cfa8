"""ServiceEntry and WorkloadEntry: the typed views, virtual-IP allocation,
host lookup (what the DNS proxy answers) and route decisions (issue 14, item 4
and item 3's allocation)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from agent.proxy.route import resolve, workload_meshed
from agent.state import serviceentry as se
from agent.state.model import ClusterState, WorkloadSpec

TD = "cluster.local"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def entry(name="ext", hosts=("api.example.com",), namespace="shop", version="v1", **spec) -> dict:
    spec.setdefault("resolution", "STATIC")
    spec.setdefault("ports", [{"number": 80, "name": "http", "protocol": "HTTP"}])
    return {"apiVersion": f"networking.istio.io/{version}", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"hosts": list(hosts), **spec}}


def workload_entry(name="vm", address="198.18.9.1", namespace="shop", **spec) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"address": address, **spec}}


def pod(name, ip, labels=None, namespace="shop", sa="default") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": "node1", "serviceAccountName": sa},
            "status": {"phase": "Running", "podIP": ip}}


def state(*items) -> ClusterState:
    return ClusterState.from_items(list(items))


# -- views and validation ---------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_every_istio_version_is_read(version):
    s = state(entry(version=version, hosts=["API.Example.com."], addresses=["198.18.9.0/24"],
                    location="MESH_INTERNAL", endpoints=[{"address": "198.18.9.1", "ports": {"http": 8080},
                                                          "serviceAccount": "vm", "labels": AMBIENT}]))
    view = s.service_entry_views[("shop", "ext")]
    assert view.hosts == ("api.example.com",)
    assert view.addresses == ("198.18.9.0/24",)
    assert (view.location, view.resolution) == ("MESH_INTERNAL", "STATIC")
    assert view.ports[0].number == 80 and view.ports[0].name == "http" and view.ports[0].protocol == "HTTP"
    assert view.endpoints[0].address == "198.18.9.1" and view.endpoints[0].ports["http"] == 8080
    assert view.endpoints[0].service_account == "vm"
    assert view.workload_selector is None
    assert s.errors == []


def test_defaults_follow_istio():
    raw = entry()
    del raw["spec"]["resolution"]
    view = state(raw).service_entry_views[("shop", "ext")]
    assert (view.resolution, view.location) == ("NONE", "MESH_EXTERNAL")


def test_workload_entry_view():
    s = state(workload_entry(labels={"app": "vm"}, serviceAccount="vm-sa", network="n1", ports={"http": 9080}))
    we = s.workload_entry_views[("shop", "vm")]
    assert (we.address, dict(we.labels), we.service_account, we.network) == ("198.18.9.1", {"app": "vm"},
                                                                            "vm-sa", "n1")
    assert we.spec.ports["http"] == 9080


@pytest.mark.parametrize("raw, reason", [
    (entry(version="v2"), "apiVersion"),
    (entry(hosts=[]), "spec.hosts is empty"),
    (entry(hosts=["bad_host!"]), "not a DNS name"),
    (entry(hosts=["a.*.com"]), "not a DNS name"),
    (entry(hosts=[7]), "not a non-empty string"),
    (entry(addresses=["not-an-ip"]), "spec.addresses"),
    (entry(ports=[{"number": 0, "name": "x"}]), "number is not 1..65535"),
    (entry(ports=[{"number": 80, "targetPort": "http"}]), "targetPort"),
    (entry(resolution="MAGIC"), "resolution 'MAGIC'"),
    (entry(location="ELSEWHERE"), "location"),
    (entry(endpoints=[{"address": "198.18.9.1"}], workloadSelector={"labels": {"a": "b"}}), "mutually exclusive"),
    (entry(workloadSelector={"labels": ["a"]}), "workloadSelector.labels"),
    (entry(endpoints=[{"address": "vm.example.com"}]), "resolution STATIC needs an IP"),
    (entry(endpoints=[{}]), "has no address"),
    (entry(endpoints=[{"address": "198.18.9.1", "ports": {"http": "80"}}]), "ports"),
    (entry(endpoints=[{"address": "198.18.9.1", "serviceAccount": 5}]), "serviceAccount is a int"),
    ({**entry(), "spec": "nope"}, "no spec"),
    (workload_entry(address=""), "has no address"),
    (workload_entry(labels={"a": 1}), "labels"),
    (workload_entry(serviceAccount=["x"]), "serviceAccount"),
    (entry(exportTo="*"), "spec.exportTo is not a list"),
    (entry(exportTo=[".", 3]), "spec.exportTo is not a list"),
    (entry(exportTo=["Not_A_Namespace"]), "is not '.', '*', '~' or a namespace name"),
    (entry(exportTo=["~", "shop"]), "'~' (visible nowhere) cannot be combined"),
])
def test_malformed_entries_are_ignored_with_a_reason(raw, reason):
    good = entry(name="good", hosts=["ok.example.com"])
    s = state(raw, good)
    assert ("shop", raw["metadata"]["name"]) not in {**s.service_entry_views, **s.workload_entry_views}
    assert ("shop", "good") in s.service_entry_views          # the rest of the state stands
    assert len(s.errors) == 1 and reason in s.errors[0] and "(ignored)" in s.errors[0], s.errors
    assert se.resolve_host(s, "ok.example.com")                # lookups still work


def test_other_groups_are_not_istio_entries():
    foreign = {**entry(), "apiVersion": "example.com/v1"}
    s = state(foreign)
    assert s.service_entry_views == {} and s.errors == []


# -- allocation ---------------------------------------------------------------------

def test_slots_map_into_the_documented_ranges_and_never_to_0_or_255():
    for slot in (0, 1, 253, 254, 255, se.SLOTS - 1) + tuple(random.Random(1).sample(range(se.SLOTS), 200)):
        v4, v6 = se.slot_addresses(slot)
        assert ipaddress.ip_address(v4) in se.V4_RANGE and ipaddress.ip_address(v6) in se.V6_RANGE
        assert v4.rsplit(".", 1)[1] not in ("0", "255")
    assert len({se.slot_addresses(s)[0] for s in range(se.SLOTS)}) == se.SLOTS
    assert se.slot_addresses(0) == ("240.240.0.1", "2001:2::f0f0:1")
    assert se.slot_addresses(254) == ("240.240.1.1", "2001:2::f0f0:101")
    with pytest.raises(ValueError):
        se.slot_addresses(se.SLOTS)


def test_allocation_ignores_order_and_is_unique():
    keys = [f"ns{i % 7}/entry{i}/host{i}.example.com" for i in range(3000)]
    first = se.allocate(keys)
    for seed in range(3):
        shuffled = keys[:]
        random.Random(seed).shuffle(shuffled)
        assert se.allocate(shuffled) == first
    assert len({v4 for v4, _ in first.values()}) == len(keys)
    assert len({v6 for _, v6 in first.values()}) == len(keys)


def _colliding_pair() -> tuple[str, str]:
    seen: dict[int, str] = {}
    for i in range(100000):
        key = f"shop/e{i}/h.example.com"
        slot = se.fnv1a32(key.encode()) % se.SLOTS
        if slot in seen:
            return seen[slot], key
        seen[slot] = key
    raise AssertionError("no collision found")


def test_collisions_are_resolved_the_same_way_on_every_node():
    a, b = _colliding_pair()
    one, two = se.allocate([a, b]), se.allocate([b, a])
    assert one == two
    assert one[a] != one[b]
    # The key that sorts first keeps its hash slot; the other probes onwards.
    winner = min(a, b)
    assert one[winner] == se.slot_addresses(se.fnv1a32(winner.encode()) % se.SLOTS)


def test_a_full_range_hands_out_every_slot_once():
    keys = [f"k{i}" for i in range(se.SLOTS + 5)]
    out = se.allocate(keys)
    assert len(out) == se.SLOTS and len(set(out.values())) == se.SLOTS


def test_adding_an_entry_keeps_the_others_addresses():
    base = [entry(name=f"e{i}", hosts=[f"h{i}.example.com"]) for i in range(50)]
    before = se.allocated_vips(state(*base))
    after = se.allocated_vips(state(*base, entry(name="new", hosts=["new.example.com"])))
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.parametrize("spec, gets_vip", [
    ({}, True),
    ({"resolution": "DNS"}, False),           # answered upstream, passes through
    ({"resolution": "NONE"}, False),          # as Istio: the original destination would be lost
    ({"addresses": ["198.18.9.7"]}, False),   # has its own
])
def test_who_gets_a_virtual_ip(spec, gets_vip):
    s = state(entry(**spec))
    assert bool(se.allocated_vips(s)) == gets_vip


def test_wildcard_hosts_get_no_virtual_ip():
    s = state(entry(hosts=["*.example.com", "api.example.com"]))
    assert list(se.allocated_vips(s)) == ["shop/ext/api.example.com"]


# -- host lookup (what the DNS proxy answers) ---------------------------------------

def test_resolve_host_exact_wildcard_and_unknown():
    s = state(entry(name="api", hosts=["api.example.com"]),
              entry(name="wild", hosts=["*.example.com"], addresses=["198.18.9.9", "fd00:198:18::9", "198.18.10.0/24"]),
              entry(name="deeper", hosts=["*.eu.example.com"], addresses=["198.18.9.10"]),
              entry(name="any", hosts=["*"], addresses=["198.18.9.11"]),
              entry(name="dns", hosts=["dns.example.org"], resolution="DNS"))
    v4, v6 = se.allocated_vips(s)["shop/api/api.example.com"]
    assert se.resolve_host(s, "api.example.com") == [v4, v6]
    assert se.resolve_host(s, "API.EXAMPLE.COM.") == [v4, v6]
    assert se.resolve_host(s, "web.example.com") == ["198.18.9.9", "fd00:198:18::9"]   # CIDR: no answer
    assert se.resolve_host(s, "a.b.example.com") == ["198.18.9.9", "fd00:198:18::9"]
    assert se.resolve_host(s, "x.eu.example.com") == ["198.18.9.10"]                  # most specific
    assert se.resolve_host(s, "example.com") == []         # a wildcard needs a label before the suffix
    assert se.resolve_host(s, "dns.example.org") == []     # known, but answered upstream
    assert se.lookup_host(s, "dns.example.org").entry.name == "dns"
    assert se.resolve_host(s, "elsewhere.net") == []       # a bare "*" never answers DNS
    assert se.resolve_host(s, "") == []


def test_same_host_in_two_entries_first_by_name_wins():
    s = state(entry(name="b", hosts=["x.example.com"], addresses=["198.18.9.2"]),
              entry(name="a", hosts=["x.example.com"], addresses=["198.18.9.1"]))
    assert se.resolve_host(s, "x.example.com") == ["198.18.9.1"]


def test_the_index_is_built_once_per_state():
    s = state(entry())
    assert se.index(s) is se.index(s)


def test_entry_for_ip_single_addresses_cidrs_and_vips():
    s = state(entry(name="net", hosts=["db.example.com"], addresses=["198.18.20.0/24"]),
              entry(name="vip", hosts=["api.example.com"]))
    assert se.entry_for_ip(s, "198.18.20.7")[0].name == "net"
    v4, v6 = se.resolve_host(s, "api.example.com")
    assert se.entry_for_ip(s, v4)[1] == "api.example.com" and se.entry_for_ip(s, v6)[0].name == "vip"
    assert se.entry_for_ip(s, v6.replace("2001:2::", "2001:0002:0:0:0:0:"))[0].name == "vip"  # not canonical
    assert se.entry_for_ip(s, "198.18.21.1") is None
    assert se.entry_for_ip(s, "garbage") is None


# -- route decisions --------------------------------------------------------------------

MESHED_NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": AMBIENT}}
PLAIN_NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}


def _vip(s, host="api.example.com") -> str:
    return se.resolve_host(s, host)[0]


def test_static_selector_to_a_meshed_pod_is_hbone_with_the_pod_identity():
    s = state(MESHED_NS, pod("db-0", "198.18.1.5", {"app": "db"}, sa="db"),
              entry(ports=[{"number": 80, "name": "http", "targetPort": 8080}],
                    workloadSelector={"labels": {"app": "db"}}))
    r = resolve(s, _vip(s), 80, TD)
    assert (r.kind, r.ip, r.port, r.identity) == ("hbone", "198.18.1.5", 8080, f"spiffe://{TD}/ns/shop/sa/db")
    assert r.pod is not None and r.pod.name == "db-0"


def test_static_selector_to_an_unmeshed_pod_is_plaintext():
    s = state(PLAIN_NS, pod("db-0", "198.18.1.5", {"app": "db"}), entry(workloadSelector={"labels": {"app": "db"}}))
    r = resolve(s, _vip(s), 80, TD)
    assert (r.kind, r.ip, r.port) == ("passthrough", "198.18.1.5", 80)


@pytest.mark.parametrize("we_spec, kind, identity", [
    ({"serviceAccount": "vm", "labels": {"app": "vm", **AMBIENT}}, "hbone", f"spiffe://{TD}/ns/shop/sa/vm"),
    ({"labels": {"app": "vm", **AMBIENT}}, "passthrough", ""),           # no service account: no identity
    ({"serviceAccount": "vm", "labels": {"app": "vm"}}, "passthrough", ""),   # not labelled ambient
])
def test_workload_entry_meshed_or_not(we_spec, kind, identity):
    s = state(PLAIN_NS, workload_entry(ports={"http": 9080}, **we_spec),
              entry(workloadSelector={"labels": {"app": "vm"}}))
    r = resolve(s, _vip(s), 80, TD)
    assert (r.kind, r.ip, r.port, r.identity) == (kind, "198.18.9.1", 9080, identity)


def test_workload_entry_at_an_unmeshed_pods_address_is_plaintext_to_that_pod():
    s = state(PLAIN_NS, pod("legacy", "198.18.1.9", {"app": "other"}),
              workload_entry(address="198.18.1.9", labels={"app": "vm"}),
              entry(workloadSelector={"labels": {"app": "vm"}}))
    r = resolve(s, _vip(s), 80, TD)
    assert (r.kind, r.ip, r.port) == ("passthrough", "198.18.1.9", 80)
    assert r.pod is not None and r.pod.name == "legacy"


def test_workload_entries_of_other_namespaces_are_not_selected():
    s = state(PLAIN_NS, workload_entry(namespace="elsewhere", labels={"app": "vm"}),
              entry(workloadSelector={"labels": {"app": "vm"}}))
    assert resolve(s, _vip(s), 80, TD).kind == "no-endpoint"


def test_inline_endpoints_and_the_port_map():
    s = state(entry(addresses=["198.18.30.1"], endpoints=[
        {"address": "198.18.9.1", "ports": {"http": 8081}, "serviceAccount": "vm", "labels": AMBIENT},
        {"address": "198.18.9.2"}]))
    routes = {resolve(s, "198.18.30.1", 80, TD, salt=salt).ip: resolve(s, "198.18.30.1", 80, TD, salt=salt)
              for salt in range(20)}
    assert set(routes) == {"198.18.9.1", "198.18.9.2"}
    assert (routes["198.18.9.1"].kind, routes["198.18.9.1"].port) == ("hbone", 8081)
    assert (routes["198.18.9.2"].kind, routes["198.18.9.2"].port) == ("passthrough", 80)


@pytest.mark.parametrize("resolution", ["DNS", "NONE"])
def test_dns_and_none_pass_through_to_the_original_destination(resolution):
    s = state(entry(resolution=resolution, addresses=["198.18.30.2"], endpoints=[{"address": "198.18.9.1"}]
                    if resolution == "NONE" else []))
    r = resolve(s, "198.18.30.2", 80, TD)
    assert (r.kind, r.ip, r.port) == ("passthrough", "198.18.30.2", 80)
    assert resolution in r.reason


def test_unknown_port_and_no_endpoint():
    s = state(entry(workloadSelector={"labels": {"app": "none"}}))
    assert resolve(s, _vip(s), 81, TD).kind == "no-endpoint"
    assert "no endpoint" in resolve(s, _vip(s), 80, TD).reason


def test_ipv6_vip_picks_the_pods_ipv6_address():
    raw = pod("db-0", "198.18.1.5", {"app": "db"})
    raw["status"]["podIPs"] = [{"ip": "198.18.1.5"}, {"ip": "fd00:198:18::5"}]
    s = state(MESHED_NS, raw, entry(workloadSelector={"labels": {"app": "db"}}))
    v4, v6 = se.resolve_host(s, "api.example.com")
    assert resolve(s, v6, 80, TD).ip == "fd00:198:18::5"
    assert resolve(s, v4, 80, TD).ip == "198.18.1.5"


def test_workload_meshed_rule():
    assert workload_meshed(WorkloadSpec("198.18.9.1", AMBIENT, "vm", "", {}))
    assert not workload_meshed(WorkloadSpec("198.18.9.1", AMBIENT, "", "", {}))
    assert not workload_meshed(WorkloadSpec("198.18.9.1", {"istio.io/dataplane-mode": "none"}, "vm", "", {}))


# -- exportTo: who sees an entry ----------------------------------------------------

@pytest.mark.parametrize("export_to, visible_in", [
    (None, {"shop", "web", "other"}),                 # Istio's default: "*"
    ([], {"shop", "web", "other"}),
    (["*"], {"shop", "web", "other"}),
    (["."], {"shop"}),                                # the entry's own namespace
    (["web"], {"web"}),                               # named namespaces only, not its own
    ([".", "web"], {"shop", "web"}),
    (["web", "*"], {"shop", "web", "other"}),
    (["~"], set()),                                   # nobody
])
def test_export_to_decides_who_sees_the_entry(export_to, visible_in):
    spec = {} if export_to is None else {"exportTo": export_to}
    s = state(PLAIN_NS, pod("db-0", "198.18.1.5", {"app": "db"}),
              entry(workloadSelector={"labels": {"app": "db"}}, **spec))
    assert s.errors == []
    view = s.service_entry_views[("shop", "ext")]
    vip = se.allocated_vips(s)["shop/ext/api.example.com"][0]     # allocated whoever sees it
    for ns in ("shop", "web", "other"):
        seen = ns in visible_in
        assert view.visible_to(ns) is seen
        assert se.resolve_host(s, "api.example.com", ns) == ([vip, se.allocated_vips(s)["shop/ext/api.example.com"][1]]
                                                             if seen else [])
        assert (se.entry_for_ip(s, vip, ns) is not None) is seen
        r = resolve(s, vip, 80, TD, namespace=ns)
        # Not exported here: the address means nothing to this client, which
        # gets plain passthrough to it (as a client that never heard of it).
        assert (r.kind, r.ip) == (("passthrough", "198.18.1.5") if seen else ("passthrough", vip)), r
        assert (r.service_host == "api.example.com") is seen
    assert view.visible_to(None)                     # no client (status output): every entry


def test_a_hidden_entry_gives_way_to_a_visible_one_with_the_same_host_or_address():
    # "infra/a-hidden" sorts first, so it wins where it is seen.
    hidden = entry(name="a-hidden", hosts=["api.example.com"], addresses=["198.18.9.9"], namespace="infra",
                   exportTo=["."])
    public = entry(name="b-public", hosts=["api.example.com"], addresses=["198.18.9.9"],
                   endpoints=[{"address": "198.18.9.10"}])
    wild = entry(name="c-wild", hosts=["*.example.com"], addresses=["198.18.9.11"], namespace="infra",
                 exportTo=["."])
    s = state(hidden, public, wild)
    assert se.lookup_host(s, "api.example.com", "infra").entry.name == "a-hidden"
    assert se.lookup_host(s, "api.example.com", "web").entry.name == "b-public"
    assert se.lookup_host(s, "api.example.com").entry.name == "a-hidden"      # no client: first of all
    assert se.entry_for_ip(s, "198.18.9.9", "infra")[0].name == "a-hidden"
    assert se.entry_for_ip(s, "198.18.9.9", "web")[0].name == "b-public"
    assert se.resolve_host(s, "x.example.com", "infra") == ["198.18.9.11"]
    assert se.resolve_host(s, "x.example.com", "web") == []            # upstream


# -- the service a ServiceEntry connection reports ------------------------------------

def test_routes_name_the_entry_and_host_as_istiod_tells_ztunnel():
    s = state(MESHED_NS, pod("db-0", "198.18.1.5", {"app": "db"}, sa="db"),
              entry(hosts=["db.example.com", "db2.example.com"], workloadSelector={"labels": {"app": "db"}}),
              entry(name="dns", hosts=["dns.example.com"], resolution="DNS", addresses=["198.18.9.20"]),
              entry(name="empty", hosts=["empty.example.com"]))
    for host in ("db.example.com", "db2.example.com"):
        r = resolve(s, _vip(s, host), 80, TD)
        assert (r.kind, r.service, r.service_host) == ("hbone", "shop/ext", host)
    r = resolve(s, "198.18.9.20", 443, TD)
    assert (r.kind, r.service, r.service_host) == ("passthrough", "shop/dns", "dns.example.com")
    r = resolve(s, _vip(s, "empty.example.com"), 80, TD)
    assert (r.kind, r.service, r.service_host) == ("no-endpoint", "shop/empty", "empty.example.com")
    # Services keep no host of their own: theirs is name.namespace.svc.<domain>.
    assert resolve(s, "198.18.1.5", 80, TD).service_host == ""
