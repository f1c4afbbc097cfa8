"""Kernel objects the lab creates and removes: namespaces, cgroups, processes.

Everything here acts on one named object the caller recorded in ``lab.json``
first; nothing searches by name pattern or kills by process name.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import threading
import time
from typing import Callable, TypeVar

from pyroute2 import netns as pr_netns

from agent.netns import setns

NETNS_DIR = "/run/netns"
CGROUP_V2 = "/sys/fs/cgroup/unified"   # the v2 hierarchy on these hybrid hosts
T = TypeVar("T")

# pyroute2 creates a namespace in a forked child; one at a time keeps the
# fork away from our own concurrent pod-creation threads' netlink sockets.
_netns_lock = threading.Lock()


# --- network namespaces ---------------------------------------------------

def netns_path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create_netns(name: str) -> str:
    """Create ``/run/netns/<name>`` (like ``ip netns add``); refuse to adopt one."""
    with _netns_lock:
        if netns_exists(name):
            raise FileExistsError(errno.EEXIST, f"network namespace {name} already exists")
        pr_netns.create(name)
    return netns_path(name)


def remove_netns(name: str) -> bool:
    """Unmount and unlink ``/run/netns/<name>``; False if it was not there.

    The namespace itself dies once no process and no mount holds it; the
    lab kills its processes first so the links inside go away with it.
    """
    if not os.path.lexists(netns_path(name)):
        return False
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def list_netns() -> list[str]:
    return sorted(pr_netns.listnetns())


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` on a fresh thread that lives inside the namespace at ``path``.

    setns(2) moves only the calling thread; the thread ends with ``fn`` so it
    can never serve anyone else from the wrong namespace.
    """
    box: dict = {}

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=body, name="lab-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def enable_ip_forward(path: str) -> None:
    """Set net.ipv4.ip_forward=1 in the namespace at ``path`` only.

    /proc/sys/net is resolved against the network namespace of the thread
    that opens the file, so the write happens on a thread inside the node.
    """
    def write() -> str:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            return f.read().strip()

    if run_in_netns(path, write) != "1":
        raise OSError(f"could not enable ip_forward in {path}")


def setup_ipv6(path: str, forward: bool = True) -> None:
    """accept_dad=0 (and with ``forward`` forwarding=1) for IPv6 in the namespace at ``path``.

    DAD off: the lab's addresses are unique by construction, and a
    tentative address would make the first seconds of a dual-stack pod fail.
    """
    def write() -> str:
        keys = [("conf/all/accept_dad", "0"), ("conf/default/accept_dad", "0")]
        if forward:
            keys.append(("conf/all/forwarding", "1"))
        for key, value in keys:
            with open(f"/proc/sys/net/ipv6/{key}", "w") as f:
                f.write(value)
        with open("/proc/sys/net/ipv6/conf/all/forwarding") as f:
            return f.read().strip()

    if run_in_netns(path, write) != ("1" if forward else "0"):
        raise OSError(f"could not set up IPv6 in {path}")


def child_setup(netns_fd: int | None = None, cgroup_dir: str | None = None,
                then: Callable[[], object] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` that puts the new process into a cgroup and a netns.

    It runs in the forked child before exec: joining the cgroup first means
    the child never runs the user's program outside it, and ``setns`` in a
    single-threaded child moves the whole process. ``netns_fd`` must stay
    open in the parent until Popen returns.
    """
    procs = os.path.join(cgroup_dir, "cgroup.procs") if cgroup_dir else None

    def preexec() -> None:
        if procs:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        if netns_fd is not None:
            setns(netns_fd)
        if then is not None:
            then()

    return preexec


# --- cgroups (v2) ---------------------------------------------------------

def cgroup_create(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def _populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() == "1"
    except FileNotFoundError:
        return False
    return False


def cgroup_kill(path: str, timeout: float = 5.0) -> bool:
    """SIGKILL every process in the cgroup subtree at ``path``; wait until empty.

    Only the lab puts processes into its cgroups (pod commands, node
    commands, agents), so everything found there is ours. ``cgroup.kill``
    (Linux 5.14) does it atomically, with no pid-reuse window.
    """
    if not os.path.isdir(path):
        return True
    if not _populated(path):
        return True
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except FileNotFoundError:
        _kill_listed(path)
    deadline = time.monotonic() + timeout
    while _populated(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _kill_listed(path: str) -> None:
    """Fallback without cgroup.kill: pidfd per listed process, subtree first."""
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                # Still in that cgroup now that the pidfd pins the process?
                if _cgroup_of(pid) == "/" + os.path.relpath(dirpath, CGROUP_V2):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)


def _cgroup_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return ""


def cgroup_remove_tree(path: str, timeout: float = 5.0) -> list[str]:
    """Kill what is inside, then rmdir leaf-first. Returns problems."""
    problems: list[str] = []
    if not os.path.isdir(path):
        return problems
    if not cgroup_kill(path, timeout):
        problems.append(f"processes remain in {path}")
    # A cgroup directory only holds interface files, which rmdir ignores.
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"rmdir {dirpath}: {exc.strerror}")
    return problems


# --- processes ------------------------------------------------------------

def proc_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields start after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [x.decode("utf-8", "replace") for x in raw.split(b"\0") if x]


def proc_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def process_is(pid: int, start_time: int | None, needle: str) -> bool:
    """Is ``pid`` still the process we started (same start time, our lab in argv)?"""
    if not pid or not proc_running(pid):
        return False
    if start_time is not None and proc_start_time(pid) != start_time:
        return False
    return any(needle in arg for arg in proc_cmdline(pid))


def stop_process(pid: int, start_time: int | None, needle: str, sig: int = signal.SIGTERM,
                 grace: float = 5.0, popen: subprocess.Popen | None = None,
                 wait: bool = True) -> bool:
    """Signal a recorded process; SIGKILL it if it outlives ``grace`` seconds.

    A pidfd pins the process while we check it is still ours, so a reused
    pid can never be signalled. Returns True when the process is gone (or
    was never ours to stop).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        _reap(popen)
        return True
    try:
        if not process_is(pid, start_time, needle):
            _reap(popen)
            return True
        signal.pidfd_send_signal(pidfd, sig)
        if not wait:
            return False
        if _wait_pidfd(pidfd, grace, popen):
            return True
        if sig != signal.SIGKILL:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return _wait_pidfd(pidfd, grace, popen)
        return False
    finally:
        os.close(pidfd)


def _wait_pidfd(pidfd: int, timeout: float, popen: subprocess.Popen | None) -> bool:
    # A pidfd becomes readable when the process exits (child or not).
    ready, _, _ = select.select([pidfd], [], [], timeout)
    if ready:
        _reap(popen)
        return True
    return False


def _reap(popen: subprocess.Popen | None) -> None:
    if popen is not None:
        try:
            popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
