"""Istio's dashboards, Kiali and the chart's dashboard against a real Prometheus (issue 12).

Debian's ``prometheus`` (installed by the Makefile) runs in node1's network
namespace and scrapes both lab agents every second. A client in ``shop``
talks to Service ``backend/api`` through its cluster IP (HBONE between the
nodes); then the test runs, through Prometheus' HTTP API, the PromQL that

* Istio's Service, Workload and ztunnel Grafana dashboards run
  (istio/istio ``manifests/addons/dashboards/*.json``, read at commit 86c9f01),
* Kiali's graph runs for TCP traffic with its default options (kiali/kiali
  ``graph/telemetry/istio/istio.go`` and ``appender/security_policy.go``,
  read at commit d733a09: duration 10m, tcp rate "sent", ambient "total"),
* every expression of ``charts/ambient-agent/dashboards/ambient-agent.json``
  (read when the test runs),

and checks each answer against what the traffic implies: the Service on
both reporters, mutual TLS, the SPIFFE principals, bytes within 5 %.
``promtool check metrics`` lints both agents' output.

The queries are copied verbatim as data below; only Grafana's template
variables are substituted, the way Grafana does (a variable set to "All"
becomes the regex of the values its own query returns).

Rates and exact bytes: the traffic is one long connection. It is opened,
left idle while Prometheus takes samples (its byte series exist from the
open, at 0, as in ztunnel), then carries one burst of N bytes each way. The
queries are evaluated at the first scrape after the burst, so ``irate`` over
the last two samples is exactly N / (scrape interval), and ``rate`` over a
window longer than the connection's life is (bytes moved) / window, up to
Prometheus' extrapolation at the window's end (at most 1.1 scrape intervals
over the series' age; the idle phase makes that < 3 %).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.lab.conftest import PEER, running_lab, wait_for

HERE = Path(__file__).resolve().parent
CHART_DASHBOARD = HERE.parents[1] / "charts" / "ambient-agent" / "dashboards" / "ambient-agent.json"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

SCRAPE_SECONDS = 1
IDLE_SECONDS = 45            # series age before the burst (see the module docstring)
BURST = 256 * 1024           # bytes each way: one line, echoed back
RATE_WINDOW = "1m"           # what $__rate_interval becomes (longer than the connection's life)
RATE_WINDOW_SECONDS = 60
KIALI_SECONDS = 600          # Kiali's default graph duration, 10m
TOLERANCE = 0.05

SERVICE = "api.backend.svc.cluster.local"
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
API_ID = "spiffe://cluster.local/ns/backend/sa/api"

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: backend, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-6f7c9d8b5-qwxyz
  namespace: shop
  labels: {app: web, version: v1, pod-template-hash: 6f7c9d8b5}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-6f7c9d8b5, controller: true, uid: r1}]
spec: {nodeName: node1, serviceAccountName: web}
---
apiVersion: v1
kind: Pod
metadata:
  name: api-5c4b7f9d6-plmnb
  namespace: backend
  labels: {app: api, version: v2, pod-template-hash: 5c4b7f9d6}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: api-5c4b7f9d6, controller: true, uid: r2}]
spec:
  nodeName: node2
  serviceAccountName: api
  containers: [{name: api, ports: [{name: http, containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: backend}
spec:
  selector: {app: api}
  ports: [{port: 80, targetPort: http}]
"""
WEB_POD = "shop/web-6f7c9d8b5-qwxyz"
API_POD = "backend/api-5c4b7f9d6-plmnb"

# ---------------------------------------------------------------------------
# The queries, verbatim. (dashboard file / row / panel, expression)

ISTIO_SERVICE_DASHBOARD = [  # istio-service-dashboard.json
    ("General / TCP Received Bytes",
     'sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", destination_service="$service"}[$__rate_interval]))'),
    ("General / TCP Sent Bytes",
     'sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_service="$service"}[$__rate_interval]))'),
    ("Client Workloads / Bytes Received from Incoming TCP Connection (mTLS)",
     'round(sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)'),
    ("Client Workloads / Bytes Received from Incoming TCP Connection",
     'round(sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", connection_security_policy!="mutual_tls", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)'),
    ("Client Workloads / Bytes Sent to Incoming TCP Connection (mTLS)",
     'round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter=~"$qrep", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)'),
    ("Client Workloads / Bytes Sent to Incoming TCP Connection",
     'round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy!="mutual_tls", reporter=~"$qrep", destination_service="$service", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)'),
    ("Service Workloads / Bytes Received from Incoming TCP Connection (mTLS)",
     'round(sum(irate(istio_tcp_received_bytes_total{reporter="destination", connection_security_policy="mutual_tls", destination_service="$service", destination_workload=~"$dstwl", destination_workload_namespace=~"$dstns"}[$__rate_interval])) by (destination_workload, destination_workload_namespace), 0.001)'),
    ("Service Workloads / Bytes Received from Incoming TCP Connection",
     'round(sum(irate(istio_tcp_received_bytes_total{reporter="destination", connection_security_policy!="mutual_tls", destination_service="$service", destination_workload=~"$dstwl", destination_workload_namespace=~"$dstns"}[$__rate_interval])) by (destination_workload, destination_workload_namespace), 0.001)'),
    ("Service Workloads / Bytes Sent to Incoming TCP Connection (mTLS)",
     'round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter="destination", destination_service="$service", destination_workload=~"$dstwl", destination_workload_namespace=~"$dstns"}[$__rate_interval])) by (destination_workload, destination_workload_namespace), 0.001)'),
    ("Service Workloads / Bytes Sent to Incoming TCP Connection",
     'round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy!="mutual_tls", reporter="destination", destination_service="$service", destination_workload=~"$dstwl", destination_workload_namespace=~"$dstns"}[$__rate_interval])) by (destination_workload, destination_workload_namespace), 0.001)'),
]
ISTIO_SERVICE_VARIABLES = {  # istio-service-dashboard.json, templating (Grafana's query_result(...))
    "service": 'query_result(sum(istio_requests_total{}) by (destination_service) or sum(istio_tcp_sent_bytes_total{}) by (destination_service))',
    "srcns": 'query_result(sum(istio_requests_total{reporter=~"$qrep", destination_service="$service"}) by (source_workload_namespace) or sum(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_service="$service"}) by (source_workload_namespace))',
    "srcwl": 'query_result(sum(istio_requests_total{reporter=~"$qrep", destination_service="$service", source_workload_namespace=~"$srcns"}) by (source_workload) or sum(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_service="$service", source_workload_namespace=~"$srcns"}) by (source_workload))',
    "dstcluster": 'query_result(sum(istio_requests_total{reporter="destination", destination_service="$service"}) by (destination_cluster) or sum(istio_tcp_sent_bytes_total{reporter="destination", destination_service="$service"}) by (destination_cluster))',
    "dstns": 'query_result(sum(istio_requests_total{reporter="destination", destination_service="$service"}) by (destination_workload_namespace) or sum(istio_tcp_sent_bytes_total{reporter="destination", destination_service="$service"}) by (destination_workload_namespace))',
    "dstwl": 'query_result( sum(istio_requests_total{reporter="destination", destination_service="$service", destination_cluster=~"$dstcluster", destination_workload_namespace=~"$dstns"}) by (destination_workload) or sum(istio_tcp_sent_bytes_total{reporter="destination", destination_service="$service", destination_cluster=~"$dstcluster", destination_workload_namespace=~"$dstns"}) by (destination_workload))',
}

ISTIO_WORKLOAD_DASHBOARD = [  # istio-workload-dashboard.json
    ("General / TCP Server Traffic",
     'sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload"}[$__rate_interval])) + sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload"}[$__rate_interval]))'),
    ("General / TCP Client Traffic",
     'sum(irate(istio_tcp_sent_bytes_total{reporter=~"$qrep", source_workload_namespace=~"$namespace", source_workload=~"$workload"}[$__rate_interval])) + sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", source_workload_namespace=~"$namespace", source_workload=~"$workload"}[$__rate_interval]))'),
    ("Inbound Workloads / Bytes Received from Incoming TCP Connection (mTLS)",
     'round(sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", connection_security_policy="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)'),
    ("Inbound Workloads / Bytes Received from Incoming TCP Connection",
     'round(sum(irate(istio_tcp_received_bytes_total{reporter=~"$qrep", connection_security_policy!="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)'),
    ("Inbound Workloads / Bytes Sent to Incoming TCP Connection (mTLS)",
     'round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)'),
    ("Inbound Workloads / Bytes Sent to Incoming TCP Connection",
     'round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy!="mutual_tls", reporter=~"$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[$__rate_interval])) by (source_workload, source_workload_namespace), 0.001)'),
    ("Outbound Services / Bytes Sent on Outgoing TCP Connection (mTLS)",
     'round(sum(irate(istio_tcp_received_bytes_total{connection_security_policy="mutual_tls", reporter="source", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service), 0.001)'),
    ("Outbound Services / Bytes Sent on Outgoing TCP Connection",
     'round(sum(irate(istio_tcp_received_bytes_total{connection_security_policy!="mutual_tls", reporter="source", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service), 0.001)'),
    ("Outbound Services / Bytes Received from Outgoing TCP Connection (mTLS)",
     'round(sum(irate(istio_tcp_sent_bytes_total{reporter="source", connection_security_policy="mutual_tls", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service), 0.001)'),
    ("Outbound Services / Bytes Received from Outgoing TCP Connection",
     'round(sum(irate(istio_tcp_sent_bytes_total{reporter="source", connection_security_policy!="mutual_tls", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[$__rate_interval])) by (destination_service), 0.001)'),
]
ISTIO_WORKLOAD_VARIABLES = {  # istio-workload-dashboard.json, templating
    "namespace": 'query_result(sum(istio_requests_total) by (destination_workload_namespace) or sum(istio_tcp_sent_bytes_total) by (destination_workload_namespace))',
    "workload": 'query_result((sum(istio_requests_total{destination_workload_namespace=~"$namespace"}) by (destination_workload) or sum(istio_requests_total{source_workload_namespace=~"$namespace"}) by (source_workload)) or (sum(istio_tcp_sent_bytes_total{destination_workload_namespace=~"$namespace"}) by (destination_workload) or sum(istio_tcp_sent_bytes_total{source_workload_namespace=~"$namespace"}) by (source_workload)))',
    "srcns": 'query_result(sum(istio_requests_total{reporter=~"$qrep", destination_workload="$workload", destination_workload_namespace=~"$namespace"}) by (source_workload_namespace) or sum(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_workload="$workload", destination_workload_namespace=~"$namespace"}) by (source_workload_namespace))',
    "srcwl": 'query_result(sum(istio_requests_total{reporter=~"$qrep", destination_workload="$workload", destination_workload_namespace=~"$namespace", source_workload_namespace=~"$srcns"}) by (source_workload) or sum(istio_tcp_sent_bytes_total{reporter=~"$qrep", destination_workload="$workload", destination_workload_namespace=~"$namespace", source_workload_namespace=~"$srcns"}) by (source_workload))',
    "dstsvc": 'query_result(sum(istio_requests_total{reporter="source", source_workload=~"$workload", source_workload_namespace=~"$namespace"}) by (destination_service) or sum(istio_tcp_sent_bytes_total{reporter="source", source_workload=~"$workload", source_workload_namespace=~"$namespace"}) by (destination_service))',
}

ZTUNNEL_DASHBOARD = [  # ztunnel-dashboard.gen.json (the panels our metrics can answer)
    ("Ztunnel Versions", 'sum by (tag) (istio_build{component="ztunnel"})'),
    ("Connections", 'sum by (pod) (rate(istio_tcp_connections_opened_total{pod=~"ztunnel-.*"}[$__rate_interval]))'),
    ("Bytes Transmitted (sent)", 'sum by (pod) (rate(istio_tcp_sent_bytes_total{pod=~"ztunnel-.*"}[$__rate_interval]))'),
    ("Bytes Transmitted (received)",
     'sum by (pod) (rate(istio_tcp_received_bytes_total{pod=~"ztunnel-.*"}[$__rate_interval]))'),
    ("Resource Usage (fds)", 'sum by (pod) (process_open_fds{app="ztunnel"})'),
]

# Kiali, graph/telemetry/istio/istio.go (TCP section) and appender/security_policy.go, as
# fmt.Sprintf builds them with the default options; NS is the namespace of the graph.
KIALI_GROUP = ("app,source_cluster,source_workload_namespace,source_workload,source_canonical_service,"
               "source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,"
               "destination_service_name,destination_workload_namespace,destination_workload,"
               "destination_canonical_service,destination_canonical_revision,response_flags")
KIALI_SP_GROUP = ("source_cluster,source_workload_namespace,source_workload,source_canonical_service,"
                  "source_canonical_revision,source_principal,destination_cluster,destination_service_namespace,"
                  "destination_service_name,destination_workload_namespace,destination_workload,"
                  "destination_canonical_service,destination_canonical_revision,destination_principal,"
                  "connection_security_policy")
KIALI = [
    ("istio.go TCP 0) unserviced incoming",
     'sum(rate(istio_tcp_received_bytes_total{reporter=~"waypoint|source",source_workload_namespace!="NS",'
     'destination_workload_namespace="unknown",destination_workload="unknown",'
     r'destination_service=~"^.+\\.NS\\..+$"} [600s])) by (' + KIALI_GROUP + ') > 0'),
    ("istio.go TCP 1) incoming, destination telemetry",
     'sum(rate(istio_tcp_received_bytes_total{reporter=~"waypoint|destination",destination_workload_namespace="NS"}'
     ' [600s])) by (' + KIALI_GROUP + ') > 0'),
    ("istio.go TCP 2) outgoing, source telemetry",
     'sum(rate(istio_tcp_received_bytes_total{reporter=~"waypoint|source",source_workload_namespace="NS"}'
     ' [600s])) by (' + KIALI_GROUP + ') > 0'),
    ("security_policy.go 1) from outside the namespace",
     '(sum(rate(istio_requests_total{reporter=~"waypoint|destination",source_workload_namespace!="NS",'
     'destination_service_namespace="NS"}[600s])) by (' + KIALI_SP_GROUP + ') > 0) OR '
     '(sum(rate(istio_tcp_sent_bytes_total{reporter=~"waypoint|destination",source_workload_namespace!="NS",'
     'destination_service_namespace="NS"}[600s])) by (' + KIALI_SP_GROUP + ') > 0)'),
    ("security_policy.go 2) from the namespace",
     '(sum(rate(istio_requests_total{reporter=~"waypoint|destination",source_workload_namespace="NS"}[600s])) by ('
     + KIALI_SP_GROUP + ') > 0) OR (sum(rate(istio_tcp_sent_bytes_total{reporter=~"waypoint|destination",'
     'source_workload_namespace="NS"}[600s])) by (' + KIALI_SP_GROUP + ') > 0) OR '
     '(sum(rate(istio_tcp_sent_bytes_total{app="ztunnel",reporter="source",source_workload_namespace="NS"}[600s])) by ('
     + KIALI_SP_GROUP + ') > 0)'),
]

# ---------------------------------------------------------------------------
# Prometheus in the lab

QUERY = r"""
import json, sys, urllib.parse, urllib.request
base = sys.argv[1]
out = []
for path, params in json.load(sys.stdin):
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode()
            out.append({"status": r.status, "body": body})
    except urllib.error.HTTPError as e:
        out.append({"status": e.code, "body": e.read().decode()})
    except OSError as e:
        out.append({"status": 0, "body": str(e)})
print(json.dumps(out))
"""


class Prometheus:
    """A real Prometheus in node1's namespace; its storage in a temporary directory."""

    def __init__(self, lab, node: str, targets: dict[str, str]) -> None:
        self.lab, self.node = lab, node
        self.dir = Path(tempfile.mkdtemp(prefix=f"prom-{lab.name}-"))
        self.port = 19090
        self.base = f"http://127.0.0.1:{self.port}"
        # In a cluster, Istio's sample Prometheus (kubernetes-pods job) turns the
        # pod's labels into target labels and adds its name as `pod`: the chart
        # gives the agents `app: ztunnel` and `ztunnel-*` names. Static here.
        static = [{"targets": [address], "labels": {"app": "ztunnel", "pod": pod, "namespace": "istio-system"}}
                  for pod, address in targets.items()]
        config = {"global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "scrape_timeout": "900ms",
                             "evaluation_interval": "15s"},
                  "scrape_configs": [{"job_name": "ambient-agent", "metrics_path": "/metrics",
                                      "static_configs": static}]}
        (self.dir / "prometheus.yml").write_text(json.dumps(config))     # JSON is YAML
        self.proc = None

    def start(self) -> None:
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = self.lab.node_exec(self.node, [
            PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.logs()}")
            return self.get([("/-/ready", {})])[0]["status"] == 200
        wait_for(ready, timeout=30, what="prometheus ready")

    def logs(self) -> str:
        try:
            return (self.dir / "prometheus.log").read_text()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def get(self, requests: list[tuple[str, dict]]) -> list[dict]:
        done = self.lab.node_run(self.node, [sys.executable, "-c", QUERY, self.base],
                                 input=json.dumps(requests), timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def query(self, exprs: list[str], at: float | None = None) -> list[list[dict]]:
        """Instant queries; each answer the list of {"metric": labels, "value": float}."""
        params = [("/api/v1/query", {"query": e, **({"time": f"{at:.3f}"} if at is not None else {})})
                  for e in exprs]
        answers = []
        for expr, reply in zip(exprs, self.get(params)):
            body = json.loads(reply["body"]) if reply["body"].startswith("{") else {}
            assert reply["status"] == 200 and body.get("status") == "success", (expr, reply)
            result = body["data"]["result"]
            if body["data"]["resultType"] == "scalar":
                result = [{"metric": {}, "value": result}]
            answers.append([{"metric": r["metric"], "value": float(r["value"][1])} for r in result])
        return answers

    def samples(self, selector: str, at: float | None = None) -> dict[tuple, list[tuple[float, float]]]:
        """Raw samples of the last minute: labels -> [(timestamp, value)]."""
        reply = self.get([("/api/v1/query", {"query": f"{selector}[1m]",
                                             **({"time": f"{at:.3f}"} if at is not None else {})})])[0]
        body = json.loads(reply["body"])
        assert body.get("status") == "success", reply
        return {tuple(sorted(r["metric"].items())): [(float(t), float(v)) for t, v in r["values"]]
                for r in body["data"]["result"]}


@pytest.fixture(scope="module")
def lab():
    if not PROMETHEUS or not PROMTOOL:
        pytest.fail("prometheus/promtool missing: `make setup` installs Debian's prometheus (Makefile DEBS)")
    with running_lab("prom", MANIFEST) as lab:
        yield lab


@pytest.fixture
def prometheus(lab):
    prom = Prometheus(lab, "node1", {"ztunnel-node1": f"{lab.node_ip('node1')}:15020",
                                     "ztunnel-node2": f"{lab.node_ip('node2')}:15020"})
    try:
        prom.start()
        yield prom
    finally:
        prom.stop()


# ---------------------------------------------------------------------------
# Grafana's variables

def grafana(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's template variables replaced; none may be left."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise AssertionError(f"no value for ${name} in {expr}")
        return values[name]
    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)
    return out


def query_result(text: str) -> str:
    """The PromQL inside Grafana's ``query_result(...)`` variable query."""
    inner = text.strip()
    assert inner.startswith("query_result(") and inner.endswith(")"), text
    return inner[len("query_result("):-1]


def all_of(prom: Prometheus, var_query: str, values: dict[str, str]) -> tuple[str, list[str]]:
    """Grafana's "All" for a query variable: the regex of the values its query returns."""
    answer = prom.query([grafana(query_result(var_query), values)], at=values["@"])[0]
    found = sorted({v for r in answer for v in r["metric"].values()})
    # Regex-escaped, then escaped again for PromQL's double-quoted string (as Grafana does).
    return "(" + "|".join(re.escape(v).replace("\\", "\\\\") for v in found) + ")", found


# ---------------------------------------------------------------------------
# What the traffic implies

def close(actual: float, expected: float) -> bool:
    return math.isfinite(actual) and abs(actual - expected) <= TOLERANCE * expected


def check(name: str, answer: list[dict], expected: list[tuple[dict, float]]) -> None:
    """``answer`` has exactly the expected series (labels included), each value within 5 %."""
    assert len(answer) == len(expected), f"{name}: {len(answer)} series, expected {len(expected)}: {answer}"
    for labels, value in expected:
        match = [r for r in answer if all(r["metric"].get(k) == v for k, v in labels.items())]
        assert len(match) == 1, f"{name}: no series with {labels}: {answer}"
        assert close(match[0]["value"], value), f"{name}: {match[0]['value']} != {value} (+-5 %): {match[0]}"


class Traffic:
    """One long connection web -> Service api, through the cluster IP, with a burst of N bytes."""

    def __init__(self, lab, vip: str) -> None:
        self.proc = lab.exec(WEB_POD, [sys.executable, PEER, "chat", vip, "80", "--timeout", "120"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.banner = self.proc.stdout.readline().strip()
        assert self.banner.startswith("api "), (self.banner, self.proc.stderr.read() if self.proc.poll() else "")
        self.request = 0                              # client -> server
        self.response = len(self.banner) + 1          # server -> client: banner line, then echoes

    def burst(self) -> None:
        line = "x" * (BURST - 1)
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        echoed = self.proc.stdout.readline().strip()
        assert echoed == line, f"echo of {len(echoed)} bytes"
        self.request += BURST
        self.response += BURST

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fetch_metrics(lab, node: str) -> str:
    q = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode(), end="")
"""
    done = lab.node_run(node, [sys.executable, "-c", q, "http://127.0.0.1:15020/metrics"], timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def byte_series(prom: Prometheus, at: float | None = None) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(metric, reporter) -> samples of our connection's byte series (named by its Service)."""
    out = {}
    for metric in ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"):
        for labels, values in prom.samples(f'{metric}{{destination_service="{SERVICE}"}}', at).items():
            reporter = dict(labels)["reporter"]
            assert (metric, reporter) not in out, f"two {metric} series for reporter {reporter}"
            out[(metric, reporter)] = values
    return out


def burst_and_find_the_scrape(prom: Prometheus, traffic: Traffic) -> tuple[float, dict]:
    """Send the burst; return the evaluation time (the first scrape that saw all of it on
    every series) and, per series, the interval between that scrape and the one before.

    A scrape that landed in the middle of the burst would split it over two
    samples: then the burst is repeated (the expected totals follow).
    """
    for _attempt in range(4):
        before = {k: v[-1][1] for k, v in byte_series(prom).items()}
        traffic.burst()
        final = {("istio_tcp_received_bytes_total", r): traffic.request for r in ("source", "destination")}
        final.update({("istio_tcp_sent_bytes_total", r): traffic.response for r in ("source", "destination")})

        def complete():
            series = byte_series(prom)
            return series if all(series.get(k) and series[k][-1][1] == v for k, v in final.items()) else None
        series = wait_for(complete, timeout=15, what="the burst in every byte series")
        firsts = {}
        clean = True
        for key, values in series.items():
            k = next(i for i, (_, v) in enumerate(values) if v == final[key])
            clean &= k > 0 and values[k - 1][1] == before[key]
            firsts[key] = (values[k][0], values[k][0] - values[k - 1][0] if k > 0 else 0.0)
        at = max(t for t, _ in firsts.values())
        # Each series' last sample at `at` must be its first with the burst (irate's pair).
        again = byte_series(prom, at)
        clean &= all(again[key][-1][0] == firsts[key][0] for key in final)
        if clean:
            return at, {key: dt for key, (_, dt) in firsts.items()}
        time.sleep(2 * SCRAPE_SECONDS)
    raise AssertionError("every burst was split by a scrape")


# ---------------------------------------------------------------------------

def test_istio_dashboards_kiali_and_the_chart_dashboard_against_real_prometheus(lab, servers, prometheus):
    srv = servers(lab)
    srv.serve(API_POD, 9000, "api")
    state = json.loads(Path(lab.state_path).read_text())["items"]
    vip = next(i for i in state if i["kind"] == "Service" and i["metadata"]["name"] == "api")["spec"]["clusterIP"]

    traffic = Traffic(lab, vip)
    try:
        opened = time.time()

        def both_reporters():
            series = byte_series(prometheus)
            return len(series) == 4 and all(len(v) >= 2 for v in series.values())
        # Both reporters name the Service from the connection's open on (byte series at 0).
        wait_for(both_reporters, timeout=30, what="both reporters' byte series for the Service in Prometheus")
        time.sleep(max(0.0, opened + IDLE_SECONDS - time.time()))
        at, intervals = burst_and_find_the_scrape(prometheus, traffic)
        # Evaluated while the connection is still open (the chart's open-connections panel).
        run_all_queries(prometheus, traffic, at, intervals)
        # promtool lints what both agents export now, every family populated
        # (TCP series of both reporters, health, build, process).
        for node in ("node1", "node2"):
            text = fetch_metrics(lab, node)
            assert "istio_tcp_received_bytes_total{" in text and "istio_build{" in text, text[:2000]
            lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                                  timeout=30)
            assert lint.returncode == 0, f"{node}: promtool check metrics:\n{lint.stdout}{lint.stderr}"
    finally:
        traffic.close()
    assert traffic.proc.returncode == 0, traffic.proc.stderr.read()


def run_all_queries(prom: Prometheus, traffic: Traffic, at: float, intervals: dict) -> None:
    irate = {r: BURST / intervals[("istio_tcp_received_bytes_total", r)] for r in ("source", "destination")}
    irate_sent = {r: BURST / intervals[("istio_tcp_sent_bytes_total", r)] for r in ("source", "destination")}
    base = {"@": at, "__rate_interval": RATE_WINDOW}

    # -- Istio's Service dashboard, for each reporter choice --------------------
    for qrep in ("destination", "source"):
        v = {**base, "qrep": qrep, "service": SERVICE}
        services = prom.query([query_result(ISTIO_SERVICE_VARIABLES["service"])], at=at)[0]
        assert SERVICE in {r["metric"].get("destination_service") for r in services}, services
        v["dstcluster"], _ = all_of(prom, ISTIO_SERVICE_VARIABLES["dstcluster"], v)
        v["srcns"], srcns = all_of(prom, ISTIO_SERVICE_VARIABLES["srcns"], v)
        v["srcwl"], srcwl = all_of(prom, ISTIO_SERVICE_VARIABLES["srcwl"], v)
        v["dstns"], dstns = all_of(prom, ISTIO_SERVICE_VARIABLES["dstns"], v)
        v["dstwl"], dstwl = all_of(prom, ISTIO_SERVICE_VARIABLES["dstwl"], v)
        assert (srcns, srcwl, dstns, dstwl) == (["shop"], ["web"], ["backend"], ["api"]), (qrep, srcns, srcwl)
        client = {"source_workload": "web", "source_workload_namespace": "shop"}
        server = {"destination_workload": "api", "destination_workload_namespace": "backend"}
        expected = [
            [({}, irate[qrep])], [({}, irate_sent[qrep])],
            [(client, irate[qrep])], [], [(client, irate_sent[qrep])], [],
            [(server, irate["destination"])], [], [(server, irate_sent["destination"])], [],
        ]
        answers = prom.query([grafana(e, v) for _, e in ISTIO_SERVICE_DASHBOARD], at=at)
        for (panel, _), answer, exp in zip(ISTIO_SERVICE_DASHBOARD, answers, expected):
            check(f"istio-service-dashboard {panel} (qrep={qrep})", answer, exp)

    # -- Istio's Workload dashboard: the server and the client workload -------------
    for qrep in ("destination", "source"):
        for ns, wl in (("backend", "api"), ("shop", "web")):
            v = {**base, "qrep": qrep, "namespace": ns, "workload": wl}
            namespaces = prom.query([query_result(ISTIO_WORKLOAD_VARIABLES["namespace"])], at=at)[0]
            assert "backend" in {r["metric"].get("destination_workload_namespace") for r in namespaces}
            workloads = prom.query([grafana(query_result(ISTIO_WORKLOAD_VARIABLES["workload"]), v)], at=at)[0]
            assert wl in {x for r in workloads for x in r["metric"].values()}, (wl, workloads)
            v["srcns"], _ = all_of(prom, ISTIO_WORKLOAD_VARIABLES["srcns"], v)
            v["srcwl"], _ = all_of(prom, ISTIO_WORKLOAD_VARIABLES["srcwl"], v)
            v["dstsvc"], dstsvc = all_of(prom, ISTIO_WORKLOAD_VARIABLES["dstsvc"], v)
            client = {"source_workload": "web", "source_workload_namespace": "shop"}
            svc = {"destination_service": SERVICE}
            if wl == "api":
                assert dstsvc == []
                expected = [[({}, irate[qrep] + irate_sent[qrep])], [],
                            [(client, irate[qrep])], [], [(client, irate_sent[qrep])], [],
                            [], [], [], []]
            else:
                assert dstsvc == [SERVICE], dstsvc
                expected = [[], [({}, irate[qrep] + irate_sent[qrep])],
                            [], [], [], [],
                            [(svc, irate["source"])], [], [(svc, irate_sent["source"])], []]
            answers = prom.query([grafana(e, v) for _, e in ISTIO_WORKLOAD_DASHBOARD], at=at)
            for (panel, _), answer, exp in zip(ISTIO_WORKLOAD_DASHBOARD, answers, expected):
                check(f"istio-workload-dashboard {panel} ({ns}/{wl}, qrep={qrep})", answer, exp)

    # -- rates over windows longer than the connection's life ----------------------
    request_rate = traffic.request / RATE_WINDOW_SECONDS
    response_rate = traffic.response / RATE_WINDOW_SECONDS
    pods = [{"pod": "ztunnel-node1"}, {"pod": "ztunnel-node2"}]
    answers = prom.query([grafana(e, base) for _, e in ZTUNNEL_DASHBOARD], at=at)
    versions, opened, sent, received, fds = answers
    from agent.observe.metrics import agent_version
    check("ztunnel-dashboard Ztunnel Versions", versions, [({"tag": agent_version()}, 2)])
    # A counter's first increment is invisible to rate() (the series starts at 1):
    # one connection per agent shows as a series per pod at 0, as for ztunnel.
    assert sorted(r["metric"]["pod"] for r in opened) == ["ztunnel-node1", "ztunnel-node2"], opened
    check("ztunnel-dashboard Bytes Transmitted (sent)", sent, [(p, response_rate) for p in pods])
    check("ztunnel-dashboard Bytes Transmitted (received)", received, [(p, request_rate) for p in pods])
    assert sorted(r["metric"]["pod"] for r in fds) == ["ztunnel-node1", "ztunnel-node2"]
    assert all(r["value"] > 0 for r in fds)

    # -- Kiali's TCP graph, for the client's and the server's namespace --------------
    edge = {"app": "ztunnel", "source_cluster": "Kubernetes", "source_workload_namespace": "shop",
            "source_workload": "web", "source_canonical_service": "web", "source_canonical_revision": "v1",
            "destination_cluster": "Kubernetes", "destination_service_namespace": "backend",
            "destination_service": SERVICE, "destination_service_name": "api",
            "destination_workload_namespace": "backend", "destination_workload": "api",
            "destination_canonical_service": "api", "destination_canonical_revision": "v2", "response_flags": "-"}
    secure = {k: v for k, v in edge.items() if k not in ("app", "destination_service", "response_flags")}
    secure.update(source_principal=WEB_ID, destination_principal=API_ID, connection_security_policy="mutual_tls")
    kiali_request = traffic.request / KIALI_SECONDS
    kiali_response = traffic.response / KIALI_SECONDS
    expect = {
        "backend": [[], [(edge, kiali_request)], [], [(secure, kiali_response)], []],
        "shop": [[], [], [(edge, kiali_request)], [], [(secure, kiali_response)]],
    }
    for ns, expected in expect.items():
        answers = prom.query([e.replace("NS", ns) for _, e in KIALI], at=at)
        for (name, _), answer, exp in zip(KIALI, answers, expected):
            check(f"kiali {name} (namespace {ns})", answer, exp)
            for r in answer:        # every label Kiali groups by is there, none empty
                assert all(r["metric"].get(k) for k in (KIALI_SP_GROUP if "security" in name else KIALI_GROUP)
                           .split(",")), r

    # -- the chart's own dashboard ----------------------------------------------------
    run_chart_dashboard(prom, traffic, at)


def _chart_variables(dashboard: dict, at: float) -> dict[str, str]:
    values = {"@": at, "__rate_interval": RATE_WINDOW, "__interval": "15s", "__range": "5m",
              "datasource": "prometheus", "DS_PROMETHEUS": "prometheus"}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var.get("name")
        current = (var.get("current") or {}).get("value")
        if isinstance(current, list):
            current = current[0] if len(current) == 1 else "|".join(current)
        if name in ("namespace", "destination_namespace"):
            values[name] = "backend"           # the traffic's destination namespace
        elif current in (None, "", "$__all"):
            values[name] = var.get("allValue") or ".*"
        else:
            values[name] = current
    return values


def _reporters(expr: str, values: dict[str, str]) -> int:
    """How many reporters an expression sums over (for the bytes it should show)."""
    m = re.search(r'reporter(=~|=|!=)"([^"]*)"', expr)
    if not m:
        return 2
    op, pattern = m.group(1), grafana(m.group(2), values)
    hits = [r for r in ("source", "destination") if re.fullmatch(pattern, r)]
    return len(hits) if op != "!=" else 2 - len(hits)


def run_chart_dashboard(prom: Prometheus, traffic: Traffic, at: float) -> None:
    dashboard = json.loads(CHART_DASHBOARD.read_text())
    values = _chart_variables(dashboard, at)
    panels = []

    def walk(items):
        for p in items:
            walk(p.get("panels") or [])
            for t in p.get("targets") or []:
                if t.get("expr"):
                    panels.append((p.get("title", "?"), t["expr"]))
    walk(dashboard.get("panels") or [])
    assert panels, "the chart's dashboard has no expressions"
    answers = prom.query([grafana(e, values) for _, e in panels], at=at)
    for (title, expr), answer in zip(panels, answers):
        name = f"chart dashboard {title!r}: {expr}"
        assert all(math.isfinite(r["value"]) for r in answer), (name, answer)
        if "istio_tcp_connections_failed_total" in expr or "rate(istio_tcp_connections_closed_total" in expr:
            # Nothing failed, and the one connection is still open.
            assert sum(r["value"] for r in answer) == 0, (name, answer)
            continue
        assert answer, f"{name}: no series"
        k = _reporters(expr, values)
        total = sum(r["value"] for r in answer)
        if re.search(r"rate\(istio_tcp_received_bytes_total", expr):
            assert close(total, k * traffic.request / RATE_WINDOW_SECONDS), (name, k, answer)
        elif re.search(r"rate\(istio_tcp_sent_bytes_total", expr):
            assert close(total, k * traffic.response / RATE_WINDOW_SECONDS), (name, k, answer)
        elif "istio_tcp_connections_opened_total" in expr and "closed" in expr and "rate(" not in expr:
            assert total == k, f"{name}: {total} open connections, expected {k} (the one open pair)"
        elif "ambient_agent_certificate_expiration_timestamp_seconds" in expr and "time()" in expr:
            assert all(r["value"] > 0 for r in answer), f"{name}: certificates valid for a while: {answer}"
        elif "ambient_agent_state_last_sync_timestamp_seconds" in expr and "time()" in expr:
            assert all(0 <= r["value"] < 600 for r in answer), f"{name}: synced recently: {answer}"
        elif "ambient_agent_pods_not_captured" in expr:
            assert total == 0, f"{name}: every pod captured: {answer}"
        elif "ambient_agent_enrolled_pods" in expr and "process_" not in expr:
            assert total == 2, f"{name}: one pod on each node: {answer}"
