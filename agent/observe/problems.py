"""One log line per distinct problem, not one per connection.

A refused or failed connection is recorded in full by the access log (one
line per connection, on purpose, ``accesslog.py``). The agent's own log
must not grow with the connection rate as well: at 200 connections/s it
grew 22-26 MB per 5 minutes, and a peer that can make connections fail can
make it grow at will (issue 11, item 7).

``ProblemLog.report`` logs the first occurrence of a problem, then counts
repeats of the same problem for ``interval`` seconds; the next occurrence
after that logs again, saying how many were not logged in between, and a
problem that stops recurring gets its count logged with the next line
logged for any problem. Problems are told apart by a key the caller builds; keys that
peers influence go through ``problem_key`` (digits, hence addresses and
ports, are folded), and at most ``max_keys`` distinct keys are tracked per
interval (the rest share one), so the lines per interval are bounded
whatever peers send.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

_DIGITS = re.compile(r"\d+")
OVERFLOW = ("(other problems)",)


def problem_key(*parts: str, width: int = 120) -> tuple[str, ...]:
    """A key for ``parts`` with digit runs folded and each part cut to ``width``:
    ``refused: 400 bad authority '198.18.0.7:81'`` and the same with another
    address are one problem."""
    return tuple(_DIGITS.sub("N", part)[:width] for part in parts)


class _Seen:
    __slots__ = ("since", "repeats", "level", "message")

    def __init__(self, since: float, level: int, message: str) -> None:
        self.since = since
        self.repeats = 0
        self.level = level
        self.message = message


class ProblemLog:
    """Rate-limited logging of per-connection problems (see the module docstring)."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._seen: dict[tuple, _Seen] = {}
        self._swept = clock()
        self.suppressed = 0          # lines not written since start (for tests and status)

    def report(self, level: int, key: tuple, msg: str, *args, exc_info=None) -> bool:
        """Log ``msg % args`` at ``level`` unless the same ``key`` was logged
        less than ``interval`` seconds ago; True if it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None and len(self._seen) >= self.max_keys:
            key, seen = OVERFLOW, self._seen.get(OVERFLOW)
        if seen is not None and now - seen.since < self.interval:
            seen.repeats += 1
            seen.level, seen.message = level, (msg % args if args else msg)
            self.suppressed += 1
            return False
        repeats = seen.repeats if seen is not None else 0
        if repeats:
            msg += f" ({repeats} more like this in the last {self.interval:g}s not logged)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        self._seen[key] = _Seen(now, level, "")
        if now - self._swept >= self.interval:
            self._sweep(now)
        return True

    def _sweep(self, now: float) -> None:
        """Forget problems quiet for a whole interval, logging what they left uncounted."""
        self._swept = now
        for key, seen in list(self._seen.items()):
            if now - seen.since < self.interval:
                continue
            del self._seen[key]
            if seen.repeats:
                self.logger.log(seen.level, "%s (the last of %d like this in %gs not logged)",
                                seen.message, seen.repeats, self.interval)
