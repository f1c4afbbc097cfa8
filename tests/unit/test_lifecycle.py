"""The node's pod lifecycle as a sans-IO state machine (agent/enrol/lifecycle.py).

Each case is a story: events in, the actions that come out, and what the
core then knows. The shell's answers to ``Capture``/``Keep``/``Release``
are given by the story (a namespace identity and cookie per path, or a
failure), as the node agent gives them after doing the I/O. No root, no
sockets: the same decisions the lab tests check end to end
(tests/lab/test_enrolment.py, test_live_enrolment.py,
test_cni_add_hardening.py).
"""

from __future__ import annotations

import pytest

from agent.enrol import lifecycle as lc
from agent.enrol.discover import PodNetns
from agent.enrol.reconcile import Unrecorded
from agent.enrol.records import PodRecord
from agent.state.model import ClusterState

NODE = "n1"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
# Namespace identities (device, inode) and cookies the shell would read.
NETNS = {"/run/netns/a": ((4, 4026532001), 101), "/var/run/netns/a": ((4, 4026532001), 101),
         "/run/netns/b": ((4, 4026532002), 102)}


def pod(name="web", uid="u-1", labels=None, sa="web", ips=("198.18.1.5",), node=NODE, annotations=None):
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "mesh", "uid": uid, "labels": labels or {},
                                        "annotations": annotations or {}},
            "spec": {"nodeName": node, "serviceAccountName": sa},
            "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]}}


def state(*pods, ns_labels=AMBIENT):
    return ClusterState.from_items([{"kind": "Namespace", "metadata": {"name": "mesh", "labels": ns_labels}},
                                    *pods])


def add(uid="u-1", path="/run/netns/a", ips=("198.18.1.5",), name="web"):
    return lc.CniAddEvent("mesh", name, uid, "c-" + uid, path, ips, ("198.18.1.1",), NETNS[path][0])


def record(name="web", uid="u-1", path="/run/netns/a", enrolled=True, cookie=101, sa="web"):
    return PodRecord(namespace="mesh", name=name, uid=uid, container_id="c", netns=path, ips=["198.18.1.5"],
                     gateways=["198.18.1.1"], enrolled=enrolled, netns_cookie=cookie if enrolled else 0,
                     service_account=sa)


class Shell:
    """Carries out actions as the node agent would, with I/O outcomes given by the story."""

    def __init__(self, core: lc.PodLifecycle, fail: dict[str, str] | None = None) -> None:
        self.core = core
        self.fail = fail or {}         # namespace path -> capture error
        self.log: list[tuple] = []

    def feed(self, event) -> list[tuple]:
        out: list[tuple] = []
        pending = list(self.core.handle(event))
        while pending:
            action = pending.pop(0)
            out.append(summary(action))
            if isinstance(action, lc.Capture):
                path = action.record.netns
                if path in self.fail:
                    result = lc.CaptureResult(action, False, error=self.fail[path])
                else:
                    result = lc.CaptureResult(action, True, NETNS[path][0], NETNS[path][1])
                pending[:0] = self.core.handle(result)
            elif isinstance(action, lc.Keep):
                pending[:0] = self.core.handle(lc.KeepResult(action, True))
            elif isinstance(action, lc.Release):
                pending[:0] = self.core.handle(lc.ReleaseDone(action.record.key))
        self.log += out
        return out


def summary(action) -> tuple:
    """An action as a short, comparable tuple."""
    if isinstance(action, lc.Capture):
        return ("capture", action.record.key, action.record.netns, action.cause.value, action.moves)
    if isinstance(action, lc.Keep):
        return ("keep", action.record.key, action.record.uid, "new proxy" if action.new_proxy else "same proxy")
    if isinstance(action, lc.Release):
        return ("release", action.record.key, action.record.netns)
    if isinstance(action, lc.SaveRecord):
        return ("save", action.record.key, action.record.uid, action.record.enrolled)
    if isinstance(action, lc.RemoveRecord):
        return ("remove", action.record.key, action.record.uid)
    if isinstance(action, lc.Annotate):
        return ("annotate", f"{action.namespace}/{action.name}", action.value)
    if isinstance(action, lc.RevalidateConnections):
        return ("revalidate",)
    if isinstance(action, lc.ReportProblem):
        return ("problem", action.key, action.problem)
    if isinstance(action, lc.ClearProblem):
        return ("clear", action.key)
    if isinstance(action, lc.Reply):
        return ("reply", action.as_dict())
    raise AssertionError(f"unexpected action {action!r}")


def core_with(st: ClusterState) -> tuple[lc.PodLifecycle, Shell]:
    core = lc.PodLifecycle(node=NODE)
    shell = Shell(core)
    assert shell.feed(lc.StateChanged(st)) == [("revalidate",)]
    return core, shell


AMBIENT_REASON = "namespace mesh labelled istio.io/dataplane-mode=ambient"
ENROLLED_REPLY = ("reply", {"ok": True, "enrolled": True, "reason": AMBIENT_REASON})


def test_first_add_captures_saves_and_answers():
    core, shell = core_with(state(pod()))
    assert core.refusal("mesh", "web", "u-1") is None
    assert shell.feed(add()) == [("capture", "mesh/web", "/run/netns/a", "cni-add", False),
                                 ("save", "mesh/web", "u-1", True), ENROLLED_REPLY]
    assert core.known["mesh/web"].netns_cookie == 101 and core.is_captured("mesh/web")
    assert core.identity(core.known["mesh/web"]) == "spiffe://cluster.local/ns/mesh/sa/web"


# A pod already captured in /run/netns/a gets a second CNI ADD.
@pytest.mark.parametrize("second, pods, expected, captured_in", [
    # The same sandbox again (or by its other path): the listeners and the proxy stay.
    pytest.param(add(), [pod()], [("keep", "mesh/web", "u-1", "same proxy")], (4, 4026532001),
                 id="repeated ADD"),
    pytest.param(add(path="/var/run/netns/a"), [pod()], [("keep", "mesh/web", "u-1", "same proxy")],
                 (4, 4026532001), id="repeated ADD by another path"),
    # A new pod (uid) in the same sandbox: same listeners, a new proxy.
    pytest.param(add(uid="u-2"), [pod(uid="u-2")], [("keep", "mesh/web", "u-2", "new proxy")], (4, 4026532001),
                 id="new uid"),
    # New addresses: re-steered, new proxy.
    pytest.param(add(ips=("198.18.1.6",)), [pod(ips=("198.18.1.6",))], [("keep", "mesh/web", "u-1", "new proxy")],
                 (4, 4026532001), id="new address"),
    # A new sandbox: captured there first; the shell retires the old capture after.
    pytest.param(add(path="/run/netns/b"), [pod()], [("capture", "mesh/web", "/run/netns/b", "cni-add", True)],
                 (4, 4026532002), id="new netns"),
])
def test_repeated_add(second, pods, expected, captured_in):
    core, shell = core_with(state(pod()))
    shell.feed(add())
    shell.feed(lc.StateChanged(state(*pods)))
    out = shell.feed(second)
    assert out[:-2] == expected
    assert out[-2] == ("save", "mesh/web", second.uid, True) and out[-1] == ENROLLED_REPLY
    assert core.captured["mesh/web"].netns == captured_in
    assert core.known["mesh/web"].netns == second.netns_path


def test_new_netns_whose_capture_fails_keeps_the_old_capture():
    core, shell = core_with(state(pod()))
    shell.feed(add())
    shell.fail["/run/netns/b"] = "listen: address in use"
    assert shell.feed(add(path="/run/netns/b")) == [
        ("capture", "mesh/web", "/run/netns/b", "cni-add", True),
        ("reply", {"ok": False, "error": "pod mesh/web: capture failed: listen: address in use"})]
    assert core.known["mesh/web"].netns == "/run/netns/a" and core.captured["mesh/web"].netns == (4, 4026532001)


def test_first_capture_failing_is_remembered_for_the_node_check():
    core, shell = core_with(state(pod()))
    shell.fail["/run/netns/a"] = "no such device"
    assert shell.feed(add())[-1] == ("reply", {"ok": False, "error": "pod mesh/web: capture failed: no such device"})
    assert not core.is_captured("mesh/web") and not core.known["mesh/web"].enrolled
    assert [(c.record.key, c.enrol) for c in core.plan()] == [("mesh/web", True)]


@pytest.mark.parametrize("st, expected", [
    pytest.param(state(), ("reply", {"ok": False, "error": "pod mesh/web (uid u-1) is not in the cluster state yet"}),
                 id="unknown to the state"),
    pytest.param(state(pod(uid="u-9")),
                 ("reply", {"ok": False, "error": "pod mesh/web (uid u-1) is not in the cluster state yet"}),
                 id="another pod of that name"),
])
def test_add_before_the_state_knows_the_pod_changes_nothing(st, expected):
    core, shell = core_with(st)
    assert summary(core.refusal("mesh", "web", "u-1")) == expected
    assert shell.feed(add()) == [expected]
    assert core.known == {} and core.captured == {}


def test_add_of_a_pod_the_rule_does_not_enrol_is_recorded():
    core, shell = core_with(state(pod(), ns_labels={}))
    out = shell.feed(add())
    assert out[0] == ("save", "mesh/web", "u-1", False) and out[1][1]["enrolled"] is False
    assert not core.is_captured("mesh/web")


def test_add_that_no_longer_enrols_a_captured_pod_releases_it():
    core, shell = core_with(state(pod()))
    shell.feed(add())
    shell.feed(lc.StateChanged(state(pod(labels={"istio.io/dataplane-mode": "none"}))))
    out = shell.feed(add())
    assert out[:2] == [("release", "mesh/web", "/run/netns/a"), ("save", "mesh/web", "u-1", False)]
    assert out[2][1]["enrolled"] is False and not core.is_captured("mesh/web")


@pytest.mark.parametrize("event, expected, still_known", [
    pytest.param(lc.CniDelEvent("mesh", "other", "u-7"), [("reply", {"ok": True})], True, id="unknown pod"),
    pytest.param(lc.CniDelEvent("mesh", "web", "u-old"), [("reply", {"ok": True})], True, id="uid mismatch"),
    pytest.param(lc.CniDelEvent("mesh", "web", "u-1"),
                 [("release", "mesh/web", "/run/netns/a"), ("remove", "mesh/web", "u-1"), ("reply", {"ok": True})],
                 False, id="the pod"),
    pytest.param(lc.CniDelEvent("mesh", "web", ""),
                 [("release", "mesh/web", "/run/netns/a"), ("remove", "mesh/web", "u-1"), ("reply", {"ok": True})],
                 False, id="no uid given"),
])
def test_cni_del(event, expected, still_known):
    core, shell = core_with(state(pod()))
    shell.feed(add())
    assert shell.feed(event) == expected
    assert ("mesh/web" in core.known) is still_known
    assert core.is_captured("mesh/web") is still_known


def test_label_removed_releases_and_the_annotation_goes():
    core, shell = core_with(state(pod()))
    shell.feed(add())
    annotated = pod(annotations={"ambient.istio.io/redirection": "enabled"})
    shell.feed(lc.StateChanged(state(annotated)))
    assert core.annotations() == []
    opted_out = pod(labels={"istio.io/dataplane-mode": "none"}, annotations={"ambient.istio.io/redirection": "enabled"})
    assert shell.feed(lc.StateChanged(state(opted_out))) == [("revalidate",)]
    changes = core.plan()
    assert [(c.record.key, c.enrol) for c in changes] == [("mesh/web", False)]
    assert shell.feed(lc.PlannedChange(changes[0])) == [("release", "mesh/web", "/run/netns/a"),
                                                        ("save", "mesh/web", "u-1", False)]
    assert "opted out" in core.known["mesh/web"].reason
    assert [summary(a) for a in core.annotations()] == [("annotate", "mesh/web", None)]
    assert core.plan() == []


def test_label_added_captures_a_recorded_pod_and_annotates_it():
    core, shell = core_with(state(pod(), ns_labels={}))
    shell.feed(add())
    shell.feed(lc.StateChanged(state(pod())))
    (change,) = core.plan()
    assert shell.feed(lc.PlannedChange(change)) == [("capture", "mesh/web", "/run/netns/a", "reconcile", False),
                                                    ("save", "mesh/web", "u-1", True)]
    assert [summary(a) for a in core.annotations()] == [("annotate", "mesh/web", "enabled")]


def test_a_change_planned_before_a_cni_request_replaced_the_record_is_dropped():
    core, shell = core_with(state(pod(), ns_labels={}))
    shell.feed(add())
    shell.feed(lc.StateChanged(state(pod())))
    (change,) = core.plan()
    shell.feed(add())                   # the CNI ADD (now enrolling) wins
    assert shell.feed(lc.PlannedChange(change)) == []


def test_vanished_netns_releases_and_forgets():
    core, shell = core_with(state(pod()))
    shell.feed(add())
    rec = core.known["mesh/web"]
    assert shell.feed(lc.NetnsVanished("mesh/web", rec)) == [("release", "mesh/web", "/run/netns/a"),
                                                            ("remove", "mesh/web", "u-1")]
    assert core.known == {} and core.captured == {}
    assert shell.feed(lc.NetnsVanished("mesh/web", rec)) == []     # already gone


def test_release_drains_until_done():
    core = lc.PodLifecycle(node=NODE)
    core.handle(lc.StateChanged(state(pod())))
    (cap,) = core.handle(add())
    core.handle(lc.CaptureResult(cap, True, NETNS["/run/netns/a"][0], 101))
    assert core.draining == {}
    # Released by a label change, captured again, released by DEL: two drains at once.
    core.handle(lc.StateChanged(state(pod(labels={"istio.io/dataplane-mode": "none"}))))
    (change,) = core.plan()
    assert isinstance(core.handle(lc.PlannedChange(change))[0], lc.Release) and core.draining == {"mesh/web": 1}
    core.handle(lc.StateChanged(state(pod())))
    (again,) = core.handle(lc.PlannedChange(core.plan()[0]))
    core.handle(lc.CaptureResult(again, True, NETNS["/run/netns/a"][0], 101))
    assert core.draining == {"mesh/web": 1}        # the first drain goes on
    actions = core.handle(lc.CniDelEvent("mesh", "web", "u-1"))
    assert isinstance(actions[0], lc.Release) and core.draining == {"mesh/web": 2}
    core.handle(lc.ReleaseDone("mesh/web"))
    assert core.draining == {"mesh/web": 1}
    core.handle(lc.ReleaseDone("mesh/web"))
    assert core.draining == {}


def test_problem_kept_then_cleared():
    lost = pod(name="lost", uid="u-5", ips=("198.18.1.9",))
    core, shell = core_with(state(lost))
    (missing,) = core.unrecorded()
    assert missing == Unrecorded("mesh", "lost", "u-5", ("198.18.1.9",), AMBIENT_REASON)
    nowhere = "no network namespace on this node holds 198.18.1.9"
    check = [lc.CheckStarted(), lc.ScanResult(missing, None), lc.CheckFinished()]
    assert [a for e in check for a in shell.feed(e)] == [("problem", "mesh/lost", nowhere)]
    # The same problem on the next check: kept, not reported again.
    assert [a for e in check for a in shell.feed(e)] == []
    assert core.problems == {"mesh/lost": nowhere}
    # Found now: captured (a record is made) and the problem clears.
    found = PodNetns("/run/netns/b", ["198.18.1.9"], ["198.18.1.1"])
    out = [a for e in (lc.CheckStarted(), lc.ScanResult(missing, found), lc.CheckFinished()) for a in shell.feed(e)]
    assert out == [("capture", "mesh/lost", "/run/netns/b", "adopt", False), ("save", "mesh/lost", "u-5", True),
                   ("clear", "mesh/lost")]
    assert core.problems == {} and core.unrecorded() == []


@pytest.mark.parametrize("found, fail, problem", [
    pytest.param("IP 198.18.1.9 is held by 2 network namespaces: /run/netns/a, /run/netns/b", None,
                 "IP 198.18.1.9 is held by 2 network namespaces: /run/netns/a, /run/netns/b", id="ambiguous"),
    pytest.param(PodNetns("/run/netns/b", ["198.18.1.9"], []), "EPERM",
                 "capture of the running pod failed: EPERM", id="capture failed"),
])
def test_problems_of_a_running_pod(found, fail, problem):
    core, shell = core_with(state(pod(name="lost", uid="u-5", ips=("198.18.1.9",))))
    if fail:
        shell.fail["/run/netns/b"] = fail
    (missing,) = core.unrecorded()
    out = [a for e in (lc.CheckStarted(), lc.ScanResult(missing, found), lc.CheckFinished()) for a in shell.feed(e)]
    assert out[-1] == ("problem", "mesh/lost", problem)
    if fail:          # the record is saved: the next check's plan retries the capture
        assert ("save", "mesh/lost", "u-5", False) in out and core.plan()[0].enrol


def test_damaged_capture_and_failed_reconcile_are_problems_for_one_check():
    core, shell = core_with(state(pod(), ns_labels={}))
    shell.feed(add())
    shell.feed(lc.StateChanged(state(pod())))
    shell.fail["/run/netns/a"] = "ENOMEM"
    (change,) = core.plan()
    out = [a for e in (lc.CheckStarted(), lc.PlannedChange(change), lc.CaptureDamaged("mesh/x", "pins gone"),
                       lc.CheckFinished()) for a in shell.feed(e)]
    assert out[1:] == [("problem", "mesh/web", "capture failed: ENOMEM"), ("problem", "mesh/x", "pins gone")]
    assert [a for e in (lc.CheckStarted(), lc.CheckFinished()) for a in shell.feed(e)] == [
        ("clear", "mesh/web"), ("clear", "mesh/x")]


def test_scan_of_a_pod_replacing_an_older_one_of_the_same_name():
    core, shell = core_with(state(pod()))
    shell.feed(add())
    shell.feed(lc.StateChanged(state(pod(uid="u-2"))))
    (missing,) = core.unrecorded()
    out = shell.feed(lc.ScanResult(missing, PodNetns("/run/netns/b", ["198.18.1.5"], ["198.18.1.1"])))
    assert out == [("release", "mesh/web", "/run/netns/a"), ("remove", "mesh/web", "u-1"),
                   ("capture", "mesh/web", "/run/netns/b", "adopt", False), ("save", "mesh/web", "u-2", True)]
    # A CNI ADD of that very pod came while scanning: nothing to do.
    assert shell.feed(lc.ScanResult(missing, PodNetns("/run/netns/b", ["198.18.1.5"], []))) == []


def test_readoption_after_restart():
    recs = (record(), record(name="gone", uid="u-3", path="/run/netns/gone"),
            record(name="plain", uid="u-4", path="/run/netns/b", enrolled=False))
    core, shell = core_with(state(pod(sa="api"), pod(name="plain", uid="u-4", ips=("198.18.1.7",)), ns_labels={}))
    out = shell.feed(lc.Restarted(recs, frozenset({"/run/netns/a", "/run/netns/b"})))
    assert out == [("capture", "mesh/web", "/run/netns/a", "readopt", False), ("save", "mesh/web", "u-1", True),
                   ("release", "mesh/gone", "/run/netns/gone"), ("remove", "mesh/gone", "u-3")]
    assert sorted(core.known) == ["mesh/plain", "mesh/web"] and list(core.captured) == ["mesh/web"]
    # The service account in the state wins over the record's.
    assert core.identity(core.known["mesh/web"]) == "spiffe://cluster.local/ns/mesh/sa/api"
    assert core.live_cookies() == {101}
    # The state (no ambient label now) releases it at the next check.
    assert [(c.record.key, c.enrol) for c in core.plan()] == [("mesh/web", False)]


def test_failed_readoption_is_logged_not_retried_by_the_plan():
    core, shell = core_with(state(pod()))
    shell.fail["/run/netns/a"] = "EBUSY"
    assert shell.feed(lc.Restarted((record(),), frozenset({"/run/netns/a"}))) == [
        ("capture", "mesh/web", "/run/netns/a", "readopt", False)]
    assert "mesh/web" in core.known and not core.is_captured("mesh/web")


def test_every_state_change_revalidates_open_connections():
    core = lc.PodLifecycle(node=NODE)
    assert not core.synced
    for st in (state(), state(pod()), state()):
        assert [summary(a) for a in core.handle(lc.StateChanged(st))] == [("revalidate",)]
        assert core.state is st and core.synced
    # A source that returns the version it already gave (its cached load): nothing changed.
    assert core.handle(lc.StateChanged(st)) == []


def test_unknown_event_is_refused():
    with pytest.raises(TypeError):
        lc.PodLifecycle(node=NODE).handle(object())   # type: ignore[arg-type]
