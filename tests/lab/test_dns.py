"""The DNS proxy end to end: real pods, real eBPF DNS capture, real resolvers.

A lab pod (``plain/dns``, outside the mesh) runs a small DNS server
(tests/lab/dns_server.py) that plays the cluster's DNS: it knows
``web.mesh.svc.cluster.local`` with an address the agent would never give
(198.18.250.2), so an answer of the Service's cluster IP proves the agent
answered; it knows ``external.example`` (forwarded: its address must come
back) and ``big.example`` (too long for its 512-byte UDP answers, so the
truncation path is taken). The meshed pod sees a resolv.conf of its own
that points at that server: lab pods share the host's files, so the
test's "container" is a process in a private mount namespace with the file
bound over /etc/resolv.conf, and every query runs in that namespace
(``nsenter``) as a container's process would. The agent finds the file the
same way, through /proc/<pid>/root of a process of the pod.

Resolvers: glibc's (``socket.getaddrinfo``, over UDP and with
``RES_OPTIONS=use-vc`` over TCP) and BIND's ``dig`` (UDP and ``+tcp``).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.lab import Lab
from tests.builders import AMBIENT, manifest, namespace, pod, service
from tests.lab.conftest import agent_pod, pod_ip6, resolv_container, running_lab, settle, unique_name
from tests.lab.test_observe import fetch, series

DNS_SERVER = str(Path(__file__).with_name("dns_server.py"))
CLUSTER_DNS_WEB = "198.18.250.2"       # what the test's "cluster DNS" says for the Service name
EXTERNAL = "198.18.250.1"
BIG = sorted(f"198.18.251.{i}" for i in range(1, 61))   # 60 A records: ~1000 bytes
WILD = "198.18.252.9"
EXTERNAL6 = "fd00:198:18:250::1"
ZONE = {"web.mesh.svc.cluster.local.": [CLUSTER_DNS_WEB], "external.example.": [EXTERNAL, EXTERNAL6],
        "big.example.": BIG}

MANIFEST = manifest(
    namespace("mesh", AMBIENT), namespace("plain"),
    pod("client", "mesh", node="node1", sa="client"),
    pod("optout", "mesh", node="node1", annotations={"ambient.istio.io/dns-capture": "false"}),
    pod("broken", "mesh", node="node1"),      # its resolv.conf names a resolver that never answers
    pod("server", "mesh", node="node2", labels={"app": "db"}),
    pod("dns", "plain", node="node2"),
    pod("client", "plain", node="node1"),
    service("web", "mesh", selector={"app": "web"}, ports=[{"port": 80}]),
    {**service("db", "mesh", selector={"app": "db"}, ports=[{"port": 5432}]),
     "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}},
    # ServiceEntry hosts: one without addresses (an auto-allocated virtual IP), a wildcard with its own.
    {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
     "metadata": {"name": "api", "namespace": "mesh"},
     "spec": {"hosts": ["api.external.test"], "ports": [{"number": 80, "name": "tcp", "protocol": "TCP"}],
              "resolution": "STATIC", "endpoints": [{"address": "198.18.252.1"}]}},
    {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "wild", "namespace": "mesh"},
     "spec": {"hosts": ["*.wild.test"], "addresses": [WILD], "resolution": "NONE",
              "ports": [{"number": 80, "name": "tcp", "protocol": "TCP"}]}},
)

GETADDRINFO = r"""
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = sorted({ai[4][0] for ai in socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)})
    except socket.gaierror as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dns")
    with running_lab("dns", MANIFEST) as lab:
        log = tmp / "queries.log"
        log.touch()
        server = lab.exec("plain/dns", [sys.executable, DNS_SERVER, json.dumps(ZONE), str(log)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        holders: list[subprocess.Popen] = []
        try:
            line = server.stdout.readline().strip()
            assert line == "ready", server.stderr.read()
            conf = tmp / "resolv.conf"
            conf.write_text(f"nameserver {lab.pod_ip('plain/dns')}\n"
                            "search mesh.svc.cluster.local svc.cluster.local cluster.local\n"
                            "options ndots:5 timeout:3 attempts:2\n")
            dead = tmp / "resolv-dead.conf"
            dead.write_text(f"nameserver {dead_resolver(lab)}\noptions timeout:8 attempts:1\n")
            containers = {}
            for p, path in (("mesh/client", conf), ("mesh/optout", conf), ("plain/client", conf),
                            ("mesh/broken", dead)):
                holders.append(resolv_container(lab, p, path))
                containers[p] = holders[-1].pid
            lab.dns_log = log                 # type: ignore[attr-defined]
            lab.containers = containers       # type: ignore[attr-defined]
            yield lab
        finally:
            for proc in (server, *holders):
                proc.kill()
                proc.wait(10)


def dead_resolver(lab) -> str:
    """An address in the DNS server pod's subnet where nothing is: queries to it go unanswered."""
    return lab.pod_ip("plain/dns").rsplit(".", 1)[0] + ".250"


def in_container(lab, pod_name: str, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = ["nsenter", "-t", str(lab.containers[pod_name]), "-m", "--", *argv]
    if env:
        cmd = ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]
    return lab.run(pod_name, cmd, timeout=30)


def getaddrinfo(lab, pod_name: str, *names: str, tcp: bool = False) -> dict:
    done = in_container(lab, pod_name, [sys.executable, "-c", GETADDRINFO, *names],
                        env={"RES_OPTIONS": "use-vc"} if tcp else None)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def dig(lab, pod_name: str, name: str, *opts: str) -> list[str]:
    server = lab.pod_ip("plain/dns")
    done = in_container(lab, pod_name, ["dig", f"@{server}", name, "A", "+short", "+time=3", "+tries=2", *opts])
    assert done.returncode == 0, done.stdout + done.stderr
    return sorted(line for line in done.stdout.split("\n") if line and not line.startswith(";"))


def service_ip(lab, name: str) -> str:
    items = json.loads(Path(lab.state_path).read_text())["items"]
    return next(i for i in items if i["kind"] == "Service" and i["metadata"]["name"] == name)["spec"]["clusterIP"]


def dns_counters(lab, node: str, pod_name: str) -> dict:
    status = lab.agent_request(node, {"op": "status"})
    return status["dns"]["pods"].get(pod_name, {"outcomes": {}, "udp": 0, "tcp": 0})


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_getaddrinfo_resolves_services_through_the_agent_and_the_rest_upstream(lab, tcp):
    web = service_ip(lab, "web")
    before = dns_counters(lab, "node1", "mesh/client")
    got = getaddrinfo(lab, "mesh/client", "web", "web.mesh", "web.mesh.svc.cluster.local",
                      "db.mesh.svc.cluster.local", "external.example", "big.example", tcp=tcp)
    assert got == {"web": [web], "web.mesh": [web], "web.mesh.svc.cluster.local": [web],
                   "db.mesh.svc.cluster.local": [lab.pod_ip("mesh/server")],    # headless: the ready pod
                   "external.example": [EXTERNAL], "big.example": BIG}
    after = dns_counters(lab, "node1", "mesh/client")
    assert after["tcp" if tcp else "udp"] > before["tcp" if tcp else "udp"]
    assert after["outcomes"]["local"] > before["outcomes"].get("local", 0)
    assert after["outcomes"]["forwarded"] > before["outcomes"].get("forwarded", 0)


@pytest.mark.parametrize("opts", [(), ("+tcp",), ("+notcp", "+noedns")], ids=["udp-edns", "tcp", "udp-512"])
def test_dig_through_the_capture(lab, opts):
    assert dig(lab, "mesh/client", "web.mesh.svc.cluster.local", *opts) == [service_ip(lab, "web")]
    assert dig(lab, "mesh/client", "external.example", *opts) == [EXTERNAL]
    assert dig(lab, "mesh/client", "nothing.example", *opts) == []      # NXDOMAIN passed through


def test_truncated_upstream_answers_are_fetched_over_tcp(lab):
    log: Path = lab.dns_log
    start = len(log.read_text().splitlines())
    # dig offers 1232 bytes (EDNS); the server sends at most 512 over UDP, so the agent
    # must ask it again over TCP and hand dig the whole answer over UDP.
    done = in_container(lab, "mesh/client", ["dig", f"@{lab.pod_ip('plain/dns')}", "big.example", "A",
                                             "+time=3", "+tries=1", "+bufsize=1232"])
    assert done.returncode == 0, done.stdout
    assert "Truncated" not in done.stdout, done.stdout
    addrs = sorted(line.split()[-1] for line in done.stdout.splitlines()
                   if line.startswith("big.example.") and " A " in line.replace("\t", " "))
    assert addrs == BIG
    seen = log.read_text().splitlines()[start:]
    assert "udp big.example. A" in seen and "tcp big.example. A" in seen, seen


def test_pods_outside_the_mesh_and_opted_out_pods_reach_the_resolver_directly(lab):
    for p in ("plain/client", "mesh/optout"):
        assert dig(lab, p, "web.mesh.svc.cluster.local") == [CLUSTER_DNS_WEB], p
        assert dig(lab, p, "web.mesh.svc.cluster.local", "+tcp") == [CLUSTER_DNS_WEB], p
        assert getaddrinfo(lab, p, "web") == {"web": [CLUSTER_DNS_WEB]}, p
    assert agent_pod(lab, "node1", "mesh/optout")["enrolled"] is True
    assert dns_counters(lab, "node1", "mesh/optout") == {"outcomes": {}, "udp": 0, "tcp": 0}


def test_upstream_failure_is_servfail_not_silence(lab):
    # The pod's upstream (its resolv.conf) does not answer: the agent answers
    # SERVFAIL after its upstream timeout, while mesh names still resolve.
    # (Like ztunnel, the agent forwards to the pod's configured resolvers, not
    # to the address the query was sent to.)
    done = in_container(lab, "mesh/broken", ["dig", f"@{dead_resolver(lab)}", "external.example", "A",
                                             "+time=8", "+tries=1"])
    assert "status: SERVFAIL" in done.stdout, done.stdout
    assert dig(lab, "mesh/broken", "web.mesh.svc.cluster.local") == [service_ip(lab, "web")]
    assert dns_counters(lab, "node1", "mesh/broken")["outcomes"]["servfail"] == 1


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_serviceentry_hosts_are_answered_by_the_agent(lab, tcp):
    status = lab.agent_request("node1", {"op": "status"})
    vips = status["dns"]["allocated_vips"]
    vip = vips["mesh/api/api.external.test"][0]
    assert vip.startswith("240.240."), vips
    got = getaddrinfo(lab, "mesh/client", "api.external.test", "x.wild.test", "a.b.wild.test", tcp=tcp)
    assert got == {"api.external.test": [vip], "x.wild.test": [WILD], "a.b.wild.test": [WILD]}
    assert dig(lab, "mesh/client", "api.external.test", *(("+tcp",) if tcp else ())) == [vip]
    # Outside the mesh, the names are the upstream's (which does not know them).
    assert dig(lab, "plain/client", "api.external.test") == []


FLOOD = r"""
import socket, sys
server = sys.argv[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
junk = [b"", b"\x12", b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 30, b"\x00" * 5000, b"\x12\x34\x81\x80" + bytes(8)]
for i in range(3000):
    try:
        u.sendto(junk[i % len(junk)], (server, 53))
    except OSError:
        pass
t = socket.create_connection((server, 53), timeout=5)
t.sendall(b"\xff\xff" + b"\x00" * 100)    # a 65535-byte TCP query announced: refused
t.settimeout(5)
print(repr(t.recv(10)))
"""


def test_malformed_queries_and_floods_harm_no_one(lab):
    before = dns_counters(lab, "node1", "mesh/client")
    done = lab.run("mesh/client", [sys.executable, "-c", FLOOD, lab.pod_ip("plain/dns")], timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "b''", done.stdout + done.stderr
    after = dns_counters(lab, "node1", "mesh/client")
    grew = {k: after["outcomes"].get(k, 0) - before["outcomes"].get(k, 0)
            for k in ("formerr", "dropped", "ratelimited")}
    # (Rate limiting itself: tests/unit/test_dns_server_limits.py; this burst may stay under it.)
    assert grew["formerr"] > 0 and grew["dropped"] > 0, grew
    # What the socket buffer held (the kernel drops the rest of such a burst,
    # more of it on a loaded machine) was each counted once.
    queries = after["udp"] + after["tcp"] - before["udp"] - before["tcp"]
    assert sum(grew.values()) == queries >= 300, (grew, after, before)
    # Other pods are served at once; the flooding pod again once its rate allows.
    assert dig(lab, "mesh/broken", "web.mesh.svc.cluster.local") == [service_ip(lab, "web")]
    assert dig(lab, "mesh/client", "external.example") == [EXTERNAL]
    assert lab.agent_request("node1", {"op": "status"})["ok"]


def test_metrics_and_config_dump_show_dns(lab):
    dig(lab, "mesh/client", "web.mesh.svc.cluster.local")
    dig(lab, "mesh/client", "external.example")
    status = lab.agent_request("node1", {"op": "status"})
    assert status["dns"]["capture"] is True
    outcomes = status["dns"]["pods"]["mesh/client"]["outcomes"]
    assert outcomes["local"] > 0 and outcomes["forwarded"] > 0
    code, body = fetch(lab, "node1", "http://127.0.0.1:15000/config_dump")
    assert code == 200 and json.loads(body)["dns"]["pods"]["mesh/client"]["outcomes"]["local"] > 0
    code, text = fetch(lab, "node1", "http://127.0.0.1:15020/metrics")
    assert code == 200
    # Counted per outcome for the node (all its pods), at least this pod's.
    assert series(text, "ambient_agent_dns_queries_total", outcome="local") >= outcomes["local"]
    assert series(text, "ambient_agent_dns_queries_total", outcome="forwarded") >= outcomes["forwarded"]
    # BPF counters of the capture itself.
    assert status["capture"]["dns_udp_captured"] > 0 and status["capture"]["dns_tcp_captured"] > 0


def test_node_flag_switches_dns_capture_off(tmp_path):
    """``--dns-capture off``: enrolled pods' DNS reaches their resolver untouched, and
    the pod's TCP to port 53 is an ordinary captured connection."""
    lab = Lab(unique_name("dnsoff"), pod_timeout=20.0, agent_args=["--dns-capture", "off"])
    log = tmp_path / "queries.log"
    log.touch()
    server = None
    try:
        lab.up(manifest(namespace("mesh", AMBIENT), namespace("plain"),
                        pod("client", "mesh", node="node1"), pod("dns", "plain", node="node1"),
                        service("web", "mesh", selector={"app": "web"}, ports=[{"port": 80}])))
        settle(lab)
        server = lab.exec("plain/dns", [sys.executable, DNS_SERVER, json.dumps(ZONE), str(log)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        assert agent_pod(lab, "node1", "mesh/client")["enrolled"] is True
        for opts in ((), ("+tcp",)):
            done = lab.run("mesh/client", ["dig", f"@{lab.pod_ip('plain/dns')}", "web.mesh.svc.cluster.local",
                                           "A", "+short", "+time=3", "+tries=2", *opts], timeout=30)
            assert done.stdout.split() == [CLUSTER_DNS_WEB], done.stdout + done.stderr
        status = lab.agent_request("node1", {"op": "status"})
        assert status["dns"]["capture"] is False and status["dns"]["pods"] == {}
        assert status["capture"]["dns_udp_captured"] == 0 and status["capture"]["dns_tcp_captured"] == 0
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
        lab.down()


GETADDRINFO6 = GETADDRINFO.replace("socket.AF_INET,", "socket.AF_INET6,")


WILD6 = "fd00:198:18:252::9"
V4ONLY_UPSTREAM6 = "fd00:198:18:250::7"   # what the test's "cluster DNS" says (AAAA) for a single-stack Service


def test_ipv6_pods_resolve_through_the_capture(tmp_path):
    """A dual-stack lab: the pod's resolver is the DNS pod's IPv6 address, so queries
    go through sendmsg6/recvmsg6 (UDP) and connect6 (TCP) to the agent's [::1]:15053.
    AAAA answered by the agent: a dual-stack Service's IPv6 cluster IP, a headless
    Service's pod IPv6 address, a ServiceEntry host's auto-allocated IPv6 VIP and a
    wildcard host's own IPv6 address; a single-stack IPv4 Service has no AAAA (an
    empty NOERROR from the agent, never the upstream's record).
    IPv6-only pods: tests/lab/test_ipv6_only.py."""
    lab = Lab(unique_name("dns6"), pod_timeout=20.0, dual_stack=True)
    log = tmp_path / "queries.log"
    log.touch()
    procs: list[subprocess.Popen] = []
    try:
        web = {**service("web", "mesh", selector={"app": "web"}, ports=[{"port": 80}])}
        web["spec"]["ipFamilyPolicy"] = "PreferDualStack"
        headless = service("db", "mesh", selector={"app": "db"}, ports=[{"port": 5432}])
        headless["spec"].update(clusterIP="None", ipFamilyPolicy="PreferDualStack")
        lab.up(manifest(namespace("mesh", AMBIENT), namespace("plain"),
                        pod("client", "mesh", node="node1"), pod("dns", "plain", node="node2"),
                        pod("server", "mesh", node="node2", labels={"app": "db"}), web, headless,
                        service("v4only", "mesh", selector={"app": "web"}, ports=[{"port": 80}]),
                        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                         "metadata": {"name": "api", "namespace": "mesh"},
                         "spec": {"hosts": ["api.external.test"], "resolution": "STATIC",
                                  "ports": [{"number": 80, "name": "tcp", "protocol": "TCP"}],
                                  "endpoints": [{"address": "fd00:198:18:252::1"}]}},
                        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                         "metadata": {"name": "wild6", "namespace": "mesh"},
                         "spec": {"hosts": ["*.wild6.test"], "addresses": [WILD6], "resolution": "NONE",
                                  "ports": [{"number": 80, "name": "tcp", "protocol": "TCP"}]}}))
        settle(lab)
        zone = {**ZONE, "v4only.mesh.svc.cluster.local.": [V4ONLY_UPSTREAM6]}
        server = lab.exec("plain/dns", [sys.executable, DNS_SERVER, json.dumps(zone), str(log)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(server)
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        dns6 = pod_ip6(lab, "plain/dns")
        conf = tmp_path / "resolv.conf"
        conf.write_text(f"nameserver {dns6}\nsearch mesh.svc.cluster.local svc.cluster.local cluster.local\n"
                        "options ndots:5 timeout:3 attempts:2\n")
        holder = resolv_container(lab, "mesh/client", conf)
        procs.append(holder)
        lab.containers = {"mesh/client": holder.pid}      # type: ignore[attr-defined]
        svc = next(i for i in json.loads(Path(lab.state_path).read_text())["items"]
                   if i["kind"] == "Service" and i["metadata"]["name"] == "web")
        web6 = next(ip for ip in svc["spec"]["clusterIPs"] if ":" in ip)
        for env in (None, {"RES_OPTIONS": "use-vc"}):
            done = in_container(lab, "mesh/client", [sys.executable, "-c", GETADDRINFO6, "web", "external.example"],
                                env=env)
            assert json.loads(done.stdout) == {"web": [web6], "external.example": [EXTERNAL6]}, done.stderr
        for opts in ((), ("+tcp",)):
            done = in_container(lab, "mesh/client", ["dig", f"@{dns6}", "web.mesh.svc.cluster.local", "AAAA",
                                                     "+short", "+time=3", "+tries=2", *opts])
            assert done.stdout.split() == [web6], done.stdout + done.stderr
        status = lab.agent_request("node1", {"op": "status"})
        api6 = status["dns"]["allocated_vips"]["mesh/api/api.external.test"][1]
        assert ipaddress.ip_address(api6) in ipaddress.ip_network("2001:2::/48"), status["dns"]
        server6 = pod_ip6(lab, "mesh/server")
        expected = {"api.external.test": [api6], "x.wild6.test": [WILD6], "db.mesh.svc.cluster.local": [server6],
                    "v4only.mesh.svc.cluster.local": []}
        for opts in ((), ("+tcp",)):
            for name, want in expected.items():
                done = in_container(lab, "mesh/client", ["dig", f"@{dns6}", name, "AAAA", "+time=3",
                                                         "+tries=2", *opts])
                assert "status: NOERROR" in done.stdout, done.stdout + done.stderr
                got = sorted(line.split()[-1] for line in done.stdout.splitlines()
                             if "\tAAAA\t" in line and not line.startswith(";"))
                assert got == want, (name, opts, done.stdout)
        done = in_container(lab, "mesh/client", [sys.executable, "-c", GETADDRINFO6, "api.external.test",
                                                 "x.wild6.test", "db"])
        assert json.loads(done.stdout) == {"api.external.test": [api6], "x.wild6.test": [WILD6],
                                           "db": [server6]}, done.stderr
        # The upstream was never asked for the single-stack Service's AAAA record.
        asked = log.read_text().splitlines()
        assert not {f"{how} v4only.mesh.svc.cluster.local. AAAA" for how in ("udp", "tcp")} & set(asked), asked
        assert not [q for q in asked if q.split()[1] in ("api.external.test.", "x.wild6.test.")], asked
        counted = lab.agent_request("node1", {"op": "status"})["dns"]["pods"]["mesh/client"]
        # local: 4 for web, 6 dig and 3 getaddrinfo answers above; nodata: v4only's AAAA over UDP and TCP.
        assert counted["outcomes"]["local"] >= 13 and counted["outcomes"]["nodata"] >= 2, counted
        assert counted["outcomes"]["forwarded"] >= 2, counted
        assert counted["udp"] > 0 and counted["tcp"] > 0, counted
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        lab.down()
