"""Layers that point one way: a module imports only from its own layer or below.

The order, bottom to top, is written down in docs/ARCHITECTURE.md ("Layers").
Every import counts, also one inside a function (a lazy import is still a
dependency). ``from agent import control`` is an import of ``agent.control``.
A module the table does not place fails the test: a new module is put in a
layer on purpose, not by accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Bottom to top. The most specific prefix places a module.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Pure helpers and values every layer may use. agent.identity.spiffe is
    # the SPIFFE ID value type (stdlib only); identities cross every module
    # boundary as it, so it sits at the bottom, not with the CA client.
    ("foundation", ("agent.boundedjson", "agent.fileio", "agent.netns", "agent.heap", "agent.eventloop",
                    "agent.kubeclient", "agent.controlclient", "agent.identity.spiffe", "agent.identity.proto")),
    # One cluster model (typed views, derived facts) and its sources.
    ("state", ("agent.state",)),
    # Decisions over the model: enrolment, L4 policy (with the request and
    # decision types the data plane uses), the node's certificates.
    ("rules", ("agent.enrol", "agent.policy", "agent.identity")),
    # Views for people and Prometheus; the CA server (its own program).
    ("observe", ("agent.observe", "agent.ca")),
    # eBPF programs, maps and per-pod listeners.
    ("capture", ("agent.capture",)),
    # The data plane.
    ("proxy", ("agent.proxy",)),
    # Wiring and programs: the node agent, its control socket and CLI, the
    # local lab. agent.identity.node wires the certificate manager to the
    # data plane's TLS contexts for the daemon, so it belongs here.
    ("node", ("agent.identity.node", "agent.daemon", "agent.control", "agent.status", "agent.cli",
              "lab", "agent")),
]
# The CNI plugin is a separate, fast-starting program: it may use the model
# and the enrolment rule, nothing that pulls in the data plane.
CNI_MAY_IMPORT_UP_TO = "rules"

_INDEX = {name: i for i, (name, _) in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    return best


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every ``agent`` module ``path`` imports, resolved to modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "agent"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "agent":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else node.module))
    return found


def _sources(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_agent_module_has_a_layer():
    unplaced = [module_name(p) for p in _sources("agent") if layer_of(module_name(p)) is None]
    assert unplaced == [], f"place these modules in a layer (tests/unit/test_layers.py, docs/ARCHITECTURE.md): {unplaced}"


def upward_imports(path: Path, importer: str, own: str) -> list[str]:
    """The imports in ``path`` (module ``importer``, in layer ``own``) of a higher layer."""
    out = []
    for line, imported in imports_of(path):
        theirs = layer_of(imported)
        if theirs is not None and _INDEX[theirs] > _INDEX[own]:
            out.append(f"{path.name}:{line}: {importer} ({own}) imports {imported} ({theirs})")
    return out


def violations(top: str, ceiling: str | None = None) -> list[str]:
    out = []
    for path in _sources(top):
        importer = module_name(path)
        own = ceiling if ceiling is not None else layer_of(importer)
        if own is not None:
            out += [f"{path.parent.relative_to(ROOT)}/{v}" for v in upward_imports(path, importer, own)]
    return out


def test_no_import_runs_up_the_layers():
    assert violations("agent") == []


def test_the_cni_plugin_stays_below_the_data_plane():
    assert violations("cni", CNI_MAY_IMPORT_UP_TO) == []


def test_the_spiffe_value_type_is_stdlib_only():
    """It sits at the bottom (foundation) and in the CNI bundle, through the model."""
    import sys
    tree = ast.parse((ROOT / "agent/identity/spiffe.py").read_text())
    tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert tops - {"__future__"} <= set(sys.stdlib_module_names), tops


@pytest.mark.parametrize("source, expected", [
    # The checker itself: an upward import is found, also a lazy one and a
    # `from package import module`; a downward one is not.
    ("from agent.proxy.hbone import workload_metadata\n", ["agent.proxy.hbone"]),
    ("def f():\n    from agent.daemon import NodeAgent\n", ["agent.daemon"]),
    ("from agent import daemon\n", ["agent.daemon"]),
    ("import agent.enrol.rule\n", ["agent.enrol.rule"]),
    ("from agent.fileio import atomic_write\n", []),
])
def test_checker_finds_upward_imports(tmp_path, source, expected):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = [v.split(" imports ")[1].split(" ")[0] for v in upward_imports(probe, "agent.state.probe", "state")]
    assert found == expected
