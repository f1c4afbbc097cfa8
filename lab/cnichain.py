"""Executing a CNI network configuration list, the pure part (no I/O).

This is what a container runtime (containerd, CRI-O, libcni) does with a
``.conflist``, reduced to data in and data out so it can be table-tested:

* each plugin entry becomes a full plugin configuration by injecting the
  list's ``cniVersion`` and ``name``, the previous plugin's result as
  ``prevResult`` (ADD: from the second plugin on; DEL: every plugin gets the
  final ADD result) and the ``runtimeConfig`` keys the plugin declared in
  ``capabilities``;
* ADD runs the plugins in order, DEL in reverse order;
* a plugin reports success by printing a result and exiting 0, failure by
  printing an error object ``{"code", "msg", "details"}`` and exiting non-zero.

``lab/runtime.py`` is the shell that actually runs the binaries.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# CNI spec error codes the lab cares about (SPEC.md "Error").
CODE_INCOMPATIBLE_VERSION = 1
CODE_UNSUPPORTED_FIELD = 2
CODE_UNKNOWN_CONTAINER = 3
CODE_INVALID_ENV = 4
CODE_IO_FAILURE = 5
CODE_DECODE_FAILURE = 6
CODE_INVALID_CONFIG = 7
CODE_TRY_AGAIN_LATER = 11
# Not a spec code (plugin-specific codes start at 100): the plugin could not
# be run, crashed, timed out, or failed without printing a CNI error object.
CODE_EXEC_FAILED = 999

# containerd runs the loopback plugin as a network of its own before the
# pod's network; the lab does the same so every pod gets a working ``lo``.
LOOPBACK_CONFLIST: dict = {
    "cniVersion": "1.0.0",
    "name": "cni-loopback",
    "plugins": [{"type": "loopback"}],
}


class CNIError(Exception):
    """A CNI plugin failed; ``code``/``msg``/``details`` as in the spec."""

    def __init__(self, code: int, msg: str, details: str = "",
                 plugin: str | None = None, command: str | None = None) -> None:
        self.code = int(code)
        self.msg = msg
        self.details = details
        self.plugin = plugin
        self.command = command
        super().__init__(str(self))

    def __str__(self) -> str:
        where = " ".join(x for x in (self.plugin, self.command) if x)
        text = f"CNI error {self.code}: {self.msg}"
        if self.details:
            text += f" ({self.details})"
        return f"{where}: {text}" if where else text

    def to_dict(self) -> dict:
        return {"code": self.code, "msg": self.msg, "details": self.details,
                "plugin": self.plugin, "command": self.command}


@dataclass(frozen=True)
class Sandbox:
    """What the runtime knows about the pod sandbox it is wiring up."""

    container_id: str
    netns: str                     # /run/netns/<name>
    namespace: str
    name: str
    uid: str
    ifname: str = "eth0"


def validate_conflist(conflist: Any) -> dict:
    """Check the shape of a network configuration list; return it unchanged."""
    if not isinstance(conflist, dict):
        raise ValueError("a CNI network configuration list must be a JSON object")
    for key in ("cniVersion", "name"):
        if not isinstance(conflist.get(key), str) or not conflist[key]:
            raise ValueError(f"CNI network configuration list needs a non-empty {key!r}")
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise ValueError("CNI network configuration list needs a non-empty 'plugins' list")
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or not plugin["type"]:
            raise ValueError(f"CNI plugin entry {i} needs a string 'type'")
    return conflist


def restrict_families(conflist: Mapping, families: Iterable[str]) -> dict:
    """A copy of ``conflist`` whose host-local IPAM hands out only ``families``
    (``"IPv4"``, ``"IPv6"``): range sets and routes of other families are
    dropped. What the lab's kubelet runs for a single-family pod on a
    dual-stack node (``lab.model.IP_FAMILIES_ANNOTATION``); ADD and DEL must
    see the same copy. Raises ValueError when a host-local IPAM is left with
    no range, since the pod would get no address of the families asked for.
    """
    wanted = {6 if f == "IPv6" else 4 for f in families}
    out = copy.deepcopy(dict(conflist))
    for plugin in out["plugins"]:
        ipam = plugin.get("ipam")
        if not isinstance(ipam, dict) or ipam.get("type") != "host-local":
            continue
        if "ranges" in ipam:
            ipam["ranges"] = [rs for rs in ipam["ranges"]
                              if rs and _family(rs[0].get("subnet", "")) in wanted]
            if not ipam["ranges"]:
                raise ValueError(f"plugin {plugin['type']}: host-local has no range of "
                                 f"{' or '.join(sorted(families))}")
        if "routes" in ipam:
            ipam["routes"] = [r for r in ipam["routes"] if _family(r.get("dst", "")) in wanted]
    return out


def _family(cidr: str) -> int:
    return 6 if ":" in cidr else 4


def plugin_config(conflist: Mapping, index: int, prev_result: Mapping | None = None,
                  runtime_config: Mapping | None = None) -> dict:
    """The configuration plugin ``index`` receives on stdin.

    The list-level ``cniVersion`` and ``name`` win over anything in the entry
    (libcni does the same), ``prevResult`` is only present when there is one,
    and ``runtimeConfig`` carries only the capabilities the plugin asked for.
    """
    conf = copy.deepcopy(dict(conflist["plugins"][index]))
    conf["cniVersion"] = conflist["cniVersion"]
    conf["name"] = conflist["name"]
    conf.pop("prevResult", None)
    if prev_result is not None:
        conf["prevResult"] = copy.deepcopy(dict(prev_result))
    wanted = [cap for cap, on in (conf.get("capabilities") or {}).items() if on]
    if runtime_config and wanted:
        rc = {k: copy.deepcopy(v) for k, v in runtime_config.items() if k in wanted}
        if rc:
            conf["runtimeConfig"] = rc
    return conf


def del_configs(conflist: Mapping, prev_result: Mapping | None,
                runtime_config: Mapping | None = None) -> list[tuple[str, dict]]:
    """``(plugin type, config)`` for DEL, last plugin first.

    After a successful ADD ``prev_result`` is the final ADD result and every
    plugin gets it. After a failed ADD there is no cached result (libcni only
    caches successful ADDs), so the DEL goes out without ``prevResult``.
    """
    plugins = conflist["plugins"]
    return [(plugins[i]["type"], plugin_config(conflist, i, prev_result, runtime_config))
            for i in reversed(range(len(plugins)))]


def cni_args(namespace: str, name: str, infra_container_id: str, uid: str) -> str:
    """The ``CNI_ARGS`` string kubelet's runtimes pass (containerd's set)."""
    pairs = (
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", infra_container_id),
        ("K8S_POD_UID", uid),
    )
    for key, value in pairs:
        if any(c in value for c in ";="):
            raise ValueError(f"CNI_ARGS value for {key} must not contain ';' or '=': {value!r}")
    return ";".join(f"{k}={v}" for k, v in pairs)


def plugin_env(command: str, sandbox: Sandbox, cni_path: str,
               base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one plugin run.

    Starts from ``base_env`` (the runtime's own environment, as libcni does)
    minus any stale ``CNI_*`` variable, so a variable from the caller can
    never change what the plugin is told.
    """
    env = {k: v for k, v in (base_env or {}).items() if not k.startswith("CNI_")}
    env.update({
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": sandbox.container_id,
        "CNI_NETNS": sandbox.netns,
        "CNI_IFNAME": sandbox.ifname,
        "CNI_PATH": cni_path,
        "CNI_ARGS": cni_args(sandbox.namespace, sandbox.name, sandbox.container_id, sandbox.uid),
    })
    return env


def _tail(data: bytes, limit: int = 400) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def _error_object(obj: Any) -> bool:
    return isinstance(obj, dict) and "code" in obj and "msg" in obj


def parse_output(plugin: str, command: str, returncode: int,
                 stdout: bytes, stderr: bytes = b"") -> dict | None:
    """Turn one plugin run into its result, or raise ``CNIError``.

    ADD must print a result object; DEL (and CHECK) print nothing on success.
    A non-zero exit is always a failure: its error object when the plugin
    printed one, otherwise ``CODE_EXEC_FAILED`` with stderr as details.
    """
    text = stdout.strip()
    obj: Any = None
    if text:
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
            if returncode == 0:
                raise CNIError(CODE_DECODE_FAILURE, "plugin printed invalid JSON",
                               _tail(stdout), plugin, command) from None
    if returncode != 0 or _error_object(obj):
        if _error_object(obj):
            details = str(obj.get("details") or "")
            if not details and stderr.strip():
                details = _tail(stderr)
            try:
                code = int(obj["code"])
            except (TypeError, ValueError):
                code = CODE_EXEC_FAILED
            raise CNIError(code, str(obj["msg"]), details, plugin, command)
        details = _tail(stderr) or _tail(stdout)
        raise CNIError(CODE_EXEC_FAILED, f"plugin exited with status {returncode}",
                       details, plugin, command)
    if command == "ADD":
        if not isinstance(obj, dict):
            raise CNIError(CODE_DECODE_FAILURE, "ADD printed no result object",
                           _tail(stdout), plugin, command)
        return obj
    return obj if isinstance(obj, dict) else None


def sandbox_ips(result: Mapping | None) -> list[str]:
    """The pod's addresses (``"198.18.1.5/24"``) from a CNI result.

    Only addresses on sandbox interfaces count (the bridge plugin also lists
    the host-side veth and the bridge); a result without interface indexes
    is taken at its word.
    """
    if not result:
        return []
    interfaces = result.get("interfaces") or []
    out = []
    for ip in result.get("ips") or []:
        addr = ip.get("address")
        if not addr:
            continue
        idx = ip.get("interface")
        if isinstance(idx, int) and 0 <= idx < len(interfaces):
            if not interfaces[idx].get("sandbox"):
                continue
        out.append(addr)
    return out


def sandbox_gateways(result: Mapping | None) -> list[str]:
    """The gateways of the pod's addresses, in the same order, without repeats."""
    if not result:
        return []
    seen: list[str] = []
    addrs = set(sandbox_ips(result))
    for ip in result.get("ips") or []:
        gw = ip.get("gateway")
        if gw and ip.get("address") in addrs and gw not in seen:
            seen.append(gw)
    return seen


def strip_prefix(addrs: Iterable[str]) -> list[str]:
    """``["198.18.1.5/24"]`` -> ``["198.18.1.5"]``."""
    return [a.split("/", 1)[0] for a in addrs]
