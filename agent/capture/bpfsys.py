"""Thin ctypes shell over libbpf: the agent's whole interface to BPF.

BCC compiles and loads our programs, but only in the short-lived loader
process (``loader.py``): it maps LLVM, cannot pin or reopen programs, has no
bpf_link API (needed for sk_lookup), and its tables do not handle SOCKHASH.
libbpf (Debian's libbpf.so.1, about 250 KB resident) does all of that with
plain fds, in the loader and in the agent. Every call raises OSError with
the failing operation named.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)

BPF_ANY = 0
BPF_F_ALLOW_MULTI = 2

# enum bpf_attach_type (uapi/linux/bpf.h)
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20
BPF_SK_LOOKUP = 36
# enum bpf_prog_type: BCC has no constant for SK_LOOKUP.
BPF_PROG_TYPE_SK_LOOKUP = 30


def _check(ret: int, what: str) -> int:
    # libbpf 1.x returns -errno and also sets errno.
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


_lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
_lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
_lib.bpf_prog_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
_lib.bpf_prog_detach2.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
for _name in ("bpf_map_update_elem",):
    getattr(_lib, _name).argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong]
_lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
_lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_lib.libbpf_num_possible_cpus.argtypes = []


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"open pinned {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = BPF_F_ALLOW_MULTI) -> None:
    _check(_lib.bpf_prog_attach(prog_fd, target_fd, attach_type, flags),
           f"attach program (type {attach_type})")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(_lib.bpf_prog_detach2(prog_fd, target_fd, attach_type),
           f"detach program (type {attach_type})")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _check(_lib.bpf_link_create(prog_fd, target_fd, attach_type, None),
                  f"create link (type {attach_type})")


def link_update(link_fd: int, prog_fd: int) -> None:
    _check(_lib.bpf_link_update(link_fd, prog_fd, None), "update link program")


def map_update(fd: int, key: ctypes.Structure | ctypes._SimpleCData,
               value: ctypes.Structure | ctypes._SimpleCData | ctypes.Array) -> None:
    _check(_lib.bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), BPF_ANY),
           "update map element")


def map_lookup(fd: int, key, value) -> bool:
    """Fill ``value``; False when the key is absent."""
    ret = _lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret < 0 and (-ret == 2 or ctypes.get_errno() == 2):  # ENOENT
        return False
    _check(ret, "look up map element")
    return True


def map_delete(fd: int, key) -> bool:
    ret = _lib.bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret < 0 and (-ret == 2 or ctypes.get_errno() == 2):
        return False
    _check(ret, "delete map element")
    return True


def map_keys(fd: int, key_type):
    """Every key of a hash map (a snapshot; the map may change meanwhile)."""
    keys = []
    prev = None
    while True:
        nxt = key_type()
        ret = _lib.bpf_map_get_next_key(fd, ctypes.byref(prev) if prev is not None else None,
                                        ctypes.byref(nxt))
        if ret < 0:
            break
        keys.append(nxt)
        prev = nxt
    return keys


def num_possible_cpus() -> int:
    return _check(_lib.libbpf_num_possible_cpus(), "count possible CPUs")
