"""The file state source: a `kind: List` document the lab (or a person) writes.

Writers replace the file atomically (temp file + rename), so it is watched
by path through its identity stamp (inode, size, mtime), never through an
open file descriptor, which would keep reading the replaced version.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from agent.fileio import FileWatch, Stamp, path_stamp, stamp_of
from agent.state.model import ClusterState, StateError, load_state_text

log = logging.getLogger(__name__)


def parse_state_url(url: str) -> str:
    """The path of a ``file:PATH`` state source (``file:///PATH`` also works).

    ``kube`` (the Kubernetes API) is not a file: ``agent.state.source.open_state_source``
    opens it; here it gets an error that says so.
    """
    scheme, sep, rest = url.partition(":")
    if not sep:
        scheme, rest = url, ""
    if scheme == "file":
        if rest.startswith("//"):
            host, slash, path = rest[2:].partition("/")
            if host not in ("", "localhost"):
                raise StateError(f"state source {url!r}: a file URL cannot name host {host!r}")
            rest = slash + path
        if not rest:
            raise StateError(f"state source {url!r}: 'file:' needs a path, e.g. file:/run/ambient/state.json")
        return rest
    if scheme == "kube":
        raise StateError(f"state source {url!r} is the Kubernetes API, not a file "
                         "(open it with agent.state.source.open_state_source)")
    raise StateError(f"unsupported state source {url!r}: expected file:PATH, kube "
                     "or kube:KUBECONFIG")


class _UnreadableVersion(StateError):
    """A StateError that remembers which version of the file failed."""

    def __init__(self, message: str, stamp: Stamp | None) -> None:
        super().__init__(message)
        self.stamp = stamp


class FileStateSource:
    """Reads a cluster state file and reports each new version of it."""

    def __init__(self, path: str) -> None:
        self.path = path
        # The last version read by load(): a version of the file with the
        # same stamp is not read and parsed again.
        self._cached: tuple[Stamp | None, ClusterState] | None = None

    def _current_stamp(self) -> Stamp | None:
        try:
            return path_stamp(self.path)
        except OSError as exc:
            raise _UnreadableVersion(f"stat {self.path}: {exc.strerror}", None) from None

    def load(self) -> ClusterState:
        """The file's current state (raises ``StateError`` if unreadable).

        A missing file is an empty cluster: the agent may start before the
        lab writes the first version. An unchanged file (same stamp) returns
        the state already parsed, so callers may load on every request.
        """
        return self._load()[1]

    def _load(self) -> tuple[Stamp | None, ClusterState]:
        try:
            with open(self.path, "rb") as fh:
                # The stamp of the version actually read, not of a path lookup
                # that a concurrent rename could have overtaken.
                stamp = stamp_of(os.fstat(fh.fileno()))
                if self._cached is not None and self._cached[0] == stamp:
                    return self._cached
                data = fh.read()
        except FileNotFoundError:
            self._cached = (None, ClusterState.from_items([]))
            return self._cached
        except OSError as exc:      # permissions, a directory, an I/O error
            raise _UnreadableVersion(f"read {self.path}: {exc.strerror}", self._current_stamp()) from None
        try:
            state = load_state_text(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _UnreadableVersion(f"{self.path}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                                     stamp) from None
        except StateError as exc:
            raise _UnreadableVersion(f"{self.path}: {exc}", stamp) from None
        for err in state.errors:
            log.warning("cluster state %s: skipped %s", self.path, err)
        self._cached = (stamp, state)
        return self._cached

    async def watch(self, on_change: Callable[[ClusterState], None], interval: float = 0.2) -> None:
        """Poll the file; call ``on_change`` with each new good version. Runs until cancelled.

        The first poll (immediately) reports the version present when
        watching starts, unless ``load()`` already returned that very
        version. A version that cannot be read or parsed is logged once and
        skipped: the caller keeps its previous state. A vanished file is not
        reported as an empty cluster either (that would release every pod);
        the next version written is.

        Every new version is reported, even one that ``load()`` read first
        for another caller (the agent reloads on CNI requests).

        State files are small and parsed inline: JSON parsing holds the GIL,
        so a thread would not keep the event loop any more responsive.
        """
        # The version last reported, and the one whose failure was logged
        # (its stamp, or the message when not even its stamp could be had),
        # so each failure is logged once.
        versions = FileWatch(self.path)
        versions.handled(self._cached[0] if self._cached is not None else None)
        missing_logged = False
        while True:
            state = None
            try:
                stamp = self._current_stamp()
                if stamp is None:
                    if versions.seen is not None and not missing_logged:
                        log.warning("cluster state %s vanished; keeping the previous state", self.path)
                        missing_logged = True
                elif versions.is_new(stamp):
                    read_stamp, state = self._load()
            except _UnreadableVersion as exc:
                if versions.failed(exc.stamp if exc.stamp is not None else str(exc)):
                    log.error("cluster state unreadable, keeping the previous one: %s", exc)
            if state is not None:
                versions.handled(read_stamp)
                missing_logged = False
                try:
                    on_change(state)
                except Exception:   # a consumer's bug must not stop the watch
                    log.exception("applying cluster state %s (resourceVersion %r) failed",
                                  self.path, state.resource_version)
            await asyncio.sleep(interval)
