"""The data plane's policy hook, backed by the policy engine.

``DataPlane.policy`` takes ``forward.InboundRequest`` and returns
``forward.PolicyDecision``; ``make_hook`` adapts ``PolicySet.evaluate`` to
that. Anything unexpected (the destination pod missing from the state, an
error in the engine) denies: the hook fails closed.
"""

from __future__ import annotations

import logging
from typing import Callable

from agent.policy.engine import DEFAULT_ROOT_NAMESPACE, PolicySet, Request
from agent.policy.parse import CLUSTER_LOCAL
from agent.proxy.forward import InboundRequest, PolicyDecision
from agent.state.model import ClusterState

log = logging.getLogger(__name__)


def request_for(inbound: InboundRequest, state: ClusterState) -> Request | None:
    """The engine's request for ``inbound``; None when its pod is not in ``state``."""
    namespace, _, name = inbound.pod.partition("/")
    pod = state.pod(namespace, name) if name else None
    if pod is None:
        return None
    return Request(pod=pod, destination_ip=inbound.destination_ip, destination_port=inbound.destination_port,
                   source_ip=inbound.source_ip, source_port=inbound.source_port,
                   source_identity=inbound.source_identity)


def make_hook(get_policy_set: Callable[[], PolicySet], get_state: Callable[[], ClusterState]
              ) -> Callable[[InboundRequest], PolicyDecision]:
    """A ``DataPlane.policy`` hook; both getters are called on every connection (keep them cheap)."""

    def hook(inbound: InboundRequest) -> PolicyDecision:
        try:
            request = request_for(inbound, get_state())
            if request is None:
                return PolicyDecision(False, f"destination pod {inbound.pod} is not in the cluster state: "
                                             "denied (fail closed)")
            decision = get_policy_set().evaluate(request)
        except Exception as exc:   # a bug must not open the door
            log.exception("policy evaluation failed for %s", inbound)
            return PolicyDecision(False, f"policy engine error ({type(exc).__name__}: {exc}): denied (fail closed)")
        return PolicyDecision(decision.allowed, decision.reason, decision.audit)

    return hook


def policy_set_source(get_state: Callable[[], ClusterState], root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                      trust_domain: str = CLUSTER_LOCAL) -> Callable[[], PolicySet]:
    """A ``get_policy_set`` that rebuilds the PolicySet only when the state object changes.

    ``FileStateSource.load()`` returns the same ``ClusterState`` object while
    the file is unchanged, so this is cheap enough to call per connection.
    New rejections and reports are logged once per rebuild.
    """
    cache: dict = {}

    def get() -> PolicySet:
        state = get_state()
        if cache.get("state") is not state:
            policies = PolicySet.from_state(state, root_namespace, trust_domain)
            for rejection in policies.rejections:
                log.warning("policy rejected: %s", rejection)
            for line in policies.reports:
                log.info("policy: %s", line)
            cache["state"], cache["set"] = state, policies
        return cache["set"]

    return get
