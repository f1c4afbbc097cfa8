"""The CA's signing material, from a directory in Istio's ``cacerts`` layout.

    ca-cert.pem     the certificate that signs workload leaves (a root or an intermediate)
    ca-key.pem      its private key (unencrypted PEM, mode 0600)
    root-cert.pem   the trust bundle: the root(s) workloads trust
    cert-chain.pem  ca-cert.pem's chain up to the root (may include ca-cert.pem and the root)

An empty (or missing) directory gets a fresh self-signed root, written in
the same layout so that a restarted CA keeps signing with the same root.
A directory with only some of the files is refused rather than repaired:
replacing a root by accident would break every workload's trust at once.

Sources are pluggable (``SigningMaterialSource``): a Kubernetes Secret
(istio-system/cacerts) will be another implementation of ``load()``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from agent.fileio import atomic_write
from agent.identity import pki

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
_REQUIRED = (CA_CERT, CA_KEY, ROOT_CERT)
_ALL = _REQUIRED + (CERT_CHAIN,)

SELF_SIGNED_VALIDITY = dt.timedelta(days=3650)
_MAX_CHAIN_DEPTH = 8
# Warn well before the signing certificate expires: after it does, no
# workload can get a certificate and renewals fail everywhere at once.
_EXPIRY_WARNING = dt.timedelta(days=30)


class MaterialError(ValueError):
    """The signing material is missing, inconsistent or unusable."""


@dataclass(frozen=True)
class SigningMaterial:
    cert: x509.Certificate                   # signs leaves
    key: pki.SigningKey
    intermediates: tuple[x509.Certificate, ...]   # above ``cert``, below ``root``, nearest first
    root: x509.Certificate                   # the root ``cert``'s chain ends at
    roots: tuple[x509.Certificate, ...] = field(default=())   # the whole trust bundle

    def issuer_chain(self) -> list[x509.Certificate]:
        """What follows a leaf in a response: the signer (unless it is the root), intermediates, root."""
        chain = [] if self.cert == self.root else [self.cert]
        return chain + list(self.intermediates) + [self.root]

    def issuer_chain_pem(self) -> list[str]:
        return [pki.certificate_pem(c).decode("ascii") for c in self.issuer_chain()]

    def roots_pem(self) -> bytes:
        return b"".join(pki.certificate_pem(c) for c in (self.roots or (self.root,)))


class SigningMaterialSource(Protocol):
    def load(self) -> SigningMaterial: ...


def assemble(cert: x509.Certificate, key: pki.SigningKey, roots: list[x509.Certificate],
             chain: list[x509.Certificate], now: dt.datetime, where: str) -> SigningMaterial:
    """Check the pieces fit together and order the chain: cert -> intermediates -> a root."""
    if not pki.same_public_key(cert.public_key(), key.public_key()):
        raise MaterialError(f"{where}: {CA_KEY} is not the key of {CA_CERT}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise MaterialError(f"{where}: {CA_CERT} ({cert.subject.rfc4514_string()}) is not a CA certificate")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise MaterialError(f"{where}: {CA_CERT} lacks the keyCertSign key usage")
    except x509.ExtensionNotFound:
        pass
    if now >= cert.not_valid_after_utc:
        raise MaterialError(f"{where}: {CA_CERT} expired at {cert.not_valid_after_utc.isoformat()}")
    if now < cert.not_valid_before_utc:
        raise MaterialError(f"{where}: {CA_CERT} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if cert.not_valid_after_utc - now < _EXPIRY_WARNING:
        log.warning("%s: %s expires at %s; rotate the CA soon", where, CA_CERT,
                    cert.not_valid_after_utc.isoformat())

    # Walk upwards from the signer, through cert-chain.pem, to one of the roots.
    candidates = [c for c in chain if c != cert and c not in roots]
    intermediates: list[x509.Certificate] = []
    current = cert
    for _ in range(_MAX_CHAIN_DEPTH):
        root = _issuer_in(current, roots)
        if root is not None:
            return SigningMaterial(cert, key, tuple(intermediates), root, tuple(roots))
        parent = _issuer_in(current, candidates)
        if parent is None:
            raise MaterialError(
                f"{where}: cannot chain {current.subject.rfc4514_string()} to any certificate in "
                f"{ROOT_CERT}: its issuer {current.issuer.rfc4514_string()} is in neither "
                f"{ROOT_CERT} nor {CERT_CHAIN}")
        intermediates.append(parent)
        candidates.remove(parent)
        current = parent
    raise MaterialError(f"{where}: certificate chain is longer than {_MAX_CHAIN_DEPTH}")


def _issuer_in(cert: x509.Certificate, pool: list[x509.Certificate]) -> x509.Certificate | None:
    for candidate in pool:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


class DirectorySigningSource:
    """``cacerts`` directory; creates a self-signed root when the directory holds none of it."""

    def __init__(self, path: str, organisation: str = "cluster.local",
                 clock: Callable[[], dt.datetime] = pki.utcnow) -> None:
        self.path = path
        self.organisation = organisation
        self.clock = clock

    def load(self) -> SigningMaterial:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        # Two CAs started on one empty directory must not create two roots.
        with open(os.path.join(self.path, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            present = [name for name in _ALL if os.path.exists(os.path.join(self.path, name))]
            if not present:
                self._create()
            else:
                missing = [name for name in _REQUIRED if name not in present]
                if missing:
                    raise MaterialError(
                        f"CA directory {self.path} has {', '.join(present)} but not "
                        f"{', '.join(missing)}: refusing to guess; add the missing files, or empty "
                        f"the directory to have a new self-signed root created")
            return self._read()

    def _read(self) -> SigningMaterial:
        def read(name: str) -> bytes:
            try:
                with open(os.path.join(self.path, name), "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise MaterialError(f"read {os.path.join(self.path, name)}: {exc.strerror}") from None

        key_path = os.path.join(self.path, CA_KEY)
        if os.stat(key_path).st_mode & 0o077:
            log.warning("%s is readable by group or others; it should be mode 0600", key_path)
        try:
            cert = pki.load_certificates(read(CA_CERT), CA_CERT)[0]
            key = pki.load_signing_key(read(CA_KEY), CA_KEY)
            roots = pki.load_certificates(read(ROOT_CERT), ROOT_CERT)
            chain = (pki.load_certificates(read(CERT_CHAIN), CERT_CHAIN)
                     if os.path.exists(os.path.join(self.path, CERT_CHAIN)) else [])
        except pki.PkiError as exc:
            raise MaterialError(f"CA directory {self.path}: {exc}") from None
        return assemble(cert, key, roots, chain, self.clock(), f"CA directory {self.path}")

    def _create(self) -> None:
        cert, key = pki.create_root(self.organisation, self.clock(), SELF_SIGNED_VALIDITY)
        cert_pem = pki.certificate_pem(cert)
        # The key goes first and the root last: a crash in between leaves a
        # directory that load() refuses (partial), never one with a root but
        # no key for it.
        atomic_write(os.path.join(self.path, CA_KEY), pki.private_key_pem(key), 0o600)
        atomic_write(os.path.join(self.path, CA_CERT), cert_pem, 0o644)
        atomic_write(os.path.join(self.path, CERT_CHAIN), cert_pem, 0o644)
        atomic_write(os.path.join(self.path, ROOT_CERT), cert_pem, 0o644)
        log.info("created a self-signed root CA in %s (%s, valid until %s)", self.path,
                 cert.subject.rfc4514_string(), cert.not_valid_after_utc.isoformat())


def write_public_file(path: str, data: bytes) -> None:
    """Atomically write a public file (e.g. the root bundle for node agents)."""
    atomic_write(path, data, 0o644)
