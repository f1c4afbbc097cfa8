"""lab.model: lab names, addressing, manifests, implicit objects (no kernel needed)."""

import ipaddress
import itertools

import pytest

from lab import model
from lab.model import ManifestError


@pytest.mark.parametrize("name", ["default", "t1a2b3c", "a", "lab-1", "abcdefghijkl"])
def test_valid_lab_names(name):
    assert model.validate_lab_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "Abc", "a_b", "abcdefghijklm", "a/b", "a.b"])
def test_invalid_lab_names(name):
    with pytest.raises(ValueError):
        model.validate_lab_name(name)


def test_every_slot_and_node_gets_distinct_addresses_in_the_benchmark_range():
    bench = ipaddress.ip_network("198.18.0.0/15")
    subnets, underlay, services = set(), set(), set()
    for slot, i in itertools.product(range(model.MAX_SLOTS), range(model.MAX_NODES)):
        net = ipaddress.ip_network(model.pod_subnet(slot, i))
        assert net.subnet_of(ipaddress.ip_network("198.18.0.0/16"))
        subnets.add(net)
        ip = ipaddress.ip_address(model.underlay_ip(slot, i))
        assert ip in bench and ip not in ipaddress.ip_network("198.18.0.0/16")
        underlay.add(ip)
        assert model.pod_gateway(slot, i) == str(net.network_address + 1)
    for slot in range(model.MAX_SLOTS):
        services.add(ipaddress.ip_network(model.service_cidr(slot)))
    assert len(subnets) == model.MAX_SLOTS * model.MAX_NODES
    assert len(underlay) == model.MAX_SLOTS * model.MAX_NODES
    # Service ranges overlap neither each other nor any underlay /24.
    nets = list(services) + [ipaddress.ip_network(f"198.19.{s}.0/24") for s in range(model.MAX_SLOTS)]
    for a, b in itertools.combinations(nets, 2):
        assert not a.overlaps(b)


@pytest.mark.parametrize("slot, index", [(32, 0), (-1, 0), (0, 8)])
def test_out_of_range(slot, index):
    with pytest.raises(ValueError):
        model.pod_subnet(slot, index)


def test_free_slot_and_cluster_ips():
    assert model.free_slot([0, 1, 3]) == 2
    with pytest.raises(RuntimeError):
        model.free_slot(range(model.MAX_SLOTS))
    assert model.allocate_cluster_ip("198.19.128.0/22", ["198.19.128.1"]) == "198.19.128.2"


def test_netns_names_of_two_labs_never_collide():
    # "a"'s names vs "a-n1"'s: the pattern of one never matches the other's.
    a, b = model.lab_netns_pattern("a"), model.lab_netns_pattern("a-n1")
    a_names = [model.wire_netns("a"), model.node_netns("a", 1), model.pod_netns("a", 12)]
    b_names = [model.wire_netns("a-n1"), model.node_netns("a-n1", 0), model.pod_netns("a-n1", 3)]
    assert all(a.match(n) for n in a_names) and all(b.match(n) for n in b_names)
    assert not any(a.match(n) for n in b_names) and not any(b.match(n) for n in a_names)


MANIFEST = """
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: apps}
  spec: {nodeName: n1, serviceAccountName: web}
- apiVersion: v1
  kind: Pod
  metadata: {name: b}
  spec: {nodeName: n2}
---
kind: Node
metadata: {name: n0}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: other}
spec: {}
---
"""


def test_load_manifest_flattens_lists_and_fills_defaults():
    objs = model.load_manifest(MANIFEST)
    assert [model.obj_key(o) for o in objs] == [
        ("Pod", "apps", "a"), ("Pod", "default", "b"), ("Node", "", "n0"),
        ("AuthorizationPolicy", "other", "deny")]
    b = objs[1]
    assert b["spec"]["serviceAccountName"] == "default" and b["spec"]["hostNetwork"] is False
    assert model.node_names(objs) == ["n0", "n1", "n2"]
    assert model.node_names(objs, known=["n1"]) == ["n0", "n2"]


def test_implicit_namespaces_and_service_accounts():
    objs = model.load_manifest(MANIFEST)
    keys = [model.obj_key(o) for o in model.implicit_objects(objs)]
    for ns in ("default", "kube-system", "apps", "other"):
        assert ("Namespace", "", ns) in keys
        assert ("ServiceAccount", ns, "default") in keys
    assert ("ServiceAccount", "apps", "web") in keys
    # Declared objects are not duplicated.
    declared = objs + [{"kind": "Namespace", "metadata": {"name": "apps", "labels": {"x": "y"}}}]
    assert ("Namespace", "", "apps") not in [model.obj_key(o) for o in model.implicit_objects(declared)]


@pytest.mark.parametrize("text, problem", [
    ("kind: Pod\nmetadata: {name: lonely, namespace: apps}\nspec: {}\n", "apps/lonely has no spec.nodeName"),
    ("kind: Pod\nmetadata: {name: x}\nspec: {nodeName: ../etc}\n", "invalid spec.nodeName"),
    ("kind: Pod\nmetadata: {namespace: a}\n", "without metadata.name"),
    ("metadata: {name: x}\n", "without a kind"),
    ("- a\n- b\n", "not an object"),
    ("kind: Pod\nmetadata: {name: x, namespace: A_B}\nspec: {nodeName: n}\n", "invalid namespace"),
    ("{{{", "not valid YAML"),
])
def test_manifest_errors(text, problem):
    with pytest.raises(ManifestError, match=problem.replace(".", r"\.").replace("/", "/")):
        model.load_manifest(text)


def test_labels_and_upsert():
    items = []
    ns = model.upsert(items, {"kind": "Namespace", "metadata": {"name": "apps"}})
    uid = ns["metadata"]["uid"]
    again = model.upsert(items, {"kind": "Namespace", "metadata": {"name": "apps", "labels": {"a": "1"}}})
    assert len(items) == 1 and again["metadata"]["uid"] == uid
    model.apply_labels(again, model.parse_label_args(["b=2", "a-"]))
    assert again["metadata"]["labels"] == {"b": "2"}
    assert model.remove(items, "Namespace", "", "apps") and items == []
    with pytest.raises(ValueError):
        model.parse_label_args(["nope"])


def test_node_object_keeps_given_labels():
    node = model.node_object("n1", "198.19.0.1", "198.18.0.0/24",
                             {"kind": "Node", "metadata": {"name": "n1", "labels": {"zone": "z1"}}})
    assert node["metadata"]["labels"] == {"zone": "z1", "kubernetes.io/hostname": "n1"}
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "198.19.0.1"}
    assert node["spec"]["podCIDRs"] == ["198.18.0.0/24"]


@pytest.mark.parametrize("value, families", [
    (None, None),
    ("IPv6", ("IPv6",)),
    ("IPv4", ("IPv4",)),
    (" IPv6 , IPv4 ", ("IPv4", "IPv6")),
])
def test_pod_ip_families_annotation(value, families):
    annotations = {} if value is None else {model.IP_FAMILIES_ANNOTATION: value}
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "ns", "annotations": annotations},
           "spec": {"nodeName": "node1"}}
    assert model.pod_ip_families(pod) == families
    assert model.normalise(pod)["metadata"]["annotations"] == annotations


@pytest.mark.parametrize("value, host_network, problem", [
    ("ipv6", False, "not a comma-separated list"),
    ("", False, "not a comma-separated list"),
    ("IPv6,IPv5", False, "not a comma-separated list"),
    (6, False, "must be a string"),
    ("IPv6", True, "needs a pod network"),
])
def test_pod_ip_families_annotation_errors(value, host_network, problem):
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "ns",
                                       "annotations": {model.IP_FAMILIES_ANNOTATION: value}},
           "spec": {"nodeName": "node1", "hostNetwork": host_network}}
    with pytest.raises(ManifestError, match=problem):
        model.normalise(pod)
