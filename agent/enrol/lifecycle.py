"""The pod lifecycle of one node, as a sans-IO state machine (issue 13, item 1).

What the node agent knows about its pods (their records), which of them it
captures (and in which network namespace), and the problems it cannot fix,
with every decision about them: events go in, actions come out. Nothing
here opens a socket, a namespace or a file, so the whole lifecycle (repeat
CNI ADD, a new uid or namespace, release, adoption, a vanished namespace,
re-adoption after a restart) is tested without root
(tests/unit/test_lifecycle.py).

The shape is h2's (``H2Connection`` takes bytes and returns events; the
caller does the I/O) and ztunnel's workload-proxy manager
(``inpod/statemanager``): the node agent (agent/daemon.py) feeds the events
and carries out the actions through its datapath, listeners, record store
and annotator. An action that can fail (``Capture``, ``Keep``) is answered
by the shell with a result event (``CaptureResult``, ``KeepResult``) that
the core turns into the record change and the reply.

Decisions reused from agent/enrol/reconcile.py: ``desired`` (the rule's
answer for one pod), ``add_action`` (what a CNI ADD does to a capture,
compared by namespace identity, never by path), ``plan``, ``unrecorded``
and ``annotation_changes``.

Namespaces are compared by identity (``netns_id``: device and inode) that
the shell reads from the opened namespace: the core never sees a file
descriptor. The CNI ADD's namespace is validated by the shell
(``open_netns``) before the ``CniAddEvent`` is fed, so a refused path
changes nothing (issue 11).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.enrol.discover import PodNetns
from agent.enrol.reconcile import (
    AddAction,
    Change,
    Unrecorded,
    add_action,
    annotation_changes,
    desired,
    plan,
    unrecorded,
)
from agent.enrol.records import PodRecord
from agent.enrol.rule import DEFAULT_EXCLUDED
from agent.state.model import ClusterState


class Cause(enum.Enum):
    """Why a capture is made: it decides the reply, the log line and whether a failure is a problem."""
    CNI_ADD = "cni-add"          # a CNI ADD: the plugin gets the answer
    READOPT = "readopt"          # a record of a previous agent, at start-up
    RECONCILE = "reconcile"      # the rule now enrols a recorded pod
    ADOPT = "adopt"              # a running pod found by a scan (no record)


# -- events (in) ---------------------------------------------------------------------

@dataclass(frozen=True)
class StateChanged:
    """A new cluster state (from the watch, the start-up load or a CNI ADD's re-read)."""
    state: ClusterState


@dataclass(frozen=True)
class Restarted:
    """The records a previous agent left, and which of their namespace paths still exist."""
    records: tuple[PodRecord, ...]
    present: frozenset[str]


@dataclass(frozen=True)
class CniAddEvent:
    """A CNI ADD whose namespace path the shell opened and validated; ``netns`` is its identity."""
    namespace: str
    name: str
    uid: str
    container_id: str
    netns_path: str
    ips: tuple[str, ...]
    gateways: tuple[str, ...]
    netns: object

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class CniDelEvent:
    namespace: str
    name: str
    uid: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class CaptureResult:
    """The shell's answer to a ``Capture``: ``netns`` and ``cookie`` of the new listeners, or the error."""
    capture: Capture
    ok: bool
    netns: object = None
    cookie: int = 0
    error: str = ""


@dataclass(frozen=True)
class KeepResult:
    """The shell's answer to a ``Keep`` (the steering update can fail)."""
    keep: Keep
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class ReleaseDone:
    """A released capture has stopped accepting and drained (or was cut at the deadline)."""
    key: str


@dataclass(frozen=True)
class NetnsVanished:
    """The namespace path of a known pod is gone (a CNI DEL missed while the agent was away)."""
    key: str
    record: PodRecord


@dataclass(frozen=True)
class PlannedChange:
    """One change of ``PodLifecycle.plan()``, applied when the shell holds the right to change."""
    change: Change


@dataclass(frozen=True)
class ScanResult:
    """Where a pod without a record lives: a namespace, None (nowhere) or an error message."""
    pod: Unrecorded
    found: PodNetns | str | None


@dataclass(frozen=True)
class CaptureDamaged:
    """A captured pod's BPF state was damaged and could not be restored."""
    key: str
    problem: str


@dataclass(frozen=True)
class CheckStarted:
    """A node check begins: problems are collected afresh, so a pod stays
    reported exactly as long as its problem lasts."""


@dataclass(frozen=True)
class CheckFinished:
    """A node check ends: the problems found replace the open ones."""


Event = (StateChanged | Restarted | CniAddEvent | CniDelEvent | CaptureResult | KeepResult | ReleaseDone
         | NetnsVanished | PlannedChange | ScanResult | CaptureDamaged | CheckStarted | CheckFinished)


# -- actions (out) -------------------------------------------------------------------

@dataclass(frozen=True)
class Capture:
    """Open listeners in ``record.netns`` and steer the pod's addresses to them.

    A pod captured in another namespace keeps that capture until the new one
    is steered to (``moves``); the shell retires the old listeners after. The
    shell answers with ``CaptureResult``; the record is changed only then.
    """
    record: PodRecord
    cause: Cause
    service_account: str
    moves: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Keep:
    """A CNI ADD for the namespace the pod is captured in: its listeners stay.

    ``record`` is the new record (the request's path, uid, sandbox),
    ``previous`` the known one. The shell re-steers changed addresses and,
    when ``new_proxy``, puts a new proxy on the same listeners (a new pod,
    identity or set of addresses). Answered with ``KeepResult``.
    """
    record: PodRecord
    previous: PodRecord | None
    service_account: str
    resteer: bool          # the addresses or gateways changed
    new_proxy: bool


@dataclass(frozen=True)
class Release:
    """Stop capturing: steering removed, the capture (if any) stops accepting and drains.

    The shell answers with ``ReleaseDone`` once the drain is over.
    """
    record: PodRecord
    reason: str = ""


@dataclass(frozen=True)
class SaveRecord:
    record: PodRecord


@dataclass(frozen=True)
class RemoveRecord:
    record: PodRecord


@dataclass(frozen=True)
class Annotate:
    """Set (``enabled``) or remove (None) the pod's ``ambient.istio.io/redirection`` annotation."""
    namespace: str
    name: str
    value: str | None


@dataclass(frozen=True)
class RevalidateConnections:
    """The policy may have changed: close open connections it now denies."""


@dataclass(frozen=True)
class ReportProblem:
    """A pod that must be in the mesh is not captured (new or changed problem: log it once)."""
    key: str
    problem: str


@dataclass(frozen=True)
class ClearProblem:
    key: str


@dataclass(frozen=True)
class Reply:
    """The answer to a CNI request."""
    ok: bool
    error: str = ""
    enrolled: bool | None = None
    reason: str = ""

    def as_dict(self) -> dict:
        if not self.ok:
            return {"ok": False, "error": self.error}
        if self.enrolled is None:
            return {"ok": True}
        return {"ok": True, "enrolled": self.enrolled, "reason": self.reason}


Action = (Capture | Keep | Release | SaveRecord | RemoveRecord | Annotate | RevalidateConnections
          | ReportProblem | ClearProblem | Reply)


# -- the state machine ------------------------------------------------------------------

@dataclass
class _Captured:
    netns: object          # identity of the namespace the listeners are in
    cookie: int
    service_account: str
    # What the steering was set up with (a Keep compares the request with these).
    ips: list[str]
    gateways: list[str]


@dataclass
class PodLifecycle:
    """Known records, the captured set, the releases still draining and the open problems."""

    node: str
    trust_domain: str = "cluster.local"
    excluded: tuple[str, ...] = DEFAULT_EXCLUDED
    state: ClusterState = field(default_factory=lambda: ClusterState.from_items([]))
    synced: bool = False
    known: dict[str, PodRecord] = field(default_factory=dict)
    captured: dict[str, _Captured] = field(default_factory=dict)
    # Released captures whose open connections are still draining (pod key ->
    # how many: a pod released, captured again and released again drains twice).
    draining: dict[str, int] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    _found: dict[str, str] | None = None       # problems of the check in progress

    # -- queries ---------------------------------------------------------------------

    def identity(self, rec: PodRecord) -> str:
        return f"spiffe://{self.trust_domain}/ns/{rec.namespace}/sa/{rec.service_account}"

    def is_captured(self, key: str) -> bool:
        return key in self.captured

    def live_cookies(self) -> set[int]:
        """Namespace cookies of the enrolled records: BPF state of any other is stale."""
        return {rec.netns_cookie for rec in self.known.values() if rec.enrolled}

    def plan(self) -> list[Change]:
        """Recorded pods whose capture disagrees with the rule (apply each with ``PlannedChange``)."""
        return plan(list(self.known.values()), self.state, self.excluded)

    def unrecorded(self) -> list[Unrecorded]:
        """Pods of this node the rule enrols that have no record: the shell scans for them."""
        return unrecorded(self.state, self.node, self.known, self.excluded)

    def annotations(self) -> list[Annotate]:
        return [Annotate(ns, name, value)
                for ns, name, value in annotation_changes(self.state, self.node, set(self.captured))]

    def refusal(self, namespace: str, name: str, uid: str) -> Reply | None:
        """The answer to a CNI ADD the state cannot decide yet (checked before the
        shell opens the namespace, as the ``CniAddEvent`` handler checks again)."""
        if desired(self.state, namespace, name, uid, self.excluded) is None:
            return Reply(False, f"pod {namespace}/{name} (uid {uid or '?'}) is not in the cluster state yet")
        return None

    def _service_account(self, rec: PodRecord, fallback: str) -> str:
        """As the state names it; else ``fallback`` (a pod the state does not know keeps its own)."""
        pod = self.state.pod_view(rec.namespace, rec.name)
        return pod.service_account if pod is not None else fallback

    # -- events ----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"not a lifecycle event: {event!r}")
        return handler(self, event)

    def _state_changed(self, ev: StateChanged) -> list[Action]:
        # The one writer of the state: every change re-validates open connections.
        if ev.state is self.state and self.synced:
            return []                  # the same version again (a source's cached load)
        self.state = ev.state
        self.synced = True
        return [RevalidateConnections()]

    def _restarted(self, ev: Restarted) -> list[Action]:
        actions: list[Action] = []
        for rec in ev.records:
            if rec.netns not in ev.present:
                # Its steering (by cookie) goes with the record.
                actions += [Release(rec, f"network namespace {rec.netns} is gone"), RemoveRecord(rec)]
                continue
            self.known[rec.key] = rec
            if rec.enrolled:
                actions.append(Capture(rec, Cause.READOPT, self._service_account(rec, rec.service_account)))
        return actions

    def _cni_add(self, ev: CniAddEvent) -> list[Action]:
        key = ev.key
        decision = desired(self.state, ev.namespace, ev.name, ev.uid, self.excluded)
        if decision is None:
            refused = self.refusal(ev.namespace, ev.name, ev.uid)
            assert refused is not None
            return [refused]
        old = self.known.get(key)
        current = self.captured.get(key)
        action = add_action(current.netns if current is not None else None, ev.netns, decision.enrolled)
        rec = PodRecord(namespace=ev.namespace, name=ev.name, uid=ev.uid, container_id=ev.container_id,
                        netns=ev.netns_path, ips=list(ev.ips), gateways=list(ev.gateways), enrolled=False,
                        reason=decision.reason)
        if old is not None and old.uid == ev.uid:
            rec.service_account = old.service_account
        if action in (AddAction.CAPTURE, AddAction.MOVE):
            return [Capture(rec, Cause.CNI_ADD, self._service_account(rec, rec.service_account),
                            moves=action is AddAction.MOVE, reason=decision.reason)]
        if action is AddAction.KEEP:
            assert current is not None
            sa = self._service_account(rec, old.service_account if old is not None else rec.service_account)
            resteer = set(rec.ips) != set(current.ips) or list(rec.gateways) != current.gateways
            same = old is not None and old.uid == rec.uid and sa == current.service_account and not resteer
            return [Keep(rec, old, sa, resteer=resteer, new_proxy=not same)]
        actions: list[Action] = []
        if action is AddAction.RELEASE and old is not None:
            actions.append(self._release(old, decision.reason))
        self.known[key] = rec
        return actions + [SaveRecord(rec), Reply(True, enrolled=False, reason=rec.reason)]

    def _capture_result(self, ev: CaptureResult) -> list[Action]:
        cap = ev.capture
        rec = cap.record
        key = rec.key
        if not ev.ok:
            if cap.cause is Cause.CNI_ADD:
                if key not in self.captured:
                    self.known[key] = rec          # the node check retries it
                return [Reply(False, f"pod {key}: capture failed: {ev.error}")]
            if cap.cause is Cause.RECONCILE:
                self._problem(key, f"capture failed: {ev.error}")
            elif cap.cause is Cause.ADOPT:
                self._problem(key, f"capture of the running pod failed: {ev.error}")
                return [SaveRecord(rec)]           # known now: the next check's plan retries it
            return []
        rec.netns_cookie = ev.cookie
        rec.enrolled = True
        rec.service_account = cap.service_account
        self.captured[key] = _Captured(ev.netns, ev.cookie, cap.service_account, list(rec.ips), list(rec.gateways))
        self.known[key] = rec
        actions: list[Action] = [SaveRecord(rec)]
        if cap.cause is Cause.CNI_ADD:
            actions.append(Reply(True, enrolled=True, reason=rec.reason))
        return actions

    def _keep_result(self, ev: KeepResult) -> list[Action]:
        keep = ev.keep
        rec = keep.record
        if not ev.ok:
            return [Reply(False, f"pod {rec.key}: capture update failed: {ev.error}")]
        current = self.captured.get(rec.key)
        if current is not None:
            rec.netns_cookie = current.cookie
            current.service_account = keep.service_account
            current.ips, current.gateways = list(rec.ips), list(rec.gateways)
        rec.enrolled = True
        rec.service_account = keep.service_account
        self.known[rec.key] = rec
        return [SaveRecord(rec), Reply(True, enrolled=True, reason=rec.reason)]

    def _release(self, rec: PodRecord, reason: str = "") -> Release:
        if self.captured.pop(rec.key, None) is not None:
            self.draining[rec.key] = self.draining.get(rec.key, 0) + 1
        rec.enrolled = False
        return Release(rec, reason)

    def _cni_del(self, ev: CniDelEvent) -> list[Action]:
        rec = self.known.get(ev.key)
        if rec is None or (ev.uid and rec.uid and ev.uid != rec.uid):
            return [Reply(True)]                   # not ours to remove: another pod of the same name
        del self.known[ev.key]
        return [self._release(rec, "CNI DEL"), RemoveRecord(rec), Reply(True)]

    def _release_done(self, ev: ReleaseDone) -> list[Action]:
        left = self.draining.get(ev.key, 0) - 1
        if left > 0:
            self.draining[ev.key] = left
        else:
            self.draining.pop(ev.key, None)
        return []

    def _netns_vanished(self, ev: NetnsVanished) -> list[Action]:
        if self.known.get(ev.key) is not ev.record:
            return []                              # replaced meanwhile
        del self.known[ev.key]
        return [self._release(ev.record, f"network namespace {ev.record.netns} is gone"), RemoveRecord(ev.record)]

    def _planned_change(self, ev: PlannedChange) -> list[Action]:
        change = ev.change
        rec = change.record
        if self.known.get(rec.key) is not rec:
            return []                              # replaced by a CNI request since the plan
        rec.reason = change.reason
        if change.enrol:
            return [Capture(rec, Cause.RECONCILE, self._service_account(rec, rec.service_account),
                            reason=change.reason)]
        return [self._release(rec, change.reason), SaveRecord(rec)]

    def _scan_result(self, ev: ScanResult) -> list[Action]:
        pod, found = ev.pod, ev.found
        if not isinstance(found, PodNetns):
            self._problem(pod.key, found or f"no network namespace on this node holds {', '.join(pod.ips)}")
            return []
        old = self.known.get(pod.key)
        if old is not None and old.uid == pod.uid:
            return []                              # CNI ADD came while the shell was scanning
        actions: list[Action] = []
        if old is not None:                        # an older pod of the same name; its sockets go first
            actions += [self._release(old, "replaced by a new pod"), RemoveRecord(old)]
        rec = PodRecord(namespace=pod.namespace, name=pod.name, uid=pod.uid, container_id="",
                        netns=found.path, ips=list(found.ips), gateways=list(found.gateways), reason=pod.reason)
        self.known[pod.key] = rec
        return actions + [Capture(rec, Cause.ADOPT, self._service_account(rec, rec.service_account),
                                  reason=pod.reason)]

    def _capture_damaged(self, ev: CaptureDamaged) -> list[Action]:
        self._problem(ev.key, ev.problem)
        return []

    def _problem(self, key: str, problem: str) -> None:
        if self._found is not None:
            self._found[key] = problem

    def _check_started(self, _ev: CheckStarted) -> list[Action]:
        self._found = {}
        return []

    def _check_finished(self, _ev: CheckFinished) -> list[Action]:
        found, self._found = self._found or {}, None
        actions: list[Action] = [ReportProblem(k, p) for k, p in found.items() if self.problems.get(k) != p]
        actions += [ClearProblem(k) for k in self.problems if k not in found]
        self.problems = found
        return actions


_HANDLERS: dict[type, Callable[[PodLifecycle, Any], list[Action]]] = {
    StateChanged: PodLifecycle._state_changed,
    Restarted: PodLifecycle._restarted,
    CniAddEvent: PodLifecycle._cni_add,
    CniDelEvent: PodLifecycle._cni_del,
    CaptureResult: PodLifecycle._capture_result,
    KeepResult: PodLifecycle._keep_result,
    ReleaseDone: PodLifecycle._release_done,
    NetnsVanished: PodLifecycle._netns_vanished,
    PlannedChange: PodLifecycle._planned_change,
    ScanResult: PodLifecycle._scan_result,
    CaptureDamaged: PodLifecycle._capture_damaged,
    CheckStarted: PodLifecycle._check_started,
    CheckFinished: PodLifecycle._check_finished,
}
