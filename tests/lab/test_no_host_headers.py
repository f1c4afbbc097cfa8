"""The capture programs compile and load with no kernel headers on the host.

Each test runs the agent's real load path (``CaptureDatapath.load``, which
runs the real loader and BCC) in a child process with its own private mount
namespace (util-linux ``unshare --mount --propagation private``: unshare
CLONE_NEWNS, then make-rprivate), in which ``/lib/modules`` and ``/usr/src``
are covered by empty tmpfs mounts, as on a node image that ships no headers.
The only headers left are the bundle the image ships (``make kernel-headers``
makes the same tree and links it at the image's path).

The last test runs a lab's real agents: one compile per agent start, none
per pod, and the compile time exported as a metric.

The programs go to a fresh cgroup v2 directory of the test's own (no process
runs in it) and a unique pin directory; the sk_lookup link goes to a network
namespace the test creates. All of it is removed afterwards, also on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.capture import kernel_headers
from agent.capture.datapath import BPFFS, CGROUP_PROGRAMS, SK_LOOKUP_PIN, teardown
from lab import sysops
from tests.lab.conftest import running_lab, settle, unique_name, wait_for

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = ("/lib/modules", "/usr/src")

# Runs in the child, inside the new mount namespace: cover each directory
# named in $HIDE with an empty tmpfs, check that the premise holds, then run
# the command. Mounts vanish with the namespace when the child exits.
HIDE_SCRIPT = r"""
set -e
for d in $HIDE; do
  if [ -d "$d" ]; then mount -t tmpfs -o size=64k,mode=0755 ambient-test-hidden "$d"; fi
  if [ -n "$(ls -A "$d" 2>/dev/null)" ]; then echo "premise: $d is not empty" >&2; exit 99; fi
done
if [ -e "/lib/modules/$(uname -r)/build" ] || [ -e /sys/kernel/kheaders.tar.xz ]; then
  echo "premise: kernel headers still reachable" >&2; exit 99
fi
exec "$@"
"""

# The agent's side, in the child: load (runs the loader), then attach the
# pinned sk_lookup program to the test's netns through a pinned bpf_link,
# as the agent does for each pod (libbpf's bpf_link_create).
AGENT_SCRIPT = r"""
import json, os, sys
from agent.capture.datapath import CaptureDatapath, CaptureError
pin_dir, cgroup, netns = sys.argv[1:4]
dp = CaptureDatapath(pin_dir, cgroup)
try:
    dp.load()
except CaptureError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(3)
fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
try:
    dp.attach_netns(4242, fd)   # 4242: only the pin's name (link_4242)
finally:
    os.close(fd)
r = dp.report
print(json.dumps({"compile_seconds": r.compile_seconds, "kernel_headers": r.kernel_headers,
                  "headers_source": r.headers_source, "loader_seconds": dp.loader_seconds}))
dp.close()
"""


@pytest.fixture
def target():
    name = unique_name("ambient-test-nohdr-")
    cgroup = f"{sysops.CGROUP_V2}/{name}"
    pin_dir = f"{BPFFS}/{name}"
    os.mkdir(cgroup)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield pin_dir, cgroup, f"/run/netns/{name}"
    finally:
        problems = teardown(pin_dir, cgroup)
        subprocess.run(["ip", "netns", "delete", name], timeout=10)
        os.rmdir(cgroup)
        assert problems == []


def _run_hidden(hide: tuple[str, ...], *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in (kernel_headers.BCC_ENV, kernel_headers.SETTING_ENV)}
    env["PYTHONPATH"] = str(ROOT)
    env["HIDE"] = " ".join(hide)
    return subprocess.run(["unshare", "--mount", "--propagation", "private",
                           "sh", "-c", HIDE_SCRIPT, "sh", *command],
                          capture_output=True, text=True, timeout=180, env=env, cwd=str(ROOT))


def _bpftool(*args: str):
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True,
                         timeout=10).stdout
    return json.loads(out.strip() or "[]")


def test_bundled_headers_suffice_with_lib_modules_usr_src_and_btf_hidden(target):
    pin_dir, cgroup, netns = target
    assert kernel_headers.usable(kernel_headers.BUNDLED_DIR), \
        f"no bundle at {kernel_headers.BUNDLED_DIR}: run `make kernel-headers`"
    # /sys/kernel/btf too: nothing in our load path needs the kernel's BTF (docs/CAPTURE.md).
    done = _run_hidden((*HIDDEN, "/sys/kernel/btf"), sys.executable, "-c", AGENT_SCRIPT,
                       pin_dir, cgroup, netns)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["headers_source"] == "bundled"
    assert report["kernel_headers"] == kernel_headers.BUNDLED_DIR
    assert 0 < report["compile_seconds"] < report["loader_seconds"]

    # The cgroup programs are attached, and they are the pinned ones.
    pinned = {name: _bpftool("prog", "show", "pinned", f"{pin_dir}/{name}")["id"]
              for name, *_ in CGROUP_PROGRAMS}
    assert {p["id"] for p in _bpftool("cgroup", "show", cgroup)} == set(pinned.values())
    # The sk_lookup link made in the hidden namespace holds the test netns
    # (the child has exited: only the pin keeps it).
    sk_id = _bpftool("prog", "show", "pinned", f"{pin_dir}/{SK_LOOKUP_PIN}")["id"]
    netns_ino = os.stat(netns).st_ino
    links = [link for link in _bpftool("link", "show") if link.get("prog_id") == sk_id]
    assert [(link["type"], link.get("netns_ino")) for link in links] == [("netns", netns_ino)]


def test_without_bundle_or_host_headers_the_load_fails(target):
    pin_dir, cgroup, netns = target
    # The default (auto) with the bundle hidden as well: BCC's own search of
    # the host finds nothing, and the agent gets a CaptureError saying so.
    done = _run_hidden((*HIDDEN, os.path.dirname(kernel_headers.BUNDLED_DIR)), sys.executable, "-c",
                       AGENT_SCRIPT, pin_dir, cgroup, netns)
    assert done.returncode == 3, done.stdout + done.stderr
    error = json.loads(done.stdout.strip().splitlines()[-1])["error"]
    assert "BPF loader exited with status 1" in error
    assert "against kernel headers the host's" in error
    assert "Unable to find kernel headers" in error   # libbcc's own message (its stdout)
    assert _bpftool("cgroup", "show", cgroup) == []


def test_host_setting_ignores_the_bundle_and_fails_without_host_headers(target):
    pin_dir, cgroup, _netns = target
    done = _run_hidden(HIDDEN, sys.executable, "-m", "agent.capture.loader", "--pin-dir", pin_dir,
                       "--cgroup", cgroup, "--kernel-headers", "host")
    assert done.returncode == 1, done.stderr
    assert "Unable to find kernel headers" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("loader: compile ")
    assert _bpftool("cgroup", "show", cgroup) == []


def test_the_bundle_has_no_kernel_internal_headers():
    # Kernel-internal layouts differ between kernels: a program reading them
    # must fail to compile against the 6.1 bundle, not load with wrong offsets.
    code = ("from bcc import BPF\n"
            "BPF(text='#include <net/sock.h>\\nint f(struct __sk_buff *ctx) { return 0; }')\n")
    env = {k: v for k, v in os.environ.items() if k != kernel_headers.SETTING_ENV}
    env[kernel_headers.BCC_ENV] = kernel_headers.BUNDLED_DIR
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert "'net/sock.h' file not found" in done.stderr


FIRST = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web}
"""
LATER = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web}
"""
METRICS = ("import urllib.request\n"
           "print(urllib.request.urlopen('http://127.0.0.1:15020/metrics', timeout=5).read().decode())\n")


def _gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_the_agent_compiles_once_at_start_not_per_pod_and_exports_the_time():
    with running_lab("nohdr", FIRST) as lab:
        assert lab.apply(LATER)["failed"] == {}   # two pods enrolled after the agent started
        settle(lab)

        def metrics() -> str:
            return lab.node_run("node1", [sys.executable, "-c", METRICS], timeout=20, check=True).stdout

        wait_for(lambda: _gauge(metrics(), "ambient_agent_enrolled_pods") == 3, what="3 pods captured")
        text = metrics()
        compile_s = _gauge(text, "ambient_agent_bpf_compile_seconds")
        loader_s = _gauge(text, "ambient_agent_bpf_loader_seconds")
        assert compile_s is not None and loader_s is not None
        assert 0 < compile_s < loader_s < 60
        log = (lab.node_dir("node1") / "agent.log").read_text(errors="replace")
        # datapath.CaptureDatapath.load logs this once per loader run.
        assert log.count("BPF programs compiled in") == 1, log[-3000:]
        assert "against kernel headers /usr/share/ambient-agent/kernel-headers (bundled)" in log
