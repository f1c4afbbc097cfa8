"""The node's capture data path: eBPF programs, pinned maps and links.

Loads ``bpf/*.c`` with BCC and keeps everything under one pin directory per
node agent, so that:

* the cgroup programs (connect4/6, sock_ops) stay attached when the agent
  dies: captured connects then hit a dead listener and are refused
  (fail closed), and
* a restarted agent reopens the same maps, swaps in its freshly compiled
  programs, and re-adopts the pods it had captured.

Pin layout (``pin_dir``)::

    pod_config pending_dst orig_dst inbound_config listeners capture_stats   maps
    prog_connect4 prog_connect6 prog_sockops                                 cgroup programs
    link_<netns cookie>                                                      sk_lookup links

Two agents on one kernel each have their own pin directory, maps and
programs; each program only acts on network namespaces in its own maps.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from agent.capture import bpfsys

log = logging.getLogger(__name__)

BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"
BPF_SOURCES = ("stats.c", "connect.c", "sockops.c", "sk_lookup.c")
DEFAULT_CGROUP = "/sys/fs/cgroup/unified"
BPFFS = "/sys/fs/bpf"

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008
AGENT_MARK = 0x539

LISTENER_INBOUND = 0
LISTENER_HBONE = 1
POD_IPV4 = 1
POD_IPV6 = 2

STATS = ("outbound_captured", "outbound_exempt_mark", "inbound_captured",
         "inbound_no_listener", "inbound_probe", "orig_dst_recorded")

# (pin name, BCC function, BCC program type, attach type)
CGROUP_PROGRAMS = (
    ("prog_connect4", "ambient_connect4", 18, bpfsys.BPF_CGROUP_INET4_CONNECT),
    ("prog_connect6", "ambient_connect6", 18, bpfsys.BPF_CGROUP_INET6_CONNECT),
    ("prog_sockops", "ambient_sockops", 13, bpfsys.BPF_CGROUP_SOCK_OPS),
)


class CaptureError(RuntimeError):
    """The capture data path could not be set up or changed."""


# ctypes mirrors of bpf/common.h. Keep field order and sizes identical.
class PodConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("ip4", ctypes.c_uint32),
                ("ip6", ctypes.c_uint32 * 4)]


class OrigDst(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint32), ("port", ctypes.c_uint32),
                ("ip", ctypes.c_uint32 * 4)]


class FlowKey(ctypes.Structure):
    _fields_ = [("netns", ctypes.c_uint64), ("family", ctypes.c_uint32),
                ("port", ctypes.c_uint32), ("ip", ctypes.c_uint32 * 4)]


class AddrKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint32), ("ip", ctypes.c_uint32 * 4)]


class InboundConfig(ctypes.Structure):
    _fields_ = [("probe_ip4", ctypes.c_uint32), ("probe_ip6", ctypes.c_uint32 * 4)]


class ListenerKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint32), ("ip", ctypes.c_uint32 * 4),
                ("kind", ctypes.c_uint32)]


def _ip_words(addr: str) -> tuple[int, list[int]]:
    """(family, four 32-bit words in network byte order as the kernel stores them)."""
    ip = ipaddress.ip_address(addr)
    packed = ip.packed
    if ip.version == 4:
        return socket.AF_INET, [int.from_bytes(packed, "little"), 0, 0, 0]
    return socket.AF_INET6, [int.from_bytes(packed[i:i + 4], "little") for i in range(0, 16, 4)]


def _words_ip(family: int, words) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(int(words[0]).to_bytes(4, "little")))
    return str(ipaddress.IPv6Address(b"".join(int(w).to_bytes(4, "little") for w in words)))


@dataclass(frozen=True)
class OriginalDestination:
    ip: str
    port: int


def ensure_bpffs() -> None:
    """bpffs is not always mounted here; pinning needs it."""
    if os.path.ismount(BPFFS):
        return
    os.makedirs(BPFFS, exist_ok=True)
    # mount(2) through util-linux: there is no mount in the stdlib and this
    # runs once per boot.
    subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True)


class CaptureDatapath:
    """One node agent's BPF programs and maps."""

    def __init__(self, pin_dir: str, cgroup: str = DEFAULT_CGROUP) -> None:
        self.pin_dir = pin_dir
        self.cgroup = cgroup
        self._bpf = None
        self._sk_lookup_fd = -1
        self._maps: dict[str, int] = {}
        self._links: dict[int, int] = {}   # netns cookie -> link fd
        self._lock = threading.Lock()

    # -- loading -----------------------------------------------------------

    def load(self) -> None:
        """Compile, load, attach; replace the programs of a previous agent."""
        from bcc import BPF  # imported here: BCC is slow to import and needs root

        ensure_bpffs()
        os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
        text = "".join((BPF_SOURCE_DIR / name).read_text() for name in BPF_SOURCES)
        try:
            self._bpf = BPF(text=text, cflags=[f"-I{BPF_SOURCE_DIR}",
                                                f'-DPIN_DIR="{self.pin_dir}"'])
        except Exception as exc:
            raise CaptureError(f"compile {', '.join(BPF_SOURCES)}: {exc}") from exc
        for name in ("pod_config", "pending_dst", "orig_dst", "inbound_config",
                     "listeners", "capture_stats"):
            self._maps[name] = bpfsys.obj_get(os.path.join(self.pin_dir, name))

        sk_fn = self._bpf.load_func("ambient_sk_lookup", bpfsys.BPF_PROG_TYPE_SK_LOOKUP,
                                    attach_type=bpfsys.BPF_SK_LOOKUP)
        self._sk_lookup_fd = sk_fn.fd
        cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for pin_name, func, prog_type, attach_type in CGROUP_PROGRAMS:
                fn = self._bpf.load_func(func, prog_type, attach_type=attach_type)
                self._replace_cgroup_program(cg_fd, pin_name, fn.fd, attach_type)
        finally:
            os.close(cg_fd)
        self._adopt_links()
        log.info("capture programs attached at %s, state pinned in %s", self.cgroup, self.pin_dir)

    def _replace_cgroup_program(self, cg_fd: int, pin_name: str, prog_fd: int,
                                attach_type: int) -> None:
        # Attach the new program before detaching the old one: both act on
        # the same pinned maps, and the second sees an already rewritten
        # (loopback) destination and leaves it alone, so there is no moment
        # without capture.
        pin = os.path.join(self.pin_dir, pin_name)
        staged = f"{pin}_staged{os.getpid()}"  # bpffs names may not contain dots
        if os.path.exists(staged):
            os.unlink(staged)
        bpfsys.obj_pin(prog_fd, staged)
        bpfsys.prog_attach(prog_fd, cg_fd, attach_type)
        if os.path.exists(pin):
            old = bpfsys.obj_get(pin)
            try:
                bpfsys.prog_detach(old, cg_fd, attach_type)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            finally:
                os.close(old)
            os.unlink(pin)
        os.rename(staged, pin)

    def _adopt_links(self) -> None:
        """Point the pinned sk_lookup links of a previous agent at our program."""
        for entry in os.listdir(self.pin_dir):
            if not entry.startswith("link_"):
                continue
            cookie = int(entry[len("link_"):])
            fd = bpfsys.obj_get(os.path.join(self.pin_dir, entry))
            bpfsys.link_update(fd, self._sk_lookup_fd)
            self._links[cookie] = fd

    # -- per pod -----------------------------------------------------------

    def enrolled_netns(self) -> list[int]:
        """Network-namespace cookies present in the pinned pod_config map."""
        return [int(k.value) for k in bpfsys.map_keys(self._maps["pod_config"], ctypes.c_uint64)]

    def attach_netns(self, cookie: int, netns_fd: int) -> None:
        """Inbound capture for one pod: a pinned sk_lookup link on its netns."""
        pin = os.path.join(self.pin_dir, f"link_{cookie}")
        if cookie in self._links:
            if not os.path.exists(pin):
                # Attached (we hold the link) but unpinned: an agent restart
                # would detach it. Pin it again.
                bpfsys.obj_pin(self._links[cookie], pin)
            return
        if os.path.exists(pin):
            fd = bpfsys.obj_get(pin)
            bpfsys.link_update(fd, self._sk_lookup_fd)
        else:
            fd = bpfsys.link_create(self._sk_lookup_fd, netns_fd, bpfsys.BPF_SK_LOOKUP)
            bpfsys.obj_pin(fd, pin)
        self._links[cookie] = fd

    def detach_netns(self, cookie: int) -> None:
        pin = os.path.join(self.pin_dir, f"link_{cookie}")
        if os.path.exists(pin):
            os.unlink(pin)
        fd = self._links.pop(cookie, None)
        if fd is not None:
            os.close(fd)   # the last reference: the link detaches

    def set_listener(self, ip: str, kind: int, sock: socket.socket) -> None:
        family, words = _ip_words(ip)
        key = ListenerKey(family, (ctypes.c_uint32 * 4)(*words), kind)
        bpfsys.map_update(self._maps["listeners"], key, ctypes.c_uint32(sock.fileno()))

    def set_inbound(self, ip: str, probe_sources: list[str]) -> None:
        family, words = _ip_words(ip)
        cfg = InboundConfig()
        for probe in probe_sources:
            pfam, pwords = _ip_words(probe)
            if pfam == socket.AF_INET:
                cfg.probe_ip4 = pwords[0]
            else:
                cfg.probe_ip6 = (ctypes.c_uint32 * 4)(*pwords)
        bpfsys.map_update(self._maps["inbound_config"],
                          AddrKey(family, (ctypes.c_uint32 * 4)(*words)), cfg)

    def clear_inbound(self, ip: str) -> None:
        family, words = _ip_words(ip)
        bpfsys.map_delete(self._maps["inbound_config"], AddrKey(family, (ctypes.c_uint32 * 4)(*words)))
        for kind in (LISTENER_INBOUND, LISTENER_HBONE):
            bpfsys.map_delete(self._maps["listeners"],
                              ListenerKey(family, (ctypes.c_uint32 * 4)(*words), kind))

    def set_outbound(self, cookie: int, ips: list[str]) -> None:
        """Start capturing the pod's outbound connects (the switch that makes it enrolled)."""
        cfg = PodConfig()
        for ip in ips:
            family, words = _ip_words(ip)
            if family == socket.AF_INET:
                cfg.flags |= POD_IPV4
                cfg.ip4 = words[0]
            else:
                cfg.flags |= POD_IPV6
                cfg.ip6 = (ctypes.c_uint32 * 4)(*words)
        bpfsys.map_update(self._maps["pod_config"], ctypes.c_uint64(cookie), cfg)

    def clear_outbound(self, cookie: int) -> None:
        bpfsys.map_delete(self._maps["pod_config"], ctypes.c_uint64(cookie))

    def capture_problems(self, cookie: int, ips: list[str]) -> list[str]:
        """What is missing from one captured pod's BPF state (empty: intact).

        The agent checks this periodically: state wiped by hand, by a crashed
        tool or by anything else must not leave a pod marked as captured while
        its traffic bypasses the listeners.
        """
        problems = []
        if not bpfsys.map_lookup(self._maps["pod_config"], ctypes.c_uint64(cookie), PodConfig()):
            problems.append("outbound capture (pod_config entry) missing")
        if not os.path.exists(os.path.join(self.pin_dir, f"link_{cookie}")):
            problems.append("inbound sk_lookup link pin missing")
        for ip in ips:
            family, words = _ip_words(ip)
            if not bpfsys.map_lookup(self._maps["inbound_config"],
                                     AddrKey(family, (ctypes.c_uint32 * 4)(*words)), InboundConfig()):
                problems.append(f"inbound steering for {ip} (inbound_config entry) missing")
        return problems

    def original_destination(self, netns: int, peer_ip: str, peer_port: int) -> OriginalDestination | None:
        """Where a connection accepted by an outbound listener was headed; consumes the entry."""
        family, words = _ip_words(peer_ip)
        key = FlowKey(netns, family, peer_port, (ctypes.c_uint32 * 4)(*words))
        value = OrigDst()
        if not bpfsys.map_lookup(self._maps["orig_dst"], key, value):
            return None
        bpfsys.map_delete(self._maps["orig_dst"], key)
        return OriginalDestination(_words_ip(value.family, value.ip), value.port)

    def stats(self) -> dict[str, int]:
        """Capture decision counters, summed over CPUs."""
        ncpu = bpfsys.num_possible_cpus()
        out = {}
        for idx, name in enumerate(STATS):
            values = (ctypes.c_uint64 * ncpu)()
            bpfsys.map_lookup(self._maps["capture_stats"], ctypes.c_uint32(idx), values)
            out[name] = int(sum(values))
        return out

    def close(self) -> None:
        """Release our fds. Attachments and pins stay: that is what fails closed."""
        for fd in self._links.values():
            os.close(fd)
        self._links.clear()
        for fd in self._maps.values():
            os.close(fd)
        self._maps.clear()
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def teardown(pin_dir: str, cgroup: str = DEFAULT_CGROUP) -> list[str]:
    """Remove a node agent's capture entirely: detach programs, drop pins.

    For uninstall and for the lab's ``down``; the agent itself never does
    this on exit (its attachments are what keeps pods failing closed).
    Returns what could not be removed; missing pieces are not errors.
    """
    problems: list[str] = []
    if not os.path.isdir(pin_dir):
        return problems
    try:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        cg_fd = -1
        problems.append(f"open cgroup {cgroup}: {exc.strerror}")
    attach_types = {name: at for name, _f, _t, at in CGROUP_PROGRAMS}
    for entry in sorted(os.listdir(pin_dir)):
        path = os.path.join(pin_dir, entry)
        base = entry.split("_staged", 1)[0]
        if base in attach_types and cg_fd >= 0:
            try:
                fd = bpfsys.obj_get(path)
                try:
                    bpfsys.prog_detach(fd, cg_fd, attach_types[base])
                finally:
                    os.close(fd)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    problems.append(f"detach {path}: {exc}")
        try:
            os.unlink(path)
        except OSError as exc:
            problems.append(f"unpin {path}: {exc.strerror}")
    if cg_fd >= 0:
        os.close(cg_fd)
    try:
        os.rmdir(pin_dir)
    except OSError as exc:
        problems.append(f"remove {pin_dir}: {exc.strerror}")
    return problems
