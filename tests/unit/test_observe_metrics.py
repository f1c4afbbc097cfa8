"""Metrics exposure: exact Istio names and labels in the Prometheus text, bytes before close."""

import re

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.observe.metrics import (TCP_LABELS, Metrics, TcpMetrics, WithoutCreated, labels_for)

WEB = {"metadata": {"name": "web-5d8f7c9b4-x2k4p", "namespace": "shop",
                    "labels": {"app": "web", "pod-template-hash": "5d8f7c9b4"},
                    "ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d8f7c9b4", "controller": True}]}}
DB = {"metadata": {"name": "db-0", "namespace": "data", "labels": {"app": "db", "version": "v1"},
                   "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": True}]}}
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
DB_ID = "spiffe://cluster.local/ns/data/sa/db"
LABELS = labels_for("source", WEB, WEB_ID, DB, DB_ID, "data/db", True, "-")

TCP_NAMES = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
             "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total",
             "istio_tcp_connections_failed_total")


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def sample(text: str, name: str, **match) -> float | None:
    """The value of the one sample ``name`` whose labels include ``match``."""
    found = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                found.append(s.value)
    assert len(found) <= 1, f"{name} {match}: {len(found)} samples"
    return found[0] if found else None


@pytest.fixture
def metrics():
    return Metrics(clock=lambda: 1000.0)


def test_private_registry_not_global(metrics):
    assert metrics.registry is not REGISTRY
    before = generate_latest(REGISTRY).decode()
    metrics.tcp.opened(LABELS)
    assert "istio_tcp" not in generate_latest(REGISTRY).decode()
    assert "istio_tcp" not in before
    # two instances coexist (no duplicate registration on the global registry)
    Metrics()


def test_exact_names_and_label_values(metrics):
    tcp = metrics.tcp
    tcp.opened(LABELS)
    tcp.add_bytes(LABELS, 100, 2000)
    tcp.closed(LABELS)
    tcp.failed(labels_for("source", WEB, WEB_ID, None, None, None, False, "CONNECT"))
    text = scrape(metrics)
    for name in TCP_NAMES:
        assert re.search(rf"^# TYPE {name} counter$", text, re.M), name
        assert re.search(rf"^{name}\{{", text, re.M), name
        assert f"{name}_total" not in text
    line = next(l for l in text.splitlines() if l.startswith("istio_tcp_connections_opened_total{"))
    for key in TCP_LABELS:
        assert f'{key}="{LABELS[key]}"' in line
    assert 'destination_service="db.data.svc.cluster.local"' in line
    assert 'source_workload="web"' in line and 'destination_workload="db"' in line
    assert sample(text, "istio_tcp_connections_opened_total", reporter="source") == 1
    assert sample(text, "istio_tcp_connections_closed_total", reporter="source") == 1
    # Istio's direction: received = request bytes (source -> destination), sent = response bytes
    assert sample(text, "istio_tcp_received_bytes_total", reporter="source") == 100
    assert sample(text, "istio_tcp_sent_bytes_total", reporter="source") == 2000
    assert sample(text, "istio_tcp_connections_failed_total", response_flags="CONNECT",
                  destination_workload="unknown", connection_security_policy="unknown") == 1


def test_bytes_advance_before_close(metrics):
    counted = {"sent": 0, "received": 0}
    meter = metrics.tcp.connection(LABELS, totals=lambda: (counted["sent"], counted["received"]))
    assert metrics.tcp.live_connections() == 1
    text = scrape(metrics)
    assert sample(text, "istio_tcp_connections_opened_total") == 1
    assert sample(text, "istio_tcp_connections_closed_total") is None
    counted.update(sent=10, received=500)
    metrics.tcp.sync_live()
    text = scrape(metrics)
    assert sample(text, "istio_tcp_received_bytes_total") == 10
    assert sample(text, "istio_tcp_sent_bytes_total") == 500
    assert sample(text, "istio_tcp_connections_closed_total") is None
    counted.update(sent=15, received=700)
    metrics.tcp.sync_live()
    metrics.tcp.sync_live()        # idempotent: only growth is added
    text = scrape(metrics)
    assert sample(text, "istio_tcp_received_bytes_total") == 15
    assert sample(text, "istio_tcp_sent_bytes_total") == 700
    counted.update(sent=16, received=701)
    meter.close()
    meter.close()                  # idempotent
    metrics.tcp.sync_live()
    text = scrape(metrics)
    assert sample(text, "istio_tcp_received_bytes_total") == 16
    assert sample(text, "istio_tcp_sent_bytes_total") == 701
    assert sample(text, "istio_tcp_connections_closed_total") == 1
    assert metrics.tcp.live_connections() == 0


def test_meter_explicit_updates_and_close_flags(metrics):
    meter = metrics.tcp.connection(LABELS)
    meter.update(5, 6)
    meter.update(4, 6)            # totals never go backwards
    meter.close("DENY", sent_total=9, received_total=6)
    text = scrape(metrics)
    assert sample(text, "istio_tcp_received_bytes_total", response_flags="-") == 9
    assert sample(text, "istio_tcp_sent_bytes_total", response_flags="-") == 6
    assert sample(text, "istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert sample(text, "istio_tcp_connections_closed_total", response_flags="-") is None


def test_broken_totals_never_break_a_scrape(metrics):
    def boom():
        raise RuntimeError("gone")
    metrics.tcp.connection(LABELS, totals=boom)
    metrics.tcp.sync_live()
    assert sample(scrape(metrics), "istio_tcp_connections_opened_total") == 1


def test_missing_labels_become_unknown(metrics):
    metrics.tcp.opened({"reporter": "destination", "bogus": "x"})
    text = scrape(metrics)
    assert sample(text, "istio_tcp_connections_opened_total", reporter="destination",
                  source_workload="unknown", response_flags="unknown") == 1
    assert "bogus" not in text


def test_bounded_cardinality(metrics):
    # many connections between the same workloads are one series
    for port in range(50):
        m = metrics.tcp.connection(labels_for("source", WEB, WEB_ID, DB, DB_ID, None, True, "-"))
        m.update(port, port)
        m.close()
    text = scrape(metrics)
    assert len([l for l in text.splitlines() if l.startswith("istio_tcp_connections_opened_total{")]) == 1
    assert sample(text, "istio_tcp_connections_opened_total") == 50


def test_without_created_view(metrics):
    metrics.tcp.opened(LABELS)
    full = scrape(metrics)
    trimmed = generate_latest(WithoutCreated(metrics.registry)).decode()
    assert "istio_tcp_connections_opened_created" in full
    assert "_created" not in trimmed
    assert sample(trimmed, "istio_tcp_connections_opened_total") == 1


def test_agent_health_metrics():
    now = [1000.0]
    metrics = Metrics(clock=lambda: now[0])
    a = metrics.agent
    a.enrolled_pods.set(3)
    a.set_listeners({"outbound": 3, "inbound": 3, "hbone": 3})
    a.bpf_programs.set(4)
    a.ca_request("ok")
    a.ca_request("ok")
    a.ca_request("error")
    a.policy_rejected.set(2)
    a.pods_not_captured.set(1)
    a.set_certificates({WEB_ID: 1000.0 + 3600, DB_ID: 900.0, "spiffe://cluster.local/ns/x/sa/y": None})
    a.state_synced(True)
    now[0] = 1012.5
    text = scrape(metrics)
    assert sample(text, "ambient_agent_enrolled_pods") == 3
    assert sample(text, "ambient_agent_listeners", kind="hbone") == 3
    assert sample(text, "ambient_agent_bpf_programs_attached") == 4
    assert sample(text, "ambient_agent_ca_requests_total", result="ok") == 2
    assert sample(text, "ambient_agent_ca_requests_total", result="error") == 1
    assert sample(text, "ambient_agent_policy_objects_rejected") == 2
    assert sample(text, "ambient_agent_pods_not_captured") == 1
    assert sample(text, "ambient_agent_certificate_expiry_seconds", identity=WEB_ID) == 3600 - 12.5
    assert sample(text, "ambient_agent_certificate_expiry_seconds", identity=DB_ID) == -112.5
    assert sample(text, "ambient_agent_certificate_expiry_seconds",
                  identity="spiffe://cluster.local/ns/x/sa/y") is None
    assert sample(text, "ambient_agent_certificate_expiration_timestamp_seconds", identity=WEB_ID) == 4600.0
    assert sample(text, "ambient_agent_certificate_expiration_timestamp_seconds", identity=DB_ID) == 900.0
    assert sample(text, "ambient_agent_certificate_expiration_timestamp_seconds",
                  identity="spiffe://cluster.local/ns/x/sa/y") is None
    assert sample(text, "ambient_agent_state_sync_ok") == 1
    assert sample(text, "ambient_agent_state_sync_lag_seconds") == 12.5
    assert sample(text, "ambient_agent_state_last_sync_timestamp_seconds") == 1000.0
    # process CPU and memory from ProcessCollector on the private registry
    assert sample(text, "process_cpu_seconds_total") is not None
    assert sample(text, "process_resident_memory_bytes") > 0
    # a failed sync keeps the lag growing from the last success; forgotten identities vanish
    a.state_synced(False)
    a.set_certificates({WEB_ID: 5000.0})
    now[0] = 1020.0
    text = scrape(metrics)
    assert sample(text, "ambient_agent_state_sync_ok") == 0
    assert sample(text, "ambient_agent_state_sync_lag_seconds") == 20.0
    assert sample(text, "ambient_agent_certificate_expiry_seconds", identity=DB_ID) is None
    assert sample(text, "ambient_agent_certificate_expiry_seconds", identity=WEB_ID) == 3980.0
    assert sample(text, "ambient_agent_state_last_sync_timestamp_seconds") == 1000.0
    assert sample(text, "ambient_agent_certificate_expiration_timestamp_seconds", identity=DB_ID) is None
    assert sample(text, "ambient_agent_certificate_expiration_timestamp_seconds", identity=WEB_ID) == 5000.0


def test_tcp_metrics_on_any_registry():
    registry = CollectorRegistry()
    tcp = TcpMetrics(registry)
    tcp.opened(LABELS)
    assert "istio_tcp_connections_opened_total{" in generate_latest(registry).decode()


@pytest.mark.parametrize("outcome, policy, flags", [
    ("closed", "", "-"),
    ("reset", "", "-"),
    ("", "", "-"),
    ("refused: 401 denied by data/deny-web", "denied by data/deny-web", "DENY"),
    ("refused: denied by data/deny-web", "denied by data/deny-web", "DENY"),           # inbound plaintext
    ("refused: port 15008 belongs to the mesh agent", "", "CONNECT"),
    ("refused: 400 authority 198.18.1.6 is not an address of this pod", "", "CONNECT"),
    ("refused: 503 app unreachable: connection refused", "", "CONNECT"),
    ("refused: TLS handshake failed: bad certificate", "", "TLS_FAILURE"),
    ("refused: no certificate for spiffe://x yet (timed out)", "", "TLS_FAILURE"),
    ("refused: no CA configured", "", "TLS_FAILURE"),
    ("failed: no original destination recorded", "", "CONNECT"),
    ("failed: [Errno 111] Connection refused", "", "CONNECT"),
    ("refused: status 401", "", "CONNECT"),      # outbound: the peer refused; the peer reports DENY
])
def test_flags_for_outcome(outcome, policy, flags):
    from agent.observe.metrics import flags_for_outcome
    assert flags_for_outcome(outcome, policy) == flags


def test_meter_fail_counts_failed_and_closed(metrics):
    meter = metrics.tcp.connection(LABELS)
    meter.fail("CONNECT")
    meter.fail("CONNECT")                        # once only
    text = scrape(metrics)
    assert sample(text, "istio_tcp_connections_opened_total", response_flags="-") == 1
    assert sample(text, "istio_tcp_connections_closed_total", response_flags="CONNECT") == 1
    assert sample(text, "istio_tcp_connections_failed_total", response_flags="CONNECT") == 1


def test_last_sync_timestamp_is_absent_before_the_first_sync():
    now = [50.0]
    metrics = Metrics(clock=lambda: now[0])
    text = scrape(metrics)
    # Absent, not 0: "time() - metric" must not read as a sync 55 years ago.
    assert sample(text, "ambient_agent_state_last_sync_timestamp_seconds") is None
    assert "# TYPE ambient_agent_state_last_sync_timestamp_seconds" not in text
    assert sample(text, "ambient_agent_state_sync_lag_seconds") == 0     # the deprecated gauge's old reading
    metrics.agent.state_synced(False)
    assert sample(scrape(metrics), "ambient_agent_state_last_sync_timestamp_seconds") is None
    metrics.agent.state_synced(True)
    now[0] = 80.0
    metrics.agent.state_synced(False)
    text = scrape(metrics)
    assert sample(text, "ambient_agent_state_last_sync_timestamp_seconds") == 50.0
    assert "# TYPE ambient_agent_state_last_sync_timestamp_seconds gauge" in text


def test_deprecated_gauges_say_so_in_their_help():
    text = scrape(Metrics())
    for old, new in (("ambient_agent_certificate_expiry_seconds",
                      "ambient_agent_certificate_expiration_timestamp_seconds"),
                     ("ambient_agent_state_sync_lag_seconds", "ambient_agent_state_last_sync_timestamp_seconds")):
        help_line = next(l for l in text.splitlines() if l.startswith(f"# HELP {old} "))
        assert "DEPRECATED" in help_line and new in help_line


def test_build_info_as_istio_tools_read_it():
    text = scrape(Metrics(version="1.2.3"))
    # Istio's ztunnel dashboard: istio_build{component="ztunnel"}, its tag the version.
    assert sample(text, "istio_build", component="ztunnel", tag="1.2.3") == 1
    assert sample(text, "ambient_agent_build_info", version="1.2.3") == 1


def test_build_version_comes_from_the_package():
    from importlib.metadata import version
    from agent.observe.metrics import agent_version
    assert agent_version() == version("ambient-agent")
    assert sample(scrape(Metrics()), "istio_build", component="ztunnel", tag=version("ambient-agent")) == 1


def test_a_connection_that_never_carried_bytes_follows_ztunnel(metrics):
    """ztunnel counts it opened with "-", closed and failed with its flag, byte series at 0."""
    metrics.tcp.ended_early(LABELS, "DENY")
    text = scrape(metrics)
    assert sample(text, "istio_tcp_connections_opened_total", response_flags="-") == 1
    assert sample(text, "istio_tcp_connections_opened_total", response_flags="DENY") is None
    assert sample(text, "istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert sample(text, "istio_tcp_connections_failed_total", response_flags="DENY") == 1
    assert sample(text, "istio_tcp_received_bytes_total", response_flags="-") == 0
    metrics.tcp.ended_early(LABELS, "-")            # closed at once, no failure
    text = scrape(metrics)
    assert sample(text, "istio_tcp_connections_opened_total", response_flags="-") == 2
    assert sample(text, "istio_tcp_connections_closed_total", response_flags="-") == 1
    assert sample(text, "istio_tcp_connections_failed_total", response_flags="-") is None


def test_byte_series_exist_from_open_so_rate_sees_the_first_bytes(metrics):
    meter = metrics.tcp.connection(LABELS, totals=lambda: (0, 0))
    text = scrape(metrics)
    assert sample(text, "istio_tcp_received_bytes_total") == 0
    assert sample(text, "istio_tcp_sent_bytes_total") == 0
    meter.update(100, 7)
    text = scrape(metrics)
    assert sample(text, "istio_tcp_received_bytes_total") == 100
    assert sample(text, "istio_tcp_sent_bytes_total") == 7
