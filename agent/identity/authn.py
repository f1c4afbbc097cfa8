"""Who is calling the CA: bearer tokens -> the node an agent serves.

``Authenticator`` is the seam: the lab uses a token file; Kubernetes
TokenReview (a node agent's projected service-account token, bound to its
pod and so to its node) will be another implementation.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import yaml

log = logging.getLogger(__name__)


class AuthenticationError(Exception):
    """The caller could not be authenticated (the message is safe to return: it never holds a token)."""


class AuthConfigError(ValueError):
    """The authenticator's configuration (e.g. the token file) is unusable."""


@dataclass(frozen=True)
class Caller:
    node: str        # the node whose agent is calling
    principal: str   # how it was recognised, for logs ("token-file:<path>")


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller:
        """The caller a bearer token belongs to, or AuthenticationError."""
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
        self._stamp = self._current_stamp()
        self._bad_stamp: tuple | None = None
        self._tokens = self._read()     # a broken file at start-up is fatal

    def _current_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"read token file {self.path}: {exc}") from None
        return parse_token_map(text, f"token file {self.path}")

    def _refresh(self) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp or stamp == self._bad_stamp:
            return
        try:
            self._tokens = self._read()
        except AuthConfigError as exc:
            self._bad_stamp = stamp
            log.error("keeping the previous tokens: %s", exc)
            return
        self._stamp = stamp
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
