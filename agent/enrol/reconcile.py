"""Desired versus actual enrolment, as a pure function.

The agent knows pods from CNI (records: netns, addresses, whether captured)
and the cluster from its state source. Reconciling compares the enrolment
rule's answer with what is captured and says what to change. It is
idempotent: run it after every state change and after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.enrol.records import PodRecord
from agent.enrol.rule import DEFAULT_EXCLUDED, EnrolmentDecision, decide


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
