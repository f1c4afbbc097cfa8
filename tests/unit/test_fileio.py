"""agent/fileio.py: atomic replacement (crash safety, unique temporary names,
fsync) and FileWatch, the one (inode, size, mtime) change check."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent import fileio
from agent.fileio import FileWatch, atomic_write, path_stamp, remove_stale_temps

REPO = Path(__file__).resolve().parents[2]


def _temps(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n)


def test_a_failed_rename_leaves_the_old_content_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    atomic_write(str(target), b"old")

    def crash(src, dst):
        raise OSError(5, "simulated crash between write and rename")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write(str(target), b"new, longer content")
    assert target.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_a_writer_killed_before_the_rename_leaves_the_old_file_and_a_temp_that_is_cleaned(tmp_path):
    # A real crash: the process dies (os._exit, no cleanup) after the data
    # is written and fsynced, before the rename.
    target = tmp_path / "record.json"
    atomic_write(str(target), b"old")
    code = (
        "import os, sys\n"
        "from agent import fileio\n"
        "fileio.os.replace = lambda src, dst: os._exit(9)\n"
        "fileio.atomic_write(sys.argv[1], b'new')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(target)], cwd=REPO, timeout=60)
    assert done.returncode == 9
    assert target.read_bytes() == b"old"
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".record.json.tmp-")
    assert (tmp_path / left[0]).read_bytes() == b"new"          # written, never renamed
    assert remove_stale_temps(str(tmp_path)) == left             # its writer is gone
    assert _temps(tmp_path) == [] and target.read_bytes() == b"old"


def test_a_live_writers_temporary_file_is_not_removed(tmp_path):
    mine = tmp_path / f".x.json.tmp-{os.getpid()}-abcdef"
    mine.write_bytes(b"in flight")
    other = tmp_path / "x.json.tmp"          # not ours: no leading dot
    other.write_bytes(b"")
    assert remove_stale_temps(str(tmp_path)) == []
    assert mine.exists() and other.exists()


def test_two_writers_never_share_a_temporary_name(tmp_path, monkeypatch):
    target = str(tmp_path / "state.json")
    names: list[str] = []
    real_replace = os.replace
    lock = threading.Lock()

    def spy(src, dst):
        with lock:
            names.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    payloads = [bytes([65 + i]) * (1000 + i) for i in range(8)]

    def writer(payload: bytes) -> None:
        for _ in range(25):
            atomic_write(target, payload)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 200 and len(set(names)) == 200
    assert Path(target).read_bytes() in payloads                # one whole version
    assert _temps(tmp_path) == []


def test_a_leftover_with_the_next_temporary_name_is_neither_reused_nor_touched(tmp_path, monkeypatch):
    target = tmp_path / "conf.json"
    tokens = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda n: next(tokens))
    leftover = tmp_path / f".conf.json.tmp-{os.getpid()}-aaaaaaaaaaaa"
    leftover.write_bytes(b"someone else's")
    atomic_write(str(target), b"mine")
    assert target.read_bytes() == b"mine"
    assert leftover.read_bytes() == b"someone else's"          # O_EXCL: never opened


def test_the_file_and_then_its_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    atomic_write(str(tmp_path / "f"), b"x", 0o600)
    assert events == ["fsync file", "rename", "fsync dir"]
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o600


# FileWatch over a real file: each row changes the file (or not), says
# whether the watch must see a new version, and what reading it gives.
def _replace(path, data):
    atomic_write(str(path), data)


def _edit_in_place_same_size(path, data):
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _append(path, data):
    with open(path, "ab") as fh:
        fh.write(data)


WATCH_ROWS = [
    # (change, data, new?, outcome)
    ("nothing yet", None, False, None),            # no file: not new (callers check None)
    ("replace", b"good-1", True, "ok"),
    ("nothing", None, False, None),
    ("replace", b"good-1", True, "ok"),            # same bytes, new inode: a new version
    ("edit in place", b"bad-11", True, "bad"),     # same size, newer mtime
    ("nothing", None, False, None),                # a failed version is reported once
    ("append", b"!", True, "bad"),                 # size changed
    ("nothing", None, False, None),
    ("replace", b"good-2", True, "ok"),
    ("remove", None, False, None),                 # vanished: not new to the watch
    ("replace", b"good-3", True, "ok"),
]


def test_file_watch_sees_each_new_version_once(tmp_path):
    path = tmp_path / "watched"
    watch = FileWatch(str(path))
    for index, (change, data, new, outcome) in enumerate(WATCH_ROWS):
        if change == "replace":
            _replace(path, data)
        elif change == "edit in place":
            _edit_in_place_same_size(path, data)
        elif change == "append":
            _append(path, data)
        elif change == "remove":
            path.unlink()
        stamp = watch.stamp()
        assert stamp == path_stamp(str(path))
        assert watch.is_new(stamp) is new, f"row {index}: {change}"
        if outcome == "ok":
            watch.handled(stamp)
        elif outcome == "bad":
            assert watch.failed(stamp) is True, f"row {index}: first failure of a version"
            assert watch.failed(stamp) is False, f"row {index}: repeated"


def test_file_watch_failures_without_a_stamp_are_keyed_by_message():
    watch = FileWatch("/nonexistent")
    assert watch.failed("stat: permission denied") is True
    assert watch.failed("stat: permission denied") is False
    assert watch.failed("stat: I/O error") is True
    assert watch.is_new((1, 2, 3)) is True
    watch.handled((1, 2, 3))
    assert watch.is_new((1, 2, 3)) is False and watch.bad is None
