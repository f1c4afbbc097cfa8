"""Chaining ambient-cni into the node's primary CNI configuration, pure.

What ``ambient-agent install-cni`` (``cni.installer``, the shell) decides,
as data in and data out, so every config shape is table-tested:

* the primary configuration is the first ``.conf``/``.conflist`` of the CNI
  config directory by name, as containerd and CRI-O pick it (files of ours,
  hidden files and temporary files are skipped);
* ambient-cni becomes the LAST plugin of that list: it must see the pod's
  addresses in ``prevResult``, i.e. run after the plugin that creates the
  interface and after the meta plugins (portmap, bandwidth) that pass it on;
* a plain ``.conf`` (one plugin) is wrapped into ``<stem>.conflist`` and the
  ``.conf`` removed, which is what istio-cni does too;
* installing is idempotent: an equal entry already last means no write, a
  different entry of ours is replaced;
* every file changed gets a restore record holding its original bytes and
  the bytes written, so uninstall puts back the original byte for byte when
  nobody touched the file since; if the primary CNI rewrote it meanwhile, our
  entry is removed from what is there instead (the primary's newer content
  wins over our old copy);
* a file that does not parse, or is not a CNI configuration, is never
  written: the plan says why and changes nothing.

Restore records live in one file in the config directory whose name has no
config extension, so runtimes do not read it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

PLUGIN_TYPE = "ambient-cni"
CONFIG_EXTENSIONS = (".conflist", ".conf")
# Kept in the CNI config dir: no .conf/.conflist/.json extension, so neither
# libcni nor we take it for a network configuration.
RECORD_NAME = "ambient-cni.restore"
KUBECONFIG_NAME = "ambient-cni-kubeconfig"
# cniVersions ambient-cni accepts (cni.config.SUPPORTED_VERSIONS); a primary
# config of another version would make every ADD fail, so it is refused here.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")


def is_candidate(name: str) -> bool:
    """A file the runtime could take as the primary network configuration."""
    if name.startswith((".", PLUGIN_TYPE)):
        return False            # hidden/temporary files (ours are ".name.tmp-*") and ours
    return name.endswith(CONFIG_EXTENSIONS)


def pick_primary(names) -> str | None:
    """The first candidate by name (byte order, like Go's sort.Strings), or None."""
    found = sorted((n for n in names if is_candidate(n)), key=lambda n: n.encode())
    return found[0] if found else None


def plugin_entry(agent_socket: str, state: str = "kube", kubeconfig: str | None = None,
                 exclude_namespaces=("kube-system",), agent_timeout_seconds: float | None = None,
                 log_file: str | None = None) -> dict:
    """Our plugin entry, in the fields ``cni.config.parse_config`` reads."""
    entry: dict = {"type": PLUGIN_TYPE, "agent_socket": agent_socket, "state": state}
    if kubeconfig:
        entry["kubeconfig"] = kubeconfig
    entry["exclude_namespaces"] = list(exclude_namespaces)
    if agent_timeout_seconds is not None:
        entry["agent_timeout_seconds"] = agent_timeout_seconds
    if log_file:
        entry["log_file"] = log_file
    return entry


def render(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


# -- restore records ------------------------------------------------------------------

@dataclass(frozen=True)
class Restore:
    """How to undo one change: ``written_name`` held ``written`` (our bytes);
    before, ``original_name`` held ``original``."""

    original_name: str
    original: bytes
    written_name: str
    written: bytes


def encode_records(records) -> bytes:
    b64 = lambda b: base64.b64encode(b).decode()   # noqa: E731 - exact bytes, whatever they are
    return render({"version": 1, "records": [
        {"original_name": r.original_name, "original": b64(r.original),
         "written_name": r.written_name, "written": b64(r.written)} for r in records]})


def decode_records(data: bytes) -> list[Restore]:
    """Raises ValueError (with the reason) for anything we did not write."""
    try:
        doc = json.loads(data)
        out = []
        for r in doc["records"]:
            out.append(Restore(_plain_name(r["original_name"]), base64.b64decode(r["original"], validate=True),
                               _plain_name(r["written_name"]), base64.b64decode(r["written"], validate=True)))
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"restore record is damaged: {type(exc).__name__}: {exc}") from None


def _plain_name(name) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a file name: {name!r}")
    return name


# -- parsing a primary config ---------------------------------------------------------

class ConfigProblem(Exception):
    """The file is not a CNI configuration we may change; the message says why."""


def parse_primary(name: str, data: bytes) -> dict:
    """The parsed file, checked to be a conflist (``.conflist``) or a single
    plugin config (``.conf``) of a version ambient-cni supports."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigProblem(f"{name}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigProblem(f"{name}: a JSON {type(doc).__name__}, not an object")
    version = doc.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise ConfigProblem(f"{name}: cniVersion {version!r} is not one ambient-cni supports "
                            f"({', '.join(SUPPORTED_VERSIONS)})")
    if not isinstance(doc.get("name"), str) or not doc["name"]:
        raise ConfigProblem(f"{name}: no network 'name'")
    if name.endswith(".conflist") or "plugins" in doc:
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise ConfigProblem(f"{name}: 'plugins' must be a non-empty list")
        for i, p in enumerate(plugins):
            if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
                raise ConfigProblem(f"{name}: plugins[{i}] has no string 'type'")
        if all(p["type"] == PLUGIN_TYPE for p in plugins):
            raise ConfigProblem(f"{name}: lists only ambient-cni, no primary plugin")
    else:
        if not isinstance(doc.get("type"), str) or not doc["type"]:
            raise ConfigProblem(f"{name}: no plugin 'type'")
        if doc["type"] == PLUGIN_TYPE:
            raise ConfigProblem(f"{name}: is an ambient-cni config, not a primary one")
    return doc


# -- plans --------------------------------------------------------------------------

@dataclass
class Plan:
    """What to do. ``records`` is the complete new record list, None for no
    change. The shell applies records first, then writes, then removes, so a
    crash half-way still leaves the original bytes on disk."""

    status: str                 # installed, updated, unchanged, waiting, refused, removed, clean
    message: str
    primary: str | None = None
    writes: dict[str, bytes] = field(default_factory=dict)
    removes: list[str] = field(default_factory=list)
    records: list[Restore] | None = None

    @property
    def changes(self) -> bool:
        return bool(self.writes or self.removes or self.records is not None)


def _without_ours(plugins: list) -> list:
    return [p for p in plugins if p.get("type") != PLUGIN_TYPE]


def plan_install(files: dict[str, bytes], entry: dict, records: list[Restore]) -> Plan:
    """Chain ``entry`` into the primary config among ``files`` (name -> bytes
    of every candidate in the directory)."""
    primary = pick_primary(files)
    if primary is None:
        return Plan("waiting", "no .conf/.conflist in the CNI config directory yet: "
                               "waiting for the primary CNI to write one")
    data = files[primary]
    try:
        doc = parse_primary(primary, data)
    except ConfigProblem as exc:
        return Plan("refused", f"left alone: {exc}", primary)

    others = [r for r in records if r.written_name != primary]
    mine = next((r for r in records if r.written_name == primary), None)

    if "plugins" in doc:
        plugins = doc["plugins"]
        ours = [p for p in plugins if p["type"] == PLUGIN_TYPE]
        if ours == [entry] and plugins[-1] == entry:
            return Plan("unchanged", f"{primary}: ambient-cni already chained last", primary)
        new = dict(doc)
        new["plugins"] = _without_ours(plugins) + [entry]
        written = render(new)
        if ours and mine is not None:
            # Our own earlier write (older settings): the original stays the same.
            record = Restore(mine.original_name, mine.original, primary, written)
            status = "updated"
        elif ours:
            # Ours, but the record is gone: rebuild the original without our
            # entry (formatting may differ from what the primary CNI wrote).
            original = dict(doc)
            original["plugins"] = _without_ours(plugins)
            record = Restore(primary, render(original), primary, written)
            status = "updated"
        else:
            # Fresh from the primary CNI (first install, or it rewrote the file).
            record = Restore(primary, data, primary, written)
            status = "installed"
        return Plan(status, f"{primary}: ambient-cni chained as plugin {len(new['plugins'])} "
                            f"of {len(new['plugins'])}", primary, writes={primary: written},
                    records=others + [record])

    # A plain .conf: wrap it into a list of two.
    target = primary[:-len(".conf")] + ".conflist"
    others = [r for r in others if r.written_name != target]
    ours_before = next((r for r in records if r.written_name == target), None)
    if target in files and ours_before is None:
        return Plan("refused", f"left alone: {primary} would be wrapped into {target}, "
                               f"which exists and was not written by ambient-cni", primary)
    single = {k: v for k, v in doc.items() if k not in ("cniVersion", "name")}
    new = {"cniVersion": doc["cniVersion"], "name": doc["name"], "plugins": [single, entry]}
    written = render(new)
    return Plan("installed", f"{primary}: wrapped into {target} with ambient-cni chained last",
                primary, writes={target: written}, removes=[primary],
                records=others + [Restore(primary, data, target, written)])


def plan_uninstall(files: dict[str, bytes], records: list[Restore]) -> Plan:
    """Undo every recorded change; remove stray entries of ours from candidates."""
    writes: dict[str, bytes] = {}
    removes: list[str] = []
    notes: list[str] = []
    handled = set()
    for r in records:
        handled.add(r.written_name)
        current = files.get(r.written_name)
        if current is None:
            notes.append(f"{r.written_name} is gone: nothing to restore")
            continue
        if current == r.written:
            if r.original_name != r.written_name and r.original_name in files:
                # The primary CNI wrote its .conf again meanwhile: it stands,
                # our wrapped copy of the older one goes.
                removes.append(r.written_name)
                notes.append(f"{r.written_name} removed ({r.original_name} was rewritten meanwhile)")
                continue
            writes[r.original_name] = r.original
            if r.original_name != r.written_name:
                removes.append(r.written_name)
            notes.append(f"{r.original_name} restored byte for byte")
            continue
        _strip(r.written_name, current, writes, notes)
    for name, data in files.items():
        if name not in handled and is_candidate(name):
            _strip(name, data, writes, notes, quiet=True)
    if not records and not writes:
        return Plan("clean", "nothing of ambient-cni in the CNI config directory")
    return Plan("removed", "; ".join(notes) or "nothing to restore", writes=writes,
                removes=removes, records=[])


def _strip(name: str, data: bytes, writes: dict, notes: list, quiet: bool = False) -> None:
    """Remove entries of ours from a file changed since we wrote it."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        doc = None
    plugins = doc.get("plugins") if isinstance(doc, dict) else None
    if not isinstance(plugins, list):
        if not quiet:
            notes.append(f"{name} changed since ambient-cni wrote it and is no conflist: left alone")
        return
    kept = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    if len(kept) == len(plugins):
        if not quiet:
            notes.append(f"{name} was rewritten without ambient-cni: left as it is")
        return
    new = dict(doc)
    new["plugins"] = kept
    writes[name] = render(new)
    notes.append(f"{name}: ambient-cni entry removed (the file changed since it was written)")


# -- the plugin's kubeconfig ----------------------------------------------------------

def api_server_url(host: str, port: str) -> str:
    """``https://HOST:PORT`` from KUBERNETES_SERVICE_HOST/PORT (IPv6 bracketed)."""
    if not host or not port:
        raise ValueError("KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set "
                         "(not in a pod?): pass --kube-server")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"https://{host}:{port}"


def kubeconfig(server: str, ca_pem: bytes, token: str) -> dict:
    """A kubeconfig for the plugin, like istio-cni's: the service account's
    token and CA embedded. Written as JSON (valid YAML, so kubectl reads it)
    because the plugin parses it with ``json`` alone."""
    return {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": "ambient-cni", "user": {"token": token}}],
        "contexts": [{"name": "ambient-cni", "context": {"cluster": "local", "user": "ambient-cni"}}],
        "current-context": "ambient-cni",
    }
