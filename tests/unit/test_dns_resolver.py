"""The DNS proxy's sans-IO core: which names are the mesh's, what is forwarded,
what malformed input gets. Queries and answers are real DNS messages made and
read with dnspython."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from agent.dns.names import capture_wanted, service_addresses
from agent.dns.resolver import (
    MAX_QUERY_BYTES,
    Drop,
    Forward,
    Reply,
    Resolver,
    TokenBucket,
    matches,
    parse_resolv_conf,
    truncated,
)
from agent.state.model import ClusterState
from tests.builders import namespace, pod, service

SERVICES = {
    ("shop", "web"): ("198.19.0.10",),
    ("shop", "dual"): ("198.19.0.11", "fd00:198:19::11"),
    ("shop", "db"): ("198.18.1.5", "198.18.2.7"),          # headless: ready pod IPs
    ("other", "api"): ("198.19.0.20",),
    ("other", "v6only"): ("fd00:198:19::20",),
}


def lookup(namespace: str, name: str):
    return SERVICES.get((namespace, name))


def resolver(ns: str = "shop") -> Resolver:
    return Resolver(ns, lookup, "cluster.local")


def ask(name: str, rdtype: str = "A", ns: str = "shop", udp: bool = True, **kw):
    query = dns.message.make_query(name, rdtype, **kw)
    return query, resolver(ns).decide(query.to_wire(), udp)


def addresses(reply: Reply) -> list[str]:
    msg = dns.message.from_wire(reply.wire)
    return sorted(rd.to_text() for rrset in msg.answer for rd in rrset)


@pytest.mark.parametrize("name, ns, rdtype, expected", [
    ("web.shop.svc.cluster.local.", "shop", "A", ["198.19.0.10"]),
    ("WEB.Shop.SVC.cluster.LOCAL.", "shop", "A", ["198.19.0.10"]),    # case-insensitive
    ("web.shop.svc.", "shop", "A", ["198.19.0.10"]),                  # short forms
    ("web.shop.", "other", "A", ["198.19.0.10"]),
    ("web.", "shop", "A", ["198.19.0.10"]),
    ("api.", "other", "A", ["198.19.0.20"]),
    ("api.other.", "shop", "A", ["198.19.0.20"]),
    ("dual.shop.svc.cluster.local.", "shop", "AAAA", ["fd00:198:19::11"]),
    ("dual.shop.svc.cluster.local.", "shop", "A", ["198.19.0.11"]),
    ("db.shop.svc.cluster.local.", "shop", "A", ["198.18.1.5", "198.18.2.7"]),   # headless
    ("v6only.other.svc.cluster.local.", "shop", "A", []),            # known name, no A: NODATA
])
def test_mesh_names_are_answered(name, ns, rdtype, expected):
    query, decision = ask(name, rdtype, ns)
    assert isinstance(decision, Reply)
    msg = dns.message.from_wire(decision.wire)
    assert msg.id == query.id and msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.AA and msg.flags & dns.flags.QR
    assert addresses(decision) == expected
    assert decision.outcome == ("local" if expected else "nodata")
    assert all(rrset.ttl == 30 for rrset in msg.answer)


@pytest.mark.parametrize("name, ns, rdtype", [
    ("example.com.", "shop", "A"),
    ("web.other.svc.cluster.local.", "shop", "A"),     # no such Service in that namespace
    ("api.", "shop", "A"),                             # short name: the pod's namespace only
    ("web.shop.svc.other.domain.", "shop", "A"),       # another cluster domain
    ("web.shop.svc.cluster.local.example.com.", "shop", "A"),   # a search-path expansion past ours
    ("web.shop.svc.cluster.local.", "shop", "MX"),     # only A and AAAA are answered here
    ("web.shop.svc.cluster.local.", "shop", "TXT"),
    ("a.b.c.d.", "shop", "A"),
])
def test_everything_else_is_forwarded_unchanged(name, ns, rdtype):
    query, decision = ask(name, rdtype, ns)
    assert isinstance(decision, Forward)
    assert decision.query == query.to_wire() and decision.id == query.id


def test_search_path_expansions_of_a_short_name():
    # glibc with ndots:5 and the pod's search path tries these in order; the
    # first that is a mesh name answers, the foreign ones are forwarded.
    search = parse_resolv_conf("search shop.svc.cluster.local svc.cluster.local cluster.local example.com\n"
                               "nameserver 198.18.0.53\noptions ndots:5\n").search
    r = resolver("shop")
    outcomes = []
    for domain in search:
        q = dns.message.make_query(f"web.{domain}.", "A")
        outcomes.append(type(r.decide(q.to_wire(), True)).__name__)
    # web.shop.svc.cluster.local: answered; web.svc.cluster.local, web.cluster.local and
    # web.example.com are no mesh name's form: forwarded.
    assert outcomes == ["Reply", "Forward", "Forward", "Forward"]


def test_headless_answer_too_big_for_udp_is_truncated():
    many = tuple(f"198.18.{i // 250}.{i % 250 + 1}" for i in range(200))
    r = Resolver("shop", lambda ns, name: many if name == "big" else None)
    q = dns.message.make_query("big.shop.svc.cluster.local.", "A")   # no EDNS: 512 bytes
    udp = r.decide(q.to_wire(), udp=True)
    assert isinstance(udp, Reply)
    msg = dns.message.from_wire(udp.wire)
    assert msg.flags & dns.flags.TC and not msg.answer and len(udp.wire) <= 512
    tcp = r.decide(q.to_wire(), udp=False)
    assert isinstance(tcp, Reply) and len(addresses(tcp)) == 200
    edns = dns.message.make_query("big.shop.svc.cluster.local.", "A", use_edns=0, payload=4096)
    big = r.decide(edns.to_wire(), udp=True)
    assert isinstance(big, Reply) and len(addresses(big)) == 200


@pytest.mark.parametrize("wire, outcome, rcode", [
    (b"", "dropped", None),
    (b"\x12\x34\x01", "dropped", None),                          # shorter than a header
    (b"\x12\x34\x81\x80" + bytes(8), "dropped", None),           # a response: never answered
    (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07exam", "formerr", dns.rcode.FORMERR),
    (b"\x12\x34\x01\x00" + bytes(8) + b"\xff" * 40, "formerr", dns.rcode.FORMERR),
    (b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\xc0\x0c\x00\x01\x00\x01", "formerr", dns.rcode.FORMERR),
    (b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\x00" * (MAX_QUERY_BYTES), "formerr", dns.rcode.FORMERR),
])
def test_malformed_input(wire, outcome, rcode):
    decision = resolver().decide(wire, True)
    if rcode is None:
        assert decision == Drop(outcome)
        return
    assert isinstance(decision, Reply) and decision.outcome == outcome
    msg = dns.message.from_wire(decision.wire)
    assert msg.id == 0x1234 and msg.rcode() == rcode and msg.flags & dns.flags.QR


def test_two_questions_and_other_opcodes():
    q = dns.message.make_query("web.shop.svc.cluster.local.", "A")
    q.question.append(dns.message.make_query("x.", "A").question[0])
    d = resolver().decide(q.to_wire(), True)
    assert isinstance(d, Reply) and d.outcome == "formerr"
    n = dns.message.make_query("web.", "A")
    n.set_opcode(dns.opcode.NOTIFY)
    d = resolver().decide(n.to_wire(), True)
    assert isinstance(d, Reply) and dns.message.from_wire(d.wire).rcode() == dns.rcode.NOTIMP


def test_upstream_reply_and_failures():
    query, fwd = ask("example.com.")
    assert isinstance(fwd, Forward)
    good = dns.message.make_response(query)
    assert Resolver.upstream_reply(fwd, good.to_wire()) == Reply(good.to_wire(), "forwarded")
    for bad in (None, b"", good.to_wire()[:5], b"\x00\x00" + good.to_wire()[2:], query.to_wire()):
        r = Resolver.upstream_reply(fwd, bad)
        msg = dns.message.from_wire(r.wire)
        assert r.outcome == "servfail" and msg.rcode() == dns.rcode.SERVFAIL and msg.id == query.id
    assert matches(fwd, good.to_wire()) and not matches(fwd, query.to_wire())


def test_truncation_bit_means_retry_over_tcp():
    query = dns.message.make_query("example.com.", "A")
    resp = dns.message.make_response(query)
    assert not truncated(resp.to_wire())
    resp.flags |= dns.flags.TC
    assert truncated(resp.to_wire())


@pytest.mark.parametrize("text, servers, search", [
    ("nameserver 198.18.0.53\nsearch a.svc.cluster.local svc.cluster.local\n",
     ("198.18.0.53",), ("a.svc.cluster.local", "svc.cluster.local")),
    ("# comment\nnameserver fd00:198:18::53\nnameserver 198.18.0.1 ; x\ndomain Example.COM.\n",
     ("fd00:198:18::53", "198.18.0.1"), ("example.com",)),
    ("nameserver not-an-ip\nsearch a\nsearch b c\n", (), ("b", "c")),
    ("", (), ()),
])
def test_resolv_conf(text, servers, search):
    conf = parse_resolv_conf(text)
    assert conf.nameservers == servers and conf.search == search


def test_token_bucket_limits_a_flood_and_refills():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2
    now[0] += 0.25            # 2.5 tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize("node, annotations, expected", [
    (True, None, True),
    (True, {}, True),
    (False, {}, False),
    (True, {"ambient.istio.io/dns-capture": "false"}, False),
    (True, {"ambient.istio.io/dns-capture": "False"}, False),
    (False, {"ambient.istio.io/dns-capture": "true"}, True),
    (False, {"ambient.istio.io/dns-capture": "1"}, True),
    (True, {"ambient.istio.io/dns-capture": "nope"}, True),     # not a boolean: the node decides
    (False, {"ambient.istio.io/dns-capture": ""}, False),
])
def test_dns_capture_switch_per_pod_over_the_node(node, annotations, expected):
    assert capture_wanted(node, annotations) is expected


def test_service_addresses_from_the_model():
    state = ClusterState.from_items([
        namespace("shop"),
        {**service("web", "shop", selector={"app": "web"}, ports=[{"port": 80}]),
         "spec": {"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10", "fd00:198:19::10"],
                  "selector": {"app": "web"}, "ports": [{"port": 80}]}},
        {**service("db", "shop", selector={"app": "db"}, ports=[{"port": 5432}]),
         "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}},
        pod("db-0", "shop", ips=["198.18.1.5"], labels={"app": "db"}, phase="Running"),
        pod("db-1", "shop", ips=["198.18.2.7", "fd00:198:18::7"], labels={"app": "db"}, phase="Running"),
        pod("db-2", "shop", ips=["198.18.3.9"], labels={"app": "db"}, phase="Pending"),   # not ready
        pod("other", "shop", ips=["198.18.4.1"], labels={"app": "x"}, phase="Running"),
    ])
    assert service_addresses(state, "shop", "web") == ("198.19.0.10", "fd00:198:19::10")
    assert service_addresses(state, "shop", "db") == ("198.18.1.5", "198.18.2.7", "fd00:198:18::7")
    assert service_addresses(state, "shop", "nope") is None
    assert service_addresses(state, "other", "web") is None


HOSTS = {"api.example.com": ("240.240.3.7", "2001:2::f0f0:307"), "a.wild.test": ("198.18.252.9",),
         "dns-resolved.example.com": ()}


@pytest.mark.parametrize("name, rdtype, expected", [
    ("api.example.com.", "A", ["240.240.3.7"]),
    ("API.Example.com.", "AAAA", ["2001:2::f0f0:307"]),
    ("a.wild.test.", "A", ["198.18.252.9"]),
    ("a.wild.test.", "AAAA", []),                       # a mesh host without IPv6: NODATA
])
def test_serviceentry_hosts_are_answered(name, rdtype, expected):
    r = Resolver("shop", lookup, hosts=lambda n: HOSTS.get(n, ()))
    decision = r.decide(dns.message.make_query(name, rdtype).to_wire(), True)
    assert isinstance(decision, Reply) and addresses(decision) == expected


@pytest.mark.parametrize("name", ["dns-resolved.example.com.", "other.example.com.", "example.com."])
def test_serviceentry_hosts_without_addresses_go_upstream(name):
    r = Resolver("shop", lookup, hosts=lambda n: HOSTS.get(n, ()))
    assert isinstance(r.decide(dns.message.make_query(name, "A").to_wire(), True), Forward)


def test_services_win_over_serviceentry_hosts():
    r = Resolver("shop", lookup, hosts=lambda n: ("240.240.0.1",))
    decision = r.decide(dns.message.make_query("web.shop.svc.cluster.local.", "A").to_wire(), True)
    assert isinstance(decision, Reply) and addresses(decision) == ["198.19.0.10"]


# -- built answers kept per pod until the state changes ----------------------------

def _cached_resolver(state: dict, calls: list) -> Resolver:
    def counting(ns: str, name: str):
        calls.append((ns, name))
        return state["services"].get((ns, name))
    return Resolver("shop", counting, "cluster.local", generation=lambda: state["version"])


def test_a_cached_answer_is_the_built_one_with_the_new_id():
    state, calls = {"version": object(), "services": dict(SERVICES)}, []
    r, plain = _cached_resolver(state, calls), resolver()
    for udp in (True, False):
        for rdtype, kw in (("A", {}), ("AAAA", {}), ("A", {"use_edns": 0, "payload": 1232}),
                           ("A", {"want_dnssec": True})):
            for qid in (1, 2, 65535):
                query = dns.message.make_query("dual.shop.svc.cluster.local.", rdtype, **kw)
                query.id = qid
                got, built = r.decide(query.to_wire(), udp), plain.decide(query.to_wire(), udp)
                assert isinstance(got, Reply) and got == built, (rdtype, kw, udp, qid)
                assert dns.message.from_wire(got.wire).id == qid
    # One build per distinct query (flags, EDNS and transport are part of it), not per id.
    assert len(calls) == 2 * 4


def test_the_cache_starts_afresh_when_the_state_changes():
    state, calls = {"version": object(), "services": dict(SERVICES)}, []
    r = _cached_resolver(state, calls)
    wire = dns.message.make_query("web.shop.svc.cluster.local.", "A").to_wire()
    assert addresses(r.decide(wire, True)) == ["198.19.0.10"]
    state["services"][("shop", "web")] = ("198.19.0.99",)
    assert addresses(r.decide(wire, True)) == ["198.19.0.10"]      # same state object: kept
    state["version"] = object()
    assert addresses(r.decide(wire, True)) == ["198.19.0.99"]      # a new state: built again
    del state["services"][("shop", "web")]
    state["version"] = object()
    assert isinstance(r.decide(wire, True), Forward)               # gone: upstream's name now


def test_only_local_answers_are_kept_and_the_cache_is_bounded():
    from agent.dns.resolver import ANSWER_CACHE, CACHED_QUERY_BYTES
    state, calls = {"version": object(), "services": dict(SERVICES)}, []
    r = _cached_resolver(state, calls)
    external = dns.message.make_query("example.org.", "A").to_wire()
    for _ in range(3):
        assert isinstance(r.decide(external, True), Forward)
    assert len(calls) == 3 and not r._cache                        # forwarded: decided every time
    nodata = dns.message.make_query("v6only.other.svc.cluster.local.", "A").to_wire()
    assert r.decide(nodata, True).outcome == "nodata" and len(r._cache) == 1
    for i in range(ANSWER_CACHE + 10):                              # distinct ids in the question
        state["services"][("shop", f"s{i}")] = ("198.19.1.1",)
        r.decide(dns.message.make_query(f"s{i}.shop.svc.cluster.local.", "A").to_wire(), True)
        assert len(r._cache) <= ANSWER_CACHE
    big = dns.message.make_query("web.shop.svc.cluster.local.", "A", use_edns=0,
                                 options=[dns.edns.GenericOption(65001, b"x" * CACHED_QUERY_BYTES)])
    before = len(r._cache)
    assert r.decide(big.to_wire(), True).outcome == "local" and len(r._cache) == before   # too long to keep
