"""CA authentication in a cluster: Kubernetes TokenReview of projected service-account tokens.

A node agent presents a projected token (audience ``istio-ca``) that the
kubelet bound to its pod. The CA asks the API server to review it
(``POST /apis/authentication.k8s.io/v1/tokenreviews``) and learns:

* the service account (``system:serviceaccount:<ns>:<sa>``), which decides
  whether the caller may impersonate (``agent.ca.rules.authorise``);
* the node: the bound token's ``authentication.kubernetes.io/node-name``
  extra (Kubernetes >= 1.30 adds it), otherwise the node of the pod named by
  ``authentication.kubernetes.io/pod-name`` (GET, ``spec.nodeName``), whose
  UID must match ``authentication.kubernetes.io/pod-uid`` when given.

A token that binds no pod (a legacy Secret token, or a TokenRequest bound
to a Secret) says nothing about a node, so it is refused: the CA signs only
for pods on the caller's node and cannot know which node that is.

``review_identity`` and ``pod_node`` are the pure decisions (tests/unit);
``TokenReviewAuthenticator`` is the I/O shell around the official client.
The client is synchronous, so each call runs in a worker thread.

Tokens are secrets: none is ever logged or put in an error message, and the
cache of positive reviews is keyed by a SHA-256 of the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from agent.ca.authn import AuthConfigError, AuthenticationError, AuthenticationUnavailable, Caller, ServiceAccount
from agent.identity.spiffe import IdentityError, service_account_of
from agent.kubeclient import KubeConfigError, load_configuration

log = logging.getLogger(__name__)

DEFAULT_AUDIENCE = "istio-ca"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# Keys of the user info's ``extra`` that the API server sets for tokens
# bound to a pod (KEP-4193 adds the node ones).
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"

# A positive review is reused this long: a node agent asks for a
# certificate per pod identity, often in bursts at start-up, and each
# review is an API request. Revocation (pod deleted) takes effect within
# this time; authorisation still checks the pod against current state.
DEFAULT_CACHE_SECONDS = 60.0
DEFAULT_CACHE_ENTRIES = 4096
DEFAULT_API_TIMEOUT = 5.0


@dataclass(frozen=True)
class TokenIdentity:
    """What a successful TokenReview says about a token."""

    service_account: ServiceAccount
    uid: str                      # the service account's UID (logs)
    node: str | None              # from the node-name extra, if the API server set it
    pod_name: str | None
    pod_uid: str | None


def _one_extra(extra: dict, key: str) -> str | None:
    values = extra.get(key)
    if values is None:
        return None
    if isinstance(values, str):         # tolerate a scalar where a list is specified
        values = [values]
    if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], str) \
            or not values[0]:
        raise AuthenticationError(f"token review: user extra {key!r} must hold exactly one "
                                  f"non-empty string")
    return values[0]


def review_identity(status: Any, audience: str) -> TokenIdentity:
    """The identity in a TokenReview ``status`` (JSON object), or AuthenticationError.

    Accepted only if the token is authenticated, valid for ``audience`` (in
    ``status.audiences``: an authenticator that ignored ``spec.audiences``
    would otherwise let a token minted for another service through), and
    belongs to a service account.
    """
    if not isinstance(status, dict):
        raise AuthenticationError("token review: the API server returned no status")
    if status.get("authenticated") is not True:
        # The API server's reason ("token has expired", "audiences ... invalid")
        # names no secret; it tells the agent what to fix.
        reason = status.get("error")
        raise AuthenticationError("token not authenticated by the Kubernetes API server"
                                  + (f": {str(reason)[:300]}" if reason else ""))
    audiences = status.get("audiences")
    if not isinstance(audiences, list) or audience not in audiences:
        raise AuthenticationError(f"token is not valid for audience {audience!r} "
                                  f"(its reviewed audiences: {audiences if isinstance(audiences, list) else []})")
    user = status.get("user")
    if not isinstance(user, dict):
        raise AuthenticationError("token review: authenticated, but no user information")
    username = user.get("username")
    if not isinstance(username, str) or not username.startswith(SERVICE_ACCOUNT_PREFIX):
        raise AuthenticationError(f"token belongs to {str(username)[:100]!r}, not a service account "
                                  f"({SERVICE_ACCOUNT_PREFIX}<namespace>:<name>)")
    namespace, sep, name = username[len(SERVICE_ACCOUNT_PREFIX):].partition(":")
    try:
        if not sep:
            raise IdentityError("expected <namespace>:<name>")
        account = ServiceAccount(namespace, name)
    except IdentityError as exc:
        raise AuthenticationError(f"token user {username[:200]!r} is not a valid service account: "
                                  f"{exc}") from None
    extra = user.get("extra") or {}
    if not isinstance(extra, dict):
        raise AuthenticationError("token review: user extra is not an object")
    pod_name = _one_extra(extra, EXTRA_POD_NAME)
    node = _one_extra(extra, EXTRA_NODE_NAME)
    if node is None and pod_name is None:
        raise AuthenticationError(
            f"token of service account {account} is not bound to a pod (no {EXTRA_POD_NAME!r} or "
            f"{EXTRA_NODE_NAME!r}); present a projected service-account token so the CA knows "
            f"the caller's node")
    uid = user.get("uid")
    return TokenIdentity(account, uid if isinstance(uid, str) else "", node, pod_name,
                         _one_extra(extra, EXTRA_POD_UID))


def pod_node(pod: Any, identity: TokenIdentity) -> str:
    """The node of the pod a token is bound to (GET result), or AuthenticationError."""
    where = f"pod {identity.service_account.namespace}/{identity.pod_name}"
    if not isinstance(pod, dict):
        raise AuthenticationError(f"{where}, which the token is bound to, could not be read")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        spec = {}
    if identity.pod_uid is not None and meta.get("uid") != identity.pod_uid:
        # Same name, another pod: the one the token was issued to is gone.
        raise AuthenticationError(f"{where} has UID {meta.get('uid')!r}, not the "
                                  f"{identity.pod_uid!r} the token is bound to")
    account = service_account_of(spec)
    if account != identity.service_account.name:
        raise AuthenticationError(f"{where} runs as service account {account!r}, not "
                                  f"{identity.service_account.name!r} as the token says")
    node = spec.get("nodeName")
    if not isinstance(node, str) or not node:
        raise AuthenticationError(f"{where}, which the token is bound to, is not scheduled to a node")
    return node


class ReviewCache:
    """Positive reviews by SHA-256 of the token, for ``ttl`` seconds, at most ``size`` entries."""

    def __init__(self, ttl: float = DEFAULT_CACHE_SECONDS, size: int = DEFAULT_CACHE_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Caller]] = OrderedDict()

    @staticmethod
    def key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8")).digest()

    def get(self, token: str) -> Caller | None:
        key = self.key(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, caller = entry
        if self.clock() >= expires:
            del self._entries[key]
            return None
        return caller

    def put(self, token: str, caller: Caller) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        key = self.key(token)
        self._entries.pop(key, None)
        self._entries[key] = (self.clock() + self.ttl, caller)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)       # the oldest entry goes first

    def __len__(self) -> int:
        return len(self._entries)


def api_client(kubeconfig: str | None = None):
    """An ApiClient from ``kubeconfig``; without one, like the kube state source
    (``agent.kubeclient``): in-cluster configuration when running in a pod, else
    ``$KUBECONFIG`` or ``~/.kube/config``."""
    from kubernetes import client

    try:
        configuration, _ = load_configuration(kubeconfig, hint="; pass --kubeconfig PATH")
    except KubeConfigError as exc:
        raise AuthConfigError(f"cannot review tokens: {exc}") from None
    return client.ApiClient(configuration)


def _api_error(exc: BaseException) -> str:
    """A short description of a failed API call (status and reason; never request headers)."""
    status = getattr(exc, "status", None)
    if status:
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip()
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _json_body(response) -> Any:
    """The JSON of an unpreloaded response; its connection goes back to the pool either way."""
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


class TokenReviewAuthenticator:
    """Authenticates callers by TokenReview; see the module docstring for the rules."""

    def __init__(self, api_client, audience: str = DEFAULT_AUDIENCE, *,
                 cache: ReviewCache | None = None, timeout: float = DEFAULT_API_TIMEOUT) -> None:
        from kubernetes import client

        if not audience:
            raise AuthConfigError("the token audience must not be empty")
        self.audience = audience
        self.timeout = timeout
        self.cache = cache if cache is not None else ReviewCache()
        self._api_client = api_client
        self._inflight: dict[bytes, asyncio.Future] = {}
        self._auth = client.AuthenticationV1Api(api_client)
        self._core = client.CoreV1Api(api_client)

    def close(self) -> None:
        """Release the API client's connections."""
        self._api_client.close()

    async def authenticate(self, token: str) -> Caller:
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        # An agent starting up asks for many identities at once with one
        # token: concurrent requests share one review instead of each
        # sending its own.
        key = ReviewCache.key(token)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._authenticate_uncached(token))
            self._inflight[key] = task
            task.add_done_callback(partial(self._review_done, key))
        # shield: a cancelled caller (deadline) must not cancel the others' review.
        return await asyncio.shield(task)

    def _review_done(self, key: bytes, task: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()    # retrieved here, so a review nobody waits for any more is not reported

    async def _authenticate_uncached(self, token: str) -> Caller:
        status = await self._review(token)
        identity = review_identity(status, self.audience)
        node = identity.node
        if node is None:
            node = pod_node(await self._read_pod(identity), identity)
        caller = Caller(node=node, principal=f"tokenreview, uid {identity.uid or '?'}",
                        service_account=identity.service_account)
        self.cache.put(token, caller)
        return caller

    async def _review(self, token: str) -> Any:
        from kubernetes.client.rest import ApiException

        # The client sends a plain dict as it is (its types ask for a V1TokenReview).
        body: Any = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]}}
        try:
            response = await asyncio.to_thread(
                self._auth.create_token_review, body, _preload_content=False,
                _request_timeout=self.timeout)
            doc = _json_body(response)
        except ApiException as exc:
            # 401/403 here mean the CA's own credentials or RBAC are wrong,
            # 5xx that the API server is in trouble: neither is the caller's
            # fault, so it is told to try again, and the operator is told why.
            log.error("TokenReview failed: %s", _api_error(exc))
            raise AuthenticationUnavailable(
                f"the CA cannot review tokens right now (Kubernetes API: {_api_error(exc)})") from None
        except Exception as exc:    # connection refused, timeout, TLS, a non-JSON answer
            log.error("TokenReview failed: %s", _api_error(exc))
            raise AuthenticationUnavailable(
                "the CA cannot review tokens right now (Kubernetes API unreachable)") from None
        if not isinstance(doc, dict):
            raise AuthenticationUnavailable("the Kubernetes API answered the TokenReview with no object")
        return doc.get("status")

    async def _read_pod(self, identity: TokenIdentity) -> Any:
        from kubernetes.client.rest import ApiException

        namespace, name = identity.service_account.namespace, identity.pod_name
        assert name is not None, "review_identity: a token without a node names its pod"
        try:
            response = await asyncio.to_thread(
                self._core.read_namespaced_pod, name, namespace, _preload_content=False,
                _request_timeout=self.timeout)
            return _json_body(response)
        except ApiException as exc:
            if exc.status == 404:
                raise AuthenticationError(f"pod {namespace}/{name}, which the token is bound to, "
                                          f"does not exist") from None
            log.error("reading pod %s/%s failed: %s", namespace, name, _api_error(exc))
            raise AuthenticationUnavailable(
                f"the CA cannot find the caller's node right now (Kubernetes API: "
                f"{_api_error(exc)})") from None
        except Exception as exc:
            log.error("reading pod %s/%s failed: %s", namespace, name, _api_error(exc))
            raise AuthenticationUnavailable(
                "the CA cannot find the caller's node right now (Kubernetes API unreachable)") from None
