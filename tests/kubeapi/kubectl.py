"""Run the real ``kubectl`` binary against the stand-in API server (tests only).

Which binary: ``$KUBECTL``, else ``.tools/bin/kubectl`` (the official v1.33
binary ``make chart-tools`` installs from the npm package that also carries
helm, see tests/chart/fetch_helm.py; Debian 12 has only kubectl 1.20), else
``kubectl`` on PATH. Each ``Kubectl`` has its own HOME and discovery cache directory, so
runs neither read nor write the user's ``~/.kube`` and every test starts with
a cold discovery cache (kubectl's real first-contact path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def find_kubectl() -> str | None:
    for candidate in (os.environ.get("KUBECTL"), ROOT / ".tools" / "bin" / "kubectl"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("kubectl")


def need_kubectl() -> str:
    """The binary, or a skip that says how to get it (as tests/chart does for helm)."""
    import sys

    import pytest

    binary = find_kubectl()
    if binary is None:
        why = "kubectl not found (run `make chart-tools`: the official binary into .tools/bin)"
        print(f"SKIP: {why}", file=sys.stderr)
        pytest.skip(why)
    return binary


class Kubectl:
    """``kubectl`` with a given kubeconfig, optionally inside a network namespace."""

    def __init__(self, binary: str, kubeconfig: str, home: str | os.PathLike,
                 netns_path: str | None = None) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.home = Path(home)
        self.netns_path = netns_path
        self.home.mkdir(parents=True, exist_ok=True)

    def run(self, *args: str, check: bool = True, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "XDG_"))}
        env.update(HOME=str(self.home), KUBECONFIG=self.kubeconfig)
        argv = [self.binary, "--cache-dir", str(self.home / "cache"), *args]
        if self.netns_path:
            # The API server listens inside a lab namespace: kubectl runs there too.
            argv = ["nsenter", f"--net={self.netns_path}", "--", *argv]
        done = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done
