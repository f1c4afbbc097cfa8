"""Workload certificates for the pods on this node, kept fresh.

For each tracked identity one task fetches a certificate and renews it at
about half its lifetime. Keys (ECDSA P-256) are made here, a new one per
certificate, and never leave the process; the CSR carries only the URI.

When a renewal fails, the task retries with capped exponential backoff
while the current certificate stays in use until it expires: a CA outage
shorter than half a certificate lifetime is invisible to workloads.

Time and sleeping are injectable so tests can drive renewal without
waiting for real certificate lifetimes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import pki
from agent.identity.bundle import TrustBundle, TrustBundleError
from agent.identity.client import CaError
from agent.identity.spiffe import IdentityError, WorkloadIdentity

__all__ = ["CertificateError", "CertificateManager", "CertificateTimeout", "TrustBundle",
           "TrustBundleError", "WorkloadCertificate"]

log = logging.getLogger(__name__)

DEFAULT_TTL = 24 * 3600
RENEW_FRACTION = 0.5
RENEW_JITTER = 0.05          # renew at half-life x [0.95, 1.05]: spreads a node's renewals out
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
BACKOFF_JITTER = 0.2         # each retry delay x [0.8, 1.2], never above the cap
# However short a certificate the CA hands out, do not ask again sooner:
# a CA misconfigured to one-second certificates must not be hammered.
MIN_RENEW_DELAY = 1.0


class CertificateError(Exception):
    """No usable certificate (bad CA response, identity forgotten, ...)."""


class CertificateTimeout(CertificateError, TimeoutError):
    """``certificate()`` gave up waiting; the message holds the last failure."""


class CertificateSigner(Protocol):
    """What the manager needs from a CA client (``CaClient`` is one)."""

    async def create_certificate(self, csr_pem: str, ttl_seconds: int,
                                 impersonate: str | None) -> list[str]: ...


@dataclass(frozen=True)
class WorkloadCertificate:
    identity: WorkloadIdentity
    private_key_pem: str
    chain_pem: list[str]          # one certificate per entry: leaf, intermediates, root
    not_before: float             # Unix time
    not_after: float              # Unix time
    serial_number: int

    def cert_chain_pem_bytes(self) -> bytes:
        """What a TLS endpoint presents: the leaf and intermediates.

        The root is left out (peers verify with their own trust bundle, and
        TLS 1.3 allows omitting it); a single-entry chain is returned whole.
        """
        chain = self.chain_pem[:-1] if len(self.chain_pem) > 1 else self.chain_pem
        return "".join(chain).encode("ascii")

    def key_pem_bytes(self) -> bytes:
        return self.private_key_pem.encode("ascii")

    def root_pem_bytes(self) -> bytes:
        """The root the CA says it chains to (the trust bundle is the authority, not this)."""
        return self.chain_pem[-1].encode("ascii")

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after


class _Entry:
    def __init__(self, identity: WorkloadIdentity) -> None:
        self.identity = identity
        self.cert: WorkloadCertificate | None = None
        self.next_attempt: float | None = None   # when the task next asks the CA
        self.failures = 0
        self.last_error: str | None = None
        self.forgotten = False
        self.task: asyncio.Task | None = None
        self.changed = asyncio.Event()

    def notify(self) -> None:
        # Waiters hold the current event; wake them and give later waiters a fresh one.
        self.changed.set()
        self.changed = asyncio.Event()


class CertificateManager:
    def __init__(self, client: CertificateSigner, trust_domain: str, max_in_flight: int = 8,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, *,
                 ttl_seconds: int = DEFAULT_TTL,
                 rng: random.Random | None = None,
                 backoff_initial: float = BACKOFF_INITIAL, backoff_max: float = BACKOFF_MAX,
                 on_update: Callable[[WorkloadCertificate], None] | None = None,
                 key_factory: Callable[[], ec.EllipticCurvePrivateKey] = pki.generate_key) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.client = client
        self.trust_domain = trust_domain
        self.ttl_seconds = ttl_seconds
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_update = on_update
        self._key_factory = key_factory
        # Bounds concurrent CA requests: after a node agent restart every pod
        # on the node wants a certificate at once.
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._entries: dict[WorkloadIdentity, _Entry] = {}

    # -- public API ----------------------------------------------------------

    def track(self, identity: WorkloadIdentity) -> None:
        """Start keeping a certificate for ``identity`` (no-op if already tracked)."""
        self._track(identity)

    def forget(self, identity: WorkloadIdentity) -> None:
        """Stop renewing ``identity`` and drop its key; waiters get CertificateError."""
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        entry.forgotten = True
        if entry.task is not None:
            entry.task.cancel()
        entry.notify()
        log.info("forgot %s", identity.uri)

    async def certificate(self, identity: WorkloadIdentity,
                          timeout: float | None = None) -> WorkloadCertificate:
        """A currently valid certificate for ``identity``, tracking it if needed.

        Waits until one is held; with ``timeout`` (seconds) raises
        CertificateTimeout after that long, naming the last failure.
        """
        entry = self._track(identity)
        if timeout is None:
            return await self._wait_valid(entry)
        try:
            return await asyncio.wait_for(self._wait_valid(entry), timeout)
        except TimeoutError:
            raise CertificateTimeout(
                f"no certificate for {identity.uri} within {timeout:g} s "
                f"({entry.failures} failed attempts; last error: {entry.last_error or 'none yet'})"
            ) from None

    def held(self) -> list[dict]:
        """Status of every tracked identity (JSON-friendly, sorted by URI)."""
        now = self._clock()
        out = []
        for identity, entry in sorted(self._entries.items(), key=lambda kv: kv[0].uri):
            cert = entry.cert
            state = "pending" if cert is None else ("valid" if cert.valid_at(now) else "expired")
            out.append({
                "identity": identity.uri,
                "state": state,
                "serial": f"{cert.serial_number:x}" if cert else None,
                "not_before": cert.not_before if cert else None,
                "not_after": cert.not_after if cert else None,
                "next_attempt": entry.next_attempt,
                "failures": entry.failures,
                "last_error": entry.last_error,
            })
        return out

    async def close(self) -> None:
        """Forget everything and wait for the renewal tasks to finish."""
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for identity in list(self._entries):
            self.forget(identity)
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- internals -------------------------------------------------------------

    def _track(self, identity: WorkloadIdentity) -> _Entry:
        if identity.trust_domain != self.trust_domain:
            raise IdentityError(f"identity {identity.uri} is not in this node's trust domain "
                                f"{self.trust_domain!r}")
        entry = self._entries.get(identity)
        if entry is None:
            entry = _Entry(identity)
            self._entries[identity] = entry
            entry.task = asyncio.ensure_future(self._keep_fresh(entry))
            log.info("tracking %s", identity.uri)
        return entry

    async def _wait_valid(self, entry: _Entry) -> WorkloadCertificate:
        while True:
            if entry.forgotten:
                raise CertificateError(f"{entry.identity.uri} was forgotten while waiting for its certificate")
            cert = entry.cert
            if cert is not None and cert.valid_at(self._clock()):
                return cert
            await entry.changed.wait()

    async def _keep_fresh(self, entry: _Entry) -> None:
        uri = entry.identity.uri
        while True:
            try:
                cert = await self._fetch(entry.identity)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                entry.failures += 1
                entry.last_error = str(exc)
                delay = self._backoff(entry.failures)
                now = self._clock()
                entry.next_attempt = now + delay
                if entry.cert is not None and entry.cert.valid_at(now):
                    keeping = f"keeping the current certificate until {_iso(entry.cert.not_after)}"
                else:
                    keeping = "no valid certificate held"
                log.warning("certificate for %s failed (attempt %d): %s; retrying in %.1f s, %s", uri,
                            entry.failures, exc, delay, keeping,
                            # expected failures need no traceback; anything else is a bug
                            exc_info=not isinstance(exc, (CertificateError, CaError)))
                entry.notify()      # status readers see the failure; waiters re-check and sleep on
                await self._sleep(delay)
                continue

            received = self._clock()
            entry.cert = cert
            entry.failures = 0
            entry.last_error = None
            renew_at = self._renew_at(cert, received)
            entry.next_attempt = renew_at
            log.info("certificate for %s: serial %x, valid until %s, renewing at %s", uri,
                     cert.serial_number, _iso(cert.not_after), _iso(renew_at))
            entry.notify()
            if self._on_update is not None:
                try:
                    self._on_update(cert)
                except Exception:
                    log.exception("certificate update callback failed for %s", uri)
            await self._sleep(max(renew_at - self._clock(), MIN_RENEW_DELAY))

    async def _fetch(self, identity: WorkloadIdentity) -> WorkloadCertificate:
        key = self._key_factory()
        csr = pki.build_csr(key, identity.uri)
        async with self._in_flight:
            chain = await self.client.create_certificate(csr, self.ttl_seconds, identity.uri)
        return self._accept(identity, key, chain)

    def _accept(self, identity: WorkloadIdentity, key, chain: list[str]) -> WorkloadCertificate:
        """Check the CA's answer is a certificate for our key and identity, still valid."""
        try:
            certs = x509.load_pem_x509_certificates("".join(chain).encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise CertificateError(f"CA response for {identity.uri} is not a PEM chain: {exc}") from None
        if not certs:
            raise CertificateError(f"CA response for {identity.uri} holds no certificate")
        leaf = certs[0]
        if not pki.same_public_key(leaf.public_key(), key.public_key()):
            raise CertificateError(f"CA returned a certificate for another key than {identity.uri}'s CSR")
        if len(certs) > 1:
            try:
                leaf.verify_directly_issued_by(certs[1])
            except (ValueError, TypeError, InvalidSignature):
                raise CertificateError(f"CA response for {identity.uri}: the leaf is not signed by "
                                       f"the next certificate of the chain") from None
        sans = pki.uri_sans(leaf)
        if sans != [identity.uri]:
            raise CertificateError(f"CA returned a certificate for {sans}, not [{identity.uri!r}]")
        not_after = leaf.not_valid_after_utc.timestamp()
        if not_after <= self._clock():
            raise CertificateError(f"CA returned a certificate for {identity.uri} that expired "
                                   f"at {_iso(not_after)}")
        return WorkloadCertificate(
            identity=identity,
            private_key_pem=pki.private_key_pem(key).decode("ascii"),
            chain_pem=[pki.certificate_pem(c).decode("ascii") for c in certs],
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=not_after,
            serial_number=leaf.serial_number,
        )

    def _renew_at(self, cert: WorkloadCertificate, received: float) -> float:
        # The lifetime counts from when we got the certificate, not from
        # notBefore: CAs backdate notBefore for clock skew (ours by a minute),
        # which would make short-lived certificates look half-used on arrival.
        lifetime = max(cert.not_after - received, 0.0)
        fraction = RENEW_FRACTION * self._rng.uniform(1 - RENEW_JITTER, 1 + RENEW_JITTER)
        return received + lifetime * fraction

    def _backoff(self, failures: int) -> float:
        base = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 32))
        return min(self.backoff_max, base * self._rng.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
