"""Test-only: the lab's cluster, served by the stand-in Kubernetes API server.

The lab is the kubelet and container runtime; it writes what a real cluster
would hold (Pods with their status, Namespaces, Services, ...) to its state
file. ``KubeMirror`` plays the part of the API server's writers: it copies
every change of that file into a ``lab.kubeapi.server.KubeApiServer``, so
agents run with ``--state kube:KUBECONFIG`` see the same cluster through
list/watch. Changes made directly in the API (a ``kubectl label``, the
agent's annotation patches) are kept: only objects the lab changed are
written, and annotations set through the API survive a lab update.
"""

from __future__ import annotations

import json
import threading

from lab.kubeapi.server import KubeApiServer


def _key(obj: dict) -> tuple[str, str, str, str]:
    meta = obj.get("metadata") or {}
    return (obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace", "") if obj.get("kind") != "Namespace" else "",
            meta.get("name", ""))


def _fingerprint(obj: dict) -> str:
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in ("resourceVersion", "generation")}
    return json.dumps(dict(obj, metadata=meta), sort_keys=True)


class KubeMirror:
    def __init__(self, state_path: str, api: KubeApiServer, interval: float = 0.05) -> None:
        self.state_path = state_path
        self.api = api
        self.interval = interval
        self._seen: dict[tuple, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kube-mirror", daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> KubeMirror:
        self.sync()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception as exc:        # keep mirroring; the test reads errors
                self.errors.append(repr(exc))

    def sync(self) -> None:
        try:
            with open(self.state_path) as fh:
                doc = json.load(fh)
        except (OSError, ValueError):
            return        # not written yet, or being replaced
        items = [o for o in doc.get("items", []) if isinstance(o, dict)]
        current = {}
        for obj in items:
            try:
                self.api._resource_for(obj)
            except KeyError:
                continue          # a kind the stand-in does not serve
            current[_key(obj)] = obj
        for key, obj in current.items():
            fp = _fingerprint(obj)
            if self._seen.get(key) == fp:
                continue
            _, kind, ns, name = key
            live = self.api.get(kind, ns, name)
            if live is None:
                self.api.create(obj)
            else:
                merged = json.loads(json.dumps(obj))
                annotations = dict((live.get("metadata") or {}).get("annotations") or {})
                annotations.update((obj.get("metadata") or {}).get("annotations") or {})
                merged["metadata"]["annotations"] = annotations
                self.api.update(merged)
            self._seen[key] = fp
        for key in list(self._seen):
            if key not in current:
                _, kind, ns, name = key
                if self.api.get(kind, ns, name) is not None:
                    self.api.delete(kind, ns, name)
                del self._seen[key]
