"""Access log lines: text (key=value, stable order) and JSON, from records or their dicts."""

import dataclasses
import json
import logging
import shlex

import pytest

from agent.observe.accesslog import FIELDS, AccessLogSink, access_entry, format_access
from agent.proxy.counters import ConnectionRecord

STARTED = 1767225600.25     # 2026-01-01T00:00:00.250Z

OUTBOUND = ConnectionRecord(
    direction="outbound", protocol="HBONE", pod="shop/web-1", source="198.18.1.5:40000",
    destination="198.18.2.7:8080", source_identity="spiffe://cluster.local/ns/shop/sa/web",
    destination_identity="spiffe://cluster.local/ns/data/sa/db", bytes_sent=120, bytes_received=4096,
    duration_ms=35, outcome="closed", started=STARTED)
DENIED = ConnectionRecord(
    direction="hbone", protocol="HBONE", pod="data/db-0", source="198.18.1.5:40001",
    destination="198.18.2.7:8080", source_identity="spiffe://cluster.local/ns/shop/sa/web",
    destination_identity="spiffe://cluster.local/ns/data/sa/db", duration_ms=2,
    outcome="refused: 401 denied by data/deny-web", started=STARTED,
    policy="denied by data/deny-web", audit=True)
FAILED = ConnectionRecord(
    direction="outbound", protocol="TCP", pod="shop/web-1", source="198.18.1.5:40002",
    destination="0.0.0.0:0", outcome="failed: no original destination recorded", started=STARTED)


@pytest.mark.parametrize("record, expected", [
    (OUTBOUND,
     'start=2026-01-01T00:00:00.250Z direction=outbound protocol=HBONE src.addr=198.18.1.5:40000 '
     'src.workload=web-1 src.namespace=shop src.identity=spiffe://cluster.local/ns/shop/sa/web '
     'dst.addr=198.18.2.7:8080 dst.identity=spiffe://cluster.local/ns/data/sa/db '
     'bytes_sent=120 bytes_recv=4096 duration_ms=35 outcome=closed audit=false'),
    (DENIED,
     'start=2026-01-01T00:00:00.250Z direction=hbone protocol=HBONE src.addr=198.18.1.5:40001 '
     'src.identity=spiffe://cluster.local/ns/shop/sa/web dst.addr=198.18.2.7:8080 '
     'dst.workload=db-0 dst.namespace=data dst.identity=spiffe://cluster.local/ns/data/sa/db '
     'bytes_sent=0 bytes_recv=0 duration_ms=2 outcome=refused policy="denied by data/deny-web" '
     'audit=true error="401 denied by data/deny-web"'),
    (FAILED,
     'start=2026-01-01T00:00:00.250Z direction=outbound protocol=TCP src.addr=198.18.1.5:40002 '
     'src.workload=web-1 src.namespace=shop dst.addr=0.0.0.0:0 bytes_sent=0 bytes_recv=0 '
     'duration_ms=0 outcome=failed audit=false error="no original destination recorded"'),
])
def test_text_format(record, expected):
    assert format_access(record) == expected
    # the dict form (ConnectionLog.recent()) gives the same line
    assert format_access(dataclasses.asdict(record)) == expected


def test_json_format_has_every_key_in_order():
    line = format_access(DENIED, json_format=True)
    assert "\n" not in line
    entry = json.loads(line)
    assert list(entry) == list(FIELDS)
    assert entry["outcome"] == "refused"
    assert entry["error"] == "401 denied by data/deny-web"
    assert entry["policy"] == "denied by data/deny-web"
    assert entry["audit"] is True
    assert entry["bytes_sent"] == 0 and entry["src.workload"] == ""
    assert entry["dst.namespace"] == "data"


def test_caller_supplied_workloads_win():
    record = dataclasses.asdict(OUTBOUND) | {
        "source_workload": "web", "source_namespace": "shop", "destination_workload": "db",
        "destination_namespace": "data", "destination_service": "db.data.svc.cluster.local"}
    entry = access_entry(record)
    assert (entry["src.workload"], entry["dst.workload"], entry["dst.namespace"],
            entry["dst.service"]) == ("web", "db", "data", "db.data.svc.cluster.local")


@pytest.mark.parametrize("outcome, word, error", [
    ("closed", "closed", ""),
    ("reset", "reset", ""),
    ("refused: port 15008 belongs to the mesh agent", "refused", "port 15008 belongs to the mesh agent"),
    ("failed: timed out", "failed", "timed out"),
    ("", "-", ""),
])
def test_outcome_split(outcome, word, error):
    entry = access_entry(dataclasses.replace(OUTBOUND, outcome=outcome))
    assert (entry["outcome"], entry["error"]) == (word, error)


def test_peer_text_cannot_forge_fields_or_lines():
    evil = "refused: 400 authority 'x\" dst.identity=spiffe://evil\nforged=1' is bad"
    line = format_access(dataclasses.replace(DENIED, outcome=evil))
    assert "\n" not in line
    fields = [tok.partition("=") for tok in shlex.split(line)]
    keys = [k for k, _, _ in fields]
    assert len(keys) == len(set(keys)) and "forged" not in keys
    assert dict((k, v) for k, _, v in fields)["dst.identity"] == "spiffe://cluster.local/ns/data/sa/db"
    assert 'error="400 authority \'x\\" dst.identity=spiffe://evil\\nforged=1\' is bad"' in line


def test_garbage_record_fields_are_tolerated():
    line = format_access({"bytes_sent": "lots", "started": "never", "direction": None})
    assert "bytes_sent=0" in line and "start=" not in line


@pytest.mark.parametrize("json_format", [False, True])
def test_sink_logs_to_access_logger(caplog, json_format):
    sink = AccessLogSink(json_format=json_format)
    with caplog.at_level(logging.INFO, logger="access"):
        sink(OUTBOUND)
        sink.log(dataclasses.asdict(DENIED))
    records = [r for r in caplog.records if r.name == "access"]
    assert len(records) == 2
    assert all(r.levelno == logging.INFO for r in records)
    assert records[0].getMessage() == format_access(OUTBOUND, json_format)
    assert records[1].getMessage() == format_access(DENIED, json_format)


def test_sink_disabled_logger_does_nothing(caplog):
    logger = logging.getLogger("access.test-disabled")
    logger.setLevel(logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="access.test-disabled"):
        AccessLogSink(logger=logger)(OUTBOUND)
    assert not caplog.records


def test_sink_never_raises(caplog):
    with caplog.at_level(logging.INFO, logger="access"):
        AccessLogSink()(object())        # not a mapping
    assert any("cannot format" in r.getMessage() for r in caplog.records)
