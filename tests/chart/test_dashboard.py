"""The chart's Grafana dashboard, evaluated by Prometheus's own engine (promtool).

`promtool` comes with Debian's `prometheus` package. `promtool check rules`
parses every expression (after Grafana's variable substitution), and
`promtool test rules` evaluates each one over made-up series whose answers
are worked out by hand here: the numbers a panel must show.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.chart import dashboard

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool") or (
    "/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)


def _promtool() -> str:
    if PROMTOOL is None:
        why = "promtool not found (Debian package `prometheus`)"
        print(f"SKIP tests/chart/test_dashboard: {why}", file=sys.stderr)
        pytest.skip(why)
    return PROMTOOL


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120)


# --- pure: the dashboard's shape --------------------------------------------------------------

def test_reporter_defaults_to_destination_one_at_a_time():
    """Summing both reporters counts meshed traffic twice (issue 12): one reporter, destination first."""
    dash = dashboard.load()
    (reporter,) = [v for v in dash["templating"]["list"] if v["name"] == "reporter"]
    assert reporter["multi"] is False and reporter["includeAll"] is False
    assert reporter["current"]["value"] == "destination"
    assert {o["value"] for o in reporter["options"]} == {"source", "destination"}
    traffic = [q for q in dashboard.queries(dash) if "istio_tcp_" in q.raw]
    assert len(traffic) == 5
    for q in traffic:
        assert 'reporter="$reporter"' in q.raw and 'reporter="destination"' in q.expr, q.raw


def test_substitution_covers_every_variable():
    for q in dashboard.queries():
        assert "$" not in q.expr, q
    assert "=~\".*\"" in dashboard.queries()[0].expr           # $namespace "All"
    srcq = dashboard.queries(overrides={"reporter": "source"})[0].expr
    assert 'reporter="source"' in srcq


def test_agent_health_row_uses_the_agents_metric_names():
    dash = dashboard.load()
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert any(r.startswith("Agent health") for r in rows)
    exprs = " ".join(q.raw for q in dashboard.queries(dash))
    for metric in ("ambient_agent_pods_not_captured", "ambient_agent_certificate_expiration_timestamp_seconds",
                   "ambient_agent_state_last_sync_timestamp_seconds", "ambient_agent_ca_requests_total",
                   "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert metric in exprs, metric


def test_every_agent_metric_the_dashboard_reads_is_exported():
    """The names come from a real AgentMetrics registry, not from a list kept here."""
    from prometheus_client import CollectorRegistry, generate_latest

    from agent.observe.metrics import AgentMetrics
    registry = CollectorRegistry()
    m = AgentMetrics(registry, clock=lambda: 1000.0)
    m.set_certificates({"spiffe://cluster.local/ns/a/sa/b": 5000.0})
    m.state_synced(True)
    m.ca_request("ok")
    exported = {line.split("{")[0].split(" ")[0]
                for line in generate_latest(registry).decode().splitlines() if line and line[0] != "#"}
    import re
    read = set()
    for q in dashboard.queries():
        read |= set(re.findall(r"\b(ambient_agent_\w+|process_\w+)", q.expr))
    missing = read - exported
    assert not missing, f"the dashboard reads series the agent does not export: {sorted(missing)}"


# --- promtool: every expression parses and computes the right numbers ----------------------------

def test_every_expression_parses(tmp_path):
    queries = dashboard.queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": q.expr} for i, q in enumerate(queries)]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    proc = _run("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(queries)} rules found" in proc.stdout, proc.stdout


# Series scraped every 15 s for 5 minutes (21 samples, t = 0 .. 300 s); the
# panels are evaluated at t = 300 s.
PAIR_AB = dict(source_workload="a", source_workload_namespace="ns1",
               destination_workload="b", destination_workload_namespace="ns2")
PAIR_CD = dict(source_workload="c", source_workload_namespace="ns1",
               destination_workload="d", destination_workload_namespace="ns2")
N1 = dict(instance="10.0.0.1:15020", job="ambient")
N2 = dict(instance="10.0.0.2:15020", job="ambient")
OTHER = dict(instance="10.0.0.9:9090", job="prometheus")


def _sel(name: str, **labels) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _series() -> list[dict]:
    s = []

    def add(name, values, **labels):
        s.append({"series": _sel(name, **labels), "values": values})
    for reporter, node in (("destination", N2), ("source", N1)):
        # a -> b: 20 connections opened, none closed yet (the pair the old panel hid).
        add("istio_tcp_connections_opened_total", "0+1x20", reporter=reporter, response_flags="-",
            **PAIR_AB, **node)
        add("istio_tcp_received_bytes_total", "0+1500x20", reporter=reporter, response_flags="-",
            **PAIR_AB, **node)
        add("istio_tcp_sent_bytes_total", "0+300x20", reporter=reporter, response_flags="-",
            **PAIR_AB, **node)
        # c -> d: 40 opened, 30 closed, split over two response_flags series.
        add("istio_tcp_connections_opened_total", "0+2x20", reporter=reporter, response_flags="-",
            **PAIR_CD, **node)
        add("istio_tcp_connections_closed_total", "0+1x20", reporter=reporter, response_flags="-",
            **PAIR_CD, **node)
        add("istio_tcp_connections_closed_total", "0+0.5x20", reporter=reporter, response_flags="CONNECT",
            **PAIR_CD, **node)
    # A pair in another destination namespace, for the $namespace variable.
    add("istio_tcp_connections_opened_total", "0+3x20", reporter="destination", response_flags="-",
        source_workload="e", source_workload_namespace="ns1", destination_workload="f",
        destination_workload_namespace="ns3", **N2)
    # The agents' own series.
    add("ambient_agent_pods_not_captured", "0x20", **N1)
    add("ambient_agent_pods_not_captured", "2x20", **N2)
    add("ambient_agent_enrolled_pods", "3x20", **N1)
    add("ambient_agent_enrolled_pods", "4x20", **N2)
    add("ambient_agent_certificate_expiration_timestamp_seconds", "3900x20",
        identity="spiffe://cluster.local/ns/ns1/sa/a", **N1)
    add("ambient_agent_certificate_expiration_timestamp_seconds", "7500x20",
        identity="spiffe://cluster.local/ns/ns1/sa/c", **N1)
    add("ambient_agent_certificate_expiration_timestamp_seconds", "-200x20",       # expired
        identity="spiffe://cluster.local/ns/ns2/sa/b", **N2)
    add("ambient_agent_state_last_sync_timestamp_seconds", "290x20", **N1)
    add("ambient_agent_state_last_sync_timestamp_seconds", "0x20", **N2)
    add("ambient_agent_state_sync_ok", "1x20", **N1)
    add("ambient_agent_state_sync_ok", "0x20", **N2)
    add("ambient_agent_ca_requests_total", "0+3x20", result="ok", **N1)
    add("ambient_agent_ca_requests_total", "0+0.75x20", result="ok", **N2)
    add("ambient_agent_ca_requests_total", "0+1.5x20", result="error", **N2)
    add("process_cpu_seconds_total", "0+1.5x20", **N1)
    add("process_cpu_seconds_total", "0+3x20", **N2)
    add("process_cpu_seconds_total", "0+15x20", **OTHER)         # not an agent: left out
    add("process_resident_memory_bytes", "52000000x20", **N1)
    add("process_resident_memory_bytes", "61000000x20", **N2)
    add("process_resident_memory_bytes", "900000000x20", **OTHER)
    return s


def _labels(**labels) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


# (panel title, refId) -> the samples it must return at t = 300 s, destination reporter.
EXPECTED = {
    ("TCP connections opened / s", "A"): [(_labels(**PAIR_AB), 1 / 15), (_labels(**PAIR_CD), 2 / 15),
                                          (_labels(source_workload="e", source_workload_namespace="ns1",
                                                   destination_workload="f",
                                                   destination_workload_namespace="ns3"), 3 / 15)],
    ("TCP connections closed / s", "A"): [(_labels(**PAIR_CD), 1.5 / 15)],
    ("Bytes received by the destination / s", "A"): [(_labels(**PAIR_AB), 100.0)],
    ("Bytes sent by the destination / s", "A"): [(_labels(**PAIR_AB), 20.0)],
    # a -> b: 20 open although none has closed; c -> d: 40 - 30; e -> f: 60.
    ("Open TCP connections", "A"): [(_labels(**PAIR_AB), 20), (_labels(**PAIR_CD), 10),
                                    (_labels(source_workload="e", source_workload_namespace="ns1",
                                             destination_workload="f", destination_workload_namespace="ns3"),
                                     60)],
    ("Pods not captured", "A"): [(_labels(instance=N1["instance"]), 0), (_labels(instance=N2["instance"]), 2)],
    ("Enrolled pods", "A"): [(_labels(instance=N1["instance"]), 3), (_labels(instance=N2["instance"]), 4)],
    # Soonest expiry minus now (300 s): 3600 s left on node 1, expired 500 s ago on node 2.
    ("Time to certificate expiry (soonest)", "A"): [(_labels(instance=N1["instance"]), 3600),
                                                    (_labels(instance=N2["instance"]), -500)],
    ("Cluster state age", "A"): [(_labels(instance=N1["instance"]), 10), (_labels(instance=N2["instance"]), 300)],
    ("Cluster state age", "B"): [(_labels(instance=N1["instance"]), 1), (_labels(instance=N2["instance"]), 0)],
    ("CA requests / s by result", "A"): [(_labels(result="ok"), 0.25), (_labels(result="error"), 0.1)],
    ("Agent CPU (data path)", "A"): [(_labels(instance=N1["instance"]), 0.1), (_labels(instance=N2["instance"]), 0.2)],
    ("Agent RSS", "A"): [(_labels(instance=N1["instance"]), 52e6), (_labels(instance=N2["instance"]), 61e6)],
}


def _unit_test(queries, expected) -> dict:
    return {"evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": _series(),
        "promql_expr_test": [
            {"expr": q.expr, "eval_time": "5m",
             "exp_samples": [{"labels": lbl, "value": v} for lbl, v in expected[(q.panel, q.ref_id)]]}
            for q in queries],
    }]}


def test_every_expression_computes_what_the_panel_claims(tmp_path):
    queries = dashboard.queries()
    assert {(q.panel, q.ref_id) for q in queries} == set(EXPECTED), "every expression has its expected answer"
    path = tmp_path / "dashboard_test.yaml"
    path.write_text(yaml.safe_dump(_unit_test(queries, EXPECTED), sort_keys=False))
    proc = _run("test", "rules", str(path))
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_source_reporter_and_a_namespace_filter(tmp_path):
    """Switching the variables changes what the panels count (and the test notices a wrong answer)."""
    queries = [q for q in dashboard.queries(overrides={"reporter": "source", "namespace": "ns3"})
               if q.panel == "Open TCP connections"]
    # No source-reporter series in ns3: the panel is empty.
    expected = {("Open TCP connections", "A"): []}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_unit_test(queries, expected), sort_keys=False))
    proc = _run("test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same check with a wrong expectation fails: promtool really compares.
    wrong = {("Open TCP connections", "A"): [(_labels(**PAIR_AB), 20)]}
    path.write_text(yaml.safe_dump(_unit_test(queries, wrong), sort_keys=False))
    proc = _run("test", "rules", str(path))
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr


def test_the_old_open_connections_expression_hid_a_pair(tmp_path):
    """`sum(opened) - sum(closed)` per pair drops a pair with no closed series (issue 12)."""
    sel = 'reporter="destination"'
    by = "source_workload, source_workload_namespace, destination_workload, destination_workload_namespace"
    old = (f"sum by ({by}) (istio_tcp_connections_opened_total{{{sel}}}) - "
           f"sum by ({by}) (istio_tcp_connections_closed_total{{{sel}}})")
    q = dashboard.Query("Open TCP connections", "A", old, old)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_unit_test([q], EXPECTED), sort_keys=False))
    proc = _run("test", "rules", str(path))
    assert proc.returncode != 0, "the old expression would have passed"
