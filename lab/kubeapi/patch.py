"""Strategic merge patch for the stand-in's built-in kinds (pure: no I/O).

Why: ``kubectl apply`` (client-side, the default) and ``kubectl label`` send
``application/strategic-merge-patch+json`` for built-in kinds. Without
OpenAPI from the server, kubectl takes the patch metadata from its compiled-in
Go types, so its patches carry the directives of
https://github.com/kubernetes/community/blob/master/contributors/devel/sig-api-machinery/strategic-merge-patch.md :
``$setElementOrder/<list>``, ``{"$patch": "delete", <key>: ...}`` list
elements, ``$deleteFromPrimitiveList/<list>``, ``$retainKeys`` and
``$patch: replace|delete`` on maps. A server that treated them as a JSON merge
patch would store the directives in the object (a Service edited by apply
would keep its deleted port and gain a ``$setElementOrder/ports`` field).

Lists merge by key only where the Go types say so (``patchStrategy:"merge"``
with a ``patchMergeKey``), as listed in ``MERGE_KEYS`` for the kinds the
stand-in serves; every other list is replaced whole, as on a real server.
Custom resources have no strategic merge patch at all (the real server answers
415; kubectl uses a JSON merge patch for them).

Partial, on purpose: ``$setElementOrder`` puts the listed elements in the
listed order and appends elements the patch does not name in their previous
order (the real server interleaves those); no ``$patch: merge`` nuances
beyond plain merging.
"""

from __future__ import annotations

import copy

MERGE_PRIMITIVE = object()      # a list of scalars merged as a set (finalizers)

_METADATA = {("metadata", "finalizers"): MERGE_PRIMITIVE,
             ("metadata", "ownerReferences"): "uid"}


def _container_keys(field: str) -> dict:
    return {("spec", field): "name",
            ("spec", field, "ports"): "containerPort",
            ("spec", field, "env"): "name",
            ("spec", field, "volumeMounts"): "mountPath",
            ("spec", field, "volumeDevices"): "devicePath"}


# Field paths (list elements do not add a step) -> patchMergeKey, from the
# Go types in k8s.io/api/core/v1 (types.go).
MERGE_KEYS: dict[str, dict] = {
    "Pod": {**_METADATA, **_container_keys("containers"), **_container_keys("initContainers"),
            **_container_keys("ephemeralContainers"),
            ("spec", "volumes"): "name", ("spec", "imagePullSecrets"): "name",
            ("spec", "hostAliases"): "ip",
            ("status", "conditions"): "type", ("status", "podIPs"): "ip"},
    "Service": {**_METADATA, ("spec", "ports"): "port"},
    "Namespace": dict(_METADATA),
    "Node": {**_METADATA, ("status", "addresses"): "type", ("status", "conditions"): "type"},
    "EndpointSlice": dict(_METADATA),
}


class PatchError(ValueError):
    """A patch the server cannot apply (answered as 400/422 by the caller)."""


def strategic_merge_patch(kind: str, target: dict, patch: dict) -> dict:
    """``patch`` applied to ``target`` (neither is changed) with ``kind``'s merge keys."""
    if kind not in MERGE_KEYS:
        raise KeyError(kind)
    if not isinstance(patch, dict):
        raise PatchError("a strategic merge patch must be a JSON object")
    result = _merge_map(target if isinstance(target, dict) else {}, patch, (), MERGE_KEYS[kind])
    if result is None:
        raise PatchError("a patch cannot delete the whole object")
    return result


def _merge_map(original: dict, patch: dict, path: tuple, keys: dict):
    directive = patch.get("$patch")
    if directive == "replace":
        return _clean(patch)
    if directive == "delete":
        return None
    if directive not in (None, "merge"):
        raise PatchError(f"unknown patch directive {directive!r} at {'.'.join(path) or '<root>'}")
    result = dict(original)
    retain = patch.get("$retainKeys")
    if retain is not None:
        if not isinstance(retain, list):
            raise PatchError("$retainKeys must be a list")
        result = {k: v for k, v in result.items() if k in retain}
    orders = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list) and isinstance(value, list):
                result[field] = [v for v in result[field] if v not in value]
            continue
        if key.startswith("$"):
            raise PatchError(f"unknown patch directive {key!r}")
        if value is None:
            result.pop(key, None)
            continue
        child = path + (key,)
        old = result.get(key)
        if isinstance(value, dict):
            merged = _merge_map(old if isinstance(old, dict) else {}, value, child, keys)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(old if isinstance(old, list) else [], value, child, keys)
        else:
            result[key] = copy.deepcopy(value)
    for field, order in orders.items():
        if isinstance(result.get(field), list) and isinstance(order, list):
            result[field] = _reorder(result[field], order, keys.get(path + (field,)))
    return result


def _merge_list(original: list, patch: list, path: tuple, keys: dict) -> list:
    strategy = keys.get(path)
    if strategy is None:
        return _clean(patch)             # atomic: replaced whole
    if strategy is MERGE_PRIMITIVE:
        return list(original) + [copy.deepcopy(v) for v in patch if v not in original]
    if any(isinstance(e, dict) and e.get("$patch") == "replace" for e in patch):
        return [_clean(e) for e in patch if not (isinstance(e, dict) and "$patch" in e)]
    result = [copy.deepcopy(e) for e in original]
    for element in patch:
        if not isinstance(element, dict) or strategy not in element:
            raise PatchError(f"an element of {'.'.join(path)} lacks its merge key {strategy!r}")
        at = next((i for i, e in enumerate(result)
                   if isinstance(e, dict) and e.get(strategy) == element[strategy]), None)
        if element.get("$patch") == "delete":
            result = [e for e in result if not (isinstance(e, dict) and e.get(strategy) == element[strategy])]
        elif at is None:
            result.append(_merge_map({}, element, path, keys))
        else:
            merged = _merge_map(result[at], element, path, keys)
            if merged is None:
                del result[at]
            else:
                result[at] = merged
    return result


def _reorder(items: list, order: list, key) -> list:
    def ident(item):
        return item.get(key) if isinstance(key, str) and isinstance(item, dict) else item

    wanted = [ident(o) for o in order]
    listed = sorted((i for i in items if ident(i) in wanted), key=lambda i: wanted.index(ident(i)))
    return listed + [i for i in items if ident(i) not in wanted]


def _clean(value):
    """A copy without patch directives (what a replaced value stores)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
