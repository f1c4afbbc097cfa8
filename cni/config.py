"""CNI plugin input and output, pure (CNI spec 1.0.0; 0.3.x/0.4.0 configs accepted).

No I/O and only stdlib imports: the plugin runs once per pod start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_EXCLUDED = ("kube-system",)

# Error codes from the CNI specification.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_CONFIG = 4
ERR_DECODE = 6
ERR_INVALID_ENV = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_ENROLLED = 100      # plugin-specific (100+): CHECK found a pod that should be captured, isn't


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = "1.0.0") -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class Environment:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: str

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")


@dataclass(frozen=True)
class PluginConfig:
    cni_version: str
    name: str
    agent_socket: str
    state: str
    exclude_namespaces: tuple[str, ...]
    agent_timeout_seconds: float
    prev_result: dict | None
    raw: dict = field(repr=False, default_factory=dict)


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K=V`` as the runtime passes it in CNI_ARGS."""
    out: dict[str, str] = {}
    for part in (text or "").split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, "CNI_ARGS is malformed", f"expected KEY=VALUE, got {part!r}")
        out[key] = value
    return out


def parse_environment(env: dict[str, str]) -> Environment:
    command = env.get("CNI_COMMAND", "")
    if command not in ("ADD", "DEL", "CHECK", "VERSION"):
        raise CniError(ERR_INVALID_ENV, "CNI_COMMAND is missing or unknown",
                       f"CNI_COMMAND={command!r}; expected ADD, DEL, CHECK or VERSION")
    if command != "VERSION":
        required = ["CNI_CONTAINERID", "CNI_IFNAME"]
        if command in ("ADD", "CHECK"):
            required.append("CNI_NETNS")
        for var in required:
            if not env.get(var):
                raise CniError(ERR_INVALID_ENV, f"{var} is required for {command}")
        netns = env.get("CNI_NETNS", "")
        if netns and not netns.startswith("/"):
            raise CniError(ERR_INVALID_ENV, "CNI_NETNS must be an absolute path", f"CNI_NETNS={netns!r}")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    if command in ("ADD", "CHECK"):
        for key in ("K8S_POD_NAMESPACE", "K8S_POD_NAME"):
            if not args.get(key):
                raise CniError(ERR_INVALID_ENV, f"CNI_ARGS lacks {key}",
                               "ambient-cni runs only for Kubernetes pods")
    return Environment(command, env.get("CNI_CONTAINERID", ""), env.get("CNI_NETNS", ""),
                       env.get("CNI_IFNAME", ""), args, env.get("CNI_PATH", ""))


def parse_config(data: bytes, command: str) -> PluginConfig:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(ERR_DECODE, "network configuration is not valid JSON", str(exc)) from None
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODE, "network configuration must be a JSON object")
    version = raw.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"unsupported cniVersion {version!r}",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")

    def field_(name, kind, required=True, default=None):
        value = raw.get(name, default)
        if value is None and not required:
            return default
        if not isinstance(value, kind) or (required and value in ("", None)):
            raise CniError(ERR_INVALID_CONFIG, f"config field {name!r} is missing or not a {kind.__name__}",
                           f"{name}={value!r}")
        return value

    socket_path = field_("agent_socket", str)
    if not socket_path.startswith("/"):
        raise CniError(ERR_INVALID_CONFIG, "config field 'agent_socket' must be an absolute path")
    state = field_("state", str)
    if not state.startswith("file:"):
        raise CniError(ERR_INVALID_CONFIG, f"config field 'state' must be file:PATH, got {state!r}")
    excluded = raw.get("exclude_namespaces", list(DEFAULT_EXCLUDED))
    if not isinstance(excluded, list) or not all(isinstance(x, str) for x in excluded):
        raise CniError(ERR_INVALID_CONFIG, "config field 'exclude_namespaces' must be a list of strings")
    timeout = raw.get("agent_timeout_seconds", 5)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
        raise CniError(ERR_INVALID_CONFIG, "config field 'agent_timeout_seconds' must be a number in (0, 300]")
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(ERR_INVALID_CONFIG, "prevResult must be an object")
    if command in ("ADD", "CHECK") and prev is None:
        raise CniError(ERR_INVALID_CONFIG, "ambient-cni is a chained plugin: no prevResult",
                       "put ambient-cni after the plugin that sets up the pod's network")
    return PluginConfig(version, str(raw.get("name", "")), socket_path, state, tuple(excluded),
                        float(timeout), prev, raw)


def result_addresses(prev: dict) -> tuple[list[str], list[str]]:
    """(addresses in CIDR form, gateways) from a prevResult (0.3.x, 0.4.0, 1.0.0 shapes)."""
    ips, gateways = [], []
    for entry in prev.get("ips") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            raise CniError(ERR_INVALID_CONFIG, "prevResult.ips holds an entry without an address",
                           json.dumps(entry))
        ips.append(entry["address"])
        if isinstance(entry.get("gateway"), str) and entry["gateway"]:
            gateways.append(entry["gateway"])
    return ips, gateways


def version_result() -> dict:
    return {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}


def add_result(config: PluginConfig) -> dict:
    """A chained plugin that changes nothing returns prevResult, in the config's version."""
    result = dict(config.prev_result or {})
    result["cniVersion"] = config.cni_version
    return result
