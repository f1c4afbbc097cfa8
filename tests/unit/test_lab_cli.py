"""The lab has its own command line (``python -m lab``); the product's has no ``lab`` sub-command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_python_m_lab_is_the_lab_command_line(tmp_path):
    done = _run("-m", "lab", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ambient-lab")
    for command in ("up", "status", "exec", "node-exec", "label", "delete-pod", "down", "list"):
        assert command in done.stdout
    # A lab directory with one lab record: `list` reads it without root or namespaces.
    (tmp_path / "x1").mkdir()
    (tmp_path / "x1" / "lab.json").write_text(json.dumps({"name": "x1", "slot": 3, "nodes": {"n1": {}},
                                                          "pods": {"a/b": {}}}))
    listed = _run("-m", "lab", "list", "--root", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\n")[1].split() == ["x1", "3", "n1", "1"]


def test_the_agent_command_line_has_no_lab():
    done = _run("-m", "agent.cli", "--help")
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert "run" in commands and "lab" not in commands
