"""The trust bundle: the root certificates workloads' peers are verified against.

Read from a PEM file (the CA's ``root-cert.pem`` or a copy of it) and
re-read when the file changes, so a root rotation reaches the node agent
without a restart. A version that cannot be used (unreadable, no
certificate) is logged and the last good bundle stays in force: dropping
the trust bundle would break every connection at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from cryptography import x509

from agent.fileio import FileWatch
from agent.identity import pki

log = logging.getLogger(__name__)


class TrustBundleError(ValueError):
    """The trust bundle file cannot be used (the message says why)."""


class TrustBundle:
    def __init__(self, path: str, poll_interval: float = 1.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.path = path
        self.poll_interval = poll_interval
        self.version = 0                  # bumped on every change of content; 0 = nothing loaded
        self._sleep = sleep
        self._pem = b""
        self._certificates: list[x509.Certificate] = []
        self._watch = FileWatch(path)
        self._callbacks: list[Callable[[bytes], object]] = []

    def load(self) -> bool:
        """Read the file now; True if the roots changed. TrustBundleError if it is unusable."""
        # Stamp before reading: if the file is replaced in between, the next
        # poll sees a newer stamp and reads again, so no change is missed.
        stamp = self._watch.stamp()
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise TrustBundleError(f"read trust bundle {self.path}: {exc.strerror or exc}") from None
        try:
            certs = pki.load_certificates(data, f"trust bundle {self.path}")
        except pki.PkiError as exc:
            raise TrustBundleError(str(exc)) from None
        self._watch.handled(stamp)
        # Normalise (one PEM block per root, no comments) so that rewriting
        # the same roots differently is not a change.
        pem = b"".join(pki.certificate_pem(c) for c in certs)
        if pem == self._pem:
            return False
        self._pem, self._certificates = pem, certs
        self.version += 1
        log.info("trust bundle %s version %d: %d root(s)", self.path, self.version, len(certs))
        for callback in list(self._callbacks):
            try:
                callback(pem)
            except Exception:
                log.exception("trust bundle change callback failed")
        return True

    def pem_bytes(self) -> bytes:
        """The roots as concatenated PEM; TrustBundleError if nothing has been loaded yet."""
        if not self.version:
            raise TrustBundleError(f"trust bundle {self.path} has not been loaded")
        return self._pem

    def certificates(self) -> list[x509.Certificate]:
        return list(self._certificates)

    def on_change(self, callback: Callable[[bytes], object]) -> None:
        """Call ``callback(pem)`` after every change of the roots (not for the current ones)."""
        self._callbacks.append(callback)

    async def watch(self) -> None:
        """Poll the file forever; reload when its inode, size or mtime changes."""
        while True:
            stamp = self._watch.stamp()
            if stamp is not None and self._watch.is_new(stamp):
                try:
                    self.load()
                except TrustBundleError as exc:
                    self._watch.failed(stamp)   # log a broken version once, not every poll
                    log.error("keeping trust bundle version %d: %s", self.version, exc)
            await self._sleep(self.poll_interval)
