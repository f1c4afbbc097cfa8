"""Desired versus actual enrolment, as a pure function.

The agent knows pods from CNI (records: netns, addresses, whether captured)
and the cluster from its state source. Reconciling compares the enrolment
rule's answer with what is captured and says what to change. It is
idempotent: run it after every state change and after a restart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.enrol import rule
from agent.enrol.records import PodRecord
from agent.enrol.rule import DEFAULT_EXCLUDED, EnrolmentDecision, decide, pod_namespace
from agent.state.model import pod_ips


@dataclass(frozen=True)
class Change:
    record: PodRecord
    enrol: bool          # True: capture it; False: release it
    reason: str


def desired(state, namespace: str, name: str, uid: str,
            excluded=DEFAULT_EXCLUDED) -> EnrolmentDecision | None:
    """The rule's answer for one pod, or None when the state does not know it."""
    pod = state.pod(namespace, name)
    if pod is None:
        return None
    state_uid = pod.get("metadata", {}).get("uid")
    if uid and state_uid and state_uid != uid:
        return None   # another pod of the same name: not this one's answer
    return decide(pod, state.namespace(namespace), excluded)


def plan(records: list[PodRecord], state, excluded=DEFAULT_EXCLUDED) -> list[Change]:
    """Changes that bring captured pods in line with the rule.

    A pod the state no longer knows keeps its capture until CNI DEL removes
    it: releasing it early would let its traffic out uncaptured.
    """
    changes = []
    for rec in records:
        decision = desired(state, rec.namespace, rec.name, rec.uid, excluded)
        if decision is None:
            continue
        if decision.enrolled != rec.enrolled:
            changes.append(Change(rec, decision.enrolled, decision.reason))
    return changes


# -- a CNI ADD for a pod the agent may already capture ---------------------------------

class AddAction(enum.Enum):
    RECORD = "record"      # remember the pod; the rule does not enrol it
    CAPTURE = "capture"    # not captured: open listeners in the namespace and capture it
    KEEP = "keep"          # captured in that very namespace: keep the listeners, update the record
    MOVE = "move"          # captured in another namespace: capture in the new one, then retire the old
    RELEASE = "release"    # captured, but the rule no longer enrols it


def add_action(captured_in: object | None, requested: object, enrol: bool) -> AddAction:
    """What a CNI ADD does to a pod's capture (issue 11).

    ``captured_in`` identifies the namespace the pod is captured in (None:
    not captured), ``requested`` the one the ADD names; both are namespace
    identities (device and inode of the namespace file), never path strings:
    ``/run/netns/x`` and ``/var/run/netns/x`` are one namespace, and listeners
    opened a second time in the same namespace would collide with the first.
    A new uid in the same namespace is KEEP too: the sandbox is the same.
    """
    if captured_in is None:
        return AddAction.CAPTURE if enrol else AddAction.RECORD
    if not enrol:
        return AddAction.RELEASE
    return AddAction.KEEP if captured_in == requested else AddAction.MOVE


# -- pods the agent has no record of --------------------------------------------------

# Istio's annotation for "this pod's traffic is captured" (agent/enrol/rule.py):
# the agent sets it on the pods it captures and removes its own mark from the
# pods it does not; a user's ``disabled`` (an opt-out) is never touched.
REDIRECTION_ANNOTATION = rule.REDIRECTION_ANNOTATION
REDIRECTION_ENABLED = rule.REDIRECTION_ENABLED


@dataclass(frozen=True)
class Unrecorded:
    """A pod of this node that must be captured but that CNI never told us about."""
    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]
    reason: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def unrecorded(state, node: str, records: dict[str, PodRecord],
               excluded=DEFAULT_EXCLUDED) -> list[Unrecorded]:
    """Pods on ``node`` the rule enrols that have no record (or a record of an
    older pod of the same name): their network namespace must be found.

    Only pods that have an IP: before that, the runtime is still setting the
    sandbox up and CNI ADD is on its way (or the pod has finished).
    """
    found = []
    for pod in state.pods_on_node(node):
        # The state indexes only objects with a metadata.name string (state.model._problem).
        ns, name = pod_namespace(pod), str(pod["metadata"]["name"])
        uid = str((pod.get("metadata") or {}).get("uid") or "")
        ips = pod_ips(pod)
        if not ips or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        rec = records.get(f"{ns}/{name}")
        if rec is not None and (not uid or not rec.uid or rec.uid == uid):
            continue
        decision = decide(pod, state.namespace(ns), excluded)
        if decision.enrolled:
            found.append(Unrecorded(ns, name, uid, tuple(ips), decision.reason))
    return found


def annotation_changes(state, node: str, captured: set[str]) -> list[tuple[str, str, str | None]]:
    """``(namespace, name, value)`` patches that make the redirection
    annotation of this node's pods say the truth: ``enabled`` exactly on the
    pods the agent captures (value None removes it).
    """
    changes: list[tuple[str, str, str | None]] = []
    for pod in state.pods_on_node(node):
        ns, name = pod_namespace(pod), str(pod["metadata"]["name"])
        key = f"{ns}/{name}"
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        current = annotations.get(REDIRECTION_ANNOTATION) if isinstance(annotations, dict) else None
        if current == rule.REDIRECTION_DISABLED:
            continue           # the user's opt-out; the rule releases the pod if captured
        if key in captured and current != REDIRECTION_ENABLED:
            changes.append((ns, name, REDIRECTION_ENABLED))
        elif key not in captured and current is not None:
            changes.append((ns, name, None))
    return changes
