"""A test-only mini CA issuing Istio-style SPIFFE workload certificates.

Independent of the product: it shares no code with ``agent``.  Every file
is written below the directory given to :class:`TestPKI`; the caller owns
(and removes) that directory.

    pki = TestPKI(tmpdir)                      # writes tmpdir/root.pem
    c = pki.issue("default", "sleep")          # CertFiles
    c.cert_path   leaf only (PEM)
    c.chain_path  leaf followed by its issuing root (PEM)
    c.key_path    PKCS#8 PEM private key (unencrypted)
    c.root_path   the root that issued it (root.pem, or other_root.pem)
    c.uri         "spiffe://cluster.local/ns/default/sa/sleep"

    TestPKI.with_ca(tmpdir, CERT, KEY)         # sign with an existing CA (a lab's)
    pki.issue("ns", "sa", uris=[A, B])         # a leaf with exactly these URI SANs

Leaves are ECDSA P-256 with an empty subject, a critical SAN holding only
the URI, EKU serverAuth+clientAuth, like istiod's workload certificates.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertFiles", "TestPKI", "spiffe_uri"]


def spiffe_uri(ns: str, sa: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"


@dataclass(frozen=True)
class CertFiles:
    cert_path: str
    key_path: str
    chain_path: str
    root_path: str
    uri: str


class _CA:
    @classmethod
    def existing(cls, cert_pem: bytes, key_pem: bytes, path: Path) -> "_CA":
        """A CA made elsewhere (certificate and key in PEM), its certificate copied to ``path``."""
        ca = cls.__new__(cls)
        ca.cert = x509.load_pem_x509_certificate(cert_pem)
        ca.key = serialization.load_pem_private_key(key_pem, password=None)
        ca.path = path
        ca.pem = ca.cert.public_bytes(serialization.Encoding.PEM)
        path.write_bytes(ca.pem)
        return ca

    def __init__(self, name: str, path: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test root")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = path
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        path.write_bytes(self.pem)


class TestPKI:
    """A root CA in ``tmpdir`` (``root.pem``) that issues SPIFFE leaves.

    ``other_root=True`` issues from a second, unrelated root
    (``other_root.pem``, made on first use) that nobody trusts by default.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, tmpdir: str | os.PathLike, trust_domain: str = "cluster.local",
                 _root: tuple[bytes, bytes] | None = None) -> None:
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trust_domain = trust_domain
        self._root = (_CA.existing(*_root, self.dir / "root.pem") if _root
                      else _CA(trust_domain, self.dir / "root.pem"))
        self._other: _CA | None = None
        self._n = 0

    @classmethod
    def with_ca(cls, tmpdir: str | os.PathLike, cert_path: str | os.PathLike, key_path: str | os.PathLike,
                trust_domain: str = "cluster.local") -> "TestPKI":
        """Issue from an existing CA (e.g. a lab CA's ca-cert.pem and ca-key.pem)."""
        return cls(tmpdir, trust_domain, _root=(Path(cert_path).read_bytes(), Path(key_path).read_bytes()))

    @property
    def root_path(self) -> str:
        return str(self._root.path)

    @property
    def other_root_path(self) -> str:
        return str(self._other_ca().path)

    def _other_ca(self) -> _CA:
        if self._other is None:
            self._other = _CA("other." + self.trust_domain, self.dir / "other_root.pem")
        return self._other

    def issue(self, ns: str, sa: str, ttl: int = 3600, *, expired: bool = False,
              other_root: bool = False, trust_domain: str | None = None,
              uris: Sequence[str] | None = None) -> CertFiles:
        """``uris``: the URI SANs instead of the one SPIFFE id (CertFiles.uri is the first)."""
        ca = self._other_ca() if other_root else self._root
        uri = spiffe_uri(ns, sa, trust_domain or self.trust_domain)
        names = list(uris) if uris is not None else [uri]
        uri = names[0] if names else uri
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.timezone.utc)
        if expired:
            not_before, not_after = now - _dt.timedelta(seconds=2 * ttl + 120), now - _dt.timedelta(seconds=60)
        else:
            not_before, not_after = now - _dt.timedelta(minutes=5), now + _dt.timedelta(seconds=ttl)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in names]),
                           critical=True)  # empty subject => SAN must be critical (RFC 5280)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                           critical=False)
            .sign(ca.key, hashes.SHA256())
        )
        self._n += 1
        stem = self.dir / f"{self._n:03d}-{ns}-{sa}"
        leaf = cert.public_bytes(serialization.Encoding.PEM)
        cert_path, chain_path, key_path = (Path(f"{stem}.{s}") for s in ("crt.pem", "chain.pem", "key.pem"))
        cert_path.write_bytes(leaf)
        chain_path.write_bytes(leaf + ca.pem)
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        os.chmod(key_path, 0o600)
        return CertFiles(str(cert_path), str(key_path), str(chain_path), str(ca.path), uri)
