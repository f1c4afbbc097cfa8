"""The lab is a development tool: the product (wheel, image, CNI bundle) carries none of it.

``lab/`` (the local kubelet and the stand-in API server, ``lab/kubeapi``),
``bench/`` and ``tests/`` live beside the product in the checkout. The
product is what ``pyproject.toml`` packages (``agent``, ``cni``), what the
Dockerfile copies and installs, and what ``cni/ambient-cni.spec`` freezes.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEV_TOOLS = ("lab", "bench", "tests")


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_product_code_never_imports_the_lab_bench_or_tests():
    offenders = [f"{p.relative_to(ROOT)}: {sorted(_imports(p) & set(DEV_TOOLS))}"
                 for top in ("agent", "cni") for p in sorted((ROOT / top).rglob("*.py"))
                 if _imports(p) & set(DEV_TOOLS)]
    assert offenders == []


def test_pyroute2_is_a_lab_dependency_not_a_product_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("pyroute2")]
    assert [d for d in project["optional-dependencies"]["lab"] if d.lower().startswith("pyroute2")]
    users = [str(p.relative_to(ROOT)) for top in ("agent", "cni") for p in sorted((ROOT / top).rglob("*.py"))
             if "pyroute2" in _imports(p)]
    assert users == []
    # No console script of the product points into a development tool.
    assert all(target.split(".")[0] in ("agent", "cni") for target in project["scripts"].values())


def test_product_wheel_holds_agent_and_cni_only(tmp_path):
    """Build the real wheel from a copy of the checkout that has lab/ beside agent/ and cni/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("agent", "cni", "bpf", "lab"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "bench").mkdir()
    (src / "bench" / "__init__.py").write_text("")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "out"),
                           str(src)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "out").glob("ambient_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"agent", "cni"}
    assert "agent/cli.py" in names and "cni/plugin.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in requires if "pyroute2" in r] == ['Requires-Dist: pyroute2>=0.7; extra == "lab"']


def test_image_copies_and_installs_no_development_tool():
    text = (ROOT / "Dockerfile").read_text()
    copied = [src for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M) for src in line.split()[:-1]]
    assert copied, "no COPY lines found"
    for src in copied:
        top = src.strip("./").split("/")[0]
        assert top and top not in DEV_TOOLS, f"Dockerfile copies {src}"
    installs = re.findall(r"pip install ([^\s\\]+)", text)
    assert installs and all("lab" not in spec for spec in installs), installs


def test_cni_bundle_excludes_the_development_tools():
    spec = (ROOT / "cni" / "ambient-cni.spec").read_text()
    excludes = ast.literal_eval(re.search(r"excludes=(\[[^\]]*\])", spec).group(1))
    assert set(DEV_TOOLS) | {"pyroute2"} <= set(excludes)
    # What the bundle's entry point reaches never imports them either.
    assert "bundle_entry.py" in spec and not _imports(ROOT / "cni" / "bundle_entry.py") & set(DEV_TOOLS)
