"""DNS capture switched per pod while it runs, ServiceEntry visibility
(``exportTo``) and the service a ServiceEntry connection reports (issue 14).

One lab whose agents run with ``--dns-capture off``, so every captured pod
here is one whose annotation (``ambient.istio.io/dns-capture``) turned it on:

* ``mesh/early`` carries ``"true"`` from the start: the agent opens its DNS
  listeners at capture although the node's default is off;
* ``mesh/later`` has no annotation; it gets ``"true"``, then ``"false"``,
  while it runs: each change takes effect without the pod being captured
  again (same listeners, same enrolment), in both directions;
* ``other/client`` (namespace ``other``) sees the ServiceEntry
  ``other/private``, exported only to its own namespace (``exportTo: ["."]``):
  the agent answers its host there, while a pod of ``mesh`` has the query
  forwarded to its own resolver like any unknown name;
* a connection from ``other/client`` to the entry's virtual IP reaches the
  selected meshed pod, and both reporters label it as istiod would tell
  ztunnel: ``destination_service`` is the entry's host,
  ``destination_service_name``/``_namespace`` the entry's.

Queries run in each pod's "container" (a private mount namespace whose
/etc/resolv.conf points at the test's DNS server pod), as in test_dns.py, so
no query ever leaves for the host's resolvers.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.state.model import load_state_text
from agent.state.serviceentry import resolve_host
from tests.builders import AMBIENT, manifest, namespace, pod, service
from tests.lab.conftest import agent_pod, connect, records, resolv_container, running_lab, settle, wait_for
from tests.lab.test_dns import CLUSTER_DNS_WEB, DNS_SERVER, ZONE, dig, service_ip
from tests.lab.test_observe import fetch, series

ANNOTATION = "ambient.istio.io/dns-capture"
PRIVATE_HOST = "private.example.internal"
CONTAINERS = ("mesh/early", "mesh/later", "other/client")


def _manifest(later_annotations: dict | None = None) -> str:
    return manifest(
        namespace("mesh", AMBIENT), namespace("other", AMBIENT), namespace("plain"),
        pod("early", "mesh", node="node1", annotations={ANNOTATION: "true"}),
        pod("later", "mesh", node="node1", annotations=later_annotations),
        pod("client", "other", node="node1", sa="client", annotations={ANNOTATION: "true"}),
        pod("db", "other", node="node2", sa="db", labels={"app": "db"}),
        pod("dns", "plain", node="node2"),
        service("web", "mesh", selector={"app": "web"}, ports=[{"port": 80}]),
        {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
         "metadata": {"name": "private", "namespace": "other"},
         "spec": {"hosts": [PRIVATE_HOST], "exportTo": ["."], "resolution": "STATIC",
                  "location": "MESH_INTERNAL",
                  "ports": [{"number": 80, "name": "tcp", "protocol": "TCP", "targetPort": 7090}],
                  "workloadSelector": {"labels": {"app": "db"}}}},
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dnsswitch")
    procs: list[subprocess.Popen] = []
    with running_lab("dsw", _manifest(), agent_args=["--dns-capture", "off"]) as lab, contextlib.ExitStack() as stop:
        stop.callback(_stop, procs)
        log = tmp / "queries.log"
        log.touch()
        server = lab.exec("plain/dns", [sys.executable, DNS_SERVER, json.dumps(ZONE), str(log)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(server)
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        conf = tmp / "resolv.conf"
        conf.write_text(f"nameserver {lab.pod_ip('plain/dns')}\noptions timeout:3 attempts:2\n")
        containers = {}
        for p in CONTAINERS:
            procs.append(resolv_container(lab, p, conf))
            containers[p] = procs[-1].pid
        lab.containers = containers      # type: ignore[attr-defined]
        lab.dns_log = log                # type: ignore[attr-defined]
        yield lab


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait(10)


def annotate(lab, value: str | None) -> None:
    lab.apply(_manifest(None if value is None else {ANNOTATION: value}))
    settle(lab)


def test_annotation_turns_capture_on_where_the_node_default_is_off(lab):
    web = service_ip(lab, "web")
    assert dig(lab, "mesh/early", "web.mesh.svc.cluster.local") == [web]           # the agent answered
    assert dig(lab, "mesh/later", "web.mesh.svc.cluster.local") == [CLUSTER_DNS_WEB]   # the server did
    status = lab.agent_request("node1", {"op": "status"})
    assert status["dns"]["capture"] is False
    assert status["dns"]["pods"]["mesh/early"]["outcomes"]["local"] >= 1
    assert "mesh/later" not in status["dns"]["pods"]


def test_changing_the_annotation_takes_effect_while_the_pod_runs(lab):
    web = service_ip(lab, "web")
    before = agent_pod(lab, "node1", "mesh/later")
    assert before["enrolled"] is True
    try:
        annotate(lab, "true")
        wait_for(lambda: dig(lab, "mesh/later", "web.mesh.svc.cluster.local") == [web], timeout=15,
                 what="mesh/later's DNS captured after its annotation said true")
        annotate(lab, "false")
        wait_for(lambda: dig(lab, "mesh/later", "web.mesh.svc.cluster.local") == [CLUSTER_DNS_WEB], timeout=15,
                 what="mesh/later's DNS released after its annotation said false")
        annotate(lab, "true")            # the listeners opened the first time serve again
        wait_for(lambda: dig(lab, "mesh/later", "web.mesh.svc.cluster.local") == [web], timeout=15,
                 what="mesh/later's DNS captured again")
    finally:
        annotate(lab, None)
    after = agent_pod(lab, "node1", "mesh/later")
    assert after["enrolled"] is True
    assert {k: after[k] for k in ("uid", "netns", "ips")} == {k: before[k] for k in ("uid", "netns", "ips")}


def test_an_entry_exported_to_its_namespace_only_is_answered_there_only(lab):
    vip = resolve_host(load_state_text(Path(lab.state_path).read_text()), PRIVATE_HOST, "other")[0]
    assert vip.startswith("240.240.")
    assert dig(lab, "other/client", PRIVATE_HOST) == [vip]
    log = lab.dns_log
    start = len(log.read_text().splitlines())
    # In "mesh" the entry does not exist: the query goes to the pod's resolver,
    # which does not know the name.
    assert dig(lab, "mesh/early", PRIVATE_HOST) == []
    assert f"udp {PRIVATE_HOST}. A" in log.read_text().splitlines()[start:]
    status = lab.agent_request("node1", {"op": "status"})
    assert status["dns"]["allocated_vips"][f"other/private/{PRIVATE_HOST}"][0] == vip


def test_a_serviceentry_connection_reports_the_entry_and_its_host(lab, servers):
    srv = servers(lab)
    srv.serve("other/db", 7090, "db")
    vip = resolve_host(load_state_text(Path(lab.state_path).read_text()), PRIVATE_HOST, "other")[0]
    ok, banner = connect(lab, "other/client", vip, 80, "to-the-entry")
    assert ok and banner.startswith("db"), banner
    record = wait_for(lambda: records(lab, "node1", "other/client", f"{vip}:80"), what="the connection record")[-1]
    assert record["protocol"] == "HBONE", record
    labels = {"destination_service": PRIVATE_HOST, "destination_service_name": "private",
              "destination_service_namespace": "other", "destination_workload": "db",
              "source_workload": "client", "connection_security_policy": "mutual_tls"}

    def scraped(node: str, reporter: str) -> bool:
        code, text = fetch(lab, node, "http://127.0.0.1:15020/metrics")
        assert code == 200
        return series(text, "istio_tcp_connections_closed_total", reporter=reporter, **labels) >= 1

    for node, reporter in (("node1", "source"), ("node2", "destination")):
        wait_for(lambda n=node, r=reporter: scraped(n, r), timeout=10,
                 what=f"{reporter} metrics naming {PRIVATE_HOST}")
