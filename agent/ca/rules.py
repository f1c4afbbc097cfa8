"""The CA's decisions, as pure functions: who may have which identity, is a
CSR acceptable, how long a certificate lives.

No gRPC and no I/O here: refusals are exceptions the server maps to status codes
(``AuthorisationError`` -> PERMISSION_DENIED, ``CsrError`` and ``TtlError``
-> INVALID_ARGUMENT), so the rules can be tested as tables.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.ca.authn import Caller, ServiceAccount
from agent.identity.proto import IMPERSONATED_IDENTITY
from agent.identity.spiffe import IdentityError, WorkloadIdentity, identity_of_pod, parse_spiffe_uri
from agent.state.model import ClusterState

# A CSR is a few hundred bytes; anything near this size is not a CSR.
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
# Verifying a huge RSA signature is cheap for the caller and expensive for us.
MAX_RSA_BITS = 8192

# Pods that have finished can never run a workload again, so they do not
# entitle their node to a certificate.
_FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


class AuthorisationError(Exception):
    """The caller may not have a certificate for this identity."""


class CsrError(ValueError):
    """The certificate signing request is unacceptable."""


class TtlError(ValueError):
    """The requested validity is unacceptable."""


def authorise(caller: Caller, impersonated: str | None, state: ClusterState, trust_domain: str,
              node_agent: ServiceAccount | None = None) -> WorkloadIdentity:
    """The identity ``caller`` may have signed, or AuthorisationError.

    Two kinds of caller:

    * A node agent: ``caller.service_account`` is ``node_agent`` (TokenReview),
      or None (the lab's token file, which lists only node agents). It holds
      the keys of every pod on its node, so it may speak for exactly the
      service accounts of pods scheduled there, and no others: a compromised
      node must not be able to mint identities of other nodes' pods. It must
      name the identity (``ImpersonatedIdentity``).
    * Any other service account: it may never impersonate. Without
      ``ImpersonatedIdentity`` (or naming its own SPIFFE ID) it gets its own
      identity, and only while a pod running as that account is on the node
      its token is bound to: a token copied off a deleted or finished pod
      mints nothing. Naming any other identity is refused outright, even one
      that runs on the same node.
    """
    account = caller.service_account
    if account is None or account == node_agent:
        return _authorise_node_agent(caller.node, impersonated, state, trust_domain)
    try:
        own = account.identity(trust_domain)
    except IdentityError as exc:    # unreachable with a valid trust domain; refuse, do not crash
        raise AuthorisationError(f"service account {account}: {exc}") from None
    if impersonated and impersonated != own.uri:
        agent = f" ({node_agent})" if node_agent is not None else ""
        raise AuthorisationError(
            f"service account {account} is not the node agent's service account{agent}, so it may "
            f"not impersonate: it asked for {impersonated!r} in {IMPERSONATED_IDENTITY!r}; it may "
            f"request only its own identity {own.uri}")
    if not _runs_on(caller.node, own, state, trust_domain):
        raise AuthorisationError(
            f"node {caller.node!r} runs no pod with service account {own.service_account!r} in "
            f"namespace {own.namespace!r}, so service account {account} calling from it may not "
            f"have identity {own.uri}")
    return own


def _authorise_node_agent(node: str, impersonated: str | None, state: ClusterState,
                          trust_domain: str) -> WorkloadIdentity:
    if not impersonated:
        raise AuthorisationError(
            f"node agent for {node!r} did not name the identity it requests "
            f"(gRPC request metadata {IMPERSONATED_IDENTITY!r}); node agents may only "
            f"request certificates on behalf of pods on their node")
    try:
        identity = parse_spiffe_uri(impersonated)
    except IdentityError as exc:
        raise AuthorisationError(f"{IMPERSONATED_IDENTITY} is not an Istio SPIFFE ID: {exc}") from None
    if identity.trust_domain != trust_domain:
        raise AuthorisationError(
            f"identity {identity.uri} is in trust domain {identity.trust_domain!r}; "
            f"this CA signs only for {trust_domain!r}")
    if _runs_on(node, identity, state, trust_domain):
        return identity
    raise AuthorisationError(
        f"node {node!r} runs no pod with service account {identity.service_account!r} in "
        f"namespace {identity.namespace!r}, so its agent may not have identity {identity.uri}")


def _runs_on(node: str, identity: WorkloadIdentity, state: ClusterState, trust_domain: str) -> bool:
    """Whether a pod that has not finished runs as ``identity`` on ``node``."""
    for pod in state.pods_on_node(node):
        if (pod.get("status") or {}).get("phase") in _FINISHED_PHASES:
            continue
        try:
            if identity_of_pod(pod, trust_domain) == identity:
                return True
        except IdentityError:
            continue    # a pod with an impossible service account name runs as nobody
    return False


def validate_csr(pem: str | bytes, expected: WorkloadIdentity) -> x509.CertificateSigningRequest:
    """The parsed CSR if it is well formed, self-signed and asks for exactly ``expected``."""
    data = pem.encode("utf-8", "replace") if isinstance(pem, str) else pem
    if not data.strip():
        raise CsrError("the request has no CSR")
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is {len(data)} bytes (at most {MAX_CSR_BYTES})")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CsrError(f"CSR is not a PEM certificate request: {exc}") from None
    try:
        signed = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise CsrError(f"CSR signature cannot be checked: {exc}") from None
    if not signed:
        raise CsrError("CSR signature does not verify with its own public key")
    _check_key(csr)
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrError(f"CSR has no subjectAltName; expected exactly the URI {expected.uri}") from None
    except ValueError as exc:   # duplicate or malformed extensions
        raise CsrError(f"CSR extensions are malformed: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    others = [name for name in san if not isinstance(name, x509.UniformResourceIdentifier)]
    if uris != [expected.uri] or others:
        asked = uris + [f"{type(n).__name__}:{n.value}" for n in others]
        raise CsrError(f"CSR asks for subjectAltName {asked}; expected exactly [{expected.uri!r}]")
    return csr


def _check_key(csr: x509.CertificateSigningRequest) -> None:
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise CsrError(f"CSR public key is not supported: {exc}") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CsrError(f"CSR key is ECDSA on {key.curve.name}; only P-256 (secp256r1) is accepted")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise CsrError(f"CSR key is RSA-{key.key_size}; RSA keys must have "
                           f"{MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
        return
    raise CsrError(f"CSR key is {type(key).__name__}; only ECDSA P-256 and RSA are accepted")


def clamp_ttl(requested: int, default: int, maximum: int) -> int:
    """Seconds a certificate lives: ``requested`` (0 = ``default``), never above ``maximum``.

    A request for more than the maximum is shortened rather than refused:
    the client renews at half-life of whatever it got, so a shorter
    certificate costs it nothing.
    """
    if maximum <= 0:
        raise TtlError(f"maximum TTL must be positive, not {maximum}")
    if requested < 0:
        raise TtlError(f"validity_duration must not be negative (got {requested})")
    if requested == 0:
        requested = default
    return min(requested, maximum)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Go-style durations ("48h", "1h30m", "90s", "2d") or plain seconds -> whole seconds > 0."""
    value = str(text).strip()
    if value.isdigit():
        seconds = float(value)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(value):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if not value or pos != len(value):
            raise ValueError(f"invalid duration {text!r}: expected e.g. 48h, 30m, 1h30m or seconds")
    if int(seconds) < 1:
        raise ValueError(f"duration {text!r} is shorter than one second")
    return int(seconds)
