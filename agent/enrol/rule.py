"""Istio's ambient enrolment rule: is this pod in the mesh, and why.

Pure and stdlib-only: the CNI plugin imports it on every pod sandbox
operation, so it must stay cheap to import (no third-party modules, no
``typing``, no ``dataclasses``: it imports ``inspect``, which cost the
plugin 10-17 ms of its ~60 ms start, measured with the bundled plugin).

The rule, as Istio's CNI agent applies it:

* a pod is enrolled when it, or its namespace, carries
  ``istio.io/dataplane-mode=ambient``; a pod label is enough on its own,
  even in an unlabelled namespace;
* a pod labelled ``istio.io/dataplane-mode=none`` opts out, whatever its
  namespace says, and so does a pod annotated
  ``ambient.istio.io/redirection: disabled`` (Istio's older opt-out, which
  istio-cni still honours: ``PodHasOptOut``); the agent never removes it;
* never enrolled, whatever the labels: pods in excluded namespaces
  (``kube-system`` by default), pods that already run an Istio sidecar
  (annotation ``sidecar.istio.io/status``) and host-network pods (they share
  the node's network namespace, so there is no pod namespace to capture in).

``decide`` reports the *first* rule that settles the question, checked from
the node's configuration down to the pod itself, so the reason an operator
sees is the most fundamental one: an unlabelled host-network pod is "not
labelled" (nobody asked for it), a labelled one is "hostNetwork pod".
"""

from __future__ import annotations

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
MODE_AMBIENT = "ambient"
MODE_NONE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# Istio's annotation for "this pod's traffic is captured": the agent sets it
# to ``enabled`` on the pods it captures; ``disabled`` is set by users to opt out.
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
REDIRECTION_DISABLED = "disabled"
DEFAULT_NAMESPACE = "default"
DEFAULT_EXCLUDED = ("kube-system",)

_AMBIENT = f"{DATAPLANE_MODE_LABEL}={MODE_AMBIENT}"
_NONE = f"{DATAPLANE_MODE_LABEL}={MODE_NONE}"


class EnrolmentDecision:
    """The rule's answer: a small immutable value (what a frozen dataclass would be)."""

    __slots__ = ("enrolled", "reason")
    enrolled: bool
    reason: str       # short and human-readable: it ends up in logs and `status`

    def __init__(self, enrolled: bool, reason: str) -> None:
        object.__setattr__(self, "enrolled", enrolled)
        object.__setattr__(self, "reason", reason)

    def __setattr__(self, name, value):
        raise AttributeError(f"EnrolmentDecision is immutable (tried to set {name})")

    def __eq__(self, other):
        if not isinstance(other, EnrolmentDecision):
            return NotImplemented
        return (self.enrolled, self.reason) == (other.enrolled, other.reason)

    def __hash__(self) -> int:
        return hash((self.enrolled, self.reason))

    def __repr__(self) -> str:
        return f"EnrolmentDecision(enrolled={self.enrolled!r}, reason={self.reason!r})"


def _mapping(obj, *path: str) -> dict:
    """``obj[path[0]][path[1]]...`` when every step is a mapping, else ``{}``.

    The rule sees objects straight from a state file or the API; a field of
    the wrong type must read as absent, never raise.
    """
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj if isinstance(obj, dict) else {}


def pod_namespace(pod: dict) -> str:
    """The pod's namespace; Kubernetes defaults an omitted one to ``default``."""
    name = _mapping(pod, "metadata").get("namespace")
    return name if isinstance(name, str) and name else DEFAULT_NAMESPACE


def decide(pod: dict, namespace: dict | None,
           excluded_namespaces=DEFAULT_EXCLUDED) -> EnrolmentDecision:
    """Whether ``pod`` (in ``namespace``, the Namespace object if known) is enrolled.

    ``excluded_namespaces`` replaces the default list (it is not added to it),
    like the CNI plugin's and the agent's ``exclude_namespaces`` settings.
    """
    ns_name = pod_namespace(pod)
    pod_mode = _mapping(pod, "metadata", "labels").get(DATAPLANE_MODE_LABEL)
    ns_mode = _mapping(namespace, "metadata", "labels").get(DATAPLANE_MODE_LABEL)

    if ns_name in excluded_namespaces:
        return EnrolmentDecision(False, f"namespace {ns_name} is excluded")
    if pod_mode == MODE_NONE:
        return EnrolmentDecision(False, f"pod opted out with {_NONE}")
    if _mapping(pod, "metadata", "annotations").get(REDIRECTION_ANNOTATION) == REDIRECTION_DISABLED:
        return EnrolmentDecision(False, f"pod opted out with {REDIRECTION_ANNOTATION}={REDIRECTION_DISABLED}")
    if pod_mode != MODE_AMBIENT and ns_mode != MODE_AMBIENT:
        return EnrolmentDecision(False, f"no {_AMBIENT} label on pod or namespace")
    if SIDECAR_STATUS_ANNOTATION in _mapping(pod, "metadata", "annotations"):
        return EnrolmentDecision(False, "pod has an Istio sidecar")
    if _mapping(pod, "spec").get("hostNetwork") is True:
        return EnrolmentDecision(False, "hostNetwork pod")
    if pod_mode == MODE_AMBIENT:
        return EnrolmentDecision(True, f"pod labelled {_AMBIENT}")
    return EnrolmentDecision(True, f"namespace {ns_name} labelled {_AMBIENT}")
