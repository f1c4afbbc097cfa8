"""`make bench-short` runs in CI (through `make test`) so the suite cannot rot.

Asserts that every scenario ran and wrote well-formed results with both
baseline and mesh numbers, that the lab was removed, and nothing about
speed: performance is reported by bench/, never asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab import sysops

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("0_loadgen_ceiling", "1_bulk", "2_request_response", "3_new_connections", "4_agent_cost",
             "5_capture_cost", "6_cni", "7_scaling", "8_dns")
# The variant pairs each scenario must report side by side.
PAIRS = {"1_bulk": ("baseline", "mesh"), "2_request_response": ("baseline", "mesh"),
         "3_new_connections": ("baseline", "mesh"), "4_agent_cost": ("baseline", "mesh"),
         "5_capture_cost": ("baseline", "eBPF"), "6_cni": ("baseline", "mesh"),
         "7_scaling": ("baseline", "mesh"), "8_dns": ("baseline", "mesh")}

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the benchmark needs root (it builds a pod lab)")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "bench.run", "--short", "--out-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    results = json.loads((out / "results.json").read_text())
    return done, results, (out / "results.md").read_text()


def test_short_mode_runs_every_scenario_and_cleans_up(short_run):
    done, results, _md = short_run
    assert done.returncode == 0, done.stderr[-4000:]
    assert results["mode"] == "short"
    assert set(SCENARIOS) <= set(results["scenarios"]), sorted(results["scenarios"])
    for key, sc in results["scenarios"].items():
        assert not sc.get("error"), f"{key}: {sc.get('error')}"
        assert sc["rows"], key
    assert results["cleanup_problems"] == []
    lab = results["meta"]["lab"]
    assert not any(n.startswith(f"alab-{lab}-") for n in sysops.list_netns())
    assert not Path(f"/run/ambient-lab/{lab}").exists()
    assert not Path(f"/sys/fs/bpf/ambient-lab-{lab}").exists()


def test_every_comparison_has_baseline_and_mesh_numbers_with_spread(short_run):
    _done, results, _md = short_run
    for key, (base, mesh) in PAIRS.items():
        rows = results["scenarios"][key]["rows"]
        compared = [r for r in rows if base in r["variants"] and mesh in r["variants"]]
        assert compared, f"{key}: no row with both {base} and {mesh}"
        for r in compared:
            for v in (base, mesh):
                s = r["variants"][v]
                assert s["n"] >= 1 and s["median"] is not None, (key, r["metric"], v)
                assert s["min"] <= s["median"] <= s["max"], (key, r["metric"], v)
    rr = {r["metric"]: r for r in results["scenarios"]["2_request_response"]["rows"]}
    assert rr["1000 req/s p99"]["variants"]["mesh"]["n"] >= 2       # several runs, alternating
    assert "added" in rr["1000 req/s p99"]


def test_results_name_the_machine_and_every_target(short_run):
    _done, results, md = short_run
    meta = results["meta"]
    for field in ("date", "git_commit", "kernel", "python", "bcc", "machine"):
        assert meta.get(field), field
    names = [t["name"] for t in results["targets"]]
    assert len(names) == 13 and len(set(names)) == 13
    assert all(t["measured"] is not None for t in results["targets"]), results["targets"]
    assert "## Targets (measured / target)" in md and "| kernel |" in md
    iptables = results["scenarios"]["5_capture_cost"]["raw"]["iptables_connections_through_agent"]
    assert iptables > 0          # the iptables variant really went through the agent


def test_dns_mesh_queries_went_through_the_agents_proxy(short_run):
    _done, results, md = short_run
    dns = results["scenarios"]["8_dns"]
    agent = dns["raw"]["agent"]
    # The Service name answered by the agent itself, the external name forwarded by it.
    assert agent.get("local", 0) > 0 and agent.get("forwarded", 0) > 0, agent
    metrics = {r["metric"] for r in dns["rows"]}
    for kind in ("external name", "Service name"):
        for p in ("p50", "p90", "p99"):
            assert any(m.startswith(kind) and m.endswith(f"one at a time {p}") for m in metrics), (kind, p)
    assert all("added" in r for r in dns["rows"] if r["unit"] == "ms")
    assert "## 8_dns:" in md
