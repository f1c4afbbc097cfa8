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
                        lambda pin_dir, cgroup: [sys.executable, "-c", code, pin_dir, cgroup])


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
