"""The file state source: a `kind: List` document the lab (or a person) writes.

The file is replaced atomically by its writer, so it is watched by path
(inode, size and mtime), not through an open file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from agent.state.model import ClusterState, StateError, load_state_text

log = logging.getLogger(__name__)


def parse_state_url(url: str) -> str:
    """``file:/path`` -> ``/path``."""
    if url.startswith("file:"):
        path = url[len("file:"):]
        if not path:
            raise StateError("state source 'file:' needs a path")
        return path
    if url == "kube":
        raise StateError("state source 'kube' (the Kubernetes API) is not implemented yet; use file:PATH")
    raise StateError(f"unsupported state source {url!r}: expected file:PATH")


class FileStateSource:
    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple | None = None
        self._bad: tuple | None = None

    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self) -> ClusterState:
        """Read the file now. A missing file is an empty cluster (the lab writes it later)."""
        stamp = self._stamp()
        if stamp is None:
            self._seen = None
            return ClusterState.from_items([])
        try:
            with open(self.path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"read {self.path}: {exc}") from None
        try:
            state = load_state_text(text)
        except StateError as exc:
            raise StateError(f"{self.path}: {exc}") from None
        self._seen = stamp
        for err in state.errors:
            log.warning("state %s: skipped %s", self.path, err)
        return state

    async def watch(self, on_change: Callable[[ClusterState], None], interval: float = 0.2) -> None:
        """Call ``on_change`` with each new version; a bad version keeps the last good one."""
        while True:
            await asyncio.sleep(interval)
            stamp = self._stamp()
            if stamp == self._seen or stamp is None or stamp == self._bad:
                continue
            try:
                state = self.load()
            except StateError as exc:
                self._bad = stamp
                log.error("ignoring unreadable cluster state (keeping the previous one): %s", exc)
                continue
            try:
                on_change(state)
            except Exception:
                log.exception("applying cluster state %s failed", state.resource_version)
