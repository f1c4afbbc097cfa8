"""The agent loads its BPF programs through a short-lived loader process.

BCC (and LLVM with it) must never be imported by the long-running agent; a
loader that fails or hangs must give the agent a CaptureError that says why.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from agent.capture import datapath
from agent.capture.datapath import CaptureDatapath, CaptureError


def _fake_loader(monkeypatch, code: str) -> None:
    monkeypatch.setattr(datapath, "loader_command",
                        lambda pin_dir, cgroup, headers=None: [sys.executable, "-c", code, pin_dir, cgroup])


def test_a_failing_loader_gives_a_capture_error_with_its_stderr(monkeypatch, tmp_path):
    _fake_loader(monkeypatch, (
        "import sys\n"
        "print('INFO compiling stats.c, connect.c, sockops.c, sk_lookup.c', file=sys.stderr)\n"
        "print('loader: attach program (type 10): Operation not permitted', file=sys.stderr)\n"
        "sys.exit(1)\n"))
    dp = CaptureDatapath(str(tmp_path / "pins"), cgroup=str(tmp_path))
    with pytest.raises(CaptureError) as err:
        dp.load()
    message = str(err.value)
    assert "BPF loader exited with status 1" in message
    assert "attach program (type 10): Operation not permitted" in message
    assert dp._maps == {} and dp._sk_lookup_fd == -1   # nothing half-opened


def test_a_hanging_loader_is_killed_at_the_timeout(monkeypatch, tmp_path):
    pid_file = tmp_path / "loader.pid"
    _fake_loader(monkeypatch, (
        "import os, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('compiling ...', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"))
    dp = CaptureDatapath(str(tmp_path / "pins"), cgroup=str(tmp_path), loader_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(CaptureError) as err:
        dp.load()
    assert time.monotonic() - started < 10
    assert "did not finish within 1 s and was killed" in str(err.value)
    assert "compiling ..." in str(err.value)
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}"), "the loader was left running (or unreaped)"


def test_the_real_loader_reports_a_missing_cgroup_before_compiling(tmp_path):
    # Opening the cgroup is the loader's first step, so this needs neither
    # root nor BCC, and leaves no pin directory behind.
    missing = tmp_path / "no-such-cgroup"
    dp = CaptureDatapath(str(tmp_path / "pins"), cgroup=str(missing))
    with pytest.raises(CaptureError) as err:
        dp.load()
    assert f"loader: open cgroup {missing}: No such file or directory" in str(err.value)
    assert not (tmp_path / "pins").exists()


# -- the loader's report: compile time and kernel headers (issue 16) -----------------------------

def test_the_loader_report_survives_the_trip_through_stderr():
    report = datapath.LoaderReport(0.8123, "/usr/share/ambient-agent/kernel-headers", "bundled")
    stderr = ("2026-11-30 INFO agent.capture.loader: done in 0.95 s\n"
              f"{report.line()}\n")
    assert datapath.LoaderReport.parse(stderr) == report


@pytest.mark.parametrize("stderr", [
    "",
    "loader: compile stats.c: failed\n",
    "loader-report {not json\n",
    'loader-report {"compile_seconds": 1.0}\n',
])
def test_no_report_or_a_malformed_one_gives_none(stderr):
    assert datapath.LoaderReport.parse(stderr) is None


def test_the_agent_passes_its_kernel_header_setting_to_the_loader():
    assert "--kernel-headers" not in datapath.loader_command("/p", "/c")   # the loader's default
    cmd = datapath.loader_command("/p", "/c", "host")
    assert cmd[cmd.index("--kernel-headers") + 1] == "host"


def test_run_loader_hands_back_the_report_line(monkeypatch, tmp_path):
    line = datapath.LoaderReport(0.5, "host", "host").line()
    _fake_loader(monkeypatch, f"import sys\nprint({line!r}, file=sys.stderr)\n")
    assert datapath.LoaderReport.parse(datapath.run_loader(str(tmp_path), str(tmp_path))).compile_seconds == 0.5


def test_the_real_loader_refuses_a_relative_header_path_before_compiling(tmp_path):
    # The cgroup is opened first (any directory will do for that step); the
    # header setting is checked next, before BCC is imported.
    dp = CaptureDatapath(str(tmp_path / "pins"), cgroup=str(tmp_path), kernel_headers="headers")
    with pytest.raises(CaptureError, match="kernel headers 'headers': expected 'auto', 'host' or an absolute path"):
        dp.load()
    assert dp.report is None and not (tmp_path / "pins").exists()


def test_start_up_compile_time_is_exposed_as_gauges():
    from prometheus_client import CollectorRegistry, generate_latest

    from agent.observe.metrics import AgentMetrics
    registry = CollectorRegistry()
    agent = AgentMetrics(registry, process=False)
    agent.bpf_loaded(0.84, 1.37)
    text = generate_latest(registry).decode()
    assert "ambient_agent_bpf_compile_seconds 0.84" in text
    assert "ambient_agent_bpf_loader_seconds 1.37" in text
    agent.bpf_loaded(None, None)   # unknown (a loader without a report line): kept
    assert "ambient_agent_bpf_compile_seconds 0.84" in generate_latest(registry).decode()
