"""Istio's ambient enrolment rule: is this pod in the mesh, and why.

Pure and stdlib-only: the CNI plugin imports it on every pod start.

A pod is enrolled when it or its namespace carries
``istio.io/dataplane-mode=ambient``, unless the pod itself says
``istio.io/dataplane-mode=none``. Never enrolled, whatever the labels:
host-network pods (they share the node's namespace), pods that already run
an Istio sidecar (annotation ``sidecar.istio.io/status``), and pods in
excluded namespaces (``kube-system`` by default).
"""

from __future__ import annotations

from dataclasses import dataclass

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
MODE_AMBIENT = "ambient"
MODE_NONE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
DEFAULT_EXCLUDED = ("kube-system",)


@dataclass(frozen=True)
class EnrolmentDecision:
    enrolled: bool
    reason: str


def _meta(obj: dict | None, field: str) -> dict:
    if not isinstance(obj, dict):
        return {}
    meta = obj.get("metadata")
    value = meta.get(field) if isinstance(meta, dict) else None
    return value if isinstance(value, dict) else {}


def decide(pod: dict, namespace: dict | None,
           excluded_namespaces=DEFAULT_EXCLUDED) -> EnrolmentDecision:
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
    ns_name = meta.get("namespace") or "default"
    pod_labels = _meta(pod, "labels")
    ns_labels = _meta(namespace, "labels")

    if ns_name in excluded_namespaces:
        return EnrolmentDecision(False, f"namespace {ns_name} is excluded")
    if spec.get("hostNetwork") is True:
        return EnrolmentDecision(False, "hostNetwork pod")
    if SIDECAR_STATUS_ANNOTATION in _meta(pod, "annotations"):
        return EnrolmentDecision(False, "pod has an Istio sidecar")
    pod_mode = pod_labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == MODE_NONE:
        return EnrolmentDecision(False, f"pod opted out with {DATAPLANE_MODE_LABEL}={MODE_NONE}")
    if pod_mode == MODE_AMBIENT:
        return EnrolmentDecision(True, f"pod labelled {DATAPLANE_MODE_LABEL}={MODE_AMBIENT}")
    if ns_labels.get(DATAPLANE_MODE_LABEL) == MODE_AMBIENT:
        return EnrolmentDecision(True, f"namespace {ns_name} labelled {DATAPLANE_MODE_LABEL}={MODE_AMBIENT}")
    return EnrolmentDecision(False, f"no {DATAPLANE_MODE_LABEL}={MODE_AMBIENT} label on pod or namespace")
