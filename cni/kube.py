"""The plugin's reads from the Kubernetes API (``"state": "kube"``), stdlib only.

The official ``kubernetes`` client costs about 150 ms to import, more than
the whole plugin run, and the plugin ships as a small self-contained bundle:
so two GETs (the pod, its namespace) go over ``http.client`` here, with the
bearer token and CA from the kubeconfig install-cni writes (JSON, see
``cni.install.kubeconfig``). ``ssl`` is imported only for ``https`` servers.

Only what install-cni writes is understood: a current context naming a
cluster (``server``, ``certificate-authority-data`` or
``certificate-authority``) and a user with ``token`` or ``tokenFile``.
"""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import quote, urlsplit

# A Pod object is a few KiB; anything this big is not one.
MAX_BODY_BYTES = 4 * 1024 * 1024


class KubeError(Exception):
    """The API could not be asked or answered badly; the message says which step."""


class ApiTarget:
    __slots__ = ("scheme", "host", "port", "base_path", "token", "ca_data", "ca_file", "server")

    def __init__(self, server: str, token: str, ca_data: bytes | None, ca_file: str | None) -> None:
        parts = urlsplit(server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise KubeError(f"cluster server {server!r} is not an http(s) URL")
        self.server = server
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.token = token
        self.ca_data = ca_data
        self.ca_file = ca_file


def _named(doc: dict, key: str, name) -> dict:
    for item in doc.get(key) or ():
        if isinstance(item, dict) and item.get("name") == name:
            inner = item.get(key[:-1])
            if isinstance(inner, dict):
                return inner
    raise KubeError(f"kubeconfig has no {key[:-1]} named {name!r}")


def load_kubeconfig(path: str) -> ApiTarget:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise KubeError(f"kubeconfig {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise KubeError(f"kubeconfig {path} is not a JSON object (install-cni writes JSON)")
    context = _named(doc, "contexts", doc.get("current-context"))
    cluster = _named(doc, "clusters", context.get("cluster"))
    user = _named(doc, "users", context.get("user"))
    server = cluster.get("server")
    if not isinstance(server, str):
        raise KubeError(f"kubeconfig {path}: cluster has no server")
    token = user.get("token")
    if not token and user.get("tokenFile"):
        try:
            with open(user["tokenFile"]) as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise KubeError(f"token file {user['tokenFile']}: {exc.strerror or exc}") from None
    ca_data = None
    if cluster.get("certificate-authority-data"):
        import base64
        try:
            ca_data = base64.b64decode(cluster["certificate-authority-data"], validate=True)
        except ValueError:
            raise KubeError(f"kubeconfig {path}: certificate-authority-data is not base64") from None
    return ApiTarget(server, token or "", ca_data, cluster.get("certificate-authority"))


class ApiReader:
    """GETs on one connection, all within one deadline (``timeout`` seconds)."""

    def __init__(self, target: ApiTarget, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.conn: http.client.HTTPConnection | None = None

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise KubeError(f"no answer from {self.target.server} within {self.timeout:g} s")
        return left

    def _connect(self) -> http.client.HTTPConnection:
        t = self.target
        if t.scheme == "http":
            return http.client.HTTPConnection(t.host, t.port, timeout=self._remaining())
        import ssl
        try:
            ctx = ssl.create_default_context(cafile=t.ca_file,
                                             cadata=t.ca_data.decode("ascii") if t.ca_data else None)
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise KubeError(f"cluster CA unusable: {exc}") from None
        return http.client.HTTPSConnection(t.host, t.port, timeout=self._remaining(), context=ctx)

    def get(self, path: str) -> dict | None:
        """The object at ``path``; None when the API says 404."""
        headers = {"Accept": "application/json", "User-Agent": "ambient-cni"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        try:
            if self.conn is None:
                self.conn = self._connect()
            self.conn.timeout = self._remaining()
            if self.conn.sock is not None:
                self.conn.sock.settimeout(self.conn.timeout)
            self.conn.request("GET", self.target.base_path + path, headers=headers)
            resp = self.conn.getresponse()
            body = resp.read(MAX_BODY_BYTES + 1)
        except KubeError:
            raise
        except TimeoutError:
            raise KubeError(f"no answer from {self.target.server} within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise KubeError(f"GET {self.target.server}{path}: {type(exc).__name__}: {exc}") from None
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise KubeError(f"GET {path}: HTTP {resp.status} {_reason(body)}")
        if len(body) > MAX_BODY_BYTES:
            raise KubeError(f"GET {path}: answer larger than {MAX_BODY_BYTES} bytes")
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise KubeError(f"GET {path}: answer is not a JSON object")
        return obj

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _reason(body: bytes) -> str:
    try:
        status = json.loads(body)
        return str(status.get("message") or status.get("reason") or "")[:300]
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def read_pod_and_namespace(kubeconfig_path: str, namespace: str, name: str,
                           timeout: float) -> tuple[dict | None, dict | None]:
    """(Pod, Namespace) from the API, None for either that does not exist."""
    reader = ApiReader(load_kubeconfig(kubeconfig_path), timeout)
    try:
        ns = quote(namespace, safe="")
        pod = reader.get(f"/api/v1/namespaces/{ns}/pods/{quote(name, safe='')}")
        namespace_obj = reader.get(f"/api/v1/namespaces/{ns}")
    finally:
        reader.close()
    return pod, namespace_obj
