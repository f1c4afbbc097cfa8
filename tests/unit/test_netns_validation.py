"""A CNI ADD's ``netns`` must be a pod's network namespace (issue 11, item 3).

``netns_problem`` is the pure rule; ``open_netns`` applies it to a file it
opens without blocking. Real files of this machine: a FIFO, a regular file,
a directory, a device, namespaces of other types, the test's own namespace.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from agent.enrol import discover
from agent.netns import (CLONE_NEWNET, NSFS_MAGIC, NetnsError, NetnsSwitcher, netns_id,
                         netns_problem, open_netns, refused_netns)

REG = stat.S_IFREG | 0o444
NS = (4, 4026532000)
OWN = (4, 4026531833)
HOST = (4, 4026531840)
REFUSED = {OWN: "the agent's own network namespace", HOST: "the node's host network namespace"}


@pytest.mark.parametrize("mode, magic, nstype, ident, expected", [
    (REG, NSFS_MAGIC, CLONE_NEWNET, NS, None),
    (stat.S_IFIFO | 0o600, 0, None, NS, "not a network namespace but a FIFO"),
    (stat.S_IFDIR | 0o755, 0, None, NS, "not a network namespace but a directory"),
    (stat.S_IFCHR | 0o666, 0, None, NS, "not a network namespace but a character device"),
    (stat.S_IFSOCK | 0o666, 0, None, NS, "not a network namespace but a socket"),
    (REG | 0o200, 0xEF53, None, NS, "not a network namespace but a regular file"),   # ext4
    (REG, NSFS_MAGIC, 0x04000000, NS, "not a network namespace but a uts namespace"),
    (REG, NSFS_MAGIC, None, NS, "not a network namespace but a unknown namespace"),
    (REG, NSFS_MAGIC, CLONE_NEWNET, OWN, "the agent's own network namespace, never a pod's"),
    (REG, NSFS_MAGIC, CLONE_NEWNET, HOST, "the node's host network namespace, never a pod's"),
])
def test_only_a_network_namespace_that_is_not_the_nodes_is_a_pods(mode, magic, nstype, ident, expected):
    assert netns_problem(mode, magic, nstype, ident, REFUSED) == expected


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _refused(path: str, **kwargs) -> NetnsError:
    before = _open_fds()
    with pytest.raises(NetnsError) as info:
        fd = open_netns(path, **kwargs)
        os.close(fd)
    assert _open_fds() == before, "a refused namespace file was left open"
    return info.value


def test_a_missing_path_is_refused_with_the_reason(tmp_path):
    exc = _refused(str(tmp_path / "gone"))
    assert exc.errno == errno.ENOENT
    assert f"network namespace {tmp_path / 'gone'}: cannot open: No such file or directory" in str(exc)


def test_a_regular_file_is_not_a_network_namespace(tmp_path):
    path = tmp_path / "hostname"
    path.write_text("node1\n")
    assert "not a network namespace but a regular file" in str(_refused(str(path)))


def test_a_fifo_is_refused_without_blocking(tmp_path):
    """A blocking open of a FIFO waits for a writer: on the event loop it would stall the agent."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    result: list[BaseException] = []

    def attempt() -> None:
        try:
            os.close(open_netns(str(path)))
        except BaseException as exc:   # collected for the assertion below
            result.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(5.0)
    if thread.is_alive():
        with open(path, "wb"):     # unblock the stuck open so the thread ends
            pass
        pytest.fail("open_netns blocked on a FIFO")
    assert len(result) == 1 and isinstance(result[0], NetnsError), result
    assert "not a network namespace but a FIFO" in str(result[0])


@pytest.mark.parametrize("path, what", [("/", "a directory"), ("/dev/null", "a character device"),
                                        ("/proc/self/ns/uts", "a uts namespace"),
                                        ("/proc/self/ns/mnt", "a mount namespace")])
def test_other_files_and_namespace_types_are_refused(path, what):
    assert f"not a network namespace but {what}" in str(_refused(path))


def test_the_agents_own_namespace_is_refused_by_default():
    exc = _refused("/proc/self/ns/net")
    assert "the agent's own network namespace, never a pod's" in str(exc)
    # The same namespace under another name is the same namespace.
    exc = _refused(f"/proc/{os.getpid()}/ns/net")
    assert "the agent's own network namespace" in str(exc)


def test_a_network_namespace_is_accepted_and_identified_by_device_and_inode():
    fd = open_netns("/proc/self/ns/net", refused={})
    try:
        st = os.stat("/proc/self/ns/net")
        assert netns_id(fd) == (st.st_dev, st.st_ino)
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)


def test_the_hosts_namespaces_come_from_the_configured_host_proc(tmp_path):
    """pid 1 of --host-proc, and kthreadd (pid 2) when it is one, are the node's."""
    host = tmp_path / "host-proc"
    (host / "1" / "ns").mkdir(parents=True)
    (host / "2" / "ns").mkdir(parents=True)
    # Stand-ins: other namespaces of this process, so that they differ from our own netns.
    os.symlink("/proc/self/ns/uts", host / "1" / "ns" / "net")
    os.symlink("/proc/self/ns/ipc", host / "2" / "ns" / "net")
    uts, ipc, own = (os.stat(f"/proc/self/ns/{n}") for n in ("uts", "ipc", "net"))
    (host / "2" / "comm").write_text("bash\n")
    refused = refused_netns(str(host))
    assert refused[(own.st_dev, own.st_ino)] == "the agent's own network namespace"
    assert refused[(uts.st_dev, uts.st_ino)] == "the node's host network namespace"
    assert (ipc.st_dev, ipc.st_ino) not in refused       # pid 2 is not kthreadd there
    (host / "2" / "comm").write_text("kthreadd\n")
    assert refused_netns(str(host))[(ipc.st_dev, ipc.st_ino)] == "the node's host network namespace"


def test_discovery_skips_what_is_not_a_pods_namespace_without_blocking(tmp_path):
    """A FIFO or a regular file in a pinned-namespace directory, and our own namespace."""
    pinned = tmp_path / "netns"
    pinned.mkdir()
    os.mkfifo(pinned / "fifo")
    (pinned / "file").write_text("x")
    os.symlink("/proc/self/ns/net", pinned / "own")
    empty_proc = tmp_path / "proc"
    empty_proc.mkdir()
    switcher = NetnsSwitcher()
    views: list = []
    try:
        thread = threading.Thread(target=lambda: views.append(
            discover.scan(switcher, str(empty_proc), (str(pinned),))), daemon=True)
        thread.start()
        thread.join(5.0)
        if thread.is_alive():
            with open(pinned / "fifo", "wb"):
                pass
            pytest.fail("discovery blocked on a FIFO")
    finally:
        switcher.close()
    assert views == [[]]


def _new_netns() -> int:
    """A fresh network namespace, held by an fd (made on a throwaway thread)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}

    def make():
        if libc.unshare(CLONE_NEWNET) != 0:
            out["err"] = ctypes.get_errno()
            return
        out["fd"] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    t = threading.Thread(target=make)
    t.start()
    t.join()
    if "err" in out:
        pytest.fail(f"unshare(CLONE_NEWNET): {os.strerror(out['err'])}")
    return out["fd"]


def test_socket_here_makes_the_socket_in_the_pod_and_leaves_the_thread_at_home():
    from agent.netns import netns_cookie
    import socket
    fd = _new_netns()
    switcher = NetnsSwitcher()
    home = os.stat("/proc/thread-self/ns/net").st_ino
    try:
        made_here = switcher.socket_here(fd, socket.AF_INET)
        made_there = switcher.socket(fd, socket.AF_INET)     # the private thread's way
        at_home = socket.socket()
        try:
            assert netns_cookie(made_here) == netns_cookie(made_there)
            assert netns_cookie(made_here) != netns_cookie(at_home)
            assert os.stat("/proc/thread-self/ns/net").st_ino == home
        finally:
            for s in (made_here, made_there, at_home):
                s.close()
    finally:
        switcher.close()
        os.close(fd)
