"""Entering network namespaces: the one mechanism the agent uses.

A socket belongs to the network namespace it was created in, for its whole
life. So the agent never moves itself into a pod: a thread switches into the
pod's namespace, creates the socket, and switches back; the socket is then
used from the event loop like any other.

``setns(2)`` changes only the calling thread. Work that may take time
(opening listeners, reading ``/proc``) runs on one private thread
(``run``). Creating one socket for a connection the data path makes
(``socket_here``) happens on the calling (event-loop) thread itself: two
setns calls and a socket() take microseconds with nothing in between that
could run other code of that thread, while a hop to the private thread cost
a GIL hand-over (up to the 5 ms switch interval on a busy loop) per new
connection (bench/notes.md). Either thread that cannot switch back exits the
process rather than create a later socket in the wrong pod.
Python 3.11 has no ``os.setns``, hence ctypes.

Every network namespace the agent is told about (a CNI ADD's ``netns``, a
record, a discovered path) is opened by ``open_netns``, which proves that the
path is a network namespace and not one a pod must never be (issue 11): a
FIFO must not block the event loop, a regular file must not be "captured",
and the agent's own or the node's namespace must never be mistaken for a pod.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # linux/asm-generic/socket.h, Linux >= 5.14
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h, Linux >= 4.11
NSFS_MAGIC = 0x6E736673  # linux/magic.h: the filesystem behind /proc/*/ns/* and their bind mounts

# Namespace types NS_GET_NSTYPE answers (linux/sched.h), for error messages.
_NS_TYPES = {0x00020000: "mount", 0x02000000: "cgroup", 0x04000000: "uts", 0x08000000: "ipc",
             0x10000000: "user", 0x20000000: "pid", CLONE_NEWNET: "network", 0x00000080: "time"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]

# (st_dev, st_ino) of a namespace file: the namespace's identity on this
# host, whatever path names it (/run/netns/x, /var/run/netns/x, /proc/PID/ns/net).
NetnsId = tuple[int, int]

T = TypeVar("T")


class NetnsError(OSError):
    """A network namespace could not be opened or entered."""


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace behind ``fd``."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


def netns_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for the network namespace a socket lives in.

    BPF programs see the same value through ``bpf_get_netns_cookie``.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return struct.unpack("=Q", raw)[0]


class NetnsSwitcher:
    """Runs short functions inside other network namespaces on one thread."""

    def __init__(self) -> None:
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
        self._lock = threading.Lock()

    def run(self, netns_fd: int, fn: Callable[[], T]) -> T:
        """Call ``fn`` inside the namespace ``netns_fd`` (blocking)."""
        return self._pool.submit(self._in_netns, netns_fd, fn).result()

    def _in_netns(self, netns_fd: int, fn: Callable[[], T]) -> T:
        setns(netns_fd)
        try:
            return fn()
        finally:
            # If we cannot come back, this thread must not serve anyone
            # again: a later socket would be created in the wrong pod.
            try:
                setns(self._home)
            except OSError:  # pragma: no cover - kernel refused the way home
                os._exit(70)

    def socket_here(self, netns_fd: int, family: int = socket.AF_INET,
                    type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket in the given namespace, made on the calling thread (see the module doc)."""
        setns(netns_fd)
        try:
            return socket.socket(family, type)
        finally:
            try:
                setns(self._home)
            except OSError:  # pragma: no cover - kernel refused the way home
                os._exit(70)

    def socket(self, netns_fd: int, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that lives in the given namespace (made on the private thread)."""
        return self.run(netns_fd, lambda: socket.socket(family, type))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self._home)


def netns_id(fd: int) -> NetnsId:
    """The identity of the namespace an open namespace file refers to."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def refused_netns(host_proc: str = "/proc") -> dict[NetnsId, str]:
    """Network namespaces no pod may be: the agent's own and the node's.

    The agent's own is where its admin listeners live (in the lab, the node
    namespace it runs in). The node's host network is pid 1's, in the
    agent's /proc and in the host's (``--host-proc``: in a container without
    hostPID the host's /proc is mounted elsewhere), and kernel threads'
    (kthreadd, pid 2 of the host's /proc, always lives in the initial
    namespace; it still answers where pid 1 is not dumpable and its ns links
    cannot be read). Capturing any of them would steer the node's traffic
    and leave the pod outside the mesh. A path that cannot be read is left
    out: it names no namespace this check could confuse.
    """
    host = host_proc.rstrip("/") or "/"
    candidates = [("/proc/self/ns/net", "the agent's own network namespace"),
                  (f"{host}/1/ns/net", "the node's host network namespace"),
                  ("/proc/1/ns/net", "the node's host network namespace")]
    try:
        with open(f"{host}/2/comm") as fh:
            if fh.read().strip() == "kthreadd":
                candidates.append((f"{host}/2/ns/net", "the node's host network namespace"))
    except OSError:
        pass
    refused: dict[NetnsId, str] = {}
    for path, what in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        refused.setdefault((st.st_dev, st.st_ino), what)
    return refused


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def netns_problem(mode: int, fs_magic: int, nstype: int | None, ident: NetnsId,
                  refused: Mapping[NetnsId, str]) -> str | None:
    """Why an opened file is not a namespace a pod may be captured in (None: it is).

    ``mode`` is the file's ``st_mode``, ``fs_magic`` its filesystem's
    ``f_type``, ``nstype`` what ``NS_GET_NSTYPE`` answered (None if it
    was not asked or failed). Namespace files are regular files on nsfs.
    """
    if not stat.S_ISREG(mode):
        return f"not a network namespace but {_file_kind(mode)}"
    if fs_magic != NSFS_MAGIC:
        return "not a network namespace but a regular file"
    if nstype != CLONE_NEWNET:
        kind = _NS_TYPES.get(nstype or 0, "unknown")
        return f"not a network namespace but a {kind} namespace"
    if ident in refused:
        return f"{refused[ident]}, never a pod's"
    return None


def _fs_magic(fd: int) -> int:
    # struct statfs starts with f_type (a long on 64-bit Linux); the buffer
    # is larger than the whole struct on every architecture.
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def open_netns(path: str, host_proc: str = "/proc",
               refused: Mapping[NetnsId, str] | None = None) -> int:
    """Open a network namespace file (``/run/netns/x``, ``/proc/PID/ns/net``), validated.

    The open never blocks: O_NONBLOCK makes a FIFO (or a device) return at
    once instead of waiting for a writer on the caller's thread, which is
    the event loop for CNI requests. The file must then be a regular file on
    nsfs whose ``NS_GET_NSTYPE`` is CLONE_NEWNET (the ioctl is asked only of
    nsfs files: on another filesystem the number could mean something
    else), and not one of ``refused`` (default: ``refused_netns(host_proc)``).
    Raises NetnsError with the reason; the fd is the caller's to close.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise NetnsError(exc.errno, f"network namespace {path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        magic = _fs_magic(fd) if stat.S_ISREG(st.st_mode) else 0
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE) if magic == NSFS_MAGIC else None
        problem = netns_problem(st.st_mode, magic, nstype, (st.st_dev, st.st_ino),
                                refused_netns(host_proc) if refused is None else refused)
    except OSError as exc:
        os.close(fd)
        raise NetnsError(exc.errno, f"network namespace {path}: cannot check it: {exc.strerror}") from None
    if problem is not None:
        os.close(fd)
        raise NetnsError(f"network namespace {path}: {problem}")
    return fd
