"""The pod records that decide re-adoption after a crash: saved atomically and durably."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import fileio
from agent.enrol.records import PodRecord, RecordStore

REPO = Path(__file__).resolve().parents[2]


def _record(**changes) -> PodRecord:
    fields = dict(namespace="mesh", name="web", uid="u1", container_id="c1", netns="/run/netns/p1",
                  ips=["198.18.0.10"], gateways=["198.18.0.1"], enrolled=True, reason="label",
                  netns_cookie=42, service_account="web")
    fields.update(changes)
    return PodRecord(**fields)


def test_a_saved_record_loads_back(tmp_path):
    store = RecordStore(str(tmp_path / "pods"))
    store.save(_record())
    store.save(_record(name="db", uid="u2"))
    assert [r.key for r in store.load_all()] == ["mesh/db", "mesh/web"]
    assert store.load_all()[1] == _record()
    assert [n for n in os.listdir(store.directory) if not n.endswith(".json")] == []


def test_a_failed_save_keeps_the_previous_record(tmp_path, monkeypatch):
    store = RecordStore(str(tmp_path / "pods"))
    store.save(_record(enrolled=True))

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError):
        store.save(_record(enrolled=False, reason="label removed"))
    monkeypatch.undo()
    assert store.load_all() == [_record(enrolled=True)]


def test_an_agent_killed_mid_save_leaves_the_previous_record_and_the_next_start_cleans_up(tmp_path):
    directory = tmp_path / "pods"
    RecordStore(str(directory)).save(_record(enrolled=True))
    code = (
        "import os, sys\n"
        "from agent import fileio\n"
        "from agent.enrol.records import PodRecord, RecordStore\n"
        "fileio.os.replace = lambda src, dst: os._exit(9)\n"
        "RecordStore(sys.argv[1]).save(PodRecord('mesh', 'web', 'u1', 'c1', '/run/netns/p1', [], []))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=REPO, timeout=60)
    assert done.returncode == 9
    leftovers = [n for n in os.listdir(directory) if ".tmp-" in n]
    assert len(leftovers) == 1
    assert json.loads((directory / leftovers[0]).read_text())["enrolled"] is False   # the torn-off write
    store = RecordStore(str(directory))                    # the restarted agent
    assert store.load_all() == [_record(enrolled=True)]
    assert [n for n in os.listdir(directory) if ".tmp-" in n] == []
