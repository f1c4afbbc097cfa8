"""Istio's ambient enrolment rule, case by case."""

import pytest

from agent.enrol.rule import decide

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}


def pod(ns="app", labels=None, annotations=None, host_network=None):
    p = {"kind": "Pod", "metadata": {"name": "p", "namespace": ns, "labels": labels or {},
                                     "annotations": annotations or {}}, "spec": {}}
    if host_network is not None:
        p["spec"]["hostNetwork"] = host_network
    return p


def namespace(name="app", labels=None):
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


CASES = [
    # (description, pod, namespace, excluded, enrolled, reason fragment)
    ("namespace label enrols", pod(), namespace(labels=AMBIENT), None, True, "namespace app labelled"),
    ("pod label enrols without namespace label", pod(labels=AMBIENT), namespace(), None, True, "pod labelled"),
    ("pod label enrols with no namespace object", pod(labels=AMBIENT), None, None, True, "pod labelled"),
    ("pod none overrides namespace ambient", pod(labels=NONE), namespace(labels=AMBIENT), None, False, "opted out"),
    ("no labels anywhere", pod(), namespace(), None, False, "no istio.io/dataplane-mode=ambient"),
    ("unknown mode value is not ambient", pod(labels={"istio.io/dataplane-mode": "sidecar"}), namespace(), None, False, "no istio.io"),
    ("namespace none does not enrol", pod(), namespace(labels=NONE), None, False, "no istio.io"),
    ("hostNetwork never", pod(labels=AMBIENT, host_network=True), namespace(labels=AMBIENT), None, False, "hostNetwork"),
    ("hostNetwork false is fine", pod(host_network=False), namespace(labels=AMBIENT), None, True, "namespace"),
    ("sidecar never", pod(annotations={"sidecar.istio.io/status": "{}"}), namespace(labels=AMBIENT), None, False, "sidecar"),
    ("kube-system excluded by default", pod(ns="kube-system", labels=AMBIENT),
     namespace("kube-system", AMBIENT), None, False, "namespace kube-system is excluded"),
    ("custom exclusion", pod(ns="infra"), namespace("infra", AMBIENT), ("infra",), False, "infra is excluded"),
    ("custom exclusion replaces the default", pod(ns="kube-system"), namespace("kube-system", AMBIENT), ("infra",), True, "namespace"),
    ("pod without namespace is in default", {"metadata": {"name": "p"}}, namespace("default", AMBIENT), None, True, "namespace default"),
    ("malformed labels are ignored, not fatal", {"metadata": {"name": "p", "namespace": "app", "labels": "oops"}},
     namespace(labels=AMBIENT), None, True, "namespace"),
    ("malformed namespace object", pod(), {"metadata": []}, None, False, "no istio.io"),
]


@pytest.mark.parametrize("desc, p, ns, excluded, enrolled, reason", CASES, ids=[c[0] for c in CASES])
def test_enrolment_rule(desc, p, ns, excluded, enrolled, reason):
    decision = decide(p, ns, excluded) if excluded is not None else decide(p, ns)
    assert decision.enrolled is enrolled
    assert reason in decision.reason
