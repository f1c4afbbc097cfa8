"""The data plane's policy hook, backed by the policy engine.

``DataPlane.policy`` takes an ``InboundRequest`` and returns a
``PolicyDecision`` (both ``request.py``); ``make_hook`` finds the destination
pod in the current cluster state and asks ``PolicySet.evaluate``. Anything
unexpected (the destination pod missing from the state, an error in the
engine) denies: the hook fails closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.policy.engine import DEFAULT_ROOT_NAMESPACE, PolicySet
from agent.policy.parse import CLUSTER_LOCAL
from agent.policy.request import InboundRequest, PolicyDecision
from agent.state.model import ClusterState, Pod

log = logging.getLogger(__name__)


def destination_of(inbound: InboundRequest, state: ClusterState) -> Pod | None:
    """The destination pod of ``inbound`` (``namespace/name``) in ``state``, if it is there."""
    namespace, _, name = inbound.pod.partition("/")
    return state.pod_view(namespace, name) if name else None


def make_hook(get_policy_set: Callable[[], PolicySet], get_state: Callable[[], ClusterState]
              ) -> Callable[[InboundRequest], PolicyDecision]:
    """A ``DataPlane.policy`` hook; both getters are called on every connection (keep them cheap)."""

    def hook(inbound: InboundRequest) -> PolicyDecision:
        try:
            pod = destination_of(inbound, get_state())
            if pod is None:
                return PolicyDecision(False, f"destination pod {inbound.pod} is not in the cluster state: "
                                             "denied (fail closed)")
            return get_policy_set().evaluate(inbound, pod)
        except Exception as exc:   # a bug must not open the door
            log.exception("policy evaluation failed for %s", inbound)
            return PolicyDecision(False, f"policy engine error ({type(exc).__name__}: {exc}): denied (fail closed)")

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
