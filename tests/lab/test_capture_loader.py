"""The BPF loader on the real kernel, outside any lab.

Programs go to a fresh, empty cgroup v2 directory of the test's own (no
process runs in it, so they never act on traffic) and a unique pin
directory; both are removed afterwards, also on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agent.capture import datapath
from agent.capture.datapath import BPFFS, CGROUP_PROGRAMS, MAPS, SK_LOOKUP_PIN, CaptureDatapath, teardown
from lab import sysops
from tests.lab.conftest import unique_name

PROGRAMS = [name for name, *_ in CGROUP_PROGRAMS]


@pytest.fixture
def target():
    name = unique_name("ambient-test-ldr-")
    cgroup = f"{sysops.CGROUP_V2}/{name}"
    pin_dir = f"{BPFFS}/{name}"
    os.mkdir(cgroup)
    try:
        yield pin_dir, cgroup
    finally:
        problems = teardown(pin_dir, cgroup)
        os.rmdir(cgroup)
        assert problems == []


def _load(pin_dir: str, cgroup: str) -> None:
    done = subprocess.run([sys.executable, "-m", "agent.capture.loader", "--pin-dir", pin_dir,
                           "--cgroup", cgroup], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _attached(cgroup: str) -> set[int]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    return {entry["id"] for entry in json.loads(out.strip() or "[]")}


def _pinned_id(path: str) -> int:
    out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", path],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    return json.loads(out)["id"]


def test_loader_pins_maps_and_programs_and_a_second_run_replaces_them(target):
    pin_dir, cgroup = target
    _load(pin_dir, cgroup)
    assert set(os.listdir(pin_dir)) == {*MAPS, *PROGRAMS, SK_LOOKUP_PIN}
    first = {p: _pinned_id(f"{pin_dir}/{p}") for p in (*PROGRAMS, SK_LOOKUP_PIN)}
    assert _attached(cgroup) == {first[p] for p in PROGRAMS}

    _load(pin_dir, cgroup)
    second = {p: _pinned_id(f"{pin_dir}/{p}") for p in (*PROGRAMS, SK_LOOKUP_PIN)}
    assert not set(first.values()) & set(second.values())
    # Exactly the new programs attached: the old ones were detached after the new went on.
    assert _attached(cgroup) == {second[p] for p in PROGRAMS}
    assert set(os.listdir(pin_dir)) == {*MAPS, *PROGRAMS, SK_LOOKUP_PIN}


def test_loader_detaches_what_an_interrupted_loader_left_staged(target):
    pin_dir, cgroup = target
    _load(pin_dir, cgroup)
    # A loader killed after unpinning the old connect4 but before renaming
    # its new one leaves an attached program under a staged name only.
    leftover = _pinned_id(f"{pin_dir}/prog_connect4")
    os.rename(f"{pin_dir}/prog_connect4", f"{pin_dir}/prog_connect4_staged999999")
    os.rename(f"{pin_dir}/{SK_LOOKUP_PIN}", f"{pin_dir}/{SK_LOOKUP_PIN}_staged999999")
    _load(pin_dir, cgroup)
    assert set(os.listdir(pin_dir)) == {*MAPS, *PROGRAMS, SK_LOOKUP_PIN}
    attached = _attached(cgroup)
    assert leftover not in attached
    assert attached == {_pinned_id(f"{pin_dir}/{p}") for p in PROGRAMS}


def test_the_agent_opens_what_the_loader_pinned_and_teardown_removes_it(target):
    pin_dir, cgroup = target
    dp = CaptureDatapath(pin_dir, cgroup)
    try:
        dp.load()
        assert dp.enrolled_netns() == []
        assert set(dp.stats()) and all(v == 0 for v in dp.stats().values())
        # The fd the agent creates sk_lookup links with is the pinned program.
        info = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", f"{pin_dir}/{SK_LOOKUP_PIN}"],
                              capture_output=True, text=True, check=True, timeout=10).stdout
        assert json.loads(info)["type"] == "sk_lookup"
        assert os.readlink(f"/proc/self/fd/{dp._sk_lookup_fd}") == "anon_inode:bpf-prog"
    finally:
        dp.close()
    assert dp._sk_lookup_fd == -1 and not dp._maps
    programs = _attached(cgroup)
    assert len(programs) == len(PROGRAMS)
    assert teardown(pin_dir, cgroup) == []
    assert not os.path.exists(pin_dir)
    assert _attached(cgroup) == set()


def test_the_agent_gets_a_capture_error_when_a_pin_is_missing_after_the_loader(target, monkeypatch):
    pin_dir, cgroup = target
    _load(pin_dir, cgroup)
    os.unlink(f"{pin_dir}/{SK_LOOKUP_PIN}")
    monkeypatch.setattr(datapath, "run_loader", lambda *a, **k: "")   # as if it had just run
    dp = CaptureDatapath(pin_dir, cgroup)
    with pytest.raises(datapath.CaptureError, match="pins cannot be opened: open pinned .*prog_sk_lookup"):
        dp.load()
    assert dp._maps == {} and dp._sk_lookup_fd == -1
