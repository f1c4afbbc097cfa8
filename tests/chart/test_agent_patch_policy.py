"""The ValidatingAdmissionPolicy that narrows the agent's `patch` on pods.

RBAC can grant `patch` on `pods` and no less; the chart's policy
(templates/agent-patch-policy.yaml) lets the agent's account change only the
`ambient.istio.io/redirection` annotation, to `enabled` or away, on pods of its
own node. Its CEL expressions, as helm renders them, are evaluated here with
cel-python (an independent implementation of the CEL spec; Kubernetes runs
cel-go with extra libraries, none of which the policy uses) over admission
requests shaped like the API server's. Not run against a real API server:
none runs on the development machines.
"""
from __future__ import annotations

import copy

import pytest

from tests.chart.test_chart import IMAGE, NAMESPACE, RELEASE, _docs, _helm, _set_args, CHART, helm_env  # noqa: F401

celpy = pytest.importorskip("celpy", reason="cel-python not installed (pyproject test extra)")

AGENT = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-ambient-agent"
KEY = "ambient.istio.io/redirection"
NODE_EXTRA = "authentication.kubernetes.io/node-name"


@pytest.fixture(scope="module")
def policy(helm_env):
    out = _helm(helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_set_args(IMAGE),
                "--show-only", "templates/agent-patch-policy.yaml").stdout
    docs = {d["kind"]: d for d in _docs(out)}
    binding = docs["ValidatingAdmissionPolicyBinding"]
    vap = docs["ValidatingAdmissionPolicy"]
    assert binding["spec"]["policyName"] == vap["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert vap["spec"]["failurePolicy"] == "Fail"
    (rule,) = vap["spec"]["matchConstraints"]["resourceRules"]
    assert rule == {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods"]}
    return vap["spec"]


def _program(expr: str):
    env = celpy.Environment()
    return env.program(env.compile(expr))


def _run(spec: dict, old: dict, new: dict, user: str = AGENT, node: str | None = "node-1") -> tuple[bool, list[str]]:
    """(policy applies, messages of the validations that fail)."""
    extra = {NODE_EXTRA: [node]} if node else {}
    request = {"userInfo": {"username": user, **({"extra": extra} if extra else {})}, "operation": "UPDATE"}
    act = {"object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old),
           "request": celpy.json_to_cel(request)}
    if not all(bool(_program(c["expression"]).evaluate(act)) for c in spec["matchConditions"]):
        return False, []
    failed = []
    for v in spec["validations"]:
        result = _program(v["expression"]).evaluate(act)
        assert isinstance(result, celpy.celtypes.BoolType), (v["expression"], result)
        if not result:
            failed.append(v["message"])
    return True, failed


POD = {"metadata": {"name": "api", "namespace": "backend", "labels": {"app": "api"},
                    "annotations": {"kubectl.kubernetes.io/restartedAt": "x"},
                    "ownerReferences": [{"kind": "ReplicaSet", "name": "api-1"}]},
       "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "img"}]}}


def _with(pod: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(pod)
    d = out
    for k in path[:-1]:
        d = d.setdefault(k, {})
    if value is None:
        d.pop(path[-1], None)
    else:
        d[path[-1]] = value
    return out


ENABLED = _with(POD, ("metadata", "annotations", KEY), "enabled")


@pytest.mark.parametrize("old,new,allowed", [
    (POD, ENABLED, True),                                                          # mark captured
    (ENABLED, POD, True),                                                          # unmark (key removed)
    (_with(POD, ("metadata", "annotations", KEY), "disabled"), POD, True),          # remove any value
    (_with(POD, ("metadata", "annotations"), None), _with(POD, ("metadata", "annotations"), {KEY: "enabled"}),
     True),                                                                        # a pod with no annotations
    (ENABLED, ENABLED, True),                                                      # no-op
    (POD, _with(POD, ("metadata", "annotations", KEY), "disabled"), False),         # only `enabled` may be set
    (POD, _with(ENABLED, ("metadata", "annotations", "other"), "x"), False),        # another annotation added
    (POD, _with(ENABLED, ("metadata", "annotations", "kubectl.kubernetes.io/restartedAt"), None), False),
    (POD, _with(ENABLED, ("metadata", "labels", "istio.io/dataplane-mode"), "none"), False),   # a label
    (POD, _with(ENABLED, ("metadata", "labels"), None), False),                    # labels dropped
    (POD, _with(ENABLED, ("metadata", "finalizers"), ["x"]), False),
    (POD, _with(ENABLED, ("metadata", "ownerReferences"), []), False),
    (POD, _with(ENABLED, ("spec", "containers"), [{"name": "c", "image": "evil"}]), False),     # the spec
])
def test_the_agent_may_change_only_the_redirection_annotation(policy, old, new, allowed):
    applies, failed = _run(policy, old, new)
    assert applies
    assert (not failed) is allowed, failed


def test_only_pods_of_the_agents_own_node(policy):
    assert _run(policy, POD, ENABLED, node="node-1") == (True, [])
    applies, failed = _run(policy, POD, ENABLED, node="node-2")
    assert applies and failed == ["the node agent may annotate only pods of its own node"]
    # A token without node information (not bound to a pod): the node check cannot apply.
    assert _run(policy, POD, ENABLED, node=None) == (True, [])


def test_other_users_are_not_matched(policy):
    evil = _with(POD, ("spec", "containers"), [{"name": "c", "image": "evil"}])
    assert _run(policy, POD, evil, user="system:serviceaccount:other:default") == (False, [])
    assert _run(policy, POD, evil, user=f"system:serviceaccount:{NAMESPACE}:{RELEASE}-ambient-agent-cni") \
        == (False, [])
    assert _run(policy, POD, evil)[1]                     # the same change by the agent is refused


def test_policy_can_be_switched_off(helm_env):
    out = _helm(helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                *_set_args({**IMAGE, "rbac.restrictAgentPatches": "false"})).stdout
    assert not [d for d in _docs(out) if d["kind"].startswith("ValidatingAdmissionPolicy")]
