"""The lab's process supervisor: the mesh CA and one node agent per node.

Each runs in its namespace (the CA on the underlay, an agent in its node's
namespace) and its own cgroup, in a session of its own, with its pid and
start time recorded so that another process (``down`` after a crash) can
stop exactly it and never a process that reused the pid.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from agent import control
from lab import model, sysops
from lab.network import NetworkBuilder
from lab.store import LabError, LabSettings, LabStore, tail_file, write_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Starts argv in (netns path, cgroup) with Popen keyword arguments: PodRuntime.spawn.
Spawn = Callable[[str, str, Sequence[str], dict], subprocess.Popen]


def _child_env() -> dict[str, str]:
    """The environment of the CA and the agents: the checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH")) if x)
    return env


class AgentSupervisor:
    """Starts, upgrades, watches and stops the lab's CA and node agents."""

    def __init__(self, store: LabStore, settings: LabSettings, network: NetworkBuilder, spawn: Spawn) -> None:
        self.store = store
        self.settings = settings
        self.network = network
        self.spawn = spawn
        self.agents: dict[str, subprocess.Popen] = {}
        # Agents replaced by upgrade_agent, by pid, until they are reaped.
        self.previous_agents: dict[int, subprocess.Popen] = {}
        self.ca_proc: subprocess.Popen | None = None

    # --- node agents ------------------------------------------------------------

    def start_agent(self, node: str, extra_args: Sequence[str] = ()) -> int:
        """Start the node's agent in the node's namespace; wait until it answers."""
        if self.agent_pid(node):
            raise LabError(f"the agent of node {node} is already running (pid {self.agent_pid(node)})")
        proc, log_path = self._launch_agent(node, extra_args)
        self._wait_agent_ready(node, proc, log_path)
        log.info("lab %s: agent of node %s running, pid %d", self.store.name, node, proc.pid)
        return proc.pid

    def upgrade_agent(self, node: str, extra_args: Sequence[str] = ()) -> int:
        """Start a second agent for ``node`` while its agent runs (see ``Lab.upgrade_agent``)."""
        st = self.store
        old = st.read_records()["agents"].get(node) or {}
        if not self.agent_pid(node):
            raise LabError(f"no agent runs on node {node}: nothing to upgrade")
        with st.records() as rec:
            rec.setdefault("previous_agents", []).append(dict(old, node=node))
        old_proc = self.agents.pop(node, None)
        if old_proc is not None:
            self.previous_agents[old_proc.pid] = old_proc
        proc, log_path = self._launch_agent(node, extra_args)
        try:
            self._wait_agent_ready(node, proc, log_path, expect_pid=True)
        except LabError:
            # The old agent resumes when the new one is gone: it is the node's again.
            with st.records() as rec:
                rec["agents"][node] = {k: v for k, v in old.items()}
                rec["previous_agents"] = [a for a in rec["previous_agents"] if a.get("pid") != old.get("pid")]
            if old_proc is not None:
                self.agents[node] = self.previous_agents.pop(old_proc.pid)
            raise
        log.info("lab %s: agent of node %s upgraded: pid %s handed over to pid %d",
                 st.name, node, old.get("pid"), proc.pid)
        return proc.pid

    def previous_agent_pids(self, node: str) -> list[int]:
        """Agents of ``node`` replaced by ``upgrade_agent`` that still run (draining)."""
        if not self.store.exists():
            return []
        alive = []
        for a in self.store.read_records().get("previous_agents") or []:
            proc = self.previous_agents.get(a.get("pid"))
            if proc is not None and proc.poll() is not None:
                self.previous_agents.pop(proc.pid, None)   # reaped: no zombie left behind
            if a.get("node") == node and sysops.process_is(a.get("pid"), a.get("start_time"),
                                                           str(self.store.dir)):
                alive.append(a["pid"])
        return alive

    def _launch_agent(self, node: str, extra_args: Sequence[str]) -> tuple[subprocess.Popen, Path]:
        st, cfg = self.store, self.settings
        n = st.node_record(node)
        node_dir = st.node_dir(node)
        node_dir.mkdir(parents=True, exist_ok=True)
        cgroup = f"{st.cgroup_root}/{node}/_agent"
        sysops.cgroup_create(cgroup)
        cmd = [*cfg.agent_command, "run", "--node", node,
               "--state", f"file:{st.state_path}", "--run-dir", str(node_dir),
               "--pin-dir", st.pin_dir(node), *self._ca_args(node), *cfg.agent_args, *extra_args]
        log_path = node_dir / "agent.log"
        with st.records() as rec:
            rec["agents"][node] = {"cmd": cmd, "cgroup": cgroup, "log": str(log_path),
                                   "pid": None, "start_time": None}
        with open(log_path, "ab") as logf:
            # Its own session: a terminal's ^C to `lab up` must not kill it.
            proc = self.spawn(sysops.netns_path(n["netns"]), cgroup, cmd, dict(
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=str(node_dir), env=_child_env(), start_new_session=True))
        with st.records() as rec:
            rec["agents"][node].update(pid=proc.pid, start_time=sysops.proc_start_time(proc.pid))
        self.agents[node] = proc
        return proc, log_path

    def _wait_agent_ready(self, node: str, proc: subprocess.Popen, log_path: Path,
                          expect_pid: bool = False) -> None:
        """Until the agent answers on the control socket (``expect_pid``: the
        answer must come from ``proc``, not from an agent it takes over from)."""
        timeout = self.settings.agent_ready_timeout
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"the agent of node {node} exited with status {proc.returncode}; "
                               f"{log_path} ends with:\n{tail_file(log_path)}")
            try:
                reply = self.agent_request(node, {"op": "status"}, timeout=1.0)
                if reply.get("ok") and (not expect_pid or reply.get("pid") == proc.pid):
                    return
                last = str(reply.get("error") or f"answered by pid {reply.get('pid')}")
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.1)
        self.stop_agent(node)
        raise LabError(f"the agent of node {node} did not answer on {self.store.agent_socket(node)} "
                       f"within {timeout:g}s ({last}); {log_path} ends with:\n"
                       f"{tail_file(log_path)}")

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, wait: bool = True) -> bool:
        """Signal the node's agent; with ``wait``, SIGKILL it after the grace time and reap it."""
        st = self.store
        a = st.read_records()["agents"].get(node)
        if not a or not a.get("pid"):
            return True
        proc = self.agents.get(node)
        gone = sysops.stop_process(a["pid"], a.get("start_time"), str(st.dir), sig,
                                   self.settings.agent_grace, popen=proc, wait=wait)
        if gone:
            self.agents.pop(node, None)
            with st.records() as rec:
                if node in rec["agents"]:
                    rec["agents"][node].update(pid=None, start_time=None)
        return gone

    def agent_pid(self, node: str) -> int | None:
        """The pid of the node's running agent, or None."""
        if not self.store.exists():
            return None
        a = self.store.read_records()["agents"].get(node)
        proc = self.agents.get(node)
        if proc is not None:
            proc.poll()   # reap it if it died, so it does not linger as a zombie
        if a and a.get("pid") and sysops.process_is(a["pid"], a.get("start_time"), str(self.store.dir)):
            return a["pid"]
        return None

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every running node agent has read the current cluster state."""
        version = self.store.read_state()["metadata"]["resourceVersion"]
        deadline = time.monotonic() + timeout
        for node in self.store.nodes:
            if self.agent_pid(node) is None:
                continue
            while self.agent_request(node, {"op": "status"}).get("state_version") != version:
                if time.monotonic() > deadline:
                    raise LabError(f"the agent of node {node} did not read state version {version} "
                                   f"within {timeout:g}s")
                time.sleep(0.05)

    def agent_request(self, node: str, obj: dict, timeout: float = 5.0) -> dict:
        """One request on the node agent's control socket (one JSON line each way)."""
        return control.request(self.store.agent_socket(node), obj, timeout)

    # --- the mesh CA --------------------------------------------------------------

    @property
    def ca_address(self) -> str:
        return f"{model.ca_ip(self.store.read_records()['slot'])}:{model.CA_PORT}"

    @property
    def ca_root(self) -> str:
        """The trust bundle: the CA's root certificate, written when it starts."""
        return str(self.store.ca_dir / "root-cert.pem")

    def _ca_args(self, node: str) -> list[str]:
        if not self.settings.ca:
            return []
        return ["--ca-address", self.ca_address, "--ca-root", self.ca_root,
                "--token-file", self._node_token(node)]

    def _node_token(self, node: str) -> str:
        """The node's CA token (like a projected service-account token), created once."""
        st = self.store
        path = st.node_dir(node) / "ca-token"
        tokens_path = st.ca_dir / "tokens.json"
        with st.locked():
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(32))
            tokens = json.loads(tokens_path.read_text()) if tokens_path.exists() else {}
            tokens[path.read_text().strip()] = node
            write_json(tokens_path, tokens, 0o600)
        return str(path)

    def start_ca(self) -> int:
        """Start the CA in the wire namespace, on the underlay; wait until it listens."""
        st, cfg = self.store, self.settings
        if self.ca_pid() is not None:
            raise LabError(f"the CA of lab {st.name} is already running (pid {self.ca_pid()})")
        rec = st.read_records()
        ip = model.ca_ip(rec["slot"])
        st.ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tokens_path = st.ca_dir / "tokens.json"
        for node in st.nodes:
            st.node_dir(node).mkdir(parents=True, exist_ok=True)
            self._node_token(node)
        wire = sysops.netns_path(rec["wire"]["netns"])
        self.network.add_wire_address(ip)
        cgroup = f"{st.cgroup_root}/_ca"
        sysops.cgroup_create(cgroup)
        cmd = [*cfg.agent_command, "ca", "--listen", f"{ip}:{model.CA_PORT}",
               "--ca-dir", str(st.ca_dir), "--tokens", str(tokens_path),
               "--state", f"file:{st.state_path}", "--san", ip, "--root-cert-out", self.ca_root]
        log_path = st.dir / "ca.log"
        with st.records() as r:
            r["ca"] = {"cmd": cmd, "cgroup": cgroup, "log": str(log_path), "pid": None, "start_time": None}
        start_offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as logf:
            proc = self.spawn(wire, cgroup, cmd, dict(
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=str(st.dir), env=_child_env(), start_new_session=True))
        with st.records() as r:
            r["ca"].update(pid=proc.pid, start_time=sysops.proc_start_time(proc.pid))
        self.ca_proc = proc
        deadline = time.monotonic() + cfg.agent_ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"the lab CA exited with status {proc.returncode}; {log_path} ends with:\n"
                               f"{tail_file(log_path)}")
            with open(log_path, "rb") as fh:
                fh.seek(start_offset)
                if b" listening on " in fh.read() and os.path.exists(self.ca_root):
                    log.info("lab %s: CA running at %s, pid %d", st.name, self.ca_address, proc.pid)
                    return proc.pid
            time.sleep(0.1)
        self.stop_ca()
        raise LabError(f"the lab CA did not start within {cfg.agent_ready_timeout:g}s; {log_path} ends with:\n"
                       f"{tail_file(log_path)}")

    def ca_pid(self) -> int | None:
        if not self.store.exists():
            return None
        c = self.store.read_records().get("ca")
        if self.ca_proc is not None:
            self.ca_proc.poll()
        if c and c.get("pid") and sysops.process_is(c["pid"], c.get("start_time"), str(self.store.dir)):
            return c["pid"]
        return None

    def stop_ca(self, sig: int = signal.SIGTERM) -> bool:
        st = self.store
        c = st.read_records().get("ca") if st.exists() else None
        if not c or not c.get("pid"):
            return True
        gone = sysops.stop_process(c["pid"], c.get("start_time"), str(st.dir), sig, self.settings.agent_grace,
                                   popen=self.ca_proc)
        if gone:
            self.ca_proc = None
            with st.records() as r:
                r["ca"].update(pid=None, start_time=None)
        return gone

    # --- teardown ------------------------------------------------------------------

    def stop_all(self, rec: dict | None) -> list[str]:
        """Stop every agent (current and previous) and the CA recorded in ``rec``; the problems met."""
        problems: list[str] = []
        needle, grace = str(self.store.dir), self.settings.agent_grace
        for node, a in ((rec or {}).get("agents") or {}).items():
            if a.get("pid"):
                if not sysops.stop_process(a["pid"], a.get("start_time"), needle, signal.SIGTERM,
                                           grace, popen=self.agents.get(node)):
                    problems.append(f"agent of node {node} (pid {a['pid']}) did not stop")
        self.agents.clear()
        for a in (rec or {}).get("previous_agents") or []:
            if a.get("pid") and not sysops.stop_process(a["pid"], a.get("start_time"), needle, signal.SIGTERM,
                                                        grace, popen=self.previous_agents.get(a["pid"])):
                problems.append(f"previous agent of node {a.get('node')} (pid {a['pid']}) did not stop")
        self.previous_agents.clear()
        ca = (rec or {}).get("ca") or {}
        if ca.get("pid") and not sysops.stop_process(ca["pid"], ca.get("start_time"), needle, signal.SIGTERM,
                                                     grace, popen=self.ca_proc):
            problems.append(f"the lab CA (pid {ca['pid']}) did not stop")
        return problems
