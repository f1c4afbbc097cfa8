"""Giving the heap memory freed by a burst of traffic back to the kernel.

glibc keeps what the agent frees (the buffers of finished connections, up to
a stream window of received data each) in its heaps for reuse, and returns
only a free chunk at the very top of the heap. Measured in a two-node lab
(iperf3 through the mesh, then idle): node1's agent went from 52 MB to
87-102 MB and stayed there, 25-50 MB of it free heap memory;
``malloc_trim(0)`` (which returns every whole free page of every arena)
brought it back to 67 MB in under 1 ms.

``IdleHeapTrimmer`` calls it once each time the process goes quiet after
being busy: never under load, where the pages would be faulted right back
in, and not over and over while idle. Busy means more than ``busy_share`` of
one core over the last ``interval`` (process CPU time, all threads).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


_on_quiet: list[Callable[[], None]] = []


def on_quiet(fn: Callable[[], None]) -> None:
    """Call ``fn`` each time the process goes quiet, before the heap is
    trimmed: caches kept for throughput (h2conn's body buffers) let go."""
    _on_quiet.append(fn)


class IdleHeapTrimmer:
    def __init__(self, interval: float = 1.0, busy_share: float = 0.10,
                 cpu_clock: Callable[[], float] = time.process_time,
                 trim: Callable[[int], int] | None = None) -> None:
        self.interval = interval
        self.busy_share = busy_share
        self._cpu_clock = cpu_clock
        self._trim = trim if trim is not None else malloc_trim()
        self._last_cpu = cpu_clock()
        self._busy_since_trim = False
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def tick(self) -> bool:
        """One interval has passed; True when it trimmed."""
        now = self._cpu_clock()
        used, self._last_cpu = now - self._last_cpu, now
        if used > self.busy_share * self.interval:
            self._busy_since_trim = True
            return False
        if not self._busy_since_trim or self._trim is None:
            return False
        self._busy_since_trim = False
        for fn in _on_quiet:
            fn()
        before = _rss_bytes()
        self._trim(0)
        self.trims += 1
        log.debug("quiet after load: %.1f MB of freed heap memory returned to the kernel",
                  (before - _rss_bytes()) / 1e6)
        return True

    async def run(self) -> None:
        if self._trim is None:
            log.info("no malloc_trim in this C library: freed heap memory stays with the process")
            return
        while True:
            await asyncio.sleep(self.interval)
            self.tick()
