"""The contract between the data plane and L4 policy: one request, one decision. Pure.

The data plane (``agent/proxy/forward.py``) builds an ``InboundRequest`` for
every inbound connection before the application is reached and acts on the
``PolicyDecision`` its hook returns; the engine (``engine.py``) evaluates the
same request against a destination workload. These types live here, below
the data plane, so that the data plane imports policy and never the other
way round (``docs/ARCHITECTURE.md``, "Layers").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.policy.model import PERMISSIVE


@dataclass(frozen=True)
class InboundRequest:
    """One inbound connection, as the policy hook sees it before the app connection is made.

    ``source_identity``: the peer's verified SPIFFE ID
    (``spiffe://cluster.local/ns/frontend/sa/website``); None for plaintext.
    """
    pod: str                      # namespace/name of the destination pod
    source_ip: str
    source_port: int
    destination_ip: str
    destination_port: int
    source_identity: str | None = None


@dataclass(frozen=True)
class Workload:
    """A destination without a Pod object (``policy explain`` by labels, tests):
    what the engine reads from a ``agent.state.model.Pod``."""
    namespace: str
    labels: Mapping[str, str]
    name: str = ""


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    reason: str
    policy: str | None = None      # "namespace/name" of the policy that decided; None: a default
    rule: int | None = None        # index of the rule that matched in it
    audit: bool = False            # an AUDIT policy matched: marked in the connection record
    mtls_mode: str = PERMISSIVE    # the mode enforced for this workload and port: STRICT or PERMISSIVE


def allow_all(request: InboundRequest) -> PolicyDecision:
    """The data plane's hook when no policy engine is configured (unit tests, tools)."""
    return PolicyDecision(True, "no policy engine configured: allow")
