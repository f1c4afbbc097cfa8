"""Who is calling the CA: bearer tokens -> the caller's node (and service account).

``Authenticator`` is the seam: the lab uses a token file
(``TokenFileAuthenticator``, here); in a cluster the CA reviews projected
service-account tokens with the API server (``TokenReviewAuthenticator`` in
``agent.ca.kubeauth``: the token is bound to a pod, so to a node).

Two ways to fail, kept apart so a caller can tell "refused" from "try
again": ``AuthenticationError`` (the token is not good: UNAUTHENTICATED) and
``AuthenticationUnavailable`` (the CA could not decide, e.g. the API server
is down: UNAVAILABLE).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import yaml

from agent.fileio import FileWatch
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError, WorkloadIdentity

log = logging.getLogger(__name__)


class AuthenticationError(Exception):
    """The caller could not be authenticated (the message is safe to return: it never holds a token)."""


class AuthenticationUnavailable(Exception):
    """The caller's token could not be checked right now (the message never holds a token)."""


class AuthConfigError(ValueError):
    """The authenticator's configuration (e.g. the token file) is unusable."""


@dataclass(frozen=True, order=True)
class ServiceAccount:
    """A Kubernetes service account; names validated like a SPIFFE ID's parts."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        # The same rules a WorkloadIdentity applies, so every account we
        # accept has a well-formed SPIFFE ID.
        WorkloadIdentity(DEFAULT_TRUST_DOMAIN, self.namespace, self.name)

    def identity(self, trust_domain: str) -> WorkloadIdentity:
        return WorkloadIdentity(trust_domain, self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_service_account(text: str) -> ServiceAccount:
    """``namespace/name`` -> ServiceAccount, or ValueError saying what is wrong."""
    namespace, sep, name = str(text).partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"service account {text!r}: expected NAMESPACE/NAME")
    try:
        return ServiceAccount(namespace, name)
    except IdentityError as exc:
        raise ValueError(f"service account {text!r}: {exc}") from None


@dataclass(frozen=True)
class Caller:
    """Who is calling, as established by an Authenticator.

    ``service_account`` is the Kubernetes service account the caller proved
    (TokenReview). ``None`` means the caller was recognised as a node agent
    by a means that names no account: the lab's token file, whose entries
    are, by definition, node agents' tokens.
    """

    node: str        # the node the caller runs on
    principal: str   # how it was recognised, for logs ("token-file:<path>")
    service_account: ServiceAccount | None = None

    def describe(self) -> str:
        """For logs: who called, from which node, recognised how (never a token)."""
        if self.service_account is None:
            return f"node agent for {self.node!r} ({self.principal})"
        return f"service account {self.service_account} on node {self.node!r} ({self.principal})"


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller:
        """The caller a bearer token belongs to; AuthenticationError if the token
        is not good, AuthenticationUnavailable if that cannot be decided now."""
        ...


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of the one ``authorization: Bearer <token>`` metadata entry, or AuthenticationError."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        raise AuthenticationError("no 'authorization: Bearer <token>' metadata")
    if len(values) > 1:
        raise AuthenticationError(f"{len(values)} authorization metadata entries; expected one")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthenticationError(f"authorization scheme {scheme[:20]!r} is not supported; expected Bearer")
    token = token.strip()
    if not token:
        raise AuthenticationError("authorization: Bearer with an empty token")
    return token


def parse_token_map(text: str, where: str) -> dict[str, str]:
    """A YAML or JSON mapping ``token: node`` -> dict; AuthConfigError naming what is wrong."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AuthConfigError(f"{where}: neither JSON nor YAML: {exc}") from None
    if not isinstance(doc, dict) or not doc:
        raise AuthConfigError(f"{where}: expected a non-empty mapping of token to node name")
    tokens: dict[str, str] = {}
    for index, (token, node) in enumerate(doc.items()):
        # Tokens are secrets: errors name the entry's position, never the token.
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise AuthConfigError(
                f"{where}: entry {index + 1}: the token must be a non-empty string without "
                f"surrounding spaces (quote tokens YAML would read as numbers)")
        if not isinstance(node, str) or not node:
            raise AuthConfigError(f"{where}: entry {index + 1}: the node name must be a non-empty string")
        tokens[token] = node
    return tokens


class TokenFileAuthenticator:
    """Lab authentication: a file mapping each node agent's token to its node.

    The file is re-read when it changes (checked on each request: one stat),
    so tokens can be added or revoked without restarting the CA. A version
    that cannot be parsed is logged and the previous one stays in force.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._watch = FileWatch(path)
        stamp = self._watch.stamp()
        self._tokens = self._read()     # a broken file at start-up is fatal
        self._watch.handled(stamp)

    def _read(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"read token file {self.path}: {exc}") from None
        return parse_token_map(text, f"token file {self.path}")

    def _refresh(self) -> None:
        stamp = self._watch.stamp()
        if not self._watch.is_new(stamp):
            return
        try:
            self._tokens = self._read()
        except AuthConfigError as exc:
            self._watch.failed(stamp)
            log.error("keeping the previous tokens: %s", exc)
            return
        self._watch.handled(stamp)
        log.info("token file %s reloaded: %d tokens", self.path, len(self._tokens))

    async def authenticate(self, token: str) -> Caller:
        self._refresh()
        presented = token.encode("utf-8")
        node = None
        # Compare against every entry in constant time, so response timing
        # does not tell a caller how much of a token it guessed right.
        for known, known_node in self._tokens.items():
            if hmac.compare_digest(presented, known.encode("utf-8")):
                node = known_node
        if node is None:
            raise AuthenticationError("unknown bearer token")
        return Caller(node=node, principal=f"token-file:{self.path}")
