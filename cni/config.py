"""ambient-cni's input and output, pure: the environment, the plugin
configuration on stdin, results and errors (CNI spec 1.0.0; configurations
of versions 0.3.0, 0.3.1 and 0.4.0 are accepted too).

No I/O, and only ``json`` and ``re`` (which ``json`` imports anyway, and
``agent.boundedjson`` uses no more): the plugin runs once per pod sandbox
operation and must start fast. Plain
classes rather than dataclasses for the same reason (each dataclass costs
an ``exec`` at import).
"""

from __future__ import annotations

import json
import re

from agent import boundedjson

CURRENT_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
DEFAULT_EXCLUDED = ("kube-system",)
DEFAULT_AGENT_TIMEOUT_SECONDS = 5.0
MAX_AGENT_TIMEOUT_SECONDS = 300.0
# state "kube": the budget for both API reads (pod, namespace) of one call.
DEFAULT_API_TIMEOUT_SECONDS = 5.0
STATE_KUBE = "kube"

# Well-known error codes (CNI spec, "Error"); 1-99 are reserved to the spec.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4          # the message must name the variables
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11     # transient: the runtime retries the operation
# Plugin-specific codes (100+).
ERR_NOT_ENROLLED = 100       # CHECK: a pod that must be in the mesh is not captured
ERR_INTERNAL = 999           # a bug in the plugin (the Go CNI library's ErrInternal)

# CNI_CONTAINERID (spec, "Parameters"): an alphanumeric first character,
# then alphanumerics, underscores, dots and hyphens.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
_IFNAMSIZ = 16               # Linux interface names hold at most 15 bytes

# Bounds on the configuration checked before it is parsed (agent/boundedjson.py):
# deep nesting or a 5,000-digit number used to escape as a Python traceback
# with code 999 (issue 11). A real conflist entry with its prevResult is a
# few KB, nests about 4 levels and holds no long numbers.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_DIGITS = 64


class CniError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = CURRENT_VERSION) -> dict:
        out = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


class Environment:
    """The CNI_* parameters of one invocation."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path")

    def __init__(self, command: str, container_id: str = "", netns: str = "", ifname: str = "",
                 args: dict[str, str] | None = None, path: str = "") -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args = args or {}
        self.path = path

    # Kubernetes runtimes (containerd, CRI-O) pass the pod's identity in CNI_ARGS.
    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")

    @property
    def infra_container_id(self) -> str:
        return self.args.get("K8S_POD_INFRA_CONTAINER_ID", "")

    @property
    def pod_key(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}"

    def __repr__(self) -> str:
        return (f"Environment(command={self.command!r}, container_id={self.container_id!r}, "
                f"netns={self.netns!r}, ifname={self.ifname!r}, args={self.args!r})")


class PluginConfig:
    """ambient-cni's entry of the conflist, as the runtime passes it on stdin."""

    __slots__ = ("cni_version", "name", "agent_socket", "state", "state_path", "exclude_namespaces",
                 "agent_timeout_seconds", "log_file", "prev_result", "raw", "kubeconfig",
                 "api_timeout_seconds")

    def __init__(self, cni_version: str, name: str, agent_socket: str, state: str, state_path: str | None,
                 exclude_namespaces: tuple[str, ...], agent_timeout_seconds: float,
                 log_file: str | None, prev_result: dict | None, raw: dict,
                 kubeconfig: str | None = None,
                 api_timeout_seconds: float = DEFAULT_API_TIMEOUT_SECONDS) -> None:
        self.cni_version = cni_version
        self.name = name
        self.agent_socket = agent_socket
        self.state = state                      # as configured: file:PATH or kube
        self.state_path = state_path            # PATH of file:PATH; None for kube
        self.kubeconfig = kubeconfig            # kube: the kubeconfig install-cni wrote
        self.api_timeout_seconds = api_timeout_seconds
        self.exclude_namespaces = exclude_namespaces
        self.agent_timeout_seconds = agent_timeout_seconds
        self.log_file = log_file
        self.prev_result = prev_result
        self.raw = raw

    def __repr__(self) -> str:
        return (f"PluginConfig(cni_version={self.cni_version!r}, agent_socket={self.agent_socket!r}, "
                f"state={self.state!r}, exclude_namespaces={self.exclude_namespaces!r}, "
                f"agent_timeout_seconds={self.agent_timeout_seconds!r}, log_file={self.log_file!r}, "
                f"prev_result={'set' if self.prev_result is not None else None})")


# -- environment ----------------------------------------------------------------

def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K=V`` as the runtime passes it in ``CNI_ARGS``.

    Unknown keys are accepted whether or not ``IgnoreUnknown`` is set: the
    plugin reads only the ``K8S_POD_*`` keys and has no use for refusing the
    rest. Empty segments (a trailing ``;``) are tolerated.
    """
    out: dict[str, str] = {}
    for part in (text or "").split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, "CNI_ARGS is malformed",
                           f"CNI_ARGS: expected KEY=VALUE pairs separated by ';', got {part!r}")
        out[key] = value
    return out


def _check_ifname(name: str) -> str:
    """Why ``name`` cannot be a Linux interface name, or ``""``."""
    if len(name.encode()) >= _IFNAMSIZ:
        return f"longer than {_IFNAMSIZ - 1} bytes"
    if name in (".", ".."):
        return "not a valid name"
    if any(c in "/:" or c.isspace() for c in name):
        return "contains '/', ':' or white space"
    return ""


def parse_environment(env) -> Environment:
    """The invocation's parameters from ``env`` (a mapping like ``os.environ``).

    Raises ``CniError`` code 4 naming the variable that is missing or invalid.
    """
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENV, "CNI_COMMAND is missing or unknown" if not command
                       else f"CNI_COMMAND {command!r} is not supported",
                       f"CNI_COMMAND={command!r}; expected one of {', '.join(COMMANDS)}")
    if command == "VERSION":
        return Environment(command)

    container_id = env.get("CNI_CONTAINERID", "")
    if not container_id:
        raise CniError(ERR_INVALID_ENV, f"CNI_CONTAINERID is required for {command}")
    if not _CONTAINER_ID.match(container_id):
        raise CniError(ERR_INVALID_ENV, "CNI_CONTAINERID is invalid",
                       f"CNI_CONTAINERID={container_id!r}: must start with a letter or digit, "
                       "then letters, digits, '_', '.' or '-'")
    ifname = env.get("CNI_IFNAME", "")
    if not ifname:
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME is required for {command}")
    problem = _check_ifname(ifname)
    if problem:
        raise CniError(ERR_INVALID_ENV, "CNI_IFNAME is invalid", f"CNI_IFNAME={ifname!r}: {problem}")
    netns = env.get("CNI_NETNS", "")
    if command != "DEL":   # DEL must work after the namespace is gone
        if not netns:
            raise CniError(ERR_INVALID_ENV, f"CNI_NETNS is required for {command}")
        if not netns.startswith("/"):
            raise CniError(ERR_INVALID_ENV, "CNI_NETNS must be an absolute path", f"CNI_NETNS={netns!r}")

    # K8S_POD_NAMESPACE and K8S_POD_NAME are not required here: without them
    # the invocation is not for a Kubernetes pod (see ``not_a_kubernetes_pod``).
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    return Environment(command, container_id, netns, ifname, args, env.get("CNI_PATH", ""))


def not_a_kubernetes_pod(env: Environment) -> str:
    """Why this invocation carries no Kubernetes pod to decide on, or ``""``.

    Kubernetes runtimes (containerd, CRI-O) always pass both
    ``K8S_POD_NAMESPACE`` and ``K8S_POD_NAME``. Other runtimes sharing the
    node's conflist do not: podman passes ``K8S_POD_NAME`` alone (its
    containers/common leaves the namespace out on purpose), plain libcni
    callers pass neither. Like istio-cni, ambient-cni then lets the container
    through with ``prevResult`` untouched; failing it would make every
    non-Kubernetes container on the node unstartable.
    """
    missing = [key for key in ("K8S_POD_NAMESPACE", "K8S_POD_NAME") if not env.args.get(key)]
    if not missing:
        return ""
    return (f"not a Kubernetes pod: CNI_ARGS has no {' and no '.join(missing)} "
            "(a runtime other than a Kubernetes one, such as podman); prevResult passed through")


def log_file_hint(data: bytes) -> str | None:
    """``log_file`` of a configuration that may not be valid otherwise, or None.

    Used only to write an early failure (a bad environment, a bad field) to
    the configured log as well as to stdout; never raises.
    """
    try:
        raw = boundedjson.loads(data, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH,
                                max_digits=MAX_CONFIG_DIGITS)
    except (ValueError, RecursionError):     # boundedjson.JsonError is a ValueError
        return None
    path = raw.get("log_file") if isinstance(raw, dict) else None
    if isinstance(path, str) and path.startswith("/") and "\x00" not in path:
        return path
    return None


# -- configuration --------------------------------------------------------------

def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.4.0"`` -> ``(0, 4, 0)``; only called on supported versions."""
    return tuple(int(part) for part in version.split("."))


def _invalid(field: str, value, expected: str) -> CniError:
    return CniError(ERR_INVALID_CONFIG, f"config field {field!r} {expected}",
                    f"{field}={json.dumps(value)}")


def _absolute_path(raw: dict, field: str) -> str:
    value = raw.get(field)
    if not isinstance(value, str) or not value:
        raise _invalid(field, value, "is required (a path)" if value is None else "must be a path")
    if not value.startswith("/") or "\x00" in value:
        raise _invalid(field, value, "must be an absolute path")
    return value


def state_path_of(url: str) -> str | None:
    """PATH of ``file:PATH`` (or ``file:///PATH``) if absolute, else None.

    The same syntax as the agent's ``agent.state.file.parse_state_url``,
    repeated here because that module's imports (asyncio, logging) would
    double the plugin's start time.
    """
    if not url.startswith("file:"):
        return None
    path = url[len("file:"):]
    if path.startswith("//"):
        path = path[2:]
        if path.startswith("localhost/"):
            path = path[len("localhost"):]
    return path if path.startswith("/") and "\x00" not in path else None


def parse_config(data: bytes, command: str) -> PluginConfig:
    """Validate the plugin configuration the runtime wrote to stdin.

    Codes: 6 undecodable, 1 unsupported ``cniVersion``, 7 a missing or
    invalid field (the message names it).
    """
    try:
        raw = boundedjson.loads(data, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH,
                                max_digits=MAX_CONFIG_DIGITS)
    except boundedjson.JsonLimitError as exc:
        raise CniError(ERR_DECODE, "network configuration refused", str(exc)) from None
    except boundedjson.JsonError as exc:
        raise CniError(ERR_DECODE, "network configuration is not valid JSON", str(exc)) from None
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODE, "network configuration must be a JSON object",
                       f"got a JSON {type(raw).__name__}")

    version = raw.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       "config has no cniVersion" if version is None
                       else f"incompatible CNI version {version!r}",
                       f"ambient-cni supports {', '.join(SUPPORTED_VERSIONS)}")
    if command == "CHECK" and version_tuple(version) < (0, 4, 0):
        # CHECK arrived in spec 0.4.0; an older config cannot ask for it.
        raise CniError(ERR_INCOMPATIBLE_VERSION, "config version does not allow CHECK",
                       f"cniVersion {version} < 0.4.0")

    agent_socket = _absolute_path(raw, "agent_socket")
    state = raw.get("state")
    if not isinstance(state, str) or not state:
        raise _invalid("state", state, "is required (file:PATH or kube)" if state is None
                       else "must be file:PATH or kube")
    kubeconfig = None
    if state == STATE_KUBE:
        # The pod and its namespace come from the API server named in a
        # kubeconfig that install-cni writes (JSON, see cni.kube).
        state_path = None
        kubeconfig = _absolute_path(raw, "kubeconfig")
    else:
        state_path = state_path_of(state)
        if state_path is None:
            raise _invalid("state", state, "must be file:PATH with an absolute PATH, or kube")
    api_timeout = raw.get("api_timeout_seconds", DEFAULT_API_TIMEOUT_SECONDS)
    if (isinstance(api_timeout, bool) or not isinstance(api_timeout, (int, float))
            or not 0 < api_timeout <= MAX_AGENT_TIMEOUT_SECONDS):
        raise _invalid("api_timeout_seconds", api_timeout,
                       f"must be a number of seconds in (0, {MAX_AGENT_TIMEOUT_SECONDS:g}]")

    excluded = raw.get("exclude_namespaces", list(DEFAULT_EXCLUDED))
    if not isinstance(excluded, list) or not all(isinstance(x, str) and x for x in excluded):
        raise _invalid("exclude_namespaces", excluded, "must be a list of namespace names")

    timeout = raw.get("agent_timeout_seconds", DEFAULT_AGENT_TIMEOUT_SECONDS)
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout <= MAX_AGENT_TIMEOUT_SECONDS):
        raise _invalid("agent_timeout_seconds", timeout,
                       f"must be a number of seconds in (0, {MAX_AGENT_TIMEOUT_SECONDS:g}]")

    log_file = None if raw.get("log_file") is None else _absolute_path(raw, "log_file")

    name = raw.get("name", "")
    prev = raw.get("prevResult")
    if command == "DEL":
        prev = None        # DEL needs nothing from it, and must not fail on it
    elif prev is None:
        if command in ("ADD", "CHECK"):
            raise CniError(ERR_INVALID_CONFIG, "ambient-cni is a chained plugin: no prevResult",
                           "list ambient-cni after the plugin that creates the pod's interface")
    elif not isinstance(prev, dict):
        raise _invalid("prevResult", prev, "must be an object")
    return PluginConfig(version, name if isinstance(name, str) else "", agent_socket, state,
                        state_path, tuple(excluded), float(timeout), log_file, prev, raw,
                        kubeconfig, float(api_timeout))


# -- results ---------------------------------------------------------------------

def _is_cidr(text: str) -> bool:
    """A light syntax check of ``address/prefix`` (``ipaddress`` costs 2 ms to import)."""
    address, sep, prefix = text.partition("/")
    if not sep or not prefix.isdigit() or not address:
        return False
    if ":" in address:
        return int(prefix) <= 128
    parts = address.split(".")
    return (len(parts) == 4 and all(p.isdigit() and int(p) <= 255 for p in parts)
            and int(prefix) <= 32)


def pod_addresses(prev: dict) -> tuple[list[str], list[str]]:
    """(pod addresses in CIDR form, their gateways) from a ``prevResult``.

    ``ips`` has the same shape in 0.3.x, 0.4.0 and 1.0.0 (0.3.x/0.4.0 add a
    ``version`` field, ignored). An address whose ``interface`` index names
    a host-side interface (one without a ``sandbox``; the bridge plugin
    lists ``cni0`` and the host veth end) is not the pod's and is skipped.
    Raises ``CniError`` code 7 for a malformed ``ips``.
    """
    interfaces = prev.get("interfaces")
    if not isinstance(interfaces, list):
        interfaces = []
    entries = prev.get("ips")
    if entries is None:
        return [], []
    if not isinstance(entries, list):
        raise _invalid("prevResult.ips", entries, "must be a list")
    ips: list[str] = []
    gateways: list[str] = []
    for n, entry in enumerate(entries):
        address = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(address, str) or not _is_cidr(address):
            raise _invalid(f"prevResult.ips[{n}].address", address, "must be an address in CIDR form")
        index = entry.get("interface")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(interfaces):
            iface = interfaces[index]
            if isinstance(iface, dict) and not iface.get("sandbox"):
                continue
        ips.append(address)
        gateway = entry.get("gateway")
        if isinstance(gateway, str) and gateway and gateway not in gateways:
            gateways.append(gateway)
    return ips, gateways


def version_result() -> dict:
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def add_result(config: PluginConfig) -> dict:
    """ADD's result: ``prevResult`` unchanged, in the configuration's version.

    The runtime already converted ``prevResult`` to that version; only a
    missing ``cniVersion`` key (allowed inside ``prevResult``) is filled in.
    """
    result = dict(config.prev_result or {})
    result["cniVersion"] = config.cni_version
    return result


def render(obj: dict) -> str:
    """A result or error as printed on stdout."""
    return json.dumps(obj) + "\n"
