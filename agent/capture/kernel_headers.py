"""The kernel headers BCC compiles ``bpf/*.c`` against: bundled, not the host's.

BCC (0.26, ``src/cc/frontends/clang/loader.cc``) compiles every program with
``-D__KERNEL__`` against a kernel header tree. Without ``BCC_KERNEL_SOURCE``
it looks in ``/lib/modules/$(uname -r)/{build,source}`` and then in
``/sys/kernel/kheaders.tar.xz`` (``CONFIG_IKHEADERS``, after running
``modprobe kheaders``). Most managed node images have neither, so the image
carries its own tree and the loader points ``BCC_KERNEL_SOURCE`` at it.

Why one fixed tree (Debian 12's 6.1 headers) is right for every kernel: our
programs use only UAPI types (``__sk_buff``, ``bpf_sock_addr``,
``bpf_sock_ops``, ``bpf_sk_lookup``), whose layouts the kernel never changes,
and no program type we use reads a kernel-internal structure. The rest of the
tree is there because BCC's own ``helpers.h`` includes ``linux/log2.h``,
``asm/page.h`` and ``linux/version.h`` (6.1's ``LINUX_VERSION_CODE`` ends up
in the object's ``version`` section, which the kernel reads only for kprobes).

The bundle is a trimmed, merged copy of Debian's ``linux-headers-<abi>-<flavour>``
and ``linux-headers-<abi>-common`` (``bundle_plan``), in the single-tree
layout BCC expects under ``BCC_KERNEL_SOURCE`` (``KBuildHelper``: include
paths relative to the tree, ``-include ./include/linux/kconfig.h``). It keeps
the directories a UAPI-only program reaches (about 37 MB of the packages'
78 MB): a compile of our four programs opens about 290 files, all in them.
Left out on purpose: ``include/net``, ``include/trace``, drivers' headers.
A program that includes ``net/sock.h`` fails to compile here instead of
reading 6.1's ``struct sock`` offsets on a node that runs another kernel.

Stdlib only, so the Dockerfile's build stage and the Makefile run it as a
plain script::

    python3 agent/capture/kernel_headers.py bundle --to build/kernel-headers
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
from dataclasses import dataclass

# Where the image carries the bundle (Dockerfile); `make kernel-headers`
# links it to build/kernel-headers on a development machine.
BUNDLED_DIR = "/usr/share/ambient-agent/kernel-headers"
ORIGIN_FILE = "ORIGIN"   # one line: which package the tree was made from

# The loader's --kernel-headers (or AMBIENT_AGENT_KERNEL_HEADERS) values besides a path.
AUTO = "auto"   # BCC_KERNEL_SOURCE if set, else the bundle if present, else the host's
HOST = "host"   # BCC's own search: /lib/modules/$(uname -r)/{build,source}, then kheaders
SETTING_ENV = "AMBIENT_AGENT_KERNEL_HEADERS"
BCC_ENV = "BCC_KERNEL_SOURCE"

# What BCC opens first (its own test for a usable tree), and what kconfig.h includes.
REQUIRED = ("include/linux/kconfig.h", "include/generated/autoconf.h")

# The kept directories: those the compile of bpf/*.c reads from (traced with
# strace: include/{linux,uapi,asm-generic,generated,vdso}, arch/x86/include/
# {asm,uapi,generated}).
COMMON_INCLUDE_DIRS = ("linux", "uapi", "asm-generic", "vdso")
COMMON_ARCH_INCLUDE_DIRS = ("asm", "uapi")
# Written into ORIGIN: a bundle made with another selection is made again.
LAYOUT = (f"include/{{{','.join(COMMON_INCLUDE_DIRS)},generated}} "
          f"arch/*/include/{{{','.join(COMMON_ARCH_INCLUDE_DIRS)},generated}}")


# -- which headers the loader uses (pure) -------------------------------------------------------

@dataclass(frozen=True)
class HeaderChoice:
    """What the loader tells BCC: ``path`` None means "unset BCC_KERNEL_SOURCE"."""
    path: str | None
    source: str          # "bundled", "flag", "BCC_KERNEL_SOURCE" or "host"

    def describe(self) -> str:
        if self.path is None:
            return "the host's (/lib/modules/$(uname -r)/build, else /sys/kernel/kheaders.tar.xz)"
        return f"{self.path} ({self.source})"


class HeadersError(ValueError):
    """A kernel header setting that cannot work."""


def choose(setting: str, bcc_env: str | None, usable) -> HeaderChoice:
    """Decide from the setting, an inherited ``BCC_KERNEL_SOURCE`` and ``usable(path) -> bool``.

    ``auto``: an operator's ``BCC_KERNEL_SOURCE`` wins (BCC's own documented
    switch); then the bundle; then BCC's search of the host. ``host``: BCC's
    search of the host only. A path must hold a usable tree, checked here so
    that BCC never falls back to ``modprobe kheaders`` behind our back.
    """
    setting = (setting or AUTO).strip()
    if setting == HOST:
        return HeaderChoice(None, HOST)
    if setting == AUTO:
        if bcc_env:
            return HeaderChoice(bcc_env, BCC_ENV)
        if usable(BUNDLED_DIR):
            return HeaderChoice(BUNDLED_DIR, "bundled")
        return HeaderChoice(None, HOST)
    if not os.path.isabs(setting):
        raise HeadersError(f"kernel headers {setting!r}: expected {AUTO!r}, {HOST!r} or an absolute path")
    if not usable(setting):
        raise HeadersError(f"kernel headers {setting}: not a kernel header tree "
                           f"(no {' or '.join(REQUIRED)})")
    return HeaderChoice(setting, "flag")


def usable(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, rel)) for rel in REQUIRED)


def origin(path: str | None) -> str:
    """The ORIGIN line of a bundle ('' when there is none)."""
    if not path:
        return ""
    try:
        with open(os.path.join(path, ORIGIN_FILE), encoding="utf-8") as f:
            return f.readline().strip()
    except OSError:
        return ""


# -- building the bundle -------------------------------------------------------------------------

def common_dir_of(flavour_makefile: str, flavour_dir: str) -> str:
    """The -common tree a Debian flavour tree builds with (its Makefile's ``include`` line)."""
    m = re.search(r"^include\s+(\S+)/Makefile\s*$", flavour_makefile, re.M)
    if m:
        return m.group(1)
    # Older packages: linux-headers-<abi>-<flavour> beside linux-headers-<abi>-common.
    return re.sub(r"-[^-]+$", "-common", flavour_dir.rstrip("/"))


def bundle_plan(common: str, flavour: str, arches: list[str]) -> list[tuple[str, str]]:
    """(source dir, destination dir relative to the bundle) pairs, in copy order."""
    plan = [(f"{common}/include/{d}", f"include/{d}") for d in COMMON_INCLUDE_DIRS]
    plan.append((f"{flavour}/include/generated", "include/generated"))
    for arch in arches:
        plan += [(f"{common}/arch/{arch}/include/{d}", f"arch/{arch}/include/{d}")
                 for d in COMMON_ARCH_INCLUDE_DIRS]
        plan.append((f"{flavour}/arch/{arch}/include/generated", f"arch/{arch}/include/generated"))
    return plan


def origin_line(flavour: str, package_h: str) -> str:
    """``linux-headers-6.1.0-57-amd64 (Debian 6.1.192-3)`` from the tree and its package.h."""
    m = re.search(r'LINUX_PACKAGE_ID\s+"\s*([^"]*)"', package_h)
    version = f" ({m.group(1).strip()})" if m else ""
    return os.path.basename(flavour.rstrip("/")) + version


def find_flavour(src_root: str = "/usr/src") -> str:
    """The newest installed linux-headers-<abi>-<flavour> tree (one with generated headers)."""
    found = [d for d in glob.glob(f"{src_root}/linux-headers-*")
             if not d.endswith("-common") and os.path.isdir(f"{d}/include/generated")]
    if not found:
        raise HeadersError(f"no linux-headers-*-<flavour> tree under {src_root} "
                           "(Debian: apt-get install linux-headers-$(dpkg --print-architecture))")
    return sorted(found, key=_version_key)[-1]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _version_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def bundle(dest: str, flavour: str) -> bool:
    """Build the bundle at ``dest`` from ``flavour`` (and its -common); False if already up to date.

    Built beside ``dest`` and renamed into place, so a reader sees the old
    tree or the new one, never half of one.
    """
    with open(f"{flavour}/Makefile", encoding="utf-8") as f:
        common = common_dir_of(f.read(), flavour)
    with open(f"{flavour}/include/generated/package.h", encoding="utf-8") as f:
        line = origin_line(flavour, f.read())
    stamp = f"{line}\nkept: {LAYOUT}\n"
    if usable(dest) and _read(os.path.join(dest, ORIGIN_FILE)) == stamp:
        return False
    arches = sorted(a for a in os.listdir(f"{flavour}/arch")
                    if os.path.isdir(f"{flavour}/arch/{a}/include/generated"))
    if not arches:
        raise HeadersError(f"{flavour}: no arch/*/include/generated")
    tmp = f"{dest.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for src, rel in bundle_plan(common, flavour, arches):
            if not os.path.isdir(src):
                raise HeadersError(f"{src}: missing (is {os.path.basename(common)} installed?)")
            shutil.copytree(src, os.path.join(tmp, rel), symlinks=False)
        with open(os.path.join(tmp, ORIGIN_FILE), "w", encoding="utf-8") as f:
            f.write(stamp)
        if not usable(tmp):
            raise HeadersError(f"bundle from {flavour} lacks {' or '.join(REQUIRED)}")
        old = f"{dest.rstrip('/')}.old{os.getpid()}"
        if os.path.lexists(dest):
            os.rename(dest, old)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="bundle the kernel headers BCC needs")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="make a trimmed, merged header tree from Debian's linux-headers")
    b.add_argument("--to", required=True, help="destination directory (replaced when out of date)")
    b.add_argument("--from", dest="flavour", default=None,
                   help="a linux-headers-<abi>-<flavour> tree (default: newest under /usr/src)")
    args = p.parse_args(argv)
    try:
        flavour = args.flavour or find_flavour()
        made = bundle(args.to, flavour)
    except (HeadersError, OSError) as exc:
        print(f"kernel headers: {exc}", file=sys.stderr)
        return 1
    print(f"kernel headers: {args.to} {'made from' if made else 'up to date with'} {origin(args.to)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
