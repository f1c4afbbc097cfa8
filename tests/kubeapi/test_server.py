"""The stand-in API server, driven by the official client the agent uses.

These pin that the server behaves as the client (and a real API server)
expects, so the kube state source's tests exercise real protocol paths.
"""

import threading
import time

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from lab.kubeapi import objects
from lab.kubeapi.server import KubeApiServer, parse_label_selector


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


# -- what kubectl needs: discovery, /version, keep-alive hygiene, strategic merge patch ----------

KUBECTL_ACCEPT = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                  "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,"
                  "application/json")


def _raw(conn, api, method, path, body=None, headers=None, token=True):
    """One request on an open http.client connection: (status, content type, parsed JSON)."""
    import json
    hdrs = {"Accept": "application/json", **(headers or {})}
    if token:
        hdrs["Authorization"] = f"Bearer {api.token}"
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body   # bytes, None, iterator
    conn.request(method, path, body=data, headers=hdrs,
                 encode_chunked=hdrs.get("Transfer-Encoding") == "chunked")
    resp = conn.getresponse()
    raw = resp.read()
    return resp.status, resp.getheader("Content-Type"), json.loads(raw) if raw else None


@pytest.fixture
def conn(kubeapi):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", kubeapi.port, timeout=5)
    yield c
    c.close()


def test_version_is_public_as_on_a_real_cluster(kubeapi, conn):
    status, _, doc = _raw(conn, kubeapi, "GET", "/version", token=False)
    assert status == 200 and (doc["major"], doc["minor"]) == ("1", "33")
    assert doc["gitVersion"] == "v1.33.0" and "stand-in" in doc["gitCommit"]
    # Everything else still needs the token.
    assert _raw(conn, kubeapi, "GET", "/api", token=False)[0] == 401


def test_legacy_discovery_documents(kubeapi, conn):
    status, ctype, core = _raw(conn, kubeapi, "GET", "/api")
    assert status == 200 and ctype == "application/json"
    assert core["kind"] == "APIVersions" and core["versions"] == ["v1"]
    _, _, groups = _raw(conn, kubeapi, "GET", "/apis")
    by_name = {g["name"]: g for g in groups["groups"]}
    assert set(by_name) == {"discovery.k8s.io", "security.istio.io", "networking.istio.io",
                            "authentication.k8s.io"}
    assert by_name["security.istio.io"]["preferredVersion"]["version"] == "v1"
    assert [v["version"] for v in by_name["networking.istio.io"]["versions"]] == ["v1", "v1beta1", "v1alpha3"]
    _, _, v1 = _raw(conn, kubeapi, "GET", "/api/v1")
    short = {r["name"]: r.get("shortNames") for r in v1["resources"]}
    assert short == {"pods": ["po"], "namespaces": ["ns"], "services": ["svc"], "nodes": ["no"]}
    _, _, istio = _raw(conn, kubeapi, "GET", "/apis/security.istio.io/v1")
    assert {r["name"]: r["shortNames"] for r in istio["resources"]} == {
        "authorizationpolicies": ["ap"], "peerauthentications": ["pa"]}
    assert all("istio-io" in r["categories"] for r in istio["resources"])
    _, _, networking = _raw(conn, kubeapi, "GET", "/apis/networking.istio.io/v1alpha3")
    assert {r["name"]: r["shortNames"] for r in networking["resources"]} == {
        "serviceentries": ["se"], "workloadentries": ["we"]}
    _, _, authn = _raw(conn, kubeapi, "GET", "/apis/authentication.k8s.io/v1")
    assert [(r["name"], r["verbs"]) for r in authn["resources"]] == [("tokenreviews", ["create"])]
    status, _, group = _raw(conn, kubeapi, "GET", "/apis/security.istio.io")
    assert status == 200 and group["kind"] == "APIGroup" and len(group["versions"]) == 2
    assert _raw(conn, kubeapi, "GET", "/apis/nope.example.com")[0] == 404
    assert _raw(conn, kubeapi, "GET", "/apis/security.istio.io/v2")[0] == 404


def test_aggregated_discovery_when_the_client_asks_for_it(kubeapi, conn):
    status, ctype, core = _raw(conn, kubeapi, "GET", "/api", headers={"Accept": KUBECTL_ACCEPT})
    assert status == 200
    assert ctype == "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    assert core["kind"] == "APIGroupDiscoveryList" and core["apiVersion"] == "apidiscovery.k8s.io/v2"
    (item,) = core["items"]
    assert item["metadata"]["name"] == "" and item["versions"][0]["version"] == "v1"
    pods = [r for r in item["versions"][0]["resources"] if r["resource"] == "pods"][0]
    assert pods["shortNames"] == ["po"] and pods["scope"] == "Namespaced"
    _, _, named = _raw(conn, kubeapi, "GET", "/apis", headers={"Accept": KUBECTL_ACCEPT})
    istio = [i for i in named["items"] if i["metadata"]["name"] == "security.istio.io"][0]
    assert [v["version"] for v in istio["versions"]] == ["v1", "v1beta1"]     # preferred first
    kubeapi.aggregated_discovery = False        # an older server: the client must fall back
    status, ctype, doc = _raw(conn, kubeapi, "GET", "/apis", headers={"Accept": KUBECTL_ACCEPT})
    assert ctype == "application/json" and doc["kind"] == "APIGroupList"


def test_discovery_follows_the_istio_crd_versions(kubeapi, conn):
    kubeapi.set_istio_versions({"v1beta1"})
    _, _, groups = _raw(conn, kubeapi, "GET", "/apis")
    istio = [g for g in groups["groups"] if g["name"] == "security.istio.io"][0]
    assert [v["version"] for v in istio["versions"]] == ["v1beta1"]
    assert istio["preferredVersion"]["version"] == "v1beta1"
    assert _raw(conn, kubeapi, "GET", "/apis/security.istio.io/v1")[0] == 404
    kubeapi.set_networking_versions({"v1alpha3"})
    assert _raw(conn, kubeapi, "GET", "/apis/networking.istio.io/v1")[0] == 404
    assert _raw(conn, kubeapi, "GET", "/apis/networking.istio.io/v1alpha3")[0] == 200
    kubeapi.set_crds_present(False)
    _, _, agg = _raw(conn, kubeapi, "GET", "/apis", headers={"Accept": KUBECTL_ACCEPT})
    assert not {"security.istio.io", "networking.istio.io"} & {i["metadata"]["name"] for i in agg["items"]}


def test_error_answers_read_the_whole_body_so_keep_alive_stays_in_sync(kubeapi, conn):
    """Every error path consumes the request body before answering: leftover
    body bytes would otherwise be parsed as the next request on the connection."""
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x" * 2000}}
    assert _raw(conn, kubeapi, "POST", "/no/such/path", body)[0] == 404
    assert _raw(conn, kubeapi, "POST", "/api/v1/namespaces", body, token=False)[0] == 401
    assert _raw(conn, kubeapi, "POST", "/api/v1/namespaces/ns1/namespaces", body)[0] == 404
    assert _raw(conn, kubeapi, "PUT", "/api/v1/namespaces/x", body)[0] == 405
    assert _raw(conn, kubeapi, "GET", "/apis/authentication.k8s.io/v1/tokenreviews", body)[0] == 405
    assert _raw(conn, kubeapi, "PATCH", "/api/v1/namespaces/x", [{"op": "add"}],
                headers={"Content-Type": "application/json-patch+json"})[0] == 415
    kubeapi.refused["/api/v1/pods"] = 503
    assert _raw(conn, kubeapi, "POST", "/api/v1/pods", body)[0] == 503
    kubeapi.fail_next.append(("/api/v1/services", 500))
    assert _raw(conn, kubeapi, "POST", "/api/v1/services", body)[0] == 500
    # A chunked body (no Content-Length) is consumed as well.
    chunks = iter([b'{"kind": "Names', b'pace"}'])
    assert _raw(conn, kubeapi, "POST", "/no/such/path", chunks,
                headers={"Transfer-Encoding": "chunked"})[0] == 404
    sock = conn.sock
    status, _, listed = _raw(conn, kubeapi, "GET", "/api/v1/namespaces")
    assert status == 200 and listed["kind"] == "NamespaceList"
    assert conn.sock is sock, "the server closed the keep-alive connection"
    # The server saw exactly the requests sent: no body was parsed as a request.
    assert [(r.method, r.path) for r in kubeapi.requests] == [
        ("POST", "/no/such/path"), ("POST", "/api/v1/namespaces"),
        ("POST", "/api/v1/namespaces/ns1/namespaces"), ("PUT", "/api/v1/namespaces/x"),
        ("GET", "/apis/authentication.k8s.io/v1/tokenreviews"), ("PATCH", "/api/v1/namespaces/x"),
        ("POST", "/api/v1/pods"), ("POST", "/api/v1/services"), ("POST", "/no/such/path"),
        ("GET", "/api/v1/namespaces")]


def test_strategic_merge_patch_applies_list_directives(kubeapi, conn):
    kubeapi.create(objects.service("web", "ns1"))
    kubeapi.patch("Service", "ns1", "web", {"spec": {"ports": [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "admin", "port": 9090, "targetPort": 9090, "protocol": "TCP"}]}})
    # The shape kubectl apply sends when a port is removed from the manifest.
    patch = {"spec": {"$setElementOrder/ports": [{"port": 80}],
                      "ports": [{"port": 80, "targetPort": 8081}, {"$patch": "delete", "port": 9090}]}}
    status, _, svc = _raw(conn, kubeapi, "PATCH", "/api/v1/namespaces/ns1/services/web", patch,
                          headers={"Content-Type": "application/strategic-merge-patch+json"})
    assert status == 200
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 8081, "protocol": "TCP"}]
    assert "$setElementOrder/ports" not in svc["spec"]
    # Custom resources take merge patches only, as on a real server.
    kubeapi.create(objects.authorization_policy("p", "ns1"))
    path = "/apis/security.istio.io/v1/namespaces/ns1/authorizationpolicies/p"
    assert _raw(conn, kubeapi, "PATCH", path, {"spec": {"action": "DENY"}},
                headers={"Content-Type": "application/strategic-merge-patch+json"})[0] == 415
    status, _, ap = _raw(conn, kubeapi, "PATCH", path, {"spec": {"action": "DENY"}},
                         headers={"Content-Type": "application/merge-patch+json"})
    assert status == 200 and ap["spec"]["action"] == "DENY"
    bad = {"spec": {"ports": [{"name": "no-merge-key"}]}}
    assert _raw(conn, kubeapi, "PATCH", "/api/v1/namespaces/ns1/services/web", bad,
                headers={"Content-Type": "application/strategic-merge-patch+json"})[0] == 400


def test_writes_with_dry_run_are_refused_not_made(kubeapi, conn):
    body = objects.namespace("dry")
    status, _, err = _raw(conn, kubeapi, "POST", "/api/v1/namespaces?dryRun=All", body)
    assert status == 400 and "dryRun" in err["message"]
    assert kubeapi.get("Namespace", "", "dry") is None


def test_created_namespace_gets_the_server_defaults(kubeapi, conn):
    status, _, ns = _raw(conn, kubeapi, "POST", "/api/v1/namespaces",
                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fresh"}})
    assert status == 201 and ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "fresh"}
    assert ns["status"] == {"phase": "Active"}


def test_protobuf_bodies_are_refused_with_415(kubeapi, conn):
    status, _, err = _raw(conn, kubeapi, "POST", "/api/v1/namespaces", b"k8s\x00\n\x0f\n\x02v1",
                          headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
    assert status == 415 and "application/json only" in err["message"]
    # The connection is still usable and JSON creates work.
    assert _raw(conn, kubeapi, "POST", "/api/v1/namespaces", objects.namespace("ok"),
                headers={"Content-Type": "application/json"})[0] == 201
