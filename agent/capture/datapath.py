"""The node's capture data path: eBPF programs, pinned maps and links.

A short-lived loader process (``agent/capture/loader.py``), run once per
agent start, compiles ``bpf/*.c`` with BCC (against the kernel headers the
image bundles: ``kernel_headers.py``), attaches the cgroup programs and pins
everything under one pin directory per node agent; the agent then opens
those pins with ``bpf(BPF_OBJ_GET)`` and never imports BCC, so LLVM (about
120 MB once a program is compiled) never stays mapped in the process that
runs for days.
Everything is pinned so that:

* the cgroup programs (connect4/6, sock_ops) stay attached when the agent
  dies: captured connects then hit a dead listener and are refused
  (fail closed), and
* a restarted agent's loader reuses the same maps and swaps in freshly
  compiled programs, and the agent re-adopts the pods it had captured.

Pin layout (``pin_dir``)::

    pod_config pending_dst orig_dst inbound_config listeners capture_stats   maps
    dns_orig
    prog_connect4 prog_connect6 prog_sockops                                 cgroup programs
    prog_sendmsg4 prog_sendmsg6 prog_recvmsg4 prog_recvmsg6                  (DNS, bpf/dns.c)
    prog_sk_lookup                                                           sk_lookup program
    link_<netns cookie>                                                      sk_lookup links
    <pin>_staged<pid>                                                        a loader's, until renamed

Two agents on one kernel each have their own pin directory, maps and
programs; each program only acts on network namespaces in its own maps.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.capture import bpfsys

log = logging.getLogger(__name__)

BPF_SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"
BPF_SOURCES = ("stats.c", "dns.c", "connect.c", "sockops.c", "sk_lookup.c")
DEFAULT_CGROUP = "/sys/fs/cgroup/unified"
BPFFS = "/sys/fs/bpf"

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008
DNS_PORT = 15053
AGENT_MARK = 0x539

LISTENER_INBOUND = 0
LISTENER_HBONE = 1
POD_IPV4 = 1
POD_IPV6 = 2
POD_DNS = 4

STATS = ("outbound_captured", "outbound_exempt_mark", "inbound_captured",
         "inbound_no_listener", "inbound_probe", "orig_dst_recorded", "dns_udp_captured",
         "dns_tcp_captured")

MAPS = ("pod_config", "pending_dst", "orig_dst", "inbound_config", "listeners", "capture_stats", "dns_orig")
SK_LOOKUP_PIN = "prog_sk_lookup"

# The loader gets this long: it takes about 0.8 s on an idle 2-core machine,
# and several agents starting at once share the cores.
LOADER_TIMEOUT_SECONDS = 60.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)

# (pin name, BCC function, BCC program type, attach type)
CGROUP_PROGRAMS = (
    ("prog_connect4", "ambient_connect4", 18, bpfsys.BPF_CGROUP_INET4_CONNECT),
    ("prog_connect6", "ambient_connect6", 18, bpfsys.BPF_CGROUP_INET6_CONNECT),
    ("prog_sockops", "ambient_sockops", 13, bpfsys.BPF_CGROUP_SOCK_OPS),
    # DNS capture (bpf/dns.c): UDP queries to port 53, and their replies' source.
    ("prog_sendmsg4", "ambient_sendmsg4", 18, bpfsys.BPF_CGROUP_UDP4_SENDMSG),
    ("prog_sendmsg6", "ambient_sendmsg6", 18, bpfsys.BPF_CGROUP_UDP6_SENDMSG),
    ("prog_recvmsg4", "ambient_recvmsg4", 18, bpfsys.BPF_CGROUP_UDP4_RECVMSG),
    ("prog_recvmsg6", "ambient_recvmsg6", 18, bpfsys.BPF_CGROUP_UDP6_RECVMSG),
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


@dataclass(frozen=True)
class LoaderReport:
    """What a successful loader run tells the agent, as one line of its stderr.

    ``compile_seconds``: BCC's compile of ``bpf/*.c`` (clang inside libbcc;
    it also creates or reopens the pinned maps, which takes milliseconds).
    ``kernel_headers``: the tree it compiled against, or ``host``;
    ``headers_source``: why that one (``kernel_headers.HeaderChoice.source``).
    """
    compile_seconds: float
    kernel_headers: str
    headers_source: str

    PREFIX = "loader-report "

    def line(self) -> str:
        return self.PREFIX + json.dumps({"compile_seconds": round(self.compile_seconds, 4),
                                         "kernel_headers": self.kernel_headers,
                                         "headers_source": self.headers_source}, sort_keys=True)

    @classmethod
    def parse(cls, stderr: str) -> LoaderReport | None:
        """The last report line in ``stderr``; None if there is none or it is malformed."""
        for line in reversed(stderr.splitlines()):
            if line.startswith(cls.PREFIX):
                try:
                    d = json.loads(line[len(cls.PREFIX):])
                    return cls(float(d["compile_seconds"]), str(d["kernel_headers"]),
                               str(d["headers_source"]))
                except (ValueError, KeyError, TypeError):
                    return None
        return None


def loader_command(pin_dir: str, cgroup: str, kernel_headers: str | None = None) -> list[str]:
    """The loader's command line: this interpreter, so BCC's ``.pth`` setup is the same."""
    cmd = [sys.executable, "-m", "agent.capture.loader", "--pin-dir", pin_dir, "--cgroup", cgroup]
    if kernel_headers is not None:
        cmd += ["--kernel-headers", kernel_headers]
    return cmd


def run_loader(pin_dir: str, cgroup: str, timeout: float = LOADER_TIMEOUT_SECONDS,
               kernel_headers: str | None = None) -> str:
    """Run the loader to completion; its stderr on success, ``CaptureError`` otherwise.

    ``kernel_headers`` None: the loader's default (``$AMBIENT_AGENT_KERNEL_HEADERS``,
    else ``auto``: the image's bundled headers; see ``kernel_headers.py``).
    """
    cmd = loader_command(pin_dir, cgroup, kernel_headers)
    env = dict(os.environ)
    # `-m agent.capture.loader` must find this very package, whatever the cwd.
    env["PYTHONPATH"] = os.pathsep.join(x for x in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if x)
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=timeout, env=env, close_fds=True)
    except subprocess.TimeoutExpired as exc:   # run() has killed and reaped it
        raise CaptureError(f"BPF loader did not finish within {timeout:g} s and was killed; "
                           f"its stderr ends with: {_tail(exc.stderr)}") from None
    except OSError as exc:
        raise CaptureError(f"BPF loader could not be started ({cmd[0]}): {exc}") from exc
    if done.returncode != 0:
        raise CaptureError(f"BPF loader exited with status {done.returncode}: {_tail(done.stderr)}")
    return done.stderr


def _tail(text: str | bytes | None, lines: int = 12) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    kept = [line for line in (text or "").strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(nothing)"


class CaptureDatapath:
    """One node agent's BPF programs and maps."""

    def __init__(self, pin_dir: str, cgroup: str = DEFAULT_CGROUP,
                 loader_timeout: float = LOADER_TIMEOUT_SECONDS, kernel_headers: str | None = None) -> None:
        self.pin_dir = pin_dir
        self.cgroup = cgroup
        self.loader_timeout = loader_timeout
        self.kernel_headers = kernel_headers
        # Set by load(): the loader's report and the wall time of its whole run
        # (interpreter start, BCC import, compile, attach, pin).
        self.report: LoaderReport | None = None
        self.loader_seconds: float | None = None
        self._sk_lookup_fd = -1
        self._maps: dict[str, int] = {}
        self._links: dict[int, int] = {}   # netns cookie -> link fd
        self._lock = threading.Lock()

    # -- loading -----------------------------------------------------------

    def load(self) -> None:
        """Have the loader attach fresh programs (replacing a previous agent's), then open the pins.

        The agent calls this once, at start (``NodeAgent.run``); pods are
        captured later through the pinned program and maps, with no compile.
        """
        started = time.monotonic()
        stderr = run_loader(self.pin_dir, self.cgroup, self.loader_timeout, self.kernel_headers)
        self.loader_seconds = time.monotonic() - started
        self.report = LoaderReport.parse(stderr)
        for line in stderr.strip().splitlines():
            log.debug("loader: %s", line)
        if self.report is not None:
            log.info("BPF programs compiled in %.2f s against kernel headers %s (%s); loader took %.2f s",
                     self.report.compile_seconds, self.report.kernel_headers, self.report.headers_source,
                     self.loader_seconds)
        try:
            for name in MAPS:
                self._maps[name] = bpfsys.obj_get(os.path.join(self.pin_dir, name))
            self._sk_lookup_fd = bpfsys.obj_get(os.path.join(self.pin_dir, SK_LOOKUP_PIN))
            self._open_links()
        except OSError as exc:
            self.close()
            raise CaptureError("the BPF loader succeeded but its pins cannot be opened: "
                               f"{exc.strerror or exc}") from exc
        log.info("capture programs attached at %s, state pinned in %s", self.cgroup, self.pin_dir)

    def _open_links(self) -> None:
        """Hold the pinned sk_lookup links; the loader already pointed them at the new program."""
        for entry in os.listdir(self.pin_dir):
            if entry.startswith("link_"):
                cookie = int(entry[len("link_"):])
                self._links[cookie] = bpfsys.obj_get(os.path.join(self.pin_dir, entry))

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

    def set_outbound(self, cookie: int, ips: list[str], dns: bool = False) -> None:
        """Start capturing the pod's outbound connects (the switch that makes it enrolled).

        ``dns``: also steer its port-53 queries to the DNS listener (``DNS_PORT``).
        """
        cfg = PodConfig()
        if dns:
            cfg.flags |= POD_DNS
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

    def restore_pins(self) -> list[str]:
        """Pin again, from the fds this agent holds, the maps and the sk_lookup
        program whose pins were deleted; returns the names pinned again.

        The running capture does not need the pins (programs hold their maps),
        but the next agent does: its loader would find no maps, make empty
        ones, and every pod's steering would be lost. Raises OSError if a pin
        cannot be made.
        """
        held = dict(self._maps)
        if self._sk_lookup_fd >= 0:
            held[SK_LOOKUP_PIN] = self._sk_lookup_fd
        restored = []
        for name, fd in held.items():
            path = os.path.join(self.pin_dir, name)
            if not os.path.lexists(path):
                os.makedirs(self.pin_dir, mode=0o700, exist_ok=True)
                bpfsys.obj_pin(fd, path)
                restored.append(name)
        return restored

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
        if self._sk_lookup_fd >= 0:
            os.close(self._sk_lookup_fd)
            self._sk_lookup_fd = -1


def detach_pinned(path: str, cg_fd: int, attach_type: int) -> None:
    """Detach the cgroup program pinned at ``path``; one already gone is no error."""
    try:
        fd = bpfsys.obj_get(path)
        try:
            bpfsys.prog_detach(fd, cg_fd, attach_type)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


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
                detach_pinned(path, cg_fd, attach_types[base])
            except OSError as exc:
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
