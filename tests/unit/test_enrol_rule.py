"""Istio's ambient enrolment rule, case by case."""

import subprocess
import sys

import pytest

from agent.enrol.rule import (DATAPLANE_MODE_LABEL, DEFAULT_EXCLUDED, SIDECAR_STATUS_ANNOTATION,
                              EnrolmentDecision, decide, pod_namespace)
from tests import builders

AMBIENT = {DATAPLANE_MODE_LABEL: "ambient"}
NONE = {DATAPLANE_MODE_LABEL: "none"}
SIDECAR = {SIDECAR_STATUS_ANNOTATION: '{"containers":["istio-proxy"]}'}
DISABLED = {"ambient.istio.io/redirection": "disabled"}
ANNOTATED_OUT = "pod opted out with ambient.istio.io/redirection=disabled"


def pod(ns="app", labels=None, annotations=None, host_network=None):
    return builders.pod("p", ns, labels=labels or {}, annotations=annotations or {}, host_network=host_network)


def namespace(name="app", labels=None):
    return builders.namespace(name, labels or {})


NOT_LABELLED = "no istio.io/dataplane-mode=ambient label on pod or namespace"
NS_APP = "namespace app labelled istio.io/dataplane-mode=ambient"
POD_LABELLED = "pod labelled istio.io/dataplane-mode=ambient"
OPTED_OUT = "pod opted out with istio.io/dataplane-mode=none"

CASES = [
    # (id, pod, namespace, excluded (None: default), enrolled, exact reason)
    ("namespace label enrols", pod(), namespace(labels=AMBIENT), None, True, NS_APP),
    ("pod label enrols in an unlabelled namespace", pod(labels=AMBIENT), namespace(), None, True, POD_LABELLED),
    ("pod label enrols without a Namespace object", pod(labels=AMBIENT), None, None, True, POD_LABELLED),
    ("pod label wins the reason over the namespace's", pod(labels=AMBIENT), namespace(labels=AMBIENT), None, True,
     POD_LABELLED),
    ("pod none overrides namespace ambient", pod(labels=NONE), namespace(labels=AMBIENT), None, False, OPTED_OUT),
    ("pod none in an unlabelled namespace", pod(labels=NONE), namespace(), None, False, OPTED_OUT),
    ("redirection disabled overrides namespace ambient", pod(annotations=DISABLED), namespace(labels=AMBIENT), None,
     False, ANNOTATED_OUT),
    ("redirection disabled overrides the pod label", pod(labels=AMBIENT, annotations=DISABLED), namespace(), None,
     False, ANNOTATED_OUT),
    ("redirection enabled is not an opt-in", pod(annotations={"ambient.istio.io/redirection": "enabled"}),
     namespace(), None, False, NOT_LABELLED),
    ("no labels anywhere", pod(), namespace(), None, False, NOT_LABELLED),
    ("no labels and no Namespace object", pod(), None, None, False, NOT_LABELLED),
    ("another mode value is not ambient", pod(labels={DATAPLANE_MODE_LABEL: "sidecar"}), namespace(), None, False,
     NOT_LABELLED),
    ("label values are case-sensitive", pod(), namespace(labels={DATAPLANE_MODE_LABEL: "Ambient"}), None, False,
     NOT_LABELLED),
    ("namespace none enrols nothing", pod(), namespace(labels=NONE), None, False, NOT_LABELLED),
    ("hostNetwork never, even labelled", pod(labels=AMBIENT, host_network=True), namespace(labels=AMBIENT), None,
     False, "hostNetwork pod"),
    ("hostNetwork in an ambient namespace", pod(host_network=True), namespace(labels=AMBIENT), None, False,
     "hostNetwork pod"),
    ("unlabelled hostNetwork pod is just not labelled", pod(host_network=True), namespace(), None, False,
     NOT_LABELLED),
    ("hostNetwork false is an ordinary pod", pod(host_network=False), namespace(labels=AMBIENT), None, True, NS_APP),
    ("sidecar never", pod(annotations=SIDECAR), namespace(labels=AMBIENT), None, False, "pod has an Istio sidecar"),
    ("sidecar never, even pod-labelled", pod(labels=AMBIENT, annotations=SIDECAR), namespace(), None, False,
     "pod has an Istio sidecar"),
    ("kube-system excluded by default", pod(ns="kube-system", labels=AMBIENT), namespace("kube-system", AMBIENT),
     None, False, "namespace kube-system is excluded"),
    ("custom exclusion", pod(ns="infra"), namespace("infra", AMBIENT), ("infra",), False,
     "namespace infra is excluded"),
    ("custom exclusion replaces the default", pod(ns="kube-system"), namespace("kube-system", AMBIENT), ("infra",),
     True, "namespace kube-system labelled istio.io/dataplane-mode=ambient"),
    ("exclusion may be any container", pod(ns="infra"), namespace("infra", AMBIENT), frozenset({"infra"}), False,
     "namespace infra is excluded"),
    ("no exclusions at all", pod(ns="kube-system"), namespace("kube-system", AMBIENT), (), True,
     "namespace kube-system labelled istio.io/dataplane-mode=ambient"),
    ("pod without a namespace is in default", {"metadata": {"name": "p"}}, namespace("default", AMBIENT), None, True,
     "namespace default labelled istio.io/dataplane-mode=ambient"),
    ("malformed pod labels read as none", {"metadata": {"name": "p", "namespace": "app", "labels": "oops"}},
     namespace(labels=AMBIENT), None, True, NS_APP),
    ("malformed metadata reads as none", {"metadata": ["x"]}, namespace("default", AMBIENT), None, True,
     "namespace default labelled istio.io/dataplane-mode=ambient"),
    ("malformed spec is not hostNetwork", {**pod(), "spec": "junk"}, namespace(labels=AMBIENT), None, True, NS_APP),
    ("malformed namespace object", pod(), {"metadata": []}, None, False, NOT_LABELLED),
    ("hostNetwork must be true, not truthy", pod(host_network="yes"), namespace(labels=AMBIENT), None, True, NS_APP),
]


@pytest.mark.parametrize("desc, p, ns, excluded, enrolled, reason", CASES, ids=[c[0] for c in CASES])
def test_enrolment_rule(desc, p, ns, excluded, enrolled, reason):
    decision = decide(p, ns) if excluded is None else decide(p, ns, excluded)
    assert decision == EnrolmentDecision(enrolled, reason)


def test_decision_is_a_frozen_value():
    decision = decide(pod(), namespace(labels=AMBIENT))
    with pytest.raises(AttributeError):
        decision.enrolled = False
    assert decision == EnrolmentDecision(True, NS_APP)
    assert hash(decision) == hash(EnrolmentDecision(True, NS_APP))


def test_defaults():
    assert DEFAULT_EXCLUDED == ("kube-system",)
    assert pod_namespace({"metadata": {"namespace": ""}}) == "default"
    assert pod_namespace({"metadata": {"namespace": "x"}}) == "x"


def test_rule_imports_only_the_standard_library():
    # The CNI plugin imports the rule on every pod start: no third-party
    # module (and none of the agent's) may come with it.
    code = ("import sys; before = set(sys.modules); import agent.enrol.rule; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    ours = {m for m in loaded if m.split(".")[0] in ("agent", "cni")}
    assert ours == {"agent", "agent.enrol", "agent.enrol.rule"}
    stdlib = set(sys.stdlib_module_names)
    assert all(m.split(".")[0] in stdlib for m in loaded if m not in ours), loaded


def test_rule_imports_no_dataclasses_or_typing():
    """The CNI plugin imports the rule on every pod start: keep it cheap."""
    import subprocess
    import sys
    code = "import sys, agent.enrol.rule; print(sorted(m for m in ('dataclasses', 'inspect', 'typing') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=30,
                          cwd=__file__.rsplit("/tests/", 1)[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
