"""The installed ambient-cni runs where no Python exists.

kubelet's runtime executes CNI plugins in the host's mount namespace, and a
node need not have any Python. This test installs the real PyInstaller
bundle (``make cni-plugin``) with ``ambient-agent install-cni``, then runs
the installed plugin in a new mount namespace in which every Python of this
machine is hidden (interpreters, their libraries, libpython, pyenv, the
virtualenv, the build tree), after first proving inside that namespace that
no Python can be found or run. VERSION and two ADDs (a pod of a mesh
namespace, enrolled through a stand-in agent; a pod outside the mesh) must
give the right CNI results, with the pod read over HTTPS (verified against
the CA install-cni embedded in the plugin's kubeconfig) from the test-only
API server. It also checks that no ELF file of the bundle needs a glibc
newer than the floor in ``cni/glibc_floor.py``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.cnichain import plugin_config
from cni.glibc_floor import GLIBC_FLOOR
from lab.kubeapi import objects
from lab.kubeapi.server import KubeApiServer
from tests.unit.test_cni_install import FLANNEL
from tests.unit.test_cni_plugin import AMBIENT, ENROLLED, PREV_100, FakeAgent

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "build" / "cni" / "ambient-cni"

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare(1) for a private mount namespace")


@pytest.fixture(scope="module")
def bundle() -> Path:
    # `make test` builds it first; this keeps a lone pytest run honest too
    # (idempotent: rebuilt only when the plugin's sources are newer than the bundle).
    # The first build on a machine also builds the glibc-floor CPython (minutes; see the Makefile).
    done = subprocess.run(["make", "-s", "cni-plugin"], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.access(BUNDLE / "ambient-cni", os.X_OK)
    return BUNDLE


def python_places() -> tuple[list[str], list[str]]:
    """(files, directories) that hold a Python interpreter or its runtime here."""
    files: set[str] = set()
    for pattern in ("/usr/bin/python*", "/usr/local/bin/python*", "/bin/python*",
                    "/usr/lib/x86_64-linux-gnu/libpython*", "/usr/local/lib/libpython*",
                    "/lib/x86_64-linux-gnu/libpython*"):
        for path in glob.glob(pattern):
            real = os.path.realpath(path)
            if os.path.isfile(real):
                files.add(real)
    dirs: set[str] = set()
    for pattern in ("/usr/lib/python3*", "/usr/lib/python2*", "/usr/local/lib/python3*", "/root/.pyenv",
                    "/usr/lib/google-cloud-sdk/platform/bundledpythonunix"):
        dirs.update(os.path.realpath(p) for p in glob.glob(pattern) if os.path.isdir(p))
    for prefix in (sys.prefix, sys.base_prefix, str(REPO / ".venv"), str(REPO / "build")):
        if os.path.isdir(prefix):
            dirs.add(os.path.realpath(prefix))
    # A tmpfs over a directory hides what is below it: mount only the outermost.
    outer = [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]
    return sorted(files), sorted(outer)


def hide_every_python(tmp_path: Path) -> str:
    """The start of a ``sh`` script, run under ``unshare --mount``, that hides
    every Python of this machine, then proves none can be found or run
    (exit 90-94 otherwise) and prints ``no-python-here``."""
    files, dirs = python_places()
    assert dirs and files, "nothing to hide: the proof would be vacuous"
    empty_file = tmp_path / "empty"
    empty_file.write_bytes(b"")
    empty_file.chmod(0o644)                      # not executable: exec fails, PATH lookups skip it
    script = "set -e\n"
    script += "".join(f"mount --bind {shlex.quote(str(empty_file))} {shlex.quote(f)}\n" for f in files)
    script += "".join(f"mount -t tmpfs -o ro,size=4k ambient-no-python {shlex.quote(d)}\n" for d in dirs)
    script += f"""
set +e
export PATH={shlex.quote(os.environ.get('PATH', '/usr/bin:/bin'))}:/usr/local/bin
for name in python python3 python3.11 python3.12 python3.13 python2; do
  if command -v $name >/dev/null 2>&1; then echo "found $(command -v $name)"; exit 90; fi
done
for lib in $(ldconfig -p | awk '/libpython/ {{print $NF}}'); do
  if [ -s "$lib" ]; then echo "found $lib"; exit 91; fi
done
python3 -c 'print(1)' >/dev/null 2>&1 && exit 92
/usr/bin/python3 -c 'print(1)' >/dev/null 2>&1 && exit 93
{sys.executable} -c 'print(1)' >/dev/null 2>&1 && exit 94
echo no-python-here
"""
    return script


def test_installed_plugin_runs_with_every_python_hidden(bundle, tmp_path):
    bin_dir, conf_dir, out = tmp_path / "bin", tmp_path / "net.d", tmp_path / "out"
    for d in (bin_dir, conf_dir, out):
        d.mkdir()
    (conf_dir / "10-flannel.conflist").write_bytes(FLANNEL)
    sock = str(tmp_path / "agent.sock")

    # HTTPS with the stand-in's throw-away CA: the bundle's own ssl and
    # libssl verify the server against the CA install-cni embedded.
    with KubeApiServer(tls=True) as api:
        api.create(objects.namespace("mesh", AMBIENT))
        api.create(objects.namespace("plain"))
        for ns in ("mesh", "plain"):
            pod = objects.pod("web", ns)
            pod["metadata"]["uid"] = f"uid-{ns}"
            api.create(pod)
        (tmp_path / "token").write_text(api.token)
        (tmp_path / "ca.crt").write_bytes(api.ca_pem)
        assert api.url.startswith("https://")

        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "install-cni", "--once", "--cni-bin-dir", str(bin_dir),
             "--cni-conf-dir", str(conf_dir), "--plugin-source", str(bundle), "--agent-socket", sock,
             "--kube-server", api.url, "--token-file", str(tmp_path / "token"),
             "--ca-file", str(tmp_path / "ca.crt")],
            capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        conflist = json.loads((conf_dir / "10-flannel.conflist").read_bytes())
        index = len(conflist["plugins"]) - 1
        assert conflist["plugins"][index]["type"] == "ambient-cni"
        stdin = json.dumps(plugin_config(conflist, index, PREV_100)).encode()
        (out / "add.json").write_bytes(stdin)

        agent = FakeAgent(sock, ENROLLED)
        try:
            plugin = shlex.quote(str(bin_dir / "ambient-cni"))

            def invoke(tag: str, command: str, namespace: str = "") -> str:
                env = f"CNI_COMMAND={command}"
                if namespace:
                    env += (f" CNI_CONTAINERID=c-{namespace} CNI_NETNS=/run/netns/p CNI_IFNAME=eth0"
                            f" CNI_PATH={shlex.quote(str(bin_dir))}"
                            f" CNI_ARGS='K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web;K8S_POD_UID=uid-{namespace}'")
                return (f"env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin {env} {plugin} "
                        f"< {shlex.quote(str(out / 'add.json'))} > {out}/{tag}.out 2> {out}/{tag}.err; "
                        f"echo $? > {out}/{tag}.rc\n")

            script = hide_every_python(tmp_path)
            script += invoke("version", "VERSION")
            script += invoke("mesh", "ADD", "mesh")
            script += invoke("plain", "ADD", "plain")
            run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                 capture_output=True, text=True, timeout=60)
        finally:
            agent.close()
        asked = [r.path for r in api.requests]

    assert run.returncode == 0 and "no-python-here" in run.stdout, (run.returncode, run.stdout, run.stderr)

    def result(tag):
        rc = int((out / f"{tag}.rc").read_text())
        text = (out / f"{tag}.out").read_text()
        return rc, (json.loads(text) if text.strip() else None), (out / f"{tag}.err").read_text()

    rc, version, err = result("version")
    assert rc == 0, err
    assert version == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}

    rc, added, err = result("mesh")
    assert rc == 0, (added, err)
    assert added == dict(PREV_100, cniVersion=conflist["cniVersion"])
    assert [(r["op"], r["namespace"], r["ips"]) for r in agent.requests][:1] == \
        [("cni-add", "mesh", ["198.18.0.5/24"])]

    rc, added, err = result("plain")
    assert rc == 0, (added, err)
    assert added["ips"] == PREV_100["ips"]
    assert "/api/v1/namespaces/mesh/pods/web" in asked and "/api/v1/namespaces/plain/pods/web" in asked


def glibc_needs(path: Path) -> tuple[int, ...]:
    """The highest ``GLIBC_x.y`` symbol version ``path`` needs (``()``: none)."""
    done = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (path, done.stderr)
    versions = {tuple(int(n) for n in v.split(".")) for v in re.findall(r"\bGLIBC_([0-9]+(?:\.[0-9]+)+)\b",
                                                                         done.stdout)}
    return max(versions, default=())


def test_no_elf_of_the_bundle_needs_a_glibc_above_the_floor(bundle):
    # Every ELF file, whatever its name: the bootloader, libpython, the
    # extension modules, and any library PyInstaller collected.
    elves = [p for p in sorted(bundle.rglob("*")) if p.is_file() and not p.is_symlink()
             and p.open("rb").read(4) == b"\x7fELF"]
    names = {p.name for p in elves}
    assert "ambient-cni" in names and any(n.startswith("libpython3") for n in names), names
    assert any(n.startswith("_ssl.") for n in names), names    # HTTPS to the API server
    floor = tuple(int(n) for n in GLIBC_FLOOR.split("."))
    needs = {str(p.relative_to(bundle)): glibc_needs(p) for p in elves}
    assert needs["_internal/" + next(n for n in sorted(names) if n.startswith("libpython3"))] > (2, 2), \
        "libpython needs no versioned glibc symbol: objdump output misread"
    above = {name: ".".join(map(str, v)) for name, v in needs.items() if v > floor}
    assert not above, f"needs glibc above the floor {GLIBC_FLOOR}: {above}"
