"""`ambient-agent run`: one node's agent.

Start-up order: state source first (the rule needs it), then the BPF data
path (replacing a previous agent's programs without a gap), then, if an agent
still serves the node, the handover request that stops it from changing
anything, then re-adoption of the pods a previous agent captured, then the
control socket the CNI plugin talks to (replacing it is what tells a running
agent to let go), then the node's metrics, readiness and admin ports. After
that, every state change is reconciled.

The pod lifecycle's decisions (which pods are known, captured, released,
re-adopted; the problems reported) are made by the sans-IO core in
agent/enrol/lifecycle.py: this module feeds it events (CNI requests, state
changes, scan and capture results) and carries out the actions it returns
through the datapath, the pod listeners, the record store and the
annotator. ``status`` and ``/config_dump`` are views of a snapshot
(agent/observe/snapshot.py).

Upgrade on a node (docs/ARCHITECTURE.md, "Agent upgrade"): both agents run
at once for a while. The new one asks the running one to hand over (``{"op":
"handover"}``): it freezes (no CNI request, reconcile or BPF change; readiness
false) while still serving traffic. The new agent opens its own SO_REUSEPORT
listeners in every captured pod, points the BPF steering at them and binds the
control socket. The old agent sees its socket path replaced, closes its node
ports and its pod listeners (connections waiting in them move to the new
ones, ``tcp_migrate_req``), drains its open connections for
``--drain-seconds`` and exits. If the new agent exits before it binds the
control socket, the old one resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import select
import signal
import socket
from dataclasses import dataclass

from agent import control, eventloop
from agent.capture.datapath import DEFAULT_CGROUP, CaptureDatapath, CaptureError
from agent.capture.inpod import InPodCapture, PodListeners
from agent.control import CniAdd, CniDel, ControlServer, Handover, Request, StatusRequest
from agent.dns.names import DNS_CAPTURE_ANNOTATION, capture_wanted, service_addresses
from agent.dns.resolver import Resolver
from agent.dns.server import DnsCounters, PodDns, PodResolvConf
from agent.enrol import discover
from agent.enrol.lifecycle import (
    Action,
    Capture,
    CaptureDamaged,
    CaptureResult,
    Cause,
    CheckFinished,
    CheckStarted,
    ClearProblem,
    CniAddEvent,
    CniDelEvent,
    Keep,
    KeepResult,
    NetnsVanished,
    PlannedChange,
    PodLifecycle,
    Release,
    ReleaseDone,
    RemoveRecord,
    Reply,
    ReportProblem,
    Restarted,
    RevalidateConnections,
    SaveRecord,
    ScanResult,
    StateChanged,
)
from agent.enrol.records import PodRecord, RecordStore
from agent.enrol.rule import DEFAULT_EXCLUDED
from agent.heap import IdleHeapTrimmer
from agent.identity.node import NodeIdentities
from agent.netns import NetnsError, NetnsSwitcher, netns_id, open_netns
from agent.observe.accesslog import AccessLogSink
from agent.observe.admin import AdminServer
from agent.observe.metrics import Metrics, WithoutCreated
from agent.observe.snapshot import NodeSnapshot, PodSnapshot
from agent.policy.hook import make_hook, policy_set_source
from agent.proxy.counters import ConnectionLog, PodCounters
from agent.proxy.forward import DataPlane, PodProxy
from agent.proxy.tunnel import HbonePool
from agent.state.model import ClusterState, StateError
from agent.state.serviceentry import allocated_vips, resolve_host
from agent.state.source import STATE_URL_HELP, open_state_source

log = logging.getLogger("agent")

# How often a handing-over agent looks at its control socket path and at the
# new agent's process, and how often every agent checks that its socket path
# is still its own (an agent that took over without asking).
TAKEOVER_POLL_SECONDS = 0.05
CONTROL_PATH_CHECK_SECONDS = 1.0
# A new agent's handover request waits at most this long: the running agent
# first finishes the capture change it is making (one pod's, milliseconds).
HANDOVER_REQUEST_TIMEOUT = 30.0
AFTER_HANDOVER = ("exit", "wait")


class HandoverError(RuntimeError):
    """A running agent could not be asked to hand the node over."""


class HandingOver(Exception):
    """Raised to refuse a change while this agent hands the node over."""


@dataclass
class AgentConfig:
    node: str
    state_url: str
    run_dir: str = "/run/ambient-agent"
    pin_dir: str = "/sys/fs/bpf/ambient-agent"
    cgroup: str = DEFAULT_CGROUP
    excluded_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED
    connect_timeout: float = 5.0
    drain_seconds: float = 5.0
    trust_domain: str = "cluster.local"
    ca_address: str = ""
    ca_root: str = ""
    token_file: str = ""
    root_namespace: str = "istio-system"
    metrics_addr: tuple[str, int] = ("0.0.0.0", 15020)
    ready_addr: tuple[str, int] = ("0.0.0.0", 15021)
    admin_addr: tuple[str, int] = ("127.0.0.1", 15000)
    access_log_json: bool = False
    # After handing the node over and draining: exit, or stay idle until
    # SIGTERM. A DaemonSet restarts a container that exits, and the restarted
    # (old) agent would take the node back: the chart uses "wait".
    after_handover: str = "exit"
    # How often every pod of the node is checked against the rule and its BPF
    # state (state changes trigger a check at once as well).
    reconcile_seconds: float = 10.0
    # The host's /proc (pod processes' network namespaces) and the runtime's
    # pinned network namespaces, for finding running pods.
    host_proc: str = "/proc"
    netns_dirs: tuple[str, ...] = discover.PINNED_NETNS_DIRS
    # The DNS proxy (agent/dns): capture enrolled pods' DNS (Istio's default;
    # a pod's ambient.istio.io/dns-capture annotation overrides it).
    dns_capture: bool = True
    cluster_domain: str = "cluster.local"


@dataclass
class CapturedPod:
    listeners: PodListeners
    proxy: PodProxy
    identity: str
    # What this capture's steering was set up with: a replacement clears
    # exactly these, and a failed one restores them.
    ips: list[str]
    gateways: list[str]


@dataclass
class _Run:
    """One carrying out of lifecycle actions: the CNI ADD's namespace fd, the reply."""
    netns_fds: dict[str, int]
    reply: dict | None = None


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._stopping = asyncio.Event()
        # file:PATH or kube[:KUBECONFIG]; the kube source's first load() waits
        # for the first full sync of every watched kind (see agent/state/kube.py).
        self.source = open_state_source(config.state_url)
        # The pod lifecycle (agent/enrol/lifecycle.py): the cluster state (its
        # one writer is _set_state), the known records, the captured set and
        # the open problems. This class carries out its actions.
        self.life = PodLifecycle(node=config.node, trust_domain=config.trust_domain,
                                 excluded=tuple(config.excluded_namespaces))
        self.datapath = CaptureDatapath(config.pin_dir, config.cgroup)
        self.switcher = NetnsSwitcher()
        self.inpod = InPodCapture(self.datapath, self.switcher, config.host_proc)
        self.dns: dict[int, PodDns] = {}        # by netns cookie: each pod's DNS proxy
        self.dns_counters: dict[str, DnsCounters] = {}
        self.records = RecordStore(os.path.join(config.run_dir, "pods"))
        self.captured: dict[str, CapturedPod] = {}     # the I/O side of life.captured
        # Released captures letting their open connections finish (at most
        # --drain-seconds, then cut); shutdown() waits for them too.
        self._draining: set[asyncio.Task] = set()
        self.counters: dict[str, PodCounters] = {}
        self.control = ControlServer(os.path.join(config.run_dir, "agent.sock"), self.handle)
        self.metrics = Metrics()
        self.identities = (NodeIdentities.create(config, on_ca_result=self.metrics.agent.ca_request)
                           if config.ca_address else None)
        self.plane = DataPlane(state=lambda: self.state, trust_domain=config.trust_domain,
                               tls=self.identities.tls if self.identities else None,
                               pool=HbonePool(connect_timeout=config.connect_timeout),
                               log=ConnectionLog(), connect_timeout=config.connect_timeout)
        # L4 authorization: the policy set is rebuilt when the state changes,
        # and every inbound connection is checked before the app is reached.
        self.policies = policy_set_source(lambda: self.state, config.root_namespace, config.trust_domain)
        self.plane.policy = make_hook(self.policies, lambda: self.state)
        # Observability: Istio's TCP metrics, the access log, and the admin,
        # metrics and readiness listeners (in the agent's own, host, netns).
        self.plane.metrics = self.metrics.tcp
        self.plane.access = AccessLogSink(json_format=config.access_log_json)
        self.admin = AdminServer(WithoutCreated(self.metrics.registry), self.readiness, self.config_dump,
                                 self._stopping.set, metrics_addr=config.metrics_addr,
                                 ready_addr=config.ready_addr, admin_addr=config.admin_addr,
                                 before_scrape=self._before_scrape)
        self._bpf_ready = False
        # Live enrolment: a wake-up for the node reconciler (what it could not
        # fix is life.problems, shown by `status` and /config_dump).
        self._wake = asyncio.Event()
        self._pin_problem = ""        # deleted pins that could not be restored, logged once
        self._annotation_errors: dict[str, str] = {}
        # Handover (upgrade): every change to captures, records and BPF state
        # is made holding this lock, one pod at a time; a handover takes it
        # and keeps it, so the new agent reads records no one changes.
        self._changes = asyncio.Lock()
        self._handover_to: int | None = None     # pid of the agent taking the node over
        self._handed_over = False                # ... and it did
        self._terminate = asyncio.Event()        # SIGTERM/SIGINT (the stop that ends "wait")
        self._takeover: asyncio.Task | None = None

    # Read-only views of the lifecycle core's state.

    @property
    def state(self) -> ClusterState:
        return self.life.state

    @property
    def known(self) -> dict[str, PodRecord]:
        return self.life.known

    @property
    def unresolved(self) -> dict[str, str]:
        """Pods that must be in the mesh but are not captured (pod key -> problem)."""
        return self.life.problems

    @property
    def _synced(self) -> bool:
        return self.life.synced

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        try:
            self._set_state(self.source.load())
        except StateError as exc:
            # Keep going with an empty cluster: pods the state does not know
            # keep their capture (fail closed), and the watcher picks up the
            # first readable version.
            log.error("cluster state unreadable at start, waiting for a good one: %s", exc)
        await loop.run_in_executor(None, self.datapath.load)
        self._bpf_ready = True
        report = self.datapath.report   # the agent's one compile (issue 16)
        self.metrics.agent.bpf_loaded(report.compile_seconds if report is not None else None,
                                      self.datapath.loader_seconds)
        if self.identities is not None:
            self.identities.start()
        previous = await self._request_handover()
        if not self._stopping.is_set():
            await self._readopt()
        if self._stopping.is_set():
            # Stopped while starting: the node is not taken. An agent frozen
            # for us resumes when this process is gone (and points the
            # steering back at its own listeners).
            log.info("stopped before serving the node; %s", "the running agent resumes"
                     if previous is not None else "capture stays in place")
            return
        if previous is not None:
            self._forget_unused_identities()
        # Replacing the socket file is the moment the previous agent lets go.
        await self.control.start()
        # The previous agent closes the node's ports right after; until then
        # binding them is retried (admin.py explains why not SO_REUSEPORT).
        await self.admin.start(retry_busy=previous is not None, stop=self._stopping)
        watcher = asyncio.ensure_future(self.source.watch(self._on_state))
        reconciler = asyncio.ensure_future(self._reconcile_loop())
        trimmer = asyncio.ensure_future(IdleHeapTrimmer().run())   # agent/heap.py
        guard = asyncio.ensure_future(self._guard_control_path())
        # Everything built so far (modules, the first state, the pods' set-up)
        # lives for the whole run: move it out of the collector's sight. A full
        # collection otherwise walks every one of those objects, a pause of
        # milliseconds on the data path's only thread each time (issue 15's tail).
        gc.collect()
        gc.freeze()
        log.info("node agent for %s ready (pid %d): %d pods known, %d captured%s",
                 self.config.node, os.getpid(), len(self.known), len(self.captured),
                 "" if previous is None else f", taken over from pid {previous}" if previous > 0
                 else ", taken over")
        try:
            await self._stopping.wait()
        finally:
            watcher.cancel()
            reconciler.cancel()
            trimmer.cancel()
            guard.cancel()
            await self.shutdown()
        if self._handed_over and self.config.after_handover == "wait" and not self._terminate.is_set():
            log.info("node handed over and connections drained; idle until SIGTERM")
            await self._terminate.wait()

    def _on_stop_signal(self) -> None:
        self._terminate.set()
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop accepting, let connections drain, exit.

        Capture stays in place: after exit the pods' connections are refused
        (fail closed) until an agent runs again.
        """
        log.info("%s: draining connections for up to %.1f s",
                 self._handover_text() if self._handed_over else "shutting down", self.config.drain_seconds)
        self._stopping.set()      # readiness goes false first
        if self._handed_over:
            # The node's ports belong to the new agent now: it is retrying to
            # bind them, and the kubelet's probes must reach it, not us.
            await self.admin.close()
        await self.control.close()
        for pod in list(self.captured.values()):
            await pod.proxy.stop_accepting()
            dns = self.dns.pop(pod.listeners.cookie, None)
            if dns is not None:
                dns.stop()
            # After a handover the BPF steering points at the new agent's
            # listeners; closing ours moves the connections still queued in
            # them to the new ones (tcp_migrate_req, capture/inpod.py).
            for sock in pod.listeners.all():
                sock.close()
        await self.plane.pool.close(graceful=True)
        # Released pods still draining are waited for too (their deadline
        # started at their release, so it ends before this one).
        await asyncio.gather(*(p.proxy.drain(self.config.drain_seconds)
                               for p in self.captured.values()), *list(self._draining))
        if self.identities is not None:
            await self.identities.close()
        await self.admin.close()
        self.datapath.close()
        self.switcher.close()
        log.info("connections drained; %s", "the node is the new agent's" if self._handed_over
                 else "capture stays in place (fail closed)")

    # -- handover (upgrade on a node) ------------------------------------------

    @contextlib.asynccontextmanager
    async def _changing(self):
        """The right to change captures, records and BPF state, for one step.

        Raises HandingOver once a handover has begun: the agent taking over
        reads the records and sets the BPF state from then on. Also once the
        control socket path names another agent's socket, before
        _guard_control_path has noticed: an agent taken over without a
        handover (it was stopped) must not change anything when it runs again.
        """
        self._refuse_if_taken()
        async with self._changes:
            self._refuse_if_taken()
            yield

    def _refuse_if_taken(self) -> None:
        if self._handover_to is not None:
            raise HandingOver(f"this agent is handing the node over to the agent with pid "
                              f"{self._handover_to}; try again")
        if self.control.path_state() == "replaced":
            raise HandingOver(f"{self.control.path} belongs to another agent now")

    async def _request_handover(self) -> int | None:
        """If an agent serves this node, have it stop changing anything; its pid.

        None when no agent listens on the control socket (none runs, or a
        dead one left its socket file); -1 for one whose pid is unknown (it
        does not answer, or it predates handovers). Before asking, this agent gets
        certificates for the identities the node's pods run as: from the
        handover on, their HBONE connections reach this agent, and it must be
        able to complete their TLS handshakes.
        """
        path = self.control.path
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(None, control.request, path, {"op": "status"}, 5.0)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except (OSError, ValueError) as exc:
            # Something listens but does not answer (a stopped or wedged
            # agent): take the node without its consent. Once it runs again it
            # finds its socket replaced and lets go (_guard_control_path).
            log.warning("the agent on control socket %s does not answer (%s); taking the node over "
                        "without a handover", path, exc)
            return -1
        running = status.get("pid") if isinstance(status.get("pid"), int) else None
        log.info("an agent (pid %s) serves this node; preparing to take it over", running or "?")
        await self._await_certificates()
        if self._stopping.is_set():
            return None          # stopped while waiting: the running agent was never asked
        try:
            reply = await loop.run_in_executor(None, control.request, path, {"op": "handover"},
                                               HANDOVER_REQUEST_TIMEOUT)
        except (OSError, ValueError) as exc:
            raise HandoverError(f"the running agent (pid {running or '?'}) did not answer the handover "
                                f"request on {path}: {exc}") from None
        if reply.get("ok") is not True:
            error = str(reply.get("error") or reply)
            if "unknown op" in error:
                # An agent from before handovers. Its pod listeners lack
                # SO_REUSEPORT, so ours cannot open beside them: those pods are
                # reported and retried by the node reconciler until it exits.
                log.warning("the running agent (pid %s) cannot hand over (%s); its pods are "
                            "re-adopted once it exits", running or "?", error)
                return running or -1
            raise HandoverError(f"the running agent (pid {running or '?'}) refused the handover: {error}")
        log.info("the running agent (pid %s) has stopped changing the node; taking it over",
                 reply.get("pid", running))
        return reply.get("pid", running) or -1

    async def _await_certificates(self) -> None:
        if self.identities is None:
            return
        wanted = set()
        for rec in self.records.load_all():
            if rec.enrolled:
                # As _capture will name it: the service account in the state wins.
                pod = self.state.pod_view(rec.namespace, rec.name)
                sa = pod.service_account if pod is not None else rec.service_account
                wanted.add(f"spiffe://{self.config.trust_domain}/ns/{rec.namespace}/sa/{sa}")
        for identity in wanted:
            self.identities.track(identity)
        last_log = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            pending = sorted(c["identity"] for c in self.identities.status()
                             if c["identity"] in wanted and c["state"] != "valid")
            if not pending:
                return
            if loop.time() - last_log >= 10.0:
                # The running agent keeps serving meanwhile: waiting costs nothing.
                log.info("waiting for certificates of %s before taking the node over", ", ".join(pending))
                last_log = loop.time()
            await asyncio.sleep(0.1)

    def _forget_unused_identities(self) -> None:
        """Identities fetched for records that did not become captures."""
        if self.identities is None:
            return
        for held in self.identities.status():
            self._forget_identity(held["identity"])

    async def _prepare_handover(self, req: Handover) -> dict:
        """Freeze for the agent of pid ``req.pid``, which is about to take the node over."""
        if self._handover_to is not None:
            return {"ok": False, "error": f"already handing the node over to the agent with pid {self._handover_to}"}
        if self._stopping.is_set():
            return {"ok": False, "error": "this agent is shutting down"}
        if req.pid <= 0 or req.pid == os.getpid():
            return {"ok": False, "error": f"handover requested by an unknown process (pid {req.pid})"}
        try:
            # Taken while the requester is connected, so the pid is its own.
            pidfd = os.pidfd_open(req.pid)
        except OSError as exc:
            return {"ok": False, "error": f"cannot watch the requesting process {req.pid}: {exc.strerror}"}
        self._handover_to = req.pid       # readiness false; CNI requests and reconciles refused
        log.info("agent pid %d asked for the node: frozen until it takes over; still serving traffic", req.pid)
        try:
            await self._changes.acquire()     # the one change in progress, if any, completes
        except BaseException:
            os.close(pidfd)
            raise
        self._takeover = asyncio.ensure_future(self._await_takeover(req.pid, pidfd))
        return {"ok": True, "pid": os.getpid(), "captured": sorted(self.captured)}

    async def _await_takeover(self, pid: int, pidfd: int) -> None:
        """Let go once the new agent has bound the control socket; resume if it died first."""
        try:
            while not self._stopping.is_set():
                if self.control.path_state() == "replaced":
                    log.info("agent pid %d bound %s: it serves the node now", pid, self.control.path)
                    self._handed_over = True
                    self._stopping.set()
                    return
                if select.select([pidfd], [], [], 0)[0]:      # readable: the process exited
                    log.warning("agent pid %d exited before it took the node over; serving on", pid)
                    self._resume()
                    return
                await asyncio.sleep(TAKEOVER_POLL_SECONDS)
        finally:
            os.close(pidfd)

    def _resume(self) -> None:
        """Undo a freeze: the handover did not happen."""
        # The new agent may have pointed the steering at its listeners, which
        # closed when it exited (the sockhash drops closed sockets): point it
        # back at ours.
        for key, pod in self.captured.items():
            try:
                self.inpod.enable(pod.listeners, pod.ips, pod.gateways)
            except OSError as exc:      # the reconciler's capture check retries it
                log.error("pod %s: could not point the steering back at this agent: %s", key, exc)
        self._handover_to = None
        self._changes.release()
        self._wake.set()

    async def _guard_control_path(self) -> None:
        """Stop if another agent took the control socket without a handover.

        Two agents changing one node's BPF state would undo each other's
        steering; the one that owns the socket (which the CNI plugin reaches)
        keeps the node.
        """
        missing_logged = False
        while True:
            await asyncio.sleep(CONTROL_PATH_CHECK_SECONDS)
            if self._handover_to is not None:
                continue
            state = self.control.path_state()
            if state == "replaced":
                log.error("%s now belongs to another agent, which did not ask for a handover; "
                          "stopping so that one agent alone manages the node", self.control.path)
                self._handover_to = -1
                self._handed_over = True
                self._stopping.set()
                return
            if state == "missing" and not missing_logged:
                # Not recreated: the path may be missing because a new agent
                # is between unlinking and binding it.
                log.error("%s was removed: the CNI plugin cannot reach this agent", self.control.path)
            missing_logged = state == "missing"

    async def _readopt(self) -> None:
        """Take back the pods a previous agent captured (and forget vanished ones)."""
        records = self.records.load_all()
        present = frozenset(rec.netns for rec in records if os.path.exists(rec.netns))
        await self._carry_out(self.life.handle(Restarted(tuple(records), present)))
        live = self.life.live_cookies()
        for cookie in self.datapath.enrolled_netns():
            if cookie not in live:
                log.info("removing stale capture of network namespace cookie %d", cookie)
                self.datapath.clear_outbound(cookie)
                self.datapath.detach_netns(cookie)
        await self._reconcile()

    # -- carrying out the lifecycle's actions ---------------------------------

    async def _carry_out(self, actions: list[Action], netns_fds: dict[str, int] | None = None) -> dict | None:
        """Carry out ``actions`` of the lifecycle core in order; the reply to a CNI request, if any.

        ``netns_fds`` holds a CNI ADD's validated namespace (pod key -> fd):
        a ``Capture`` takes it over; the caller closes it if none did.
        """
        run = _Run(netns_fds if netns_fds is not None else {})
        await self._execute(actions, run)
        return run.reply

    async def _execute(self, actions: list[Action], run: _Run) -> None:
        for action in actions:
            if isinstance(action, Capture):
                await self._do_capture(action, run)
            elif isinstance(action, Keep):
                await self._do_keep(action, run)
            elif isinstance(action, Release):
                await self._do_release(action)
            elif isinstance(action, SaveRecord):
                self.records.save(action.record)
            elif isinstance(action, RemoveRecord):
                self.records.remove(action.record)
            elif isinstance(action, RevalidateConnections):
                self._revalidate()
            elif isinstance(action, ReportProblem):
                log.error("pod %s must be in the mesh but is not captured: %s", action.key, action.problem)
            elif isinstance(action, ClearProblem):
                pass               # the pod is captured now, or no longer wanted: nothing to log
            elif isinstance(action, Reply):
                run.reply = action.as_dict()
            else:                  # Annotate is carried out by _sync_annotations (API calls, no lock)
                raise TypeError(f"cannot carry out {action!r} here")

    def _set_state(self, state: ClusterState) -> None:
        """The one way the cluster state changes (the lifecycle core holds it)."""
        for action in self.life.handle(StateChanged(state)):
            if isinstance(action, RevalidateConnections):
                self._revalidate()

    def _sync_dns_capture(self) -> None:
        """A captured pod whose ``ambient.istio.io/dns-capture`` annotation now
        says otherwise has its DNS steered on or off by the node reconciler
        (which runs at every state change), not at its next capture. Turning
        it off leaves the pod's DNS proxy serving (nothing is steered to it);
        a failure is logged and retried at the next check. Changes BPF state:
        only under ``_changing()``."""
        for key, pod in self.captured.items():
            ns, _, name = key.partition("/")
            view = self.state.pod_view(ns, name)
            rec = self.known.get(key)
            if view is None or rec is None:
                continue
            wanted = capture_wanted(self.config.dns_capture, view.annotations)
            if wanted == pod.listeners.dns_enabled:
                continue
            try:
                self.inpod.set_dns(pod.listeners, pod.ips, wanted)
            except OSError as exc:    # once a minute per pod, however often the state changes
                self.plane.problems.report(logging.WARNING, ("dns-capture", key), "pod %s: cannot turn DNS "
                                           "capture %s: %s", key, "on" if wanted else "off", exc)
                continue
            log.info("pod %s: DNS capture %s (annotation %s)", key, "on" if wanted else "off",
                     DNS_CAPTURE_ANNOTATION)
            self._serve_dns(rec, pod.listeners)

    def _revalidate(self) -> None:
        # New connections see the new policy at once (the hook reads the
        # current set); open ones it now denies are closed here.
        for pod in self.captured.values():
            pod.proxy.revalidate()

    # -- capture -----------------------------------------------------------

    async def _do_capture(self, cap: Capture, run: _Run) -> None:
        rec = cap.record
        key = rec.key
        old = self.known.get(key)
        try:
            previous, listeners = self._capture(cap, run.netns_fds.pop(key, None))
        except OSError as exc:
            if cap.cause is Cause.READOPT:
                log.error("pod %s: could not re-adopt: %s", key, exc)
            elif cap.cause is not Cause.ADOPT:        # an adoption's failure is reported as a problem
                log.error("pod %s: capture failed: %s", key, exc)
            await self._execute(self.life.handle(CaptureResult(cap, False, error=str(exc))), run)
            return
        await self._execute(self.life.handle(CaptureResult(cap, True, netns_id(listeners.netns_fd),
                                                           listeners.cookie)), run)
        if cap.cause is Cause.READOPT:
            log.info("pod %s: re-adopted", key)
        elif cap.cause is Cause.ADOPT:
            log.info("pod %s: running pod captured (%s; network namespace %s)", key, cap.reason, rec.netns)
        elif cap.cause is Cause.RECONCILE:
            log.info("pod %s: captured (%s)", key, cap.reason)
        elif previous is not None:
            log.info("pod %s: capture moved from %s to %s (%s)", key, old.netns if old else "?", rec.netns,
                     cap.reason)
        else:
            log.info("pod %s: enrolled (%s)", key, cap.reason)
        await self._retire(previous)

    def _capture(self, cap: Capture, netns_fd: int | None = None) -> tuple[CapturedPod | None, PodListeners]:
        """Capture the pod of ``cap.record`` in its network namespace.

        ``netns_fd`` is that namespace already opened by ``open_netns`` (it is
        taken over); without it ``rec.netns`` is opened and validated here.
        A pod captured in another namespace keeps that capture until the new
        listeners are open and steered to, so a failure leaves the old capture
        as it was (issue 11). The replaced capture is returned with its
        steering removed but its accept loops still running: the caller must
        ``await self._retire()`` it. The record is changed by the lifecycle
        core, from the ``CaptureResult``.
        """
        rec = cap.record
        previous = self.captured.get(rec.key)
        listeners = (self.inpod.open(rec.netns) if netns_fd is None
                     else self.inpod.listen(netns_fd, rec.netns))
        view = self.state.pod_view(rec.namespace, rec.name)
        self.inpod.want_dns(listeners, capture_wanted(self.config.dns_capture, view.annotations if view else None))
        if previous is None and rec.netns_cookie and rec.netns_cookie != listeners.cookie:
            # Same path, different namespace: the old one's state is stale.
            self.inpod.disable(rec.netns_cookie, rec.ips)
        shared = set(previous.ips) if previous is not None else set()
        try:
            self.inpod.enable(listeners, rec.ips, rec.gateways)
        except OSError:
            self.inpod.disable(listeners.cookie, [ip for ip in rec.ips if ip not in shared])
            self.inpod.close(listeners)
            if previous is not None:
                # Addresses both captures share may point at the new listeners already.
                self._restore_steering(rec.key, previous)
            raise
        if previous is not None:
            # The pod's traffic now reaches the new listeners. The old namespace
            # is no longer steered, nor are addresses the pod no longer has.
            self.inpod.disable(previous.listeners.cookie, [ip for ip in previous.ips if ip not in rec.ips])
        captured = self._serve(rec, listeners, cap.service_account)
        self.captured[rec.key] = captured
        if self.identities is not None:
            self.identities.track(captured.identity)
        if previous is not None:
            self._forget_identity(previous.identity)
        return previous, listeners

    def _serve(self, rec: PodRecord, listeners: PodListeners, service_account: str) -> CapturedPod:
        """A proxy for the pod, accepting on ``listeners``.

        Nothing else may be accepting on them: two accept loops on one fd
        would unregister each other from the event loop.
        """
        counters = self.counters.setdefault(rec.key, PodCounters())
        pod = self.state.pod_view(rec.namespace, rec.name)
        identity = f"spiffe://{self.config.trust_domain}/ns/{rec.namespace}/sa/{service_account}"
        proxy = PodProxy(rec.key, identity, list(rec.ips), pod.workload_metadata() if pod is not None else
                         {"namespace": rec.namespace, "workload_name": rec.name},
                         listeners, self.datapath, self.switcher, counters, self.plane)
        proxy.start()
        self._serve_dns(rec, listeners)
        return CapturedPod(listeners, proxy, identity, list(rec.ips), list(rec.gateways))

    def _serve_dns(self, rec: PodRecord, listeners: PodListeners) -> None:
        """The pod's DNS proxy on its DNS listeners, once per set of listeners."""
        if not listeners.dns_enabled or listeners.cookie in self.dns:
            return
        resolver = Resolver(rec.namespace, lambda ns, name: service_addresses(self.state, ns, name),
                            self.config.cluster_domain,
                            hosts=lambda name: resolve_host(self.state, name, rec.namespace),
                            generation=lambda: self.state)
        counters = self.dns_counters.setdefault(rec.key, DnsCounters())
        udp = [s for s in listeners.dns if s.type == socket.SOCK_DGRAM]
        tcp = [s for s in listeners.dns if s.type == socket.SOCK_STREAM]
        server = self.dns[listeners.cookie] = PodDns(
            rec.key, resolver, udp, tcp, listeners.netns_fd, self.switcher, counters, self.metrics.agent.dns_query,
            upstream=PodResolvConf(listeners.netns_fd, self.config.host_proc).current)
        server.begin()

    def _restore_steering(self, key: str, pod: CapturedPod) -> None:
        try:
            self.inpod.enable(pod.listeners, pod.ips, pod.gateways)
        except OSError as exc:     # the node reconciler's capture check retries it
            log.error("pod %s: could not restore the steering to its capture: %s", key, exc)

    async def _do_keep(self, keep: Keep, run: _Run) -> None:
        """A CNI ADD for the namespace the pod is captured in: its listeners stay.

        They cannot be replaced there anyway (a second set would collide on
        the same ports). The record follows the request (path, uid, sandbox);
        steering follows changed addresses; a new pod (uid), identity or set
        of addresses gets a new proxy on the same listeners.
        """
        rec = keep.record
        current = self.captured[rec.key]
        if keep.resteer:
            try:
                self.inpod.enable(current.listeners, rec.ips, rec.gateways)
                for ip in current.ips:
                    if ip not in rec.ips:
                        self.datapath.clear_inbound(ip)
            except OSError as exc:
                log.error("pod %s: capture update failed: %s", rec.key, exc)
                await self._execute(self.life.handle(KeepResult(keep, False, str(exc))), run)
                return
            current.ips, current.gateways = list(rec.ips), list(rec.gateways)
        await self._execute(self.life.handle(KeepResult(keep, True)), run)
        if not keep.new_proxy:
            return                      # the same sandbox again
        # The old accept loops must be gone before new ones register the same fds.
        await current.proxy.stop_accepting()
        if self.captured.get(rec.key) is not current:
            return                      # released or moved by another request meanwhile
        replacement = self._serve(rec, current.listeners, keep.service_account)
        self.captured[rec.key] = replacement
        if self.identities is not None:
            self.identities.track(replacement.identity)
        self._forget_identity(current.identity)

    def _identity(self, rec: PodRecord) -> str:
        return self.life.identity(rec)

    def _forget_identity(self, identity: str) -> None:
        # Identities of pods that left the node are dropped.
        if self.identities is not None and not any(p.identity == identity for p in self.captured.values()):
            self.identities.forget(identity)

    async def _do_release(self, rel: Release) -> None:
        """Stop capturing the pod of ``rel.record``: steering removed, then its sockets retired.

        The steering goes at once, so other requests never see a half-released pod.
        """
        rec = rel.record
        pod = self.captured.pop(rec.key, None)
        if pod is not None:
            self.inpod.disable(pod.listeners.cookie, pod.ips)
        elif rec.netns_cookie:
            self.inpod.disable(rec.netns_cookie, rec.ips)
        if pod is not None:
            self._forget_identity(pod.identity)
        log.info("pod %s: released (%s)", rec.key, rel.reason)
        await self._retire(pod)
        if pod is None:
            self.life.handle(ReleaseDone(rec.key))
            return
        # Its open connections finish on their own, within --drain-seconds;
        # the next change does not wait for them.
        task = asyncio.ensure_future(self._drain_released(rec.key, pod))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain_released(self, key: str, pod: CapturedPod) -> None:
        try:
            if pod.proxy.open_connections():
                log.info("pod %s: released; draining %d open connection(s) for up to %.1f s", key,
                         pod.proxy.open_connections(), self.config.drain_seconds)
            await pod.proxy.drain(self.config.drain_seconds)
        except Exception:       # a bug here must not fail shutdown(), which waits for this task
            log.exception("pod %s: draining the released capture failed", key)
        finally:
            self.life.handle(ReleaseDone(key))

    async def _retire(self, pod: CapturedPod | None) -> None:
        """Stop a capture's accept loops, then close its sockets.

        In this order: a cancelled accept unregisters its fd from the event
        loop only when the cancellation is processed. Sockets closed before
        that free their fd numbers for the next listeners opened (a
        re-ADD's), and the late unregistration then removes those from epoll:
        every connection to the pod hangs while it looks captured (issue 11).
        """
        if pod is None:
            return
        await pod.proxy.stop_accepting()
        dns = self.dns.pop(pod.listeners.cookie, None)
        if dns is not None:
            dns.stop()
        self.inpod.close(pod.listeners)

    async def _reconcile(self) -> None:
        """Apply the rule to the pods we have records of (a failed capture is a problem of the check)."""
        for change in self.life.plan():
            async with self._changing():
                await self._carry_out(self.life.handle(PlannedChange(change)))

    # -- live enrolment: the node reconciler ---------------------------------

    async def _reconcile_loop(self) -> None:
        """Check the whole node now, after every state change, and periodically.

        CNI ADD and the records cover pods the agent saw start. This loop covers
        the rest: running pods that joined the mesh by a label change, pods
        whose capture was lost (records gone, BPF state wiped, node rebooted),
        pods that left, and the redirection annotation on each.
        """
        while not self._stopping.is_set():
            # Cleared before the run, so a state change that lands while the
            # run awaits (scan, annotation patches) starts the next run at once.
            self._wake.clear()
            try:
                await self.reconcile_node()
            except asyncio.CancelledError:
                raise
            except HandingOver:
                pass               # the agent taking over reconciles from now on
            except Exception:      # a bug here must not stop the agent or later checks
                log.exception("node reconcile failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.reconcile_seconds)
            except TimeoutError:
                pass

    async def reconcile_node(self) -> None:
        if not self._synced:
            return       # an empty cluster would read as "nothing to capture"
        loop = asyncio.get_running_loop()
        # What cannot be fixed is collected afresh on every check, so a pod
        # stays reported exactly as long as its problem lasts.
        self.life.handle(CheckStarted())
        # Each step that changes a pod holds _changing() (HandingOver ends the
        # run); the scan and the API calls between them do not.
        await self._drop_vanished()
        await self._reconcile()
        async with self._changing():
            self._verify_capture()
            self._sync_dns_capture()
        missing = self.life.unrecorded()
        if missing:
            views = await loop.run_in_executor(None, discover.scan, self.switcher,
                                               self.config.host_proc, self.config.netns_dirs)
            for pod in missing:
                async with self._changing():
                    await self._carry_out(self.life.handle(ScanResult(pod, discover.match(views, pod.ips))))
        await self._carry_out(self.life.handle(CheckFinished()))
        await self._sync_annotations()

    async def _drop_vanished(self) -> None:
        """Forget pods whose network namespace is gone (DEL missed while we were away)."""
        for key, rec in list(self.known.items()):
            async with self._changing():
                if self.known.get(key) is not rec or os.path.exists(rec.netns):
                    continue
                await self._carry_out(self.life.handle(NetnsVanished(key, rec)))

    def _verify_capture(self) -> None:
        """Captured pods' BPF state must be whole; what is missing is put back.

        The pods whose state could not be restored are problems of the
        check. Deleted map pins are pinned again first, from the fds the
        agent holds (issue 11).
        """
        try:
            restored = self.datapath.restore_pins()
            self._pin_problem = ""
        except OSError as exc:
            restored = []
            if self._pin_problem != str(exc):
                log.error("BPF pins deleted from %s cannot be pinned again: %s; a restarted agent "
                          "would lose every pod's capture state", self.config.pin_dir, exc)
            self._pin_problem = str(exc)
        if restored:
            log.warning("BPF pins %s were deleted from %s; pinned again from the agent's own fds",
                        ", ".join(restored), self.config.pin_dir)
        for key, pod in self.captured.items():
            rec = self.known.get(key)
            if rec is None:
                continue
            problems = self.datapath.capture_problems(pod.listeners.cookie, rec.ips)
            if not problems:
                continue
            log.error("pod %s: capture damaged (%s); restoring it", key, "; ".join(problems))
            try:
                self.inpod.enable(pod.listeners, rec.ips, rec.gateways)
            except OSError as exc:
                self.life.handle(CaptureDamaged(key, f"capture damaged and could not be restored: {exc}"))

    async def _sync_annotations(self) -> None:
        """Mark captured pods ``ambient.istio.io/redirection: enabled``, unmark the rest.

        Only sources that can write (the Kubernetes API) support it; a failed
        patch is retried at the next reconcile.
        """
        annotate = getattr(self.source, "annotate_pod", None)
        if annotate is None:
            return
        loop = asyncio.get_running_loop()
        for change in self.life.annotations():
            if self._handover_to is not None:
                return        # the agent taking over owns the annotations now
            ns, name, value = change.namespace, change.name, change.value
            key = f"{ns}/{name}"
            try:
                await loop.run_in_executor(None, annotate, ns, name,
                                           {"ambient.istio.io/redirection": value})
                self._annotation_errors.pop(key, None)
            except Exception as exc:  # API down, pod deleted meanwhile: retried later
                if self._annotation_errors.get(key) != str(exc):
                    log.warning("pod %s: cannot %s the redirection annotation: %s",
                                key, "set" if value else "remove", exc)
                self._annotation_errors[key] = str(exc)

    def _on_state(self, state: ClusterState) -> None:
        self._set_state(state)    # open connections the new policy denies are closed there
        self.metrics.agent.state_synced(True)
        self._wake.set()          # the node reconciler applies the rule to the new state

    # -- control requests --------------------------------------------------

    async def handle(self, request: Request) -> dict:
        if isinstance(request, (CniAdd, CniDel)):
            try:
                async with self._changing():
                    if isinstance(request, CniAdd):
                        return await self._cni_add(request)
                    return await self._cni_del(request)
            except HandingOver as exc:
                # The CNI plugin fails the ADD with "try again later" (code 11);
                # the kubelet retries and reaches the new agent.
                return {"ok": False, "error": str(exc)}
        if isinstance(request, StatusRequest):
            return self.status()
        if isinstance(request, Handover):
            return await self._prepare_handover(request)
        return {"ok": False, "error": f"unsupported request {type(request).__name__}"}

    async def _cni_add(self, req: CniAdd) -> dict:
        key = f"{req.namespace}/{req.name}"
        # The pod may have been written to the state after our last poll.
        try:
            self._set_state(self.source.load())
        except StateError as exc:
            log.warning("cluster state unreadable, using the last good one: %s", exc)
        refused = self.life.refusal(req.namespace, req.name, req.uid)
        if refused is not None:
            return refused.as_dict()
        # The path must be a pod's network namespace before anything changes:
        # a request that fails here leaves the pod's capture as it was (issue 11).
        try:
            fd = open_netns(req.netns, self.config.host_proc)
        except NetnsError as exc:
            log.warning("pod %s: CNI ADD refused: %s", key, _why(exc))
            return {"ok": False, "error": f"pod {key}: {_why(exc)}"}
        fds = {key: fd}
        try:
            event = CniAddEvent(req.namespace, req.name, req.uid, req.container_id, req.netns,
                                tuple(req.ips), tuple(req.gateways), netns_id(fd))
            reply = await self._carry_out(self.life.handle(event), fds)
        finally:
            unused = fds.pop(key, None)      # not taken over by a capture
            if unused is not None:
                os.close(unused)
        assert reply is not None, "the lifecycle answers every CNI ADD"
        return reply

    async def _cni_del(self, req: CniDel) -> dict:
        return await self._carry_out(self.life.handle(CniDelEvent(req.namespace, req.name, req.uid))) \
            or {"ok": True}

    def _before_scrape(self) -> None:
        """Bring gauges up to date right before Prometheus reads them."""
        m = self.metrics
        m.tcp.sync_live()
        m.agent.enrolled_pods.set(len(self.captured))
        m.agent.pods_not_captured.set(len(self.unresolved))
        m.agent.set_listeners({"outbound": sum(len(p.listeners.outbound) for p in self.captured.values()),
                               "inbound": len(self.captured), "hbone": len(self.captured)})
        m.agent.bpf_programs.set(3 + len(self.captured) if self._bpf_ready else 0)
        m.agent.policy_rejected.set(len(self.policies().rejections))
        if self.identities is not None:
            m.agent.set_certificates({c["identity"]: c["not_after"] for c in self.identities.status()})

    def readiness(self) -> tuple[bool, str]:
        """Ready only with BPF attached, the state synced and every held identity certified."""
        if self._handover_to is not None:
            return False, self._handover_text()
        if self._stopping.is_set():
            return False, "shutting down"
        if not self._bpf_ready:
            return False, "BPF programs not attached yet"
        if not self._synced:
            return False, "cluster state not synced yet"
        if self.identities is not None:
            waiting = [c["identity"] for c in self.identities.status() if c["state"] != "valid"]
            if waiting:
                return False, f"no valid certificate yet for {', '.join(waiting)}"
        return True, "ready"

    def _handover_text(self) -> str:
        if self._handover_to == -1:
            return "another agent took the node over"
        return (f"handed the node over to the agent with pid {self._handover_to}" if self._handed_over
                else f"handing the node over to the agent with pid {self._handover_to}")

    def snapshot(self) -> NodeSnapshot:
        """What this agent is doing, as one value: ``status`` and ``/config_dump`` are built from it."""
        bpf = self._bpf_ready
        policies = self.policies()
        pods = tuple(PodSnapshot(rec.namespace, rec.name, rec.uid, tuple(rec.ips), rec.netns, rec.netns_cookie,
                                 rec.enrolled, rec.reason, self._identity(rec) if rec.enrolled else "",
                                 self.counters.get(key, PodCounters()).as_dict(), tuple(self.plane.log.recent(key)))
                     for key, rec in sorted(self.known.items()))
        sync_status = getattr(self.source, "sync_status", None)
        return NodeSnapshot(
            node=self.config.node, pid=os.getpid(),
            handover=self._handover_text() if self._handover_to is not None else None,
            state_url=self.config.state_url, state=self.state, synced=self._synced,
            sync_status=sync_status() if sync_status is not None else None,
            pods=pods, problems=dict(self.unresolved),
            pin_dir=self.config.pin_dir, cgroup=self.config.cgroup, bpf_attached=bpf,
            netns_captured=tuple(self.datapath.enrolled_netns()) if bpf else (),
            capture_counters=self.datapath.stats() if bpf else {},
            hbone_connections=self.plane.pool.connections(), hbone_opened=self.plane.pool.connections_opened,
            certificates=tuple(self.identities.status()) if self.identities else (),
            trust_bundle=self.identities.bundle_status() if self.identities else None,
            policy_rejections=tuple(str(r) for r in policies.rejections), policy_reports=tuple(policies.reports),
            dns={"capture": self.config.dns_capture, "cluster_domain": self.config.cluster_domain,
                 "pods": {key: c.snapshot() for key, c in sorted(self.dns_counters.items())},
                 "allocated_vips": allocated_vips(self.state)})

    def config_dump(self) -> dict:
        """Everything the agent believes, for /config_dump (no private keys: none are put here)."""
        return self.snapshot().config_dump()

    def status(self) -> dict:
        return self.snapshot().status()


def _why(exc: OSError) -> str:
    """An OSError's message without the "[Errno N]" prefix."""
    return exc.strerror or str(exc)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the node agent")
    p.add_argument("--node", required=True, help="name of the node this agent serves")
    # Inside a cluster (the kubelet sets KUBERNETES_SERVICE_HOST in every
    # container) the API is the source; elsewhere, a state file.
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    p.add_argument("--state", default="kube" if in_cluster else "file:/run/ambient-agent/state.json",
                   help=STATE_URL_HELP + " (default: kube inside a cluster, else file:/run/ambient-agent/state.json)")
    p.add_argument("--run-dir", default="/run/ambient-agent",
                   help="control socket and pod records")
    p.add_argument("--pin-dir", default="/sys/fs/bpf/ambient-agent",
                   help="where BPF maps, programs and links are pinned")
    p.add_argument("--cgroup", default=DEFAULT_CGROUP,
                   help="cgroup v2 directory the connect/sock_ops programs attach to")
    p.add_argument("--exclude-namespace", action="append", dest="excluded",
                   help="namespace never enrolled (repeatable; default kube-system)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for an upstream connection")
    p.add_argument("--drain-seconds", type=float, default=5.0,
                   help="on SIGTERM or after handing the node over to a new agent, "
                        "how long open connections may finish")
    p.add_argument("--after-handover", choices=AFTER_HANDOVER, default="exit",
                   help="once the node is handed over to a new agent and connections are drained: "
                        "exit, or wait for SIGTERM (under a DaemonSet, which would restart an exited "
                        "container and with it the old agent)")
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain")
    p.add_argument("--ca-address", default="", help="host:port of the CA (Istio's certificate API)")
    p.add_argument("--ca-root", default="",
                   help="PEM file with the CA's root: verifies the CA and is the mesh trust bundle")
    p.add_argument("--token-file", default="", help="this node agent's token for the CA")
    p.add_argument("--root-namespace", default="istio-system",
                   help="namespace whose policies apply to the whole mesh")
    p.add_argument("--metrics-addr", default="0.0.0.0:15020", help="Prometheus metrics listener")
    p.add_argument("--ready-addr", default="0.0.0.0:15021", help="readiness listener (/healthz/ready)")
    p.add_argument("--admin-addr", default="127.0.0.1:15000", help="admin listener (config_dump, logging)")
    p.add_argument("--access-log-json", action="store_true", help="access log lines as JSON")
    p.add_argument("--reconcile-seconds", type=float, default=10.0,
                   help="period of the full node check (label changes, lost capture, annotations)")
    p.add_argument("--host-proc", default="/proc",
                   help="the host's /proc, to find running pods' network namespaces")
    p.add_argument("--netns-dir", action="append", dest="netns_dirs",
                   help="directory of pinned pod network namespaces (repeatable; "
                        f"default {' and '.join(discover.PINNED_NETNS_DIRS)})")
    p.add_argument("--dns-capture", choices=("on", "off"), default="on",
                   help="capture enrolled pods' DNS into the agent's DNS proxy (a pod's "
                        "ambient.istio.io/dns-capture annotation overrides this)")
    p.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    p.add_argument("--event-loop", choices=eventloop.CHOICES, default="auto",
                   help="event loop for the data path: uvloop (default when installed) or asyncio")
    p.set_defaults(func=_run)


def _addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _run(args: argparse.Namespace) -> int:
    config = AgentConfig(
        node=args.node, state_url=args.state, run_dir=args.run_dir, pin_dir=args.pin_dir,
        cgroup=args.cgroup,
        excluded_namespaces=tuple(args.excluded) if args.excluded else DEFAULT_EXCLUDED,
        connect_timeout=args.connect_timeout, drain_seconds=args.drain_seconds,
        trust_domain=args.trust_domain, ca_address=args.ca_address, ca_root=args.ca_root,
        token_file=args.token_file, root_namespace=args.root_namespace,
        metrics_addr=_addr(args.metrics_addr), ready_addr=_addr(args.ready_addr),
        admin_addr=_addr(args.admin_addr), access_log_json=args.access_log_json,
        after_handover=args.after_handover,
        reconcile_seconds=args.reconcile_seconds, host_proc=args.host_proc,
        netns_dirs=tuple(args.netns_dirs) if args.netns_dirs else discover.PINNED_NETNS_DIRS,
        dns_capture=args.dns_capture == "on", cluster_domain=args.cluster_domain,
    )
    if config.ca_address and not (config.ca_root and config.token_file):
        log.error("--ca-address needs --ca-root and --token-file")
        return 2
    try:
        eventloop.run(NodeAgent(config).run, args.event_loop)
    except CaptureError as exc:
        log.error("cannot start capture: %s", exc)
        return 1
    except HandoverError as exc:
        log.error("cannot take the node over: %s", exc)
        return 1
    except StateError as exc:   # a bad --state or kubeconfig; an unreachable API is retried
        log.error("cannot open the cluster state source: %s", exc)
        return 1
    return 0
