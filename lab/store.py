"""The lab's state store: what the lab created (``lab.json``) and the cluster state file.

``lab.json`` records every namespace, cgroup, process and directory *before*
it is created, so teardown can remove all of it even after a crash;
``state.json`` is the cluster state the node agents and the CNI plugin read
(docs/ARCHITECTURE.md "Cluster state file"). One writer at a time: threads
through an RLock, processes through a flock on ``<lab>/.lock``.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from agent.fileio import atomic_write
from lab import model, sysops

log = logging.getLogger(__name__)

BPF_BASE = "/sys/fs/bpf"
CONFLIST_NAME = "10-lab.conflist"


class LabError(RuntimeError):
    """The lab could not do what was asked (the message says what and why)."""


@dataclass
class LabSettings:
    """How a lab runs its pods and agents; read at use time, so a change applies to what follows."""

    agent_args: list[str] = field(default_factory=list)
    pod_timeout: float = 30.0
    ambient_cni: bool = True
    cni_bin: dict[str, str] = field(default_factory=dict)
    cni_plugins: list[dict] = field(default_factory=list)
    cni_timeout: float = 30.0
    agent_ready_timeout: float = 60.0
    agent_command: list[str] = field(default_factory=list)
    ca: bool = True
    agent_grace: float = 5.0     # SIGTERM, then SIGKILL after this many seconds
    dual_stack: bool = False     # nodes created afterwards also get IPv6 (lab/model.py)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Atomic replace: readers see the old or the new file, never half of one."""
    atomic_write(str(path), (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode(), mode)


def _fingerprint(obj: dict) -> str:
    clone = copy.deepcopy(obj)
    clone.get("metadata", {}).pop("resourceVersion", None)
    return json.dumps(clone, sort_keys=True)


class LabStore:
    """Paths, the lock, ``lab.json`` records and the cluster state file of one lab."""

    def __init__(self, name: str, root: str | Path) -> None:
        self.name = model.validate_lab_name(name)
        self.root = Path(root)
        self.dir = self.root / self.name
        self.cgroup_root = f"{sysops.CGROUP_V2}/ambient-lab-{self.name}"
        self.pin_root = f"{BPF_BASE}/ambient-lab-{self.name}"
        self._tlock = threading.RLock()
        self._lock_fd: int | None = None
        self._lock_depth = 0

    # --- paths ------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return str(self.dir / "state.json")

    @property
    def lab_json(self) -> Path:
        return self.dir / "lab.json"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "cni" / "bin"

    @property
    def ca_dir(self) -> Path:
        return self.dir / "ca"

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def conflist_path(self, node: str) -> Path:
        return self.dir / "cni" / node / "net.d" / CONFLIST_NAME

    def ipam_dir(self, node: str) -> Path:
        return self.dir / "ipam" / node

    def agent_socket(self, node: str) -> str:
        return str(self.node_dir(node) / "agent.sock")

    def pin_dir(self, node: str) -> str:
        return f"{self.pin_root}/{node}"

    def exists(self) -> bool:
        return self.lab_json.exists()

    @property
    def nodes(self) -> list[str]:
        if not self.exists():
            return []
        rec = self.read_records()
        return sorted(rec["nodes"], key=lambda n: rec["nodes"][n]["index"])

    # --- records and state (lab.json, state.json) --------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time: threads (RLock) and processes (flock)."""
        with self._tlock:
            if self._lock_depth == 0:
                try:
                    fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except FileNotFoundError:
                    raise LabError(f"lab {self.name!r} does not exist (no {self.dir})") from None
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)   # releases the flock
                    self._lock_fd = None

    def read_records(self) -> dict:
        try:
            with open(self.lab_json) as f:
                return json.load(f)
        except FileNotFoundError:
            raise LabError(f"lab {self.name!r} does not exist (no {self.lab_json})") from None

    @contextmanager
    def records(self) -> Iterator[dict]:
        """Read-modify-write ``lab.json`` under the lab lock."""
        with self.locked():
            rec = self.read_records()
            yield rec
            write_json(self.lab_json, rec, 0o600)

    def read_state(self) -> dict:
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return model.empty_state()

    def update_state(self, fn: Callable[[list[dict]], object]) -> None:
        """Apply ``fn`` to the state's items; write only if something changed.

        Each write bumps the list's ``metadata.resourceVersion``; objects that
        changed get that version too, unchanged ones keep theirs.
        """
        with self.locked():
            doc = self.read_state()
            items: list[dict] = doc.setdefault("items", [])
            before = {model.obj_key(o): _fingerprint(o) for o in items}
            old_rv = {model.obj_key(o): o.get("metadata", {}).get("resourceVersion") for o in items}
            fn(items)
            rv = str(int(doc.setdefault("metadata", {}).get("resourceVersion") or 0) + 1)
            changed = set(before) != {model.obj_key(o) for o in items}
            for o in items:
                key = model.obj_key(o)
                meta = o.setdefault("metadata", {})
                meta.setdefault("uid", model.new_uid())
                meta.setdefault("creationTimestamp", now())
                if before.get(key) != _fingerprint(o):
                    meta["resourceVersion"] = rv
                    changed = True
                elif old_rv.get(key):
                    meta["resourceVersion"] = old_rv[key]
            if not changed:
                return
            doc["metadata"]["resourceVersion"] = rv
            write_json(Path(self.state_path), doc)

    def allocate(self, wire_bridge: str) -> None:
        """Pick a free slot and write the first lab.json, under the machine-wide lock."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.exists():
                return
            leftovers = [n for n in sysops.list_netns() if model.lab_netns_pattern(self.name).match(n)]
            if leftovers or os.path.exists(self.cgroup_root):
                raise LabError(
                    f"objects of an earlier lab {self.name!r} are still there "
                    f"({', '.join(leftovers) or self.cgroup_root}); run `ambient-lab down "
                    f"--name {self.name}` first")
            used = []
            for other in self.root.glob("*/lab.json"):
                try:
                    used.append(int(json.loads(other.read_text())["slot"]))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
            slot = model.free_slot(used)
            self.dir.mkdir(mode=0o755, exist_ok=True)
            rec = {
                "version": 1, "name": self.name, "dir": str(self.dir), "slot": slot,
                "created": now(), "creator_pid": os.getpid(),
                "wire": {"netns": model.wire_netns(self.name), "bridge": wire_bridge, "ready": False},
                "cgroup_root": self.cgroup_root, "pin_root": self.pin_root,
                "service_cidr": model.service_cidr(slot),
                "nodes": {}, "pods": {}, "agents": {}, "next_pod": 1,
            }
            write_json(self.lab_json, rec, 0o600)
            log.info("lab %s: slot %d in %s", self.name, slot, self.dir)
        finally:
            os.close(fd)

    # --- single records ----------------------------------------------------------

    def pod_record(self, ns_name: str) -> dict:
        ns, name = model.split_key(ns_name)
        p = self.read_records()["pods"].get(model.pod_key(ns, name))
        if p is None:
            raise KeyError(f"no pod {ns}/{name} in lab {self.name}")
        return p

    def node_record(self, node: str) -> dict:
        rec = self.read_records()
        n = rec["nodes"].get(node)
        if n is None:
            raise KeyError(f"no node {node!r} in lab {self.name} (nodes: {', '.join(rec['nodes']) or 'none'})")
        return n

    def set_pod_record(self, key: str, **fields: Any) -> None:
        with self.records() as rec:
            if key in rec["pods"]:
                rec["pods"][key].update(fields)


def substitute(value: Any, values: Mapping[str, str]) -> Any:
    """``str.format_map`` on every string in a JSON-like value."""
    if isinstance(value, str):
        return value.format_map(values)
    if isinstance(value, list):
        return [substitute(v, values) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, values) for k, v in value.items()}
    return value


def tail_file(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

