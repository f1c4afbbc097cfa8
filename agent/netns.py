"""Entering network namespaces: the one mechanism the agent uses.

A socket belongs to the network namespace it was created in, for its whole
life. So the agent never moves itself into a pod: a dedicated worker thread
switches into the pod's namespace, creates the socket, and switches back;
the socket is then used from the event loop like any other.

``setns(2)`` changes only the calling thread, which is why the switching
happens on one private thread and never on the event loop's thread.
Python 3.11 has no ``os.setns``, hence ctypes.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # linux/asm-generic/socket.h, Linux >= 5.14

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

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

    def socket(self, netns_fd: int, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that lives in the given namespace."""
        return self.run(netns_fd, lambda: socket.socket(family, type))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self._home)


def open_netns(path: str) -> int:
    """Open a network namespace file (``/run/netns/x``, ``/proc/PID/ns/net``)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(exc.errno, f"open network namespace {path}: {exc.strerror}") from None
