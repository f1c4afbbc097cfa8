"""The kube state source (agent/state/kube.py) against the stand-in API server.

The official client talks HTTP to lab/kubeapi/server.py; the tests change
the cluster, break watches, compact history and remove CRDs, and check what
the ClusterState the agent would use looks like afterwards.
"""

import asyncio
import socket
import time

import pytest

from agent.state.kube import KubeError, KubeStateSource
from agent.state.model import StateError
from agent.state.source import open_state_source
from lab.kubeapi import objects
from lab.kubeapi.server import KubeApiServer

FAST = dict(watch_timeout=5, backoff_min=0.05, backoff_max=0.5, crd_retry_interval=0.5,
            sync_timeout=10, coalesce=0.02)


@pytest.fixture
def source_for(kubeconfig):
    made = []

    def make(**options):
        src = KubeStateSource(kubeconfig, **{**FAST, **options})
        made.append(src)
        return src

    yield make
    for src in made:
        src.close()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def populate(api):
    api.create(objects.namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    api.create(objects.namespace("istio-system"))
    api.create(objects.node("node-a"))
    web = objects.pod("web-0", "shop", ip="10.244.0.5", labels={"app": "web"})
    web["metadata"]["managedFields"] = [{"manager": "kubelet", "operation": "Update",
                                         "fieldsV1": {"f:status": {}}}]
    web["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{...}",
                                      "keep": "me"}
    web["status"]["containerStatuses"] = [{"name": "app", "ready": True, "restartCount": 0,
                                           "image": "registry.example/app:1.0"}]
    web["spec"]["containers"][0]["env"] = [{"name": "SECRET_FREE", "value": "x" * 100}]
    web["spec"]["volumes"] = [{"name": "token", "projected": {"sources": []}}]
    api.create(web)
    api.create(objects.pod("db-0", "shop", ip="10.244.0.6", node="node-b", labels={"app": "db"}))
    api.create(objects.service("web", "shop", cluster_ip="10.96.0.10"))
    api.create(objects.endpointslice("web-abc", "shop", "web", ["10.244.0.5"]))
    api.create(objects.authorization_policy("allow-web", "shop", principals=["cluster.local/ns/shop/sa/x"]))
    api.create(objects.peer_authentication("default", "istio-system"))


def test_initial_sync_builds_the_cluster_state(kubeapi, source_for):
    populate(kubeapi)
    src = source_for()
    state = src.load()
    assert src.synced
    assert set(state.pods) == {("shop", "web-0"), ("shop", "db-0")}
    assert set(state.namespaces) == {"shop", "istio-system"}
    assert state.namespace("shop")["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    assert state.service("shop", "web")["spec"]["clusterIP"] == "10.96.0.10"
    assert state.nodes == {}        # not watched by default (nobody reads them, RBAC)
    assert state.pod_by_ip("10.244.0.6")["metadata"]["name"] == "db-0"
    assert [s["metadata"]["name"] for s in state.objects_of_kind("EndpointSlice", "discovery.k8s.io")] \
        == ["web-abc"]
    [policy] = state.objects_of_kind("AuthorizationPolicy", "security.istio.io")
    assert policy["apiVersion"] == "security.istio.io/v1" and policy["spec"]["action"] == "ALLOW"
    assert state.objects_of_kind("PeerAuthentication", "security.istio.io")[0]["spec"]["mtls"]["mode"] \
        == "STRICT"
    assert state.resource_version == str(kubeapi.resource_version)
    assert not state.errors
    # List items come without kind/apiVersion; the source fills them in.
    web = state.pod("shop", "web-0")
    assert (web["kind"], web["apiVersion"]) == ("Pod", "v1")
    # Trimmed: what nobody reads is gone, what routing and identity read stays.
    assert "managedFields" not in web["metadata"]
    assert web["metadata"]["annotations"] == {"keep": "me"}
    assert set(web["status"]) == {"phase", "podIP", "podIPs", "hostIP", "conditions"}
    assert web["spec"]["containers"] == [{"name": "app", "ports": [{"containerPort": 8080,
                                                                    "protocol": "TCP"}]}]
    assert "volumes" not in web["spec"] and web["spec"]["nodeName"] == "node-a"
    status = src.sync_status()
    assert status["synced"] and status["kinds"]["pods"]["objects"] == 2
    assert status["kinds"]["authorizationpolicies"]["served_version"] == "v1"


def test_changes_reach_watchers_coalesced(kubeapi, source_for):
    populate(kubeapi)
    src = source_for()
    src.load()
    seen = []

    async def run():
        task = asyncio.ensure_future(src.watch(seen.append))
        await asyncio.sleep(0.2)
        assert seen == [], "the state load() returned must not be reported again"
        for i in range(200):
            kubeapi.create(objects.pod(f"burst-{i}", "shop", ip=f"10.244.1.{i}"))
        kubeapi.patch("Pod", "shop", "web-0", {"metadata": {"labels": {"version": "v2"}}})
        kubeapi.delete("Pod", "shop", "db-0")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if seen and len(seen[-1].pods) == 201 and seen[-1].pod("shop", "db-0") is None:
                break
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(run())
    final = seen[-1]
    assert len(final.pods) == 201 and final.pod("shop", "db-0") is None
    assert final.pod("shop", "web-0")["metadata"]["labels"]["version"] == "v2"
    # 202 events, a handful of rebuilds (coalesced), not one per event.
    assert len(seen) < 40, len(seen)


@pytest.mark.parametrize("abrupt", [False, True])
def test_dropped_watch_reconnects_without_losing_events(kubeapi, source_for, abrupt):
    populate(kubeapi)
    src = source_for()
    src.load()
    kubeapi.drop_watches(abrupt=abrupt)
    kubeapi.create(objects.pod("after-drop", "shop", ip="10.244.0.9"))
    kubeapi.delete("Pod", "shop", "db-0")
    wait_for(lambda: src.load().pod("shop", "after-drop") and not src.load().pod("shop", "db-0"),
             what="events made while the watch was down")
    # Resumed from the last resourceVersion: no second list.
    assert len(kubeapi.requests_matching("/api/v1/pods", watch=False)) == 1
    assert len(kubeapi.requests_matching("/api/v1/pods", watch=True)) >= 2
    assert src.sync_status()["kinds"]["pods"]["relists"] == 0


def test_expired_version_relists_and_sees_deletes_made_in_the_gap(kubeapi, source_for):
    populate(kubeapi)
    src = source_for()
    src.load()
    kubeapi.refused["/api/v1/pods"] = 503          # the source cannot reconnect for a while
    kubeapi.drop_watches(abrupt=True)
    kubeapi.delete("Pod", "shop", "web-0")           # its DELETED event will be compacted away
    kubeapi.create(objects.pod("new-0", "shop", ip="10.244.0.7"))
    kubeapi.compact()
    wait_for(lambda: src.sync_status()["kinds"]["pods"]["errors"] >= 1, what="a refused reconnect")
    assert src.load().pod("shop", "web-0") is not None      # stale until the relist, as expected
    del kubeapi.refused["/api/v1/pods"]
    wait_for(lambda: src.load().pod("shop", "new-0") is not None, what="the relist")
    state = src.load()
    assert state.pod("shop", "web-0") is None and state.pod("shop", "db-0") is not None
    status = src.sync_status()["kinds"]["pods"]
    assert status["relists"] == 1 and status["lists"] == 2
    assert src.synced and status["last_error"] == ""


def test_absent_istio_crds_sync_without_policies_and_are_picked_up_later(kubeapi, source_for):
    populate(kubeapi)
    kubeapi.set_crds_present(False)
    src = source_for()
    state = src.load()
    assert src.synced and state.objects_of_kind("AuthorizationPolicy") == []
    kinds = src.sync_status()["kinds"]
    for name in ("authorizationpolicies", "peerauthentications"):
        assert kinds[name]["absent"] and kinds[name]["synced"] and kinds[name]["errors"] == 0
    # Installed later: found on the next slow retry.
    kubeapi.set_crds_present(True)
    wait_for(lambda: src.load().objects_of_kind("AuthorizationPolicy"), what="the CRD to be found")
    assert not src.sync_status()["kinds"]["authorizationpolicies"]["absent"]


def test_v1beta1_only_is_used(kubeapi, source_for):
    populate(kubeapi)
    kubeapi.set_istio_versions({"v1beta1"})
    src = source_for()
    [policy] = src.load().objects_of_kind("AuthorizationPolicy", "security.istio.io")
    assert policy["apiVersion"] == "security.istio.io/v1beta1"
    assert src.sync_status()["kinds"]["authorizationpolicies"]["served_version"] == "v1beta1"
    kubeapi.create(objects.authorization_policy("deny-db", "shop", version="v1beta1", action="DENY"))
    wait_for(lambda: len(src.load().objects_of_kind("AuthorizationPolicy")) == 2, what="a v1beta1 event")


def test_crd_removed_while_watched_empties_the_kind(kubeapi, source_for):
    populate(kubeapi)
    src = source_for()
    assert src.load().objects_of_kind("PeerAuthentication")
    kubeapi.set_crds_present(False)
    wait_for(lambda: not src.load().objects_of_kind("PeerAuthentication"), what="the CRD removal")
    assert src.synced


def test_annotate_pod_round_trip(kubeapi, source_for):
    populate(kubeapi)
    src = source_for()
    src.load()
    patched = src.annotate_pod("shop", "web-0", {"ambient.istio.io/redirection": "enabled"})
    assert patched["metadata"]["annotations"]["ambient.istio.io/redirection"] == "enabled"
    assert kubeapi.get("Pod", "shop", "web-0")["metadata"]["annotations"]["ambient.istio.io/redirection"] \
        == "enabled"
    wait_for(lambda: (src.load().pod("shop", "web-0")["metadata"].get("annotations") or {})
             .get("ambient.istio.io/redirection") == "enabled", what="the annotation in the state")
    src.annotate_pod("shop", "web-0", {"ambient.istio.io/redirection": None})
    assert "ambient.istio.io/redirection" not in kubeapi.get("Pod", "shop", "web-0")["metadata"]["annotations"]
    assert len(kubeapi.requests_matching("/api/v1/namespaces/shop/pods/web-0", method="PATCH")) == 2
    with pytest.raises(KubeError, match="annotate pod shop/missing.*404.*not found"):
        src.annotate_pod("shop", "missing", {"a": "b"})
    with pytest.raises(ValueError, match="must be strings"):
        src.annotate_pod("shop", "web-0", {"a": 1})
    # From the event loop, without blocking it.
    asyncio.run(src.annotate_pod_async("shop", "web-0", {"ambient.istio.io/redirection": "enabled"}))
    assert kubeapi.get("Pod", "shop", "web-0")["metadata"]["annotations"]["ambient.istio.io/redirection"] \
        == "enabled"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_backs_off_and_recovers(tmp_path):
    port = _free_port()
    later = KubeApiServer(port=port)
    path = str(tmp_path / "kubeconfig")
    # The kubeconfig of a server that is not running yet.
    later._server = type("NotYet", (), {"server_address": ("127.0.0.1", port)})()
    later.kubeconfig(path)
    later._server = None
    src = KubeStateSource(path, **{**FAST, "sync_timeout": 1.0})
    try:
        with pytest.raises(StateError, match="not synced after 1 s.*connection refused"):
            src.load()
        assert not src.synced
        with pytest.raises(StateError, match="not synced yet"):
            src.load()      # later loads do not block
        errors = src.sync_status()["kinds"]["pods"]["errors"]
        assert 2 <= errors <= 12, f"{errors} attempts in about a second: no backoff?"
        with later:
            populate(later)
            assert src.wait_synced(10)
            assert ("shop", "web-0") in src.load().pods
    finally:
        src.close()


def test_wrong_token_is_an_error_not_a_sync(kubeapi, tmp_path):
    path = kubeapi.kubeconfig(tmp_path / "bad", token="not-the-token")
    src = KubeStateSource(path, **{**FAST, "sync_timeout": 0.5})
    try:
        with pytest.raises(StateError, match="401"):
            src.load()
    finally:
        src.close()


def test_large_lists_are_paged(kubeapi, source_for):
    for i in range(25):
        kubeapi.create(objects.pod(f"p{i}", ip=f"10.244.2.{i}"))
    src = source_for(page_size=10)
    assert len(src.load().pods) == 25
    pages = kubeapi.requests_matching("/api/v1/pods", watch=False)
    assert len(pages) == 3 and "continue" in pages[-1].query


def test_open_state_source_kube_url(kubeapi, kubeconfig):
    populate(kubeapi)
    src = open_state_source(f"kube:{kubeconfig}", **FAST)
    try:
        assert isinstance(src, KubeStateSource)
        assert len(src.load().pods) == 2
    finally:
        src.close()
    src = open_state_source("kube", kubeconfig=kubeconfig, **FAST)
    try:
        assert len(src.load().pods) == 2
    finally:
        src.close()


def test_watch_started_before_sync_reports_the_first_state(kubeapi, source_for):
    populate(kubeapi)
    kubeapi.set_crds_present(False)     # the last kinds to sync are the absent ones
    src = source_for()
    seen = []

    async def run():
        task = asyncio.ensure_future(src.watch(seen.append))
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(run())
    assert seen and len(seen[0].pods) == 2 and src.synced


def test_a_malformed_object_is_skipped_not_fatal(kubeapi, source_for):
    populate(kubeapi)
    bad = objects.pod("bad-0", "shop", ip="10.244.0.99")
    bad["metadata"]["labels"] = ["not", "a", "map"]
    kubeapi.create(bad)
    src = source_for()
    state = src.load()
    assert state.pod("shop", "bad-0") is None and state.pod("shop", "web-0") is not None
    assert any("bad-0" in e and "labels" in e for e in state.errors)
    kubeapi.create(objects.pod("later", "shop", ip="10.244.0.50"))
    wait_for(lambda: src.load().pod("shop", "later"), what="events after a bad object")


def test_source_over_https(tmp_path):
    with KubeApiServer(tls=True) as api:
        populate(api)
        src = KubeStateSource(api.kubeconfig(tmp_path / "kc"), **FAST)
        try:
            assert len(src.load().pods) == 2
            api.create(objects.pod("tls-1", "shop", ip="10.244.0.60"))
            wait_for(lambda: src.load().pod("shop", "tls-1"), what="an event over HTTPS")
        finally:
            src.close()


def test_http_410_on_a_watch_request_relists(kubeapi, source_for):
    populate(kubeapi)
    src = source_for()
    src.load()
    kubeapi.fail_next.append(("/api/v1/pods", 410))     # the re-watch is refused with 410
    kubeapi.drop_watches()
    wait_for(lambda: src.sync_status()["kinds"]["pods"]["lists"] == 2, what="a relist")
    status = src.sync_status()["kinds"]["pods"]
    assert status["relists"] == 1 and status["errors"] == 0
    kubeapi.create(objects.pod("after", "shop", ip="10.244.0.70"))
    wait_for(lambda: src.load().pod("shop", "after"), what="events after the relist")


def test_nodes_on_request_and_a_forbidden_kind_is_never_synced(kubeapi, source_for):
    populate(kubeapi)
    src = source_for(kinds=("pods", "nodes"))
    assert src.load().node("node-a")["status"]["addresses"][0]["address"] == "172.18.0.2"
    assert not kubeapi.requests_matching("/api/v1/namespaces")
    kubeapi.refused["/api/v1/nodes"] = 403
    forbidden = source_for(kinds=("pods", "nodes"), sync_timeout=0.5)
    with pytest.raises(StateError, match="nodes: HTTP 403"):
        forbidden.load()
    with pytest.raises(ValueError, match="unknown kind 'secrets'"):
        source_for(kinds=("secrets",))


def test_ca_kinds_watch_only_pods(kubeapi, source_for):
    populate(kubeapi)
    src = source_for(kinds=("pods",))
    assert len(src.load().pods) == 2 and src.load().namespaces == {}
    watched = {r.path for r in kubeapi.requests}
    assert watched == {"/api/v1/pods"}
