"""X.509 building blocks shared by the CA and the certificate manager.

Pure (no files, no network): keys, CSRs, the self-signed root, the CA's
serving certificate and workload leaves. Time is always passed in, so
callers (and tests) decide what "now" is.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Certificates carry notBefore a little in the past so that a peer whose
# clock runs slightly behind the CA's does not reject a fresh certificate.
BACKDATE = dt.timedelta(minutes=1)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PkiError(ValueError):
    """Certificate material is unusable (the message says which and why)."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: what Istio uses for workloads and self-signed roots."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; at least one, else PkiError naming ``what``."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise PkiError(f"{what}: no certificate found (expected PEM 'BEGIN CERTIFICATE' blocks)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"{what}: not a PEM certificate bundle ({exc})") from None
    if not certs:
        raise PkiError(f"{what}: no certificate found")
    return certs


def load_signing_key(data: bytes, what: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{what}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PkiError(f"{what}: {type(key).__name__} keys cannot sign here (ECDSA or RSA only)")
    return key


def signature_hash(key: SigningKey) -> hashes.SHA256:
    # SHA-256 for everything: every TLS stack verifies it, and the keys we
    # accept (P-256, RSA >= 2048) offer no more than 128-bit security anyway.
    return hashes.SHA256()


def same_public_key(a, b) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def create_root(org: str, now: dt.datetime, validity: dt.timedelta = dt.timedelta(days=3650)
                ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed root CA: ECDSA P-256, CA:TRUE, keyCertSign + cRLSign."""
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        # An issuer here is always our own signing material, whose key is a
        # SigningKey (load_signing_key; material.assemble checks cert and key match).
        key = cast("ec.EllipticCurvePublicKey | rsa.RSAPublicKey", issuer.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key)


def _end_entity(public_key, issuer: x509.Certificate, subject: x509.Name,
                not_before: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
    # A certificate must not outlive its issuer: chain validation would fail
    # at the issuer's expiry anyway, so say so in the certificate itself.
    not_after = min(not_after, issuer.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_authority_key_id(issuer), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def sign_workload(public_key, uri: str, issuer: x509.Certificate, issuer_key: SigningKey,
                  now: dt.datetime, ttl: dt.timedelta) -> x509.Certificate:
    """A workload leaf like istiod's: empty subject, one critical URI SAN.

    The subject is empty because the identity is the SPIFFE URI and nothing
    else; RFC 5280 then requires the SAN extension to be critical.
    """
    return (
        _end_entity(public_key, issuer, x509.Name([]), now - BACKDATE, now + ttl)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=True)
        .sign(issuer_key, signature_hash(issuer_key))
    )


def serving_names(names: list[str]) -> list[x509.GeneralName]:
    """``["localhost", "127.0.0.1"]`` -> DNS and IP SANs (an address is an IP SAN)."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not name or any(c.isspace() for c in name):
                raise PkiError(f"serving name {name!r} is neither an IP address nor a DNS name") from None
            out.append(x509.DNSName(name))
    if not out:
        raise PkiError("the CA's serving certificate needs at least one DNS name or IP address")
    return out


def sign_serving(public_key, names: list[str], issuer: x509.Certificate, issuer_key: SigningKey,
                 now: dt.datetime, ttl: dt.timedelta) -> x509.Certificate:
    """The CA's own TLS server certificate, for the given DNS names and addresses."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    return (
        _end_entity(public_key, issuer, subject, now - BACKDATE, now + ttl)
        .add_extension(x509.SubjectAlternativeName(serving_names(names)), critical=False)
        .sign(issuer_key, signature_hash(issuer_key))
    )


def build_csr(key: ec.EllipticCurvePrivateKey, uri: str) -> str:
    """A PEM CSR whose only content is the URI SAN (the subject stays empty, like ztunnel's)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)
