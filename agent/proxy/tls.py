"""TLS for HBONE: mutual TLS 1.3, ALPN h2, SPIFFE identities in URI SANs.

Python's ``ssl`` module only loads certificate chains from files, so the
PEM is written to a private (0700) temporary directory, loaded, and removed
at once: keys exist on disk for the duration of one call, in /run when the
agent's run directory is there (tmpfs).

HBONE uses the TLS 1.3 AES-GCM suites only. Python's ``ssl`` module has no
call for TLS 1.3 cipher suites (``set_ciphers`` covers TLS 1.2 and older),
so ``restrict_ciphersuites`` calls OpenSSL's ``SSL_CTX_set_ciphersuites`` on
the context through ctypes, using the very libssl ``_ssl`` is linked with.
It first proves it holds the right ``SSL_CTX`` (its options must equal
``ctx.options``) and refuses to build a context otherwise: no HBONE is
better than HBONE with suites we did not choose.
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import ssl
import tempfile

from cryptography import x509

ALPN = ["h2"]
AES_GCM_SUITES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"

_libssl = ctypes.CDLL(_ssl.__file__)       # dlsym searches _ssl's own libssl
_libssl.SSL_CTX_get_options.restype = ctypes.c_uint64
_libssl.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
_libssl.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
_libssl.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


def restrict_ciphersuites(ctx: ssl.SSLContext, suites: str = AES_GCM_SUITES) -> None:
    """Limit the TLS 1.3 cipher suites of ``ctx`` (see the module docstring)."""
    # CPython's PySSLContext starts with the SSL_CTX pointer, right after
    # the object header.
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or _libssl.SSL_CTX_get_options(ptr) != ctx.options:
        raise ssl.SSLError("cannot reach this Python's SSL_CTX to restrict TLS 1.3 cipher suites")
    if _libssl.SSL_CTX_set_ciphersuites(ptr, suites.encode()) != 1:
        raise ssl.SSLError(f"OpenSSL refused the TLS 1.3 cipher suites {suites}")


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate does not carry the identity we require."""

    def __str__(self) -> str:
        # SSLError's own str() is the repr of its args tuple: "('message',)".
        return str(self.args[0]) if self.args else "peer identity refused"


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes, tmp_root: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="hbone-tls-", dir=tmp_root) as tmp:
        os.chmod(tmp, 0o700)
        cert_path = os.path.join(tmp, "chain.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        with open(cert_path, "wb") as fh:
            fh.write(chain_pem)
        ctx.load_cert_chain(cert_path, key_path)


def make_context(server_side: bool, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes,
                 tmp_root: str | None = None) -> ssl.SSLContext:
    """An mTLS 1.3 context presenting ``chain_pem`` and trusting ``bundle_pem``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False          # identities are SPIFFE URIs, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    ctx.set_alpn_protocols(ALPN)
    restrict_ciphersuites(ctx)
    _load_chain(ctx, chain_pem, key_pem, tmp_root)
    return ctx


def uri_sans(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def peer_identities(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[str]:
    der = ssl_object.getpeercert(binary_form=True)
    return uri_sans(der) if der else []


def _shown(sans: list[str]) -> str:
    """The SANs for a message: a peer chooses them, so at most three, each cut short."""
    if not sans:
        return "(none)"
    shown = ", ".join(san[:200] for san in sans[:3])
    return shown + (f" and {len(sans) - 3} more" if len(sans) > 3 else "")


def _single_identity(ssl_object, side: str) -> str:
    """The peer's one URI SAN. An X.509 SVID carries exactly one (SPIFFE
    X509-SVID 4.1); a certificate naming several would let its holder be
    taken for whichever identity a check happens to look for."""
    sans = peer_identities(ssl_object)
    if len(sans) != 1:
        raise PeerIdentityError(f"{side} certificate has {len(sans)} URI SANs ({_shown(sans)}); "
                                "a SPIFFE certificate carries exactly one")
    return sans[0]


def check_server_identity(ssl_object, expected: str) -> None:
    """Client side: the server must be the workload we meant to reach."""
    if ssl_object.selected_alpn_protocol() != "h2":
        raise PeerIdentityError(f"server did not negotiate ALPN h2 (got {ssl_object.selected_alpn_protocol()})")
    san = _single_identity(ssl_object, "server")
    if san != expected:
        raise PeerIdentityError(f"server identity {[san[:200]]} is not the expected {expected}")


def check_client_identity(ssl_object, trust_domain: str) -> str:
    """Server side: the client must be a SPIFFE workload of our trust domain."""
    if ssl_object.selected_alpn_protocol() != "h2":
        raise PeerIdentityError(f"client did not negotiate ALPN h2 (got {ssl_object.selected_alpn_protocol()})")
    san = _single_identity(ssl_object, "client")
    if not san.startswith(f"spiffe://{trust_domain}/"):
        raise PeerIdentityError(f"client certificate has no SPIFFE identity in trust domain {trust_domain}"
                                f" (SANs: {_shown([san])})")
    return san


class TlsContexts:
    """SSL contexts per workload identity, rebuilt when its certificate or the
    trust bundle changes.

    ``certificate(identity)`` is awaited for the identity's current material
    ``(chain_pem, key_pem, version)``; it waits while no certificate is held
    (CA unreachable: the pod's connections fail closed meanwhile).
    ``bundle()`` returns ``(version, pem)``.
    """

    def __init__(self, certificate, bundle, tmp_root: str | None = None) -> None:
        self._certificate = certificate
        self._bundle = bundle
        self._tmp_root = tmp_root
        self._cache: dict[tuple[str, bool], tuple[tuple, ssl.SSLContext]] = {}

    async def context(self, identity: str, server_side: bool) -> ssl.SSLContext:
        chain_pem, key_pem, cert_version = await self._certificate(identity)
        bundle_version, bundle_pem = self._bundle()
        stamp = (cert_version, bundle_version)
        cached = self._cache.get((identity, server_side))
        if cached and cached[0] == stamp:
            return cached[1]
        ctx = make_context(server_side, chain_pem, key_pem, bundle_pem, self._tmp_root)
        self._cache[(identity, server_side)] = (stamp, ctx)
        return ctx

    def forget(self, identity: str) -> None:
        for server_side in (True, False):
            self._cache.pop((identity, server_side), None)
