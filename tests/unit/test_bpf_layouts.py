"""The ctypes mirrors in ``agent/capture/datapath.py`` match ``bpf/common.h``.

The agent reads and writes the pinned maps through ctypes copies of the C
structs; a field added, moved or resized on one side only would make it
read garbage (or write keys that never match) without any error. So the
layouts are compared with what the compiler made of the real header: the
real loader (``python -m agent.capture.loader``: BCC compiling ``bpf/*.c``
against the bundled kernel headers, as the agent does) creates and pins the
maps, and each pinned map carries the BTF that clang emitted for it, with a
``____btf_map_<name>`` struct naming its key and value types. That BTF
(``bpftool btf dump``) is compared, type by type, with the ctypes types the
agent uses for that map: sizes, field names, field offsets, array lengths,
recursively. Signedness is not compared (``listeners`` holds an ``int`` fd
that the agent writes as ``c_uint32``; both are 4 bytes). The integer
constants datapath.py copies (ports, mark, flags, counter slots) are
compared with the header's ``#define`` lines.

Needs root and BCC, like the lab tests. The programs are attached to a
fresh, empty cgroup v2 directory of the test's own (no process runs in it)
and pinned in a unique directory; both are removed afterwards.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import re
import secrets
import subprocess
import sys

import pytest

from agent.capture import datapath
from agent.capture.datapath import (BPFFS, DEFAULT_CGROUP, MAPS, AddrKey, FlowKey, InboundConfig,
                                    ListenerKey, OrigDst, PodConfig, teardown)

# map -> (key type, value type) as datapath.py passes them to bpfsys
# (per-CPU maps: the type of one CPU's value).
MAP_TYPES: dict[str, tuple[type, type]] = {
    "pod_config": (ctypes.c_uint64, PodConfig),
    "pending_dst": (ctypes.c_uint64, OrigDst),
    "orig_dst": (FlowKey, OrigDst),
    "inbound_config": (AddrKey, InboundConfig),
    "listeners": (ListenerKey, ctypes.c_uint32),
    "capture_stats": (ctypes.c_uint32, ctypes.c_uint64),
    "dns_orig": (ctypes.c_uint64, OrigDst),
}

_QUALIFIERS = ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG")


@pytest.fixture(scope="module")
def compiled():
    """({map name: map info from bpftool}, {BTF type id: type}) for freshly pinned maps."""
    if os.geteuid() != 0:
        pytest.fail("the layout test loads the real BPF programs: it needs root (CAP_BPF, CAP_SYS_ADMIN)")
    name = "ambient-test-layout-" + secrets.token_hex(3)
    cgroup = f"{DEFAULT_CGROUP}/{name}"
    pin_dir = f"{BPFFS}/{name}"
    os.mkdir(cgroup)
    try:
        done = subprocess.run([sys.executable, "-m", "agent.capture.loader", "--pin-dir", pin_dir,
                               "--cgroup", cgroup], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        infos = {m: _bpftool("map", "show", "pinned", f"{pin_dir}/{m}") for m in MAPS}
        # One compile, one BTF object, shared by the maps that carry it (the
        # kernel takes no BTF for a sockhash: `listeners` has none, but its
        # key/value annotation is in the same object).
        btf_ids = {info["btf_id"] for info in infos.values() if info.get("btf_id")}
        assert len(btf_ids) == 1, f"expected the maps to share one BTF object: {infos}"
        types = _bpftool("btf", "dump", "id", str(btf_ids.pop()))["types"]
        yield infos, {t["id"]: t for t in types}
    finally:
        problems = teardown(pin_dir, cgroup)
        os.rmdir(cgroup)
        assert problems == []


def _bpftool(*args: str) -> dict:
    done = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"bpftool {' '.join(args)}: {done.stderr or done.stdout}"
    return json.loads(done.stdout)


def _btf_shape(types: dict[int, dict], type_id: int):
    """A comparable description of a BTF type: sizes, names, offsets, array lengths."""
    t = types[type_id]
    while t["kind"] in _QUALIFIERS:
        t = types[t["type_id"]]
    if t["kind"] == "INT":
        return ("int", t["size"])
    if t["kind"] == "ARRAY":
        return ("array", _btf_shape(types, t["type_id"]), t["nr_elems"])
    if t["kind"] == "STRUCT":
        members = []
        for m in t["members"]:
            assert m["bits_offset"] % 8 == 0 and not m.get("bitfield_size"), f"bit field {m} in {t['name']}"
            members.append((m["name"], m["bits_offset"] // 8, _btf_shape(types, m["type_id"])))
        return ("struct", t["size"], tuple(members))
    raise AssertionError(f"no ctypes mirror is possible for BTF {t['kind']} {t.get('name')}")


def _ctypes_shape(ctype):
    if issubclass(ctype, ctypes.Structure):
        members = tuple((name, getattr(ctype, name).offset, _ctypes_shape(ftype))
                        for name, ftype, *_bits in ctype._fields_)
        return ("struct", ctypes.sizeof(ctype), members)
    if issubclass(ctype, ctypes.Array):
        return ("array", _ctypes_shape(ctype._type_), ctype._length_)
    if issubclass(ctype, ctypes._SimpleCData) and ctype._type_ in "bBhHiIlLqQ":
        return ("int", ctypes.sizeof(ctype))
    raise AssertionError(f"{ctype} is not a type common.h could declare")


def _map_kv(types: dict[int, dict], map_name: str) -> tuple[int, int]:
    """(key type id, value type id) from clang's ``____btf_map_<name>`` annotation."""
    annotation = [t for t in types.values() if t["kind"] == "STRUCT" and t["name"] == f"____btf_map_{map_name}"]
    assert len(annotation) == 1, f"no BTF key/value annotation for map {map_name}"
    members = {m["name"]: m["type_id"] for m in annotation[0]["members"]}
    return members["key"], members["value"]


@pytest.mark.parametrize("map_name", MAPS)
@pytest.mark.parametrize("side", ["key", "value"])
def test_ctypes_mirror_matches_the_compiled_header(compiled, map_name, side):
    infos, types = compiled
    info = infos[map_name]
    key_id, value_id = _map_kv(types, map_name)
    ctype = MAP_TYPES[map_name][0 if side == "key" else 1]
    assert _ctypes_shape(ctype) == _btf_shape(types, key_id if side == "key" else value_id), \
        f"{map_name} {side}: datapath.{ctype.__name__} differs from bpf/common.h"
    # The kernel's own record of the map agrees (per-CPU values: one CPU's).
    assert ctypes.sizeof(ctype) == info["bytes_key" if side == "key" else "bytes_value"]


def test_every_map_and_every_ctypes_mirror_is_covered():
    assert set(MAP_TYPES) == set(MAPS)
    mirrors = {cls for _n, cls in inspect.getmembers(datapath, inspect.isclass)
               if issubclass(cls, ctypes.Structure) and cls.__module__ == datapath.__name__}
    used = {t for kv in MAP_TYPES.values() for t in kv}
    assert mirrors <= used, f"ctypes mirrors not checked against common.h: {mirrors - used}"


def _defines() -> dict[str, int]:
    """The integer #defines of bpf/common.h (plain numbers only, as the preprocessor reads them)."""
    text = (datapath.BPF_SOURCE_DIR / "common.h").read_text()
    return {name: int(value, 0) for name, value in re.findall(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text, re.M)}


def test_the_constants_datapath_copies_match_common_h():
    defines = _defines()
    copied = ("OUTBOUND_PORT", "INBOUND_PORT", "HBONE_PORT", "AGENT_MARK", "LISTENER_INBOUND", "LISTENER_HBONE",
              "POD_IPV4", "POD_IPV6", "POD_DNS", "DNS_PORT")
    assert {n: defines.get(n) for n in copied} == {n: getattr(datapath, n) for n in copied}
    # datapath.STATS names the capture_stats slots in index order: STAT_<NAME> is the slot of <name>.
    stats = {n.removeprefix("STAT_").lower(): v for n, v in defines.items() if n.startswith("STAT_")}
    assert stats == {name: i for i, name in enumerate(datapath.STATS)}


def test_every_counter_has_a_slot_in_capture_stats(compiled):
    infos, _types = compiled
    assert infos["capture_stats"]["max_entries"] >= len(datapath.STATS)
