"""Files that others read: atomic replacement, and noticing a new version.

Atomic replacement is the one way the project writes files others read.
Readers (a container runtime reading CNI configs, node agents reading the
CA's root, the CA reading its key, the agent reading its pod records after a
crash) see the old file or the new one, never half of one, and a crash
leaves no half-written file behind: write a temporary file in the same
directory with its final mode, fsync it, rename it over the target, fsync the
directory. Each write has its own temporary name (pid and a random part,
created with O_EXCL), so two writers of one file, threads or processes,
never write into the same temporary file.

``FileWatch`` is the one way a file polled by path is checked for a new
version: its stamp (inode, size, mtime) changes when a writer replaces it
(new inode) or edits it in place (size or mtime), and the watch remembers
the version last handled and the last one that failed, so a bad version is
reported once, not on every poll. Polling by path, never through an open
descriptor, because an atomic writer replaces the file and a descriptor
would keep reading the old one.

Standard library only.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Hashable

# (st_ino, st_size, st_mtime_ns) of one version of a file.
Stamp = tuple[int, int, int]

_TMP_MARK = ".tmp-"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A fresh temporary name beside ``path``: hidden, ``.<name>.tmp-<pid>-<random>``.

    Hidden and without the target's extension, so that nothing that lists the
    directory for ``*.json``/``*.conflist`` takes it for a real file.
    """
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(6)}")


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``; the file never exists with a wider mode than ``mode``."""
    directory = os.path.dirname(path)
    while True:
        tmp = temp_name(path)
        try:
            # O_EXCL: a name some other writer holds is never opened twice.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            break
        except FileExistsError:     # 48 random bits: only a leftover of a crash can collide
            continue
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)           # O_CREAT's mode is filtered by the umask
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _discard(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(directory or ".")


def remove_stale_temps(directory: str) -> list[str]:
    """Remove temporary files that ``atomic_write`` left in ``directory`` when a
    writer died between creating and renaming them; the removed names.

    Only files whose writer (the pid in the name) no longer runs: a live
    writer's file is about to be renamed. A reused pid only delays the removal.
    """
    removed: list[str] = []
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.startswith(".") or _TMP_MARK not in entry:
            continue
        pid_text = entry.rpartition(_TMP_MARK)[2].partition("-")[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        _discard(os.path.join(directory, entry))
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def stamp_of(st: os.stat_result) -> Stamp:
    """The stamp of a version of a file, from ``os.stat``/``os.fstat``."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def path_stamp(path: str) -> Stamp | None:
    """The stamp of the file at ``path`` now; None if there is none (other OSErrors raise)."""
    try:
        return stamp_of(os.stat(path))
    except FileNotFoundError:
        return None


class FileWatch:
    """Which version of a file polled by path was handled, and which failed.

    Pure bookkeeping over stamps (``path_stamp``) plus the one stat in
    ``stamp()``; the caller reads and parses. The usual poll::

        stamp = watch.stamp()
        if watch.is_new(stamp):
            try: use(read())
            except Bad: watch.failed(stamp); log once
            else: watch.handled(stamp)

    Take the stamp *before* reading: if the file is replaced in between, the
    next poll sees a newer stamp and reads again, so no version is missed.
    ``failed`` also takes any other key (e.g. a message when not even the
    stamp could be had), so a failure that has no stamp is logged once too.
    Until something fails, ``bad`` is None, the stamp of "no file": a file
    that is missing is not new; callers that report a vanished file check
    for a None stamp themselves.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: Stamp | None = None          # the version last handled
        self.bad: Hashable | None = None        # the version (or failure) last reported

    def stamp(self) -> Stamp | None:
        return path_stamp(self.path)

    def is_new(self, stamp: Hashable | None) -> bool:
        """Neither the version last handled nor the one that last failed."""
        return stamp != self.seen and stamp != self.bad

    def handled(self, stamp: Stamp | None) -> None:
        self.seen, self.bad = stamp, None

    def failed(self, key: Hashable | None) -> bool:
        """Remember a failed version; True the first time (log it), False when repeated."""
        first = key != self.bad
        self.bad = key
        return first
