"""The stand-in API server, driven by the official client the agent uses.

These pin that the server behaves as the client (and a real API server)
expects, so the kube state source's tests exercise real protocol paths.
"""

import threading
import time

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.kubeapi import objects
from tests.kubeapi.server import KubeApiServer, parse_label_selector


def _watch_events(func, *args, **kwargs):
    """All events of one watch call that ends by itself (timeout or drop)."""
    return [(e["type"], e["raw_object"]) for e in watch.Watch().stream(func, *args, **kwargs)]


def test_list_all_namespaces_and_one_namespace(kubeapi, api_client):
    kubeapi.create(objects.pod("a", "ns1", ip="10.244.0.1"))
    kubeapi.create(objects.pod("b", "ns2", ip="10.244.0.2"))
    v1 = client.CoreV1Api(api_client)
    everything = v1.list_pod_for_all_namespaces()
    assert sorted(p.metadata.name for p in everything.items) == ["a", "b"]
    assert everything.metadata.resource_version == str(kubeapi.resource_version)
    assert [p.status.pod_ip for p in v1.list_namespaced_pod("ns2").items] == ["10.244.0.2"]
    one = v1.read_namespaced_pod("a", "ns1")
    assert one.metadata.uid and one.metadata.creation_timestamp and one.kind == "Pod"


def test_raw_list_items_have_no_kind_like_a_real_server(kubeapi, api_client):
    import json
    kubeapi.create(objects.pod("a"))
    resp = client.CoreV1Api(api_client).list_pod_for_all_namespaces(_preload_content=False)
    body = json.loads(resp.data)
    assert body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert "kind" not in body["items"][0] and body["items"][0]["metadata"]["name"] == "a"


def test_resource_versions_increase_per_write(kubeapi):
    a = kubeapi.create(objects.pod("a"))
    b = kubeapi.create(objects.pod("b"))
    c = kubeapi.patch("Pod", "default", "a", {"metadata": {"labels": {"x": "1"}}})
    assert int(a["metadata"]["resourceVersion"]) < int(b["metadata"]["resourceVersion"]) \
        < int(c["metadata"]["resourceVersion"])


@pytest.mark.parametrize("selector, expected", [
    ("app=web", ["w1", "w2"]),
    ("app==web", ["w1", "w2"]),
    ("app!=web", ["db", "plain"]),
    ("app in (web, db)", ["db", "w1", "w2"]),
    ("app notin (web)", ["db", "plain"]),
    ("tier", ["w2"]),
    ("!tier", ["db", "plain", "w1"]),
    ("app=web,tier=front", ["w2"]),
])
def test_label_selectors(kubeapi, api_client, selector, expected):
    kubeapi.create(objects.pod("w1", labels={"app": "web"}))
    kubeapi.create(objects.pod("w2", labels={"app": "web", "tier": "front"}))
    kubeapi.create(objects.pod("db", labels={"app": "db"}))
    kubeapi.create(objects.pod("plain", labels={"other": "x"}))
    pods = client.CoreV1Api(api_client).list_pod_for_all_namespaces(label_selector=selector)
    assert sorted(p.metadata.name for p in pods.items) == expected


def test_field_selectors(kubeapi, api_client):
    kubeapi.create(objects.pod("a", "ns1", node="node-a"))
    kubeapi.create(objects.pod("b", "ns1", node="node-b"))
    kubeapi.create(objects.pod("c", "ns2", node="node-a"))
    v1 = client.CoreV1Api(api_client)
    names = lambda **kw: sorted(p.metadata.name for p in v1.list_pod_for_all_namespaces(**kw).items)
    assert names(field_selector="spec.nodeName=node-a") == ["a", "c"]
    assert names(field_selector="spec.nodeName!=node-a") == ["b"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.namespace=ns2,spec.nodeName=node-a") == ["c"]
    with pytest.raises(ApiException) as err:
        v1.list_pod_for_all_namespaces(field_selector="spec.bogus=1")
    assert err.value.status == 400


def test_bad_label_selector_is_400(kubeapi, api_client):
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(api_client).list_pod_for_all_namespaces(label_selector="a in x")
    assert err.value.status == 400


def test_limit_and_continue_page_a_snapshot(kubeapi, api_client):
    for i in range(5):
        kubeapi.create(objects.pod(f"p{i}"))
    v1 = client.CoreV1Api(api_client)
    first = v1.list_pod_for_all_namespaces(limit=2)
    assert [p.metadata.name for p in first.items] == ["p0", "p1"] and first.metadata._continue
    kubeapi.create(objects.pod("p9"))        # not in the snapshot the pages come from
    second = v1.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    third = v1.list_pod_for_all_namespaces(limit=2, _continue=second.metadata._continue)
    assert [p.metadata.name for p in second.items + third.items] == ["p2", "p3", "p4"]
    assert not third.metadata._continue
    assert second.metadata.resource_version == first.metadata.resource_version
    again = v1.list_pod_for_all_namespaces(limit=2)
    kubeapi.compact()
    with pytest.raises(ApiException) as err:
        v1.list_pod_for_all_namespaces(limit=2, _continue=again.metadata._continue)
    assert err.value.status == 410


def test_exact_list_of_a_compacted_version_is_410(kubeapi, api_client):
    kubeapi.create(objects.pod("a"))
    kubeapi.create(objects.pod("b"))
    kubeapi.compact()
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(api_client).list_pod_for_all_namespaces(resource_version="1",
                                                                 resource_version_match="Exact")
    assert err.value.status == 410


def test_watch_replays_history_after_resource_version(kubeapi, api_client):
    v1 = client.CoreV1Api(api_client)
    kubeapi.create(objects.pod("old"))
    rv = v1.list_pod_for_all_namespaces().metadata.resource_version
    kubeapi.create(objects.pod("a"))
    kubeapi.patch("Pod", "default", "a", {"metadata": {"labels": {"v": "2"}}})
    kubeapi.delete("Pod", "default", "old")
    kubeapi.create(objects.namespace("not-a-pod"))
    events = _watch_events(v1.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=1)
    assert [(t, o["metadata"]["name"]) for t, o in events] == [
        ("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "old")]
    assert all(o["kind"] == "Pod" and o["apiVersion"] == "v1" for _, o in events)
    versions = [int(o["metadata"]["resourceVersion"]) for _, o in events]
    assert versions == sorted(versions) and versions[0] > int(rv)


def test_watch_without_resource_version_starts_with_current_objects(kubeapi, api_client):
    kubeapi.create(objects.pod("a"))
    kubeapi.create(objects.pod("b", "other"))
    events = _watch_events(client.CoreV1Api(api_client).list_namespaced_pod, "default", timeout_seconds=1)
    assert [(t, o["metadata"]["name"]) for t, o in events] == [("ADDED", "a")]


def test_watch_streams_live_events_and_bookmarks(kubeapi, api_client):
    v1 = client.CoreV1Api(api_client)
    rv = v1.list_pod_for_all_namespaces().metadata.resource_version
    seen = []

    def consume():
        for e in watch.Watch().stream(v1.list_pod_for_all_namespaces, resource_version=rv,
                                      allow_watch_bookmarks=True, timeout_seconds=2, deserialize=False):
            seen.append((e["type"], e["object"]))

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.5)
    kubeapi.create(objects.pod("live"))
    t.join(5)
    assert not t.is_alive(), "the watch did not honour timeoutSeconds"
    types = [ty for ty, _ in seen]
    assert "ADDED" in types and types.count("BOOKMARK") >= 2
    bookmark = [o for ty, o in seen if ty == "BOOKMARK"][-1]
    assert bookmark["kind"] == "Pod" and int(bookmark["metadata"]["resourceVersion"]) >= kubeapi.resource_version
    assert not any(ty == "BOOKMARK" for ty, _ in _watch_events(v1.list_pod_for_all_namespaces,
                                                               resource_version=rv, timeout_seconds=1))


def test_watch_from_compacted_version_gets_410(kubeapi, api_client):
    v1 = client.CoreV1Api(api_client)
    kubeapi.create(objects.pod("a"))
    rv = v1.list_pod_for_all_namespaces().metadata.resource_version
    kubeapi.create(objects.pod("b"))
    kubeapi.compact()
    with pytest.raises(ApiException) as err:
        _watch_events(v1.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=1)
    assert err.value.status == 410 and "Expired" in err.value.reason
    # The version the compaction kept is still watchable.
    assert _watch_events(v1.list_pod_for_all_namespaces, resource_version=str(kubeapi.resource_version),
                         timeout_seconds=1) == []


def test_watch_with_selector_sees_objects_leave_and_enter(kubeapi, api_client):
    v1 = client.CoreV1Api(api_client)
    kubeapi.create(objects.pod("a", labels={"app": "web"}))
    rv = v1.list_pod_for_all_namespaces().metadata.resource_version
    kubeapi.patch("Pod", "default", "a", {"metadata": {"labels": {"app": "db"}}})
    kubeapi.patch("Pod", "default", "a", {"metadata": {"labels": {"app": "web"}}})
    events = _watch_events(v1.list_pod_for_all_namespaces, label_selector="app=web",
                           resource_version=rv, timeout_seconds=1)
    assert [t for t, _ in events] == ["DELETED", "ADDED"]


@pytest.mark.parametrize("abrupt", [False, True])
def test_drop_watches_ends_open_streams(kubeapi, api_client, abrupt):
    v1 = client.CoreV1Api(api_client)
    outcome = {}

    def consume():
        try:
            list(watch.Watch().stream(v1.list_pod_for_all_namespaces, resource_version="1",
                                      timeout_seconds=30))
            outcome["ended"] = "cleanly"
        except Exception as exc:     # urllib3's ProtocolError on a reset stream
            outcome["ended"] = type(exc).__name__

    kubeapi.create(objects.pod("a"))
    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.5)
    kubeapi.drop_watches(abrupt=abrupt)
    t.join(5)
    assert not t.is_alive()
    assert (outcome["ended"] == "cleanly") == (not abrupt)


def test_patch_merges_annotations_and_null_deletes(kubeapi, api_client):
    v1 = client.CoreV1Api(api_client)
    kubeapi.create(objects.pod("a", annotations={"keep": "1", "drop": "x"}))
    rv = v1.list_pod_for_all_namespaces().metadata.resource_version
    patched = v1.patch_namespaced_pod("a", "default", {"metadata": {"annotations": {
        "ambient.istio.io/redirection": "enabled", "drop": None}}})
    assert patched.metadata.annotations == {"keep": "1", "ambient.istio.io/redirection": "enabled"}
    # The same patch again changes nothing and keeps the version.
    again = v1.patch_namespaced_pod("a", "default", {"metadata": {"annotations": {"drop": None}}})
    assert again.metadata.resource_version == patched.metadata.resource_version
    events = _watch_events(v1.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=1)
    assert [t for t, _ in events] == ["MODIFIED"]
    assert events[0][1]["metadata"]["annotations"]["ambient.istio.io/redirection"] == "enabled"


def test_merge_patch_content_type_and_json_patch_refused(kubeapi, api_client):
    kubeapi.create(objects.pod("a"))
    v1 = client.CoreV1Api(api_client)
    merged = v1.patch_namespaced_pod("a", "default", {"metadata": {"labels": {"m": "1"}}},
                                     _content_type="application/merge-patch+json")
    assert merged.metadata.labels["m"] == "1"
    with pytest.raises(ApiException) as err:
        v1.patch_namespaced_pod("a", "default", [{"op": "add", "path": "/metadata/labels/j", "value": "1"}],
                                _content_type="application/json-patch+json")
    assert err.value.status == 415
    with pytest.raises(ApiException) as err:
        v1.patch_namespaced_pod("missing", "default", {"metadata": {"labels": {"m": "1"}}})
    assert err.value.status == 404


def test_requests_without_the_bearer_token_are_401(kubeapi, tmp_path):
    from kubernetes import config
    bad = config.new_client_from_config(config_file=kubeapi.kubeconfig(tmp_path / "bad", token="wrong"))
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(bad).list_namespace()
    assert err.value.status == 401
    bad.close()


def test_istio_resources_404_while_their_crd_is_absent(kubeapi, api_client):
    custom = client.CustomObjectsApi(api_client)
    kubeapi.create(objects.authorization_policy("allow", "ns1"))
    listed = custom.list_cluster_custom_object("security.istio.io", "v1", "authorizationpolicies")
    assert listed["kind"] == "AuthorizationPolicyList"
    assert listed["items"][0]["kind"] == "AuthorizationPolicy"       # custom resources keep kind
    beta = custom.list_cluster_custom_object("security.istio.io", "v1beta1", "authorizationpolicies")
    assert beta["items"][0]["apiVersion"] == "security.istio.io/v1beta1"
    kubeapi.set_istio_versions({"v1beta1"})
    with pytest.raises(ApiException) as err:
        custom.list_cluster_custom_object("security.istio.io", "v1", "peerauthentications")
    assert err.value.status == 404
    assert custom.list_namespaced_custom_object("security.istio.io", "v1beta1", "ns1",
                                                "authorizationpolicies")["items"]
    kubeapi.set_crds_present(False)
    with pytest.raises(ApiException) as err:
        custom.list_cluster_custom_object("security.istio.io", "v1beta1", "authorizationpolicies")
    assert err.value.status == 404


def test_custom_object_watch(kubeapi, api_client):
    custom = client.CustomObjectsApi(api_client)
    rv = custom.list_cluster_custom_object("security.istio.io", "v1", "peerauthentications")[
        "metadata"]["resourceVersion"]
    kubeapi.create(objects.peer_authentication("strict", "istio-system"))
    events = _watch_events(custom.list_cluster_custom_object, "security.istio.io", "v1",
                           "peerauthentications", resource_version=rv, timeout_seconds=1)
    assert [(t, o["metadata"]["name"], o["kind"]) for t, o in events] == [
        ("ADDED", "strict", "PeerAuthentication")]


def _review(api_client, token, audiences=None):
    spec = client.V1TokenReviewSpec(token=token, audiences=audiences)
    return client.AuthenticationV1Api(api_client).create_token_review(client.V1TokenReview(spec=spec)).status


def test_token_review(kubeapi, api_client):
    kubeapi.add_pod_token("pod-token", "ns1", "sa1", "web-0", "uid-123", node_name="node-a",
                          audiences=["istio-ca"])
    ok = _review(api_client, "pod-token", ["istio-ca"])
    assert ok.authenticated and ok.audiences == ["istio-ca"] and not ok.error
    assert ok.user.username == "system:serviceaccount:ns1:sa1"
    assert "system:serviceaccounts:ns1" in ok.user.groups
    assert ok.user.extra["authentication.kubernetes.io/pod-name"] == ["web-0"]
    assert ok.user.extra["authentication.kubernetes.io/pod-uid"] == ["uid-123"]
    assert ok.user.extra["authentication.kubernetes.io/node-name"] == ["node-a"]

    wrong_audience = _review(api_client, "pod-token", ["something-else"])
    assert not wrong_audience.authenticated and "audiences" in wrong_audience.error
    # No audiences asked for: the API server's own ones apply, which this token lacks.
    assert not _review(api_client, "pod-token").authenticated
    unknown = _review(api_client, "nope", ["istio-ca"])
    assert not unknown.authenticated and "invalid bearer token" in unknown.error


def test_token_with_default_audiences(kubeapi, api_client):
    kubeapi.add_token("t", "alice", uid="u1", groups=["devs"])
    review = _review(api_client, "t")
    assert review.authenticated and review.user.username == "alice"
    assert review.audiences == kubeapi.api_audiences


def test_requests_are_recorded(kubeapi, api_client):
    v1 = client.CoreV1Api(api_client)
    v1.list_pod_for_all_namespaces()
    _watch_events(v1.list_pod_for_all_namespaces, resource_version="0", timeout_seconds=1)
    lists = kubeapi.requests_matching("/api/v1/pods", watch=False)
    watches = kubeapi.requests_matching("/api/v1/pods", watch=True)
    assert len(lists) == 1 and len(watches) == 1
    assert watches[0].query["timeoutSeconds"] == "1"


def test_injected_failure(kubeapi, api_client):
    kubeapi.fail_next.append(("/api/v1/namespaces", 500))
    v1 = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as err:
        v1.list_namespace()
    assert err.value.status == 500
    assert v1.list_namespace().items == []


@pytest.mark.parametrize("selector, labels, match", [
    ("", {}, True),
    ("a", {"a": ""}, True),
    ("a,b!=2", {"a": "1", "b": "3"}, True),
    ("a,b!=2", {"a": "1", "b": "2"}, False),
    ("a in (1, 2),c notin (x)", {"a": "2"}, True),
    ("a in (1,2)", {"a": "3"}, False),
])
def test_label_selector_parser(selector, labels, match):
    assert parse_label_selector(selector)(labels) is match


def test_server_restarts_on_the_same_port():
    with KubeApiServer() as first:
        port = first.port
    with KubeApiServer(port=port) as second:
        assert second.url.endswith(f":{port}")


def test_https_with_the_kubeconfig_ca(tmp_path):
    import ssl

    from kubernetes import config
    with KubeApiServer(tls=True) as api:
        assert api.url.startswith("https://127.0.0.1:")
        api.create(objects.pod("a"))
        good = config.new_client_from_config(config_file=api.kubeconfig(tmp_path / "kc"))
        assert [p.metadata.name for p in client.CoreV1Api(good).list_pod_for_all_namespaces().items] == ["a"]
        good.close()
        # Without the CA the client refuses the server: the TLS is real.
        with open(tmp_path / "kc") as fh:
            doc = __import__("json").load(fh)
        del doc["clusters"][0]["cluster"]["certificate-authority-data"]
        (tmp_path / "noca").write_text(__import__("json").dumps(doc))
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(tmp_path / "noca"), client_configuration=cfg)
        cfg.retries = False
        bare = client.ApiClient(cfg)
        with pytest.raises(Exception) as err:
            client.CoreV1Api(bare).list_namespace()
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) or isinstance(err.value, ssl.SSLError)
        bare.close()
