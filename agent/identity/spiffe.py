"""Workload identities as SPIFFE IDs, Istio style: ``spiffe://<td>/ns/<ns>/sa/<sa>``.

Pure. Parsing is deliberately strict: the CA authorises certificates on the
strength of these values, so anything that is not exactly Istio's shape
(extra path segments, query, port, upper case, percent-encoding, ...) is
refused instead of being normalised into something that might match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"

# SPIFFE ID spec: trust domain is lower-case letters, digits, '.', '-', '_';
# the whole ID is at most 2048 bytes.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_MAX_TRUST_DOMAIN = 255
_MAX_URI = 2048
# Kubernetes names: a namespace is a DNS-1123 label, a service account a
# DNS-1123 subdomain. Pods cannot carry anything else, so neither can an ID.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class IdentityError(ValueError):
    """A SPIFFE ID or one of its parts is not acceptable (the message says which and why)."""


def check_trust_domain(td: object) -> None:
    """IdentityError unless ``td`` is a valid SPIFFE trust domain name."""
    if not isinstance(td, str) or not td:
        raise IdentityError(f"trust domain must be a non-empty string, not {td!r}")
    if len(td) > _MAX_TRUST_DOMAIN:
        raise IdentityError(f"trust domain is {len(td)} characters long (at most {_MAX_TRUST_DOMAIN})")
    if not _TRUST_DOMAIN.fullmatch(td):
        raise IdentityError(f"trust domain {td!r} may only hold lower-case letters, digits, '.', '-' and '_'")


def _check_namespace(ns: object) -> None:
    if not isinstance(ns, str) or not ns:
        raise IdentityError(f"namespace must be a non-empty string, not {ns!r}")
    if len(ns) > 63 or not _DNS_LABEL.fullmatch(ns):
        raise IdentityError(f"namespace {ns!r} is not a DNS-1123 label")


def _check_service_account(sa: object) -> None:
    if not isinstance(sa, str) or not sa:
        raise IdentityError(f"service account must be a non-empty string, not {sa!r}")
    if len(sa) > 253 or not _DNS_SUBDOMAIN.fullmatch(sa):
        raise IdentityError(f"service account {sa!r} is not a DNS-1123 subdomain")


@dataclass(frozen=True, order=True)
class WorkloadIdentity:
    """A Kubernetes service account in a trust domain; validated on construction."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_namespace(self.namespace)
        _check_service_account(self.service_account)

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_uri(uri: object) -> WorkloadIdentity:
    """``spiffe://td/ns/NS/sa/SA`` -> WorkloadIdentity; IdentityError for anything else."""
    if not isinstance(uri, str):
        raise IdentityError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
    if not uri:
        raise IdentityError("SPIFFE ID is empty")
    if len(uri) > _MAX_URI:
        raise IdentityError(f"SPIFFE ID is {len(uri)} characters long (at most {_MAX_URI})")
    if not uri.startswith(SCHEME):
        raise IdentityError(f"SPIFFE ID {uri!r} does not start with {SCHEME!r}")
    for ch, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if ch in uri:
            raise IdentityError(f"SPIFFE ID {uri!r} must not contain {what}")
    rest = uri[len(SCHEME):]
    td, sep, path = rest.partition("/")
    if not td:
        raise IdentityError(f"SPIFFE ID {uri!r} has no trust domain")
    if "@" in td or ":" in td:
        raise IdentityError(f"SPIFFE ID {uri!r}: trust domain must not hold user info or a port")
    if not sep or not path:
        raise IdentityError(f"SPIFFE ID {uri!r} has no path; expected /ns/<namespace>/sa/<service account>")
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise IdentityError(
            f"SPIFFE ID {uri!r}: path must be exactly /ns/<namespace>/sa/<service account>")
    try:
        return WorkloadIdentity(td, parts[1], parts[3])
    except IdentityError as exc:
        raise IdentityError(f"SPIFFE ID {uri!r}: {exc}") from None


# Kubernetes admits a pod that names no service account into its namespace's "default" one.
DEFAULT_SERVICE_ACCOUNT = "default"


def service_account_of(spec) -> str:
    """The one rule for the service account a pod runs as (so its SPIFFE identity).

    ``spec.serviceAccountName``; else the deprecated ``spec.serviceAccount``,
    which Kubernetes still reads as its alias (the API server copies it into
    ``serviceAccountName`` when only it is set); else ``default``. The typed
    ``agent.state.model.Pod`` and ``identity_of_pod`` both use this; nothing
    else may read those fields.
    """
    if isinstance(spec, dict):
        for key in ("serviceAccountName", "serviceAccount"):
            value = spec.get(key)
            if isinstance(value, str) and value:
                return value
    return DEFAULT_SERVICE_ACCOUNT


def workload_entry_account(spec) -> str:
    """The service account of an Istio WorkloadEntry (or a ServiceEntry's inline
    endpoint, the same schema): ``spec.serviceAccount``, ``""`` when absent.

    Not a pod's rule: no ``default`` fallback, because a WorkloadEntry without
    one has no mesh identity (it is reached in plaintext).
    IdentityError when it is set but not a string (a broken object).
    """
    value = spec.get("serviceAccount") if isinstance(spec, dict) else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise IdentityError(f"serviceAccount is a {type(value).__name__}, not a string")
    return value


def identity_of_pod(pod: dict, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> WorkloadIdentity:
    """The identity a pod (a wire object) runs as: its namespace and ``service_account_of``.

    Code holding a ``ClusterState`` uses ``Pod.identity`` (the same rule,
    computed once per state).
    """
    if not isinstance(pod, dict):
        raise IdentityError(f"pod must be an object, not {type(pod).__name__}")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    namespace = meta.get("namespace") or "default"
    service_account = service_account_of(pod.get("spec"))
    try:
        return WorkloadIdentity(trust_domain, namespace, service_account)
    except IdentityError as exc:
        raise IdentityError(f"pod {namespace}/{meta.get('name', '?')}: {exc}") from None
