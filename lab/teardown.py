"""The lab's teardown: remove everything a lab created, idempotently, also after a crash.

Order: agents and the CA (so nothing re-pins or re-captures), every process
left in the lab's cgroups, CNI DEL of each pod, pod namespaces, BPF pins
(detached before unpinned), node and wire namespaces, cgroups, the lab
directory. It works from ``lab.json`` alone, so a process other than the
one that built the lab can run it; without ``lab.json`` it removes only
names this lab can have created.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Callable, Sequence

from lab import model, sysops
from lab.kubelet import PodRuntime
from lab.store import LabError, LabStore
from lab.supervisor import AgentSupervisor

log = logging.getLogger(__name__)


def teardown_lab(store: LabStore, supervisor: AgentSupervisor, pods: PodRuntime) -> list[str]:
    """Remove the lab; returns the problems met (empty when everything went away)."""
    try:
        rec: dict | None = store.read_records()
    except (LabError, OSError, ValueError):
        rec = None
    problems = supervisor.stop_all(rec)
    # Everything else the lab ran (pod and node commands, an agent that was
    # started but not yet recorded) lives in the lab's cgroup tree.
    if not sysops.cgroup_kill(store.cgroup_root):
        problems.append(f"processes remain in {store.cgroup_root}")

    if rec is not None:
        nodes = rec.get("nodes") or {}
        for key, p in (rec.get("pods") or {}).items():
            try:
                problems += pods.teardown_pod(key, p, nodes)
            except Exception as exc:   # keep going: the rest must still go
                problems.append(f"pod {key}: {exc}")
        problems += teardown_bpf(store.pin_root, rec)
        names = [n["netns"] for n in nodes.values()] + [rec["wire"]["netns"]]
    else:
        # No record (lab.json lost): the pattern matches only names this
        # lab can have created, never another lab's.
        problems += teardown_bpf(store.pin_root, None)
        pattern = model.lab_netns_pattern(store.name)
        names = [n for n in sysops.list_netns() if pattern.match(n)]
    for ns in names:
        try:
            sysops.remove_netns(ns)
        except OSError as exc:
            problems.append(f"remove netns {ns}: {exc}")
    problems += sysops.cgroup_remove_tree(store.cgroup_root)
    problems += remove_pin_tree(store.pin_root)
    if store.dir.exists():
        try:
            shutil.rmtree(store.dir)
        except OSError as exc:
            problems.append(f"remove {store.dir}: {exc}")
    if problems:
        log.warning("lab %s down: %d problem(s): %s", store.name, len(problems), "; ".join(problems))
    return problems


def _capture_teardown() -> Callable[..., list[str]] | None:
    """The capture module's teardown, which detaches before it unpins."""
    for module in ("agent.capture.datapath",):
        try:
            mod = __import__(module, fromlist=["teardown"])
            return getattr(mod, "teardown")
        except Exception:   # missing module, or libbpf missing at import time
            continue
    return None


def teardown_bpf(pin_root: str, rec: dict | None) -> list[str]:
    """Detach and unpin each node agent's BPF objects.

    Pinned cgroup programs must be detached before unpinning: a program
    attached with BPF_PROG_ATTACH stays attached (to the cgroup v2 root)
    after its pin is gone, with nothing left to find it by. The capture
    module's ``teardown`` knows the attach types and does both. Without
    that module no agent can have attached anything, so removing the pin
    files (``remove_pin_tree``) is enough.
    """
    if not os.path.isdir(pin_root):
        return []
    teardown = _capture_teardown()
    if teardown is None:
        return []
    problems: list[str] = []
    agents = (rec or {}).get("agents") or {}
    for entry in sorted(os.listdir(pin_root)):
        pin_dir = os.path.join(pin_root, entry)
        if not os.path.isdir(pin_dir):
            continue
        cgroup = _flag_value((agents.get(entry) or {}).get("cmd") or [], "--cgroup")
        try:
            problems += teardown(pin_dir, cgroup) if cgroup else teardown(pin_dir)
        except Exception as exc:
            problems.append(f"BPF teardown of {pin_dir}: {exc}")
    return problems


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def remove_pin_tree(path: str) -> list[str]:
    """Unlink pins and directories left under ``path`` (bpffs allows unlink/rmdir)."""
    problems: list[str] = []
    if not os.path.isdir(path):
        return problems
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for f in files:
            try:
                os.unlink(os.path.join(dirpath, f))
            except OSError as exc:
                problems.append(f"unpin {os.path.join(dirpath, f)}: {exc.strerror}")
        try:
            os.rmdir(dirpath)
        except OSError as exc:
            problems.append(f"remove {dirpath}: {exc.strerror}")
    return problems
