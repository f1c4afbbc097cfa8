"""The stand-in's pure parts: discovery documents and strategic merge patch."""

import pytest

from lab.kubeapi import discovery
from lab.kubeapi.patch import PatchError, strategic_merge_patch
from lab.kubeapi.server import RESOURCES

# What kubectl 1.30+ (client-go's discovery client) sends for /api and /apis.
KUBECTL_ACCEPT = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                  "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,"
                  "application/json")


@pytest.mark.parametrize("accept, aggregated", [
    (KUBECTL_ACCEPT, True),
    ("application/json", False),
    ("", False),
    ("*/*", False),
    # Only v2beta1 offered: the stand-in serves v2 only, so plain JSON.
    ("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json", False),
    # Plain JSON preferred over aggregation: the client's order wins.
    ("application/json, application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList", False),
    ("application/vnd.kubernetes.protobuf, application/json;g=apidiscovery.k8s.io;v=v2;"
     "as=APIGroupDiscoveryList", True),
    ("application/json; g=apidiscovery.k8s.io; v=v2; as=APIGroupDiscoveryList", True),
])
def test_aggregated_discovery_follows_the_accept_header(accept, aggregated):
    assert discovery.wants_aggregated(accept) is aggregated


def test_group_list_prefers_the_first_listed_version():
    groups = {g["name"]: g for g in discovery.group_list(RESOURCES)["groups"]}
    assert "" not in groups
    istio = groups["security.istio.io"]
    assert [v["version"] for v in istio["versions"]] == ["v1", "v1beta1"]
    assert istio["preferredVersion"] == {"groupVersion": "security.istio.io/v1", "version": "v1"}
    only_beta = [r for r in RESOURCES if r.version != "v1" or r.group != "security.istio.io"]
    beta = {g["name"]: g for g in discovery.group_list(only_beta)["groups"]}["security.istio.io"]
    assert beta["preferredVersion"]["version"] == "v1beta1"


@pytest.mark.parametrize("group, version, plural, short, namespaced", [
    ("", "v1", "pods", ["po"], True),
    ("", "v1", "namespaces", ["ns"], False),
    ("", "v1", "services", ["svc"], True),
    ("", "v1", "nodes", ["no"], False),
    ("security.istio.io", "v1", "authorizationpolicies", ["ap"], True),
    ("security.istio.io", "v1beta1", "peerauthentications", ["pa"], True),
    ("discovery.k8s.io", "v1", "endpointslices", None, True),
])
def test_resource_lists_carry_short_names(group, version, plural, short, namespaced):
    doc = discovery.resource_list(group, version, RESOURCES)
    assert doc["groupVersion"] == (f"{group}/{version}" if group else version)
    (entry,) = [r for r in doc["resources"] if r["name"] == plural]
    assert entry.get("shortNames") == short and entry["namespaced"] is namespaced
    assert "update" not in entry["verbs"]        # no PUT here: not advertised
    agg = discovery.aggregated(RESOURCES, core=not group)
    (item,) = [i for i in agg["items"] if i["metadata"]["name"] == group]
    (ver,) = [v for v in item["versions"] if v["version"] == version]
    (res,) = [r for r in ver["resources"] if r["resource"] == plural]
    assert res.get("shortNames") == short
    assert res["scope"] == ("Namespaced" if namespaced else "Cluster")
    assert res["responseKind"]["kind"] == entry["kind"]


def test_nothing_served_at_an_unknown_group_version():
    assert discovery.resource_list("security.istio.io", "v2", RESOURCES) is None


def test_version_document():
    doc = discovery.version_info("v1.33.0")
    assert (doc["major"], doc["minor"], doc["gitVersion"]) == ("1", "33", "v1.33.0")


SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "n",
                                                           "labels": {"a": "1"}, "finalizers": ["x"]},
       "spec": {"selector": {"app": "s"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                          {"name": "admin", "port": 9090, "targetPort": 9090}]}}

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
       "spec": {"containers": [{"name": "app", "image": "a:1", "env": [{"name": "A", "value": "1"}]},
                               {"name": "side", "image": "s:1"}],
                "tolerations": [{"key": "k1"}, {"key": "k2"}]}}


@pytest.mark.parametrize("kind, target, patch, expected", [
    # Maps merge; null deletes a key.
    ("Service", SVC, {"metadata": {"labels": {"a": None, "b": "2"}}},
     {"labels": {"b": "2"}}),
    # kubectl apply removing a port and changing another (its exact patch shape).
    ("Service", SVC, {"spec": {"$setElementOrder/ports": [{"port": 9090}],
                               "ports": [{"port": 9090, "targetPort": 9191}, {"$patch": "delete", "port": 80}]}},
     {"ports": [{"name": "admin", "port": 9090, "targetPort": 9191}]}),
    # A new element is appended, then $setElementOrder puts it first.
    ("Service", SVC, {"spec": {"$setElementOrder/ports": [{"port": 81}, {"port": 80}, {"port": 9090}],
                               "ports": [{"port": 81, "name": "new"}]}},
     {"ports": [{"port": 81, "name": "new"}, {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "admin", "port": 9090, "targetPort": 9090}]}),
    # $patch: replace on a list element replaces the whole list.
    ("Service", SVC, {"spec": {"ports": [{"port": 1}, {"$patch": "replace"}]}},
     {"ports": [{"port": 1}]}),
    # Primitive lists with the merge strategy are sets; $deleteFromPrimitiveList removes.
    ("Service", SVC, {"metadata": {"finalizers": ["y", "x"]}}, {"finalizers": ["x", "y"]}),
    ("Service", SVC, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}, {"finalizers": []}),
    # $patch: replace on a map; $patch: delete on a map.
    ("Service", SVC, {"spec": {"selector": {"$patch": "replace", "app": "t"}}}, {"selector": {"app": "t"}}),
    ("Service", SVC, {"spec": {"selector": {"$patch": "delete"}}}, {"selector": None}),
    # $retainKeys keeps only the listed keys of the map.
    ("Service", SVC, {"spec": {"$retainKeys": ["ports"], "ports": [{"port": 80}]}},
     {"selector": None, "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                  {"name": "admin", "port": 9090, "targetPort": 9090}]}),
    # Nested merge keys: a container's env merges by name.
    ("Pod", POD, {"spec": {"containers": [{"name": "app", "env": [{"name": "B", "value": "2"}]}]}},
     {"containers": [{"name": "app", "image": "a:1", "env": [{"name": "A", "value": "1"},
                                                            {"name": "B", "value": "2"}]},
                     {"name": "side", "image": "s:1"}]}),
    # Lists without a merge strategy are atomic: replaced whole.
    ("Pod", POD, {"spec": {"tolerations": [{"key": "k3"}]}}, {"tolerations": [{"key": "k3"}]}),
])
def test_strategic_merge_patch(kind, target, patch, expected):
    import copy
    before = copy.deepcopy(target)
    result = strategic_merge_patch(kind, target, patch)
    assert target == before                   # the stored version is never changed in place
    for field, value in expected.items():
        where = result["metadata"] if field in ("labels", "finalizers") else result["spec"]
        assert where.get(field) == value, (field, where)
    assert "$" not in repr(result)            # no directive is ever stored


@pytest.mark.parametrize("patch", [
    {"$patch": "delete"},
    {"spec": {"$patch": "bogus"}},
    {"spec": {"$unknown/x": 1}},
    {"spec": {"ports": [{"name": "no-key"}]}},
])
def test_bad_strategic_patches_are_refused(patch):
    with pytest.raises(PatchError):
        strategic_merge_patch("Service", SVC, patch)
