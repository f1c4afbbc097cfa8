"""The lab's bookkeeping that needs no kernel: names, addresses, manifests.

Addressing (all inside 198.18.0.0/15, the benchmarking range):

* a lab holds a *slot* ``s`` in 0..31, unique among the labs on the machine;
* node ``i`` (0..7) of the lab owns the pod subnet ``198.18.(8*s + i).0/24``
  (32 labs x 8 nodes exactly fill 198.18.0.0/16), with its ``cni0`` bridge at
  ``.1`` (the bridge plugin's gateway);
* node ``i``'s underlay address is ``198.19.s.(i+1)/24`` on its ``eth0``; the lab's CA
  listens on ``198.19.s.254:15012`` on the wire bridge;
* Services without a ``clusterIP`` get one from ``198.19.(128 + 4*s).0/22``.

A dual-stack lab (``Lab(..., dual_stack=True)``) adds IPv6, all inside
``fd00:198:18::/48``: node ``i``'s pods get ``fd00:198:18:<8*s + i, hex>::/64``
as a second host-local range, its underlay address is
``fd00:198:18:ff<s, 2 hex digits>::<i+1>/64`` and dual-stack Services
(``ipFamilyPolicy`` PreferDualStack/RequireDualStack, or ``ipFamilies``
naming IPv6) get a second cluster IP from ``fd00:198:18:fe<s>::/112``.
In such a lab a pod annotated ``lab.ambient-agent/ip-families: IPv6`` (a
lab-only annotation, see ``pod_ip_families``) is IPv6-only: the kubelet runs
the CNI chain for it with the IPv6 host-local range alone, so it has no IPv4
address and no IPv4 route.

Names: network namespaces ``alab-<lab>-wire``, ``alab-<lab>-n<i>``,
``alab-<lab>-p<j>``. Lab names end in a letter or digit and the suffixes
contain no dash, so no two labs can produce the same namespace name.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import uuid
from pathlib import Path
from typing import Any, Iterable

import yaml

MAX_SLOTS = 32
MAX_NODES = 8
NETNS_PREFIX = "alab"

_LAB_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?$")
# Kubernetes object names: DNS subdomain (pods, nodes) and DNS label (namespaces).
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")

# Kinds without a namespace; everything else is treated as namespaced,
# which is right for the Istio and core kinds the agent reads.
CLUSTER_SCOPED = frozenset({
    "Namespace", "Node", "PersistentVolume", "StorageClass", "PriorityClass",
    "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "APIService", "IngressClass", "RuntimeClass", "CSIDriver",
})

# A real cluster always has these, whatever the manifest says.
BUILTIN_NAMESPACES = ("default", "kube-system")


class ManifestError(ValueError):
    """The YAML handed to the lab cannot be turned into a cluster."""


def validate_lab_name(name: str) -> str:
    if not isinstance(name, str) or not _LAB_NAME.match(name):
        raise ValueError(
            f"invalid lab name {name!r}: 1-12 characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit")
    return name


# --- addressing -----------------------------------------------------------

def pod_subnet(slot: int, index: int) -> str:
    _check_slot_index(slot, index)
    return f"198.18.{slot * MAX_NODES + index}.0/24"


def pod_gateway(slot: int, index: int) -> str:
    """Where the bridge plugin puts ``cni0`` (first host of the subnet)."""
    return str(next(ipaddress.ip_network(pod_subnet(slot, index)).hosts()))


def underlay_ip(slot: int, index: int) -> str:
    _check_slot_index(slot, index)
    return f"198.19.{slot}.{index + 1}"


UNDERLAY_PREFIXLEN = 24
UNDERLAY6_PREFIXLEN = 64


def pod_subnet6(slot: int, index: int) -> str:
    _check_slot_index(slot, index)
    return str(ipaddress.ip_network(f"fd00:198:18:{slot * MAX_NODES + index:x}::/64"))


def pod_gateway6(slot: int, index: int) -> str:
    return str(next(ipaddress.ip_network(pod_subnet6(slot, index)).hosts()))


def underlay_ip6(slot: int, index: int) -> str:
    _check_slot_index(slot, index)
    return f"fd00:198:18:ff{slot:02x}::{index + 1:x}"


def service_cidr6(slot: int) -> str:
    _check_slot_index(slot, 0)
    return f"fd00:198:18:fe{slot:02x}::/112"


# Lab-only pod annotation: the address families the pod's sandbox gets
# ("IPv6" for an IPv6-only pod in a dual-stack lab; "IPv4,IPv6" is the default
# there). A real cluster gives every pod all of its node's families; the lab
# can do less so that a pod known only by its IPv6 address can be tested.
IP_FAMILIES_ANNOTATION = "lab.ambient-agent/ip-families"
IP_FAMILIES = ("IPv4", "IPv6")


def pod_ip_families(pod: dict) -> tuple[str, ...] | None:
    """The families a pod's annotation asks for (in ``IP_FAMILIES`` order), or
    None when it has none (every family its node has). Raises ManifestError
    on a value that names no family or an unknown one."""
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(IP_FAMILIES_ANNOTATION)
    if value is None:
        return None
    where = f"Pod {meta.get('namespace')}/{meta.get('name')}: annotation {IP_FAMILIES_ANNOTATION}"
    if not isinstance(value, str):
        raise ManifestError(f"{where} must be a string such as \"IPv6\", got {value!r}")
    asked = {part.strip() for part in value.split(",") if part.strip()}
    unknown = asked - set(IP_FAMILIES)
    if unknown or not asked:
        raise ManifestError(f"{where}: {value!r} is not a comma-separated list of IPv4 and IPv6")
    return tuple(f for f in IP_FAMILIES if f in asked)


def wants_dual_stack(spec: dict) -> bool:
    """Does a Service spec ask for an IPv6 cluster IP besides the IPv4 one?"""
    if spec.get("ipFamilyPolicy") in ("PreferDualStack", "RequireDualStack"):
        return True
    return "IPv6" in (spec.get("ipFamilies") or [])
CA_PORT = 15012   # Istio's CA (istiod) port


def ca_ip(slot: int) -> str:
    """The lab's CA listens on the underlay, in the wire namespace."""
    _check_slot_index(slot, 0)
    return f"198.19.{slot}.254"


def service_cidr(slot: int) -> str:
    _check_slot_index(slot, 0)
    return f"198.19.{128 + 4 * slot}.0/22"


def _check_slot_index(slot: int, index: int) -> None:
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"lab slot {slot} out of range 0..{MAX_SLOTS - 1}")
    if not 0 <= index < MAX_NODES:
        raise ValueError(f"a lab has at most {MAX_NODES} nodes (node index {index})")


def free_slot(used: Iterable[int]) -> int:
    taken = set(used)
    for slot in range(MAX_SLOTS):
        if slot not in taken:
            return slot
    raise RuntimeError(f"all {MAX_SLOTS} lab slots are in use; take a lab down first")


def allocate_cluster_ip(cidr: str, used: Iterable[str]) -> str:
    taken = set(used)
    for host in ipaddress.ip_network(cidr).hosts():
        if str(host) not in taken:
            return str(host)
    raise RuntimeError(f"service range {cidr} is full")


# --- names ----------------------------------------------------------------

def wire_netns(lab: str) -> str:
    return f"{NETNS_PREFIX}-{lab}-wire"


def node_netns(lab: str, index: int) -> str:
    return f"{NETNS_PREFIX}-{lab}-n{index}"


def pod_netns(lab: str, index: int) -> str:
    return f"{NETNS_PREFIX}-{lab}-p{index}"


def lab_netns_pattern(lab: str) -> re.Pattern:
    """Exactly the namespace names ``lab`` can create (never another lab's)."""
    return re.compile(rf"^{NETNS_PREFIX}-{re.escape(lab)}-(?:wire|n\d+|p\d+)$")


def pod_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def split_key(ns_name: str) -> tuple[str, str]:
    """``"ns/name"`` -> ``("ns", "name")``; a bare name means namespace default."""
    if "/" in ns_name:
        ns, name = ns_name.split("/", 1)
    else:
        ns, name = "default", ns_name
    if not ns or not name:
        raise ValueError(f"expected NAMESPACE/NAME, got {ns_name!r}")
    return ns, name


def cgroup_leaf(namespace: str, name: str) -> str:
    return f"{namespace}_{name}"


# --- manifests ------------------------------------------------------------

def load_manifest(source: str | Path) -> list[dict]:
    """Objects from YAML text or a file path (multi-document, ``List``s flattened)."""
    if isinstance(source, Path) or _is_file(source):
        text = Path(source).read_text()
    else:
        text = source
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest is not valid YAML: {exc}") from None
    objs: list[dict] = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError(f"manifest document is not an object: {doc!r:.60}")
        if "items" in doc and str(doc.get("kind", "")).endswith("List"):
            objs.extend(copy.deepcopy(doc.get("items") or []))
        else:
            objs.append(copy.deepcopy(doc))
    return [normalise(o) for o in objs]


def _is_file(text: str) -> bool:
    if "\n" in text:
        return False
    try:
        return Path(text).is_file()
    except OSError:     # e.g. a one-line YAML string too long to be a file name
        return False


def normalise(obj: Any) -> dict:
    """Check the basics of one object and fill in what the API server would."""
    if not isinstance(obj, dict) or not obj.get("kind"):
        raise ManifestError(f"object without a kind: {obj!r:.80}")
    kind = obj["kind"]
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ManifestError(f"{kind} without metadata.name")
    name = meta["name"]
    if kind in CLUSTER_SCOPED:
        meta.pop("namespace", None)
    else:
        meta.setdefault("namespace", "default")
        if not _DNS_LABEL.match(str(meta["namespace"])):
            raise ManifestError(f"{kind} {name}: invalid namespace {meta['namespace']!r}")
    if kind == "Namespace" and not _DNS_LABEL.match(str(name)):
        raise ManifestError(f"invalid Namespace name {name!r}")
    if kind in ("Pod", "Node") and not _DNS_SUBDOMAIN.match(str(name)):
        raise ManifestError(f"invalid {kind} name {name!r}")
    obj.setdefault("apiVersion", "v1")
    if kind == "Pod":
        spec = obj.setdefault("spec", {})
        node = spec.get("nodeName")
        if not node:
            raise ManifestError(f"Pod {meta['namespace']}/{name} has no spec.nodeName "
                                "(the lab has no scheduler: say which node it runs on)")
        if not _DNS_SUBDOMAIN.match(str(node)):
            raise ManifestError(f"Pod {meta['namespace']}/{name}: invalid spec.nodeName {node!r}")
        # As the API server does: the deprecated serviceAccount fills the name.
        spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
        spec.setdefault("hostNetwork", False)
        families = pod_ip_families(obj)
        if families is not None and spec["hostNetwork"]:
            raise ManifestError(f"Pod {meta['namespace']}/{name}: {IP_FAMILIES_ANNOTATION} "
                                "needs a pod network (hostNetwork pods have the node's addresses)")
    return obj


def obj_key(obj: dict) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj.get("kind", ""), meta.get("namespace") or "", meta.get("name", ""))


def node_names(objs: Iterable[dict], known: Iterable[str] = ()) -> list[str]:
    """Nodes not yet known, in order of first mention (Node objects, then pods)."""
    seen = list(known)
    new: list[str] = []
    objs = list(objs)
    for o in objs:
        if o["kind"] == "Node":
            _add(o["metadata"]["name"], seen, new)
    for o in objs:
        if o["kind"] == "Pod":
            _add(o["spec"]["nodeName"], seen, new)
    return new


def _add(name: str, seen: list[str], new: list[str]) -> None:
    if name not in seen:
        seen.append(name)
        new.append(name)


def implicit_objects(objs: Iterable[dict], existing: Iterable[dict] = ()) -> list[dict]:
    """Namespaces and ServiceAccounts a real cluster would have for these objects.

    Every namespace referenced gets a Namespace (unless declared) and its
    ``default`` ServiceAccount; a ServiceAccount a pod names is created too
    (a real cluster would refuse the pod; the lab is kinder).
    """
    objs = list(objs)
    have = {obj_key(o) for o in list(existing) + objs}
    namespaces: list[str] = list(BUILTIN_NAMESPACES)
    accounts: list[tuple[str, str]] = []
    for o in objs:
        ns = o["metadata"].get("namespace")
        if o["kind"] == "Namespace":
            ns = o["metadata"]["name"]
        if ns and ns not in namespaces:
            namespaces.append(ns)
        if o["kind"] == "Pod":
            accounts.append((o["metadata"]["namespace"], o["spec"]["serviceAccountName"]))
    out: list[dict] = []
    for ns in namespaces:
        if ("Namespace", "", ns) not in have:
            out.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            have.add(("Namespace", "", ns))
    for ns, sa in [(ns, "default") for ns in namespaces] + accounts:
        if ("ServiceAccount", ns, sa) not in have:
            out.append({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": sa, "namespace": ns}})
            have.add(("ServiceAccount", ns, sa))
    return out


def node_object(name: str, address: str, subnet: str, given: dict | None = None,
                subnet6: str | None = None, address6: str | None = None) -> dict:
    """The ``Node`` object the lab writes (merged over one the manifest gave)."""
    node = copy.deepcopy(given) if given else {"apiVersion": "v1", "kind": "Node",
                                                "metadata": {"name": name}}
    meta = node.setdefault("metadata", {})
    meta.setdefault("labels", {})["kubernetes.io/hostname"] = name
    spec = node.setdefault("spec", {})
    spec["podCIDR"] = subnet
    spec["podCIDRs"] = [subnet] + ([subnet6] if subnet6 else [])
    status = node.setdefault("status", {})
    status["addresses"] = [{"type": "InternalIP", "address": address},
                           *([{"type": "InternalIP", "address": address6}] if address6 else []),
                           {"type": "Hostname", "address": name}]
    return node


def new_uid() -> str:
    return str(uuid.uuid4())


# --- the state document ---------------------------------------------------

def empty_state() -> dict:
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "0"}, "items": []}


def find(items: list[dict], kind: str, namespace: str, name: str) -> dict | None:
    key = (kind, namespace or "", name)
    for o in items:
        if obj_key(o) == key:
            return o
    return None


def upsert(items: list[dict], obj: dict) -> dict:
    """Insert or replace ``obj`` by kind/namespace/name, keeping the old uid."""
    key = obj_key(obj)
    for i, o in enumerate(items):
        if obj_key(o) == key:
            uid = (o.get("metadata") or {}).get("uid")
            if uid:
                obj.setdefault("metadata", {}).setdefault("uid", uid)
            items[i] = obj
            return obj
    obj.setdefault("metadata", {}).setdefault("uid", new_uid())
    items.append(obj)
    return obj


def remove(items: list[dict], kind: str, namespace: str, name: str) -> bool:
    key = (kind, namespace or "", name)
    before = len(items)
    items[:] = [o for o in items if obj_key(o) != key]
    return len(items) != before


def apply_labels(obj: dict, labels: dict[str, str | None]) -> None:
    """Set labels on ``obj``; a ``None`` value removes that label."""
    current = obj.setdefault("metadata", {}).setdefault("labels", {})
    for k, v in labels.items():
        if v is None:
            current.pop(k, None)
        else:
            current[k] = str(v)


def parse_label_args(args: Iterable[str]) -> dict[str, str | None]:
    """kubectl's ``key=value`` / ``key-`` syntax."""
    out: dict[str, str | None] = {}
    for arg in args:
        if "=" in arg:
            k, v = arg.split("=", 1)
            out[k] = v
        elif arg.endswith("-") and len(arg) > 1:
            out[arg[:-1]] = None
        else:
            raise ValueError(f"label must be key=value or key-, got {arg!r}")
    return out
