"""Which asyncio event loop the agent runs on.

``uvloop`` (libuv, with its own Cython TLS transport) is the default when
it is installed: the data path spends most of its time in event-loop
callbacks and TLS records, and uvloop does both in native code
(bench/notes.md has the before/after). The stock asyncio loop stays a
supported fallback (``--event-loop asyncio``): everything the agent does
works on both, and the test suite runs the proxy's unit tests on both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory(kind: str = "auto") -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(name of the loop used, a factory for it). ``auto``: uvloop if importable."""
    if kind not in CHOICES:
        raise ValueError(f"unknown event loop {kind!r} (choose from {', '.join(CHOICES)})")
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(main: Callable[[], Coroutine[Any, Any, Any]], kind: str = "auto"):
    """``asyncio.run`` on the chosen loop (Python 3.11 has no loop_factory argument)."""
    name, factory = loop_factory(kind)
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())
