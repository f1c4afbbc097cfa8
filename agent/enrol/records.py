"""What the agent knows about the pods on its node, kept across restarts.

One JSON file per pod under ``<run-dir>/pods/``. A record is written when the
CNI plugin reports a pod (enrolled or not: a label may enrol it later) and
removed on CNI DEL. After a restart the agent re-adopts the pods whose
records say they were captured.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass

from agent.fileio import atomic_write, remove_stale_temps

log = logging.getLogger(__name__)


@dataclass
class PodRecord:
    namespace: str
    name: str
    uid: str
    container_id: str
    netns: str
    ips: list[str]
    gateways: list[str]
    enrolled: bool = False
    reason: str = ""
    netns_cookie: int = 0
    service_account: str = "default"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class RecordStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Temporary files of writers that died between write and rename
        # (the records themselves are intact: the rename never happened).
        for name in remove_stale_temps(directory):
            log.info("removed %s, left by an interrupted record write", name)

    def _path(self, rec: PodRecord) -> str:
        return os.path.join(self.directory, _SAFE.sub("_", f"{rec.namespace}__{rec.name}") + ".json")

    def save(self, rec: PodRecord) -> None:
        """Replace the pod's record atomically and durably: these records decide
        which pods are re-adopted after a crash, so a crash (or power loss)
        mid-save leaves the previous record, never a torn or empty one."""
        atomic_write(self._path(rec), json.dumps(asdict(rec)).encode(), 0o644)

    def remove(self, rec: PodRecord) -> None:
        try:
            os.unlink(self._path(rec))
        except FileNotFoundError:
            pass

    def load_all(self) -> list[PodRecord]:
        records = []
        for entry in sorted(os.listdir(self.directory)):
            if not entry.endswith(".json"):
                continue
            path = os.path.join(self.directory, entry)
            try:
                with open(path) as fh:
                    records.append(PodRecord(**json.load(fh)))
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable pod record %s: %s", path, exc)
        return records
