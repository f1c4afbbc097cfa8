"""The capture programs' loader: compile, load, attach, pin, exit.

``python -m agent.capture.loader --pin-dir DIR --cgroup CGROUP [--kernel-headers auto|host|PATH]``

The agent runs this as a short-lived child (``CaptureDatapath.load``) and
then works only on what it pinned, through ``bpf()`` (``bpfsys``). BCC is
imported here and nowhere else in the agent's process tree: ``import bcc``
maps libbcc and with it LLVM (about 65 MB), and one compile adds about 55 MB
more that the process keeps; in a child that exits, none of it stays in the
process that runs for days.

What it leaves behind in ``DIR`` (the layout is in ``datapath``'s docstring):

* every map, pinned by BCC itself (``BPF_TABLE_PINNED`` in ``bpf/common.h``),
  reused when a previous loader already pinned it;
* the cgroup programs, attached with ``BPF_PROG_ATTACH`` and pinned, each
  replacing the previous loader's without a moment uncaptured;
* the sk_lookup program, pinned as ``prog_sk_lookup``, with every pinned
  link of a previous agent already pointing at it.

BCC compiles against the kernel headers the image bundles, not the host's
(``kernel_headers.py``; docs/CAPTURE.md, "Kernel headers").

Exit status 0 when all of that holds, with a ``LoaderReport`` line (compile
time, headers used) last on stderr; otherwise 1 and the reason as the last
line on stderr (the agent puts it into its ``CaptureError``). A failed load
leaves the previous programs attached: pods stay captured or fail closed.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time

from agent.capture import bpfsys, kernel_headers
from agent.capture.datapath import (
    BPF_SOURCE_DIR,
    BPF_SOURCES,
    CGROUP_PROGRAMS,
    DEFAULT_CGROUP,
    MAPS,
    SK_LOOKUP_PIN,
    CaptureError,
    LoaderReport,
    detach_pinned,
    ensure_bpffs,
)

log = logging.getLogger("agent.capture.loader")

STAGED = "_staged"   # bpffs names may not contain dots: <pin>_staged<pid>


def load(pin_dir: str, cgroup: str, headers: str = kernel_headers.AUTO) -> LoaderReport:
    """Compile ``bpf/*.c``, attach and pin; replace a previous loader's programs.

    ``headers``: the kernel header tree BCC compiles against (``auto``,
    ``host`` or a path; ``kernel_headers.choose`` says what each means).
    """
    # Open the cgroup first: a wrong --cgroup fails before a compile is paid for.
    try:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CaptureError(f"open cgroup {cgroup}: {exc.strerror}") from exc
    try:
        try:
            choice = kernel_headers.choose(headers, os.environ.get(kernel_headers.BCC_ENV),
                                           kernel_headers.usable)
        except kernel_headers.HeadersError as exc:
            raise CaptureError(str(exc)) from exc
        # libbcc reads BCC_KERNEL_SOURCE with getenv() at each compile;
        # os.environ writes through to the C environment.
        if choice.path is None:
            os.environ.pop(kernel_headers.BCC_ENV, None)
        else:
            os.environ[kernel_headers.BCC_ENV] = choice.path
        log.info("kernel headers: %s %s", choice.describe(), kernel_headers.origin(choice.path))
        ensure_bpffs()
        os.makedirs(pin_dir, mode=0o700, exist_ok=True)
        try:
            from bcc import BPF  # here only: see the module docstring
        except ImportError as exc:
            raise CaptureError(f"cannot import BCC (Debian's python3-bpfcc) with {sys.executable}: "
                               f"{exc}") from exc
        text = "".join((BPF_SOURCE_DIR / name).read_text() for name in BPF_SOURCES)
        started = time.monotonic()
        try:
            # Compiles (clang, in libbcc) and creates or reuses the pinned maps.
            bpf = BPF(text=text, cflags=[f"-I{BPF_SOURCE_DIR}", f'-DPIN_DIR="{pin_dir}"'])
        except Exception as exc:
            raise CaptureError(f"compile {', '.join(BPF_SOURCES)} against kernel headers "
                               f"{choice.describe()}: {exc}") from exc
        compile_seconds = time.monotonic() - started
        for name in MAPS:
            if not os.path.exists(os.path.join(pin_dir, name)):
                raise CaptureError(f"map {name} was not pinned in {pin_dir}")

        sk_fn = bpf.load_func("ambient_sk_lookup", bpfsys.BPF_PROG_TYPE_SK_LOOKUP,
                              attach_type=bpfsys.BPF_SK_LOOKUP)
        sk_pin = os.path.join(pin_dir, SK_LOOKUP_PIN)
        sk_staged = f"{sk_pin}{STAGED}{os.getpid()}"
        bpfsys.obj_pin(sk_fn.fd, sk_staged)
        try:
            for pin_name, func, prog_type, attach_type in CGROUP_PROGRAMS:
                fn = bpf.load_func(func, prog_type, attach_type=attach_type)
                _replace_cgroup_program(pin_dir, cg_fd, pin_name, fn.fd, attach_type)
            adopted = _adopt_links(pin_dir, sk_fn.fd)
            # One rename: the agent finds either the previous program or this
            # one under the name, never nothing. Links hold their program
            # themselves, so replacing the pin detaches nothing.
            os.rename(sk_staged, sk_pin)
        except BaseException:
            _unlink(sk_staged)
            raise
        _drop_stale_staged(pin_dir, cg_fd)
        bpf.cleanup()   # our fds only; pins and BPF_PROG_ATTACH attachments stay
    finally:
        os.close(cg_fd)
    log.info("programs attached at %s and pinned in %s; %d sk_lookup link(s) adopted",
             cgroup, pin_dir, adopted)
    return LoaderReport(compile_seconds, choice.path or kernel_headers.HOST, choice.source)


def _replace_cgroup_program(pin_dir: str, cg_fd: int, pin_name: str, prog_fd: int,
                            attach_type: int) -> None:
    # Attach the new program before detaching the old one: both act on the
    # same pinned maps, and the second sees an already rewritten (loopback)
    # destination and leaves it alone, so there is no moment without capture.
    pin = os.path.join(pin_dir, pin_name)
    staged = f"{pin}{STAGED}{os.getpid()}"
    _unlink(staged)
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


def _adopt_links(pin_dir: str, prog_fd: int) -> int:
    """Point the pinned sk_lookup links of a previous agent at the new program."""
    count = 0
    for entry in sorted(os.listdir(pin_dir)):
        if not entry.startswith("link_"):
            continue
        fd = bpfsys.obj_get(os.path.join(pin_dir, entry))
        try:
            bpfsys.link_update(fd, prog_fd)
        finally:
            os.close(fd)
        count += 1
    return count


def _drop_stale_staged(pin_dir: str, cg_fd: int) -> None:
    """Remove what a loader killed half-way (the agent's timeout) left staged.

    Runs only after this loader's programs are attached and pinned under
    their own names, so detaching a leftover never leaves a hook uncaptured.
    """
    attach_types = {name: at for name, _f, _t, at in CGROUP_PROGRAMS}
    for entry in sorted(os.listdir(pin_dir)):
        base, sep, pid = entry.partition(STAGED)
        if not sep or (pid.isdigit() and os.path.exists(f"/proc/{pid}")):
            continue   # not staged, or its loader still runs (two agents starting at once)
        path = os.path.join(pin_dir, entry)
        if base in attach_types:
            try:
                detach_pinned(path, cg_fd, attach_types[base])
            except OSError as exc:
                log.warning("leftover %s: %s", path, exc)
                continue
        _unlink(path)
        log.info("removed %s, left by an interrupted loader", path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.capture.loader",
                                description="compile, attach and pin the capture programs, then exit")
    p.add_argument("--pin-dir", required=True, help="the agent's --pin-dir")
    p.add_argument("--cgroup", default=DEFAULT_CGROUP, help="cgroup v2 directory to attach to")
    p.add_argument("--kernel-headers", metavar="auto|host|PATH",
                   default=os.environ.get(kernel_headers.SETTING_ENV) or kernel_headers.AUTO,
                   help="kernel header tree BCC compiles against: 'auto' (default; $BCC_KERNEL_SOURCE if "
                        f"set, else the bundle at {kernel_headers.BUNDLED_DIR} if present, else the host's), "
                        "'host' (/lib/modules/$(uname -r)/build, else /sys/kernel/kheaders.tar.xz) or a "
                        f"tree made by kernel_headers.py; default from ${kernel_headers.SETTING_ENV}")
    args = p.parse_args(argv)
    # libbcc writes some errors ("Unable to find kernel headers") to stdout:
    # send them where the agent reads the loader's reasons.
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        report = load(args.pin_dir, args.cgroup, args.kernel_headers)
    except (CaptureError, OSError) as exc:
        print(f"loader: {exc}", file=sys.stderr, flush=True)
        return 1
    log.info("done in %.2f s (compile %.2f s)", time.monotonic() - started, report.compile_seconds)
    print(report.line(), file=sys.stderr, flush=True)   # for the agent: datapath.LoaderReport.parse
    return 0


if __name__ == "__main__":
    sys.exit(main())
