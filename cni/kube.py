"""The plugin's reads from the Kubernetes API (``"state": "kube"``), stdlib only.

The official ``kubernetes`` client costs about 150 ms to import, more than
the whole plugin run, and the plugin ships as a small self-contained bundle:
so two GETs (the pod, its namespace) go over one HTTP/1.1 connection here,
with the bearer token and CA from the kubeconfig install-cni writes (JSON,
see ``cni.install.kubeconfig``). Not ``http.client``: it imports the
``email`` package (about 12 ms, more than all the plugin's own modules) to
parse headers; a GET needs only a status line, ``Content-Length`` or
chunked transfer coding. ``ssl`` is imported only for ``https`` servers.

Only what install-cni writes is understood: a current context naming a
cluster (``server``, ``certificate-authority-data`` or
``certificate-authority``) and a user with ``token`` or ``tokenFile``.
"""

from __future__ import annotations

import json
import socket
import time

# A Pod object is a few KiB; anything this big is not one.
MAX_BODY_BYTES = 4 * 1024 * 1024


class KubeError(Exception):
    """The API could not be asked or answered badly; the message says which step."""


def quote(text: str) -> str:
    """Percent-encode a path segment (names are DNS labels; be safe anyway)."""
    safe = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
    return "".join(c if c in safe else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


class ApiTarget:
    __slots__ = ("scheme", "host", "port", "base_path", "token", "ca_data", "ca_file", "server")

    def __init__(self, server: str, token: str, ca_data: bytes | None, ca_file: str | None) -> None:
        scheme, sep, rest = server.partition("://")
        hostport, _, path = rest.partition("/")
        if not sep or scheme not in ("https", "http") or not hostport:
            raise KubeError(f"cluster server {server!r} is not an http(s) URL")
        if hostport.startswith("["):                       # [v6]:port
            host, _, port = hostport[1:].partition("]")
            port = port[1:] if port.startswith(":") else ""
        else:
            host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
        if not host or (port and not port.isdigit()):
            raise KubeError(f"cluster server {server!r} has no usable host:port")
        self.server = server
        self.scheme = scheme
        self.host = host
        self.port = int(port) if port else (443 if scheme == "https" else 80)
        self.base_path = ("/" + path).rstrip("/") if path else ""
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
    except (ValueError, RecursionError):
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
    """GETs on one keep-alive connection, all within one deadline (``timeout`` seconds)."""

    def __init__(self, target: ApiTarget, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError()
        return left

    def _connect(self) -> socket.socket:
        t = self.target
        sock = socket.create_connection((t.host, t.port), timeout=self._remaining())
        if t.scheme == "http":
            return sock
        import ssl
        try:
            ctx = ssl.create_default_context(cafile=t.ca_file,
                                             cadata=t.ca_data.decode("ascii") if t.ca_data else None)
        except (OSError, ValueError, ssl.SSLError) as exc:
            sock.close()
            raise KubeError(f"cluster CA unusable: {exc}") from None
        try:
            return ctx.wrap_socket(sock, server_hostname=t.host)
        except BaseException:
            sock.close()
            raise

    def _recv(self) -> None:
        assert self.sock is not None, "_recv before _connect"
        self.sock.settimeout(self._remaining())
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the API server")
        self.buf += chunk
        if len(self.buf) > MAX_BODY_BYTES + 65536:
            raise KubeError(f"answer larger than {MAX_BODY_BYTES} bytes")

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._recv()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _response(self) -> tuple[int, bytes]:
        status_line = self._line()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise KubeError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
        status = int(parts[1])
        headers = {}
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            body = b""
            while True:
                size_text = self._line().split(b";")[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise KubeError(f"bad chunk size {size_text[:20]!r}") from None
                if size == 0:
                    while self._line():                  # trailers up to the empty line
                        pass
                    break
                if len(body) + size > MAX_BODY_BYTES:
                    raise KubeError(f"answer larger than {MAX_BODY_BYTES} bytes")
                body += self._exactly(size)
                self._exactly(2)
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            if length > MAX_BODY_BYTES:
                raise KubeError(f"answer larger than {MAX_BODY_BYTES} bytes")
            body = self._exactly(length)
        else:                                            # until the server closes
            try:
                while True:
                    self._recv()
            except ConnectionError:
                pass
            body, self.buf = self.buf, b""
            self.close()
        if headers.get(b"connection") == b"close":
            self.close()
        return status, body

    def get(self, path: str) -> dict | None:
        """The object at ``path``; None when the API says 404."""
        t = self.target
        host = f"[{t.host}]" if ":" in t.host else t.host
        request = (f"GET {t.base_path}{path} HTTP/1.1\r\nHost: {host}:{t.port}\r\n"
                   f"Accept: application/json\r\nUser-Agent: ambient-cni\r\n")
        if t.token:
            request += f"Authorization: Bearer {t.token}\r\n"
        try:
            if self.sock is None:
                self.sock = self._connect()
            self.sock.settimeout(self._remaining())
            self.sock.sendall((request + "\r\n").encode())
            status, body = self._response()
        except KubeError:
            self.close()
            raise
        except TimeoutError:
            self.close()
            raise KubeError(f"no answer from {t.server} within {self.timeout:g} s") from None
        except (OSError, ValueError) as exc:             # ssl.SSLError is an OSError
            self.close()
            raise KubeError(f"GET {t.server}{path}: {type(exc).__name__}: {exc}") from None
        if status == 404:
            return None
        if status != 200:
            raise KubeError(f"GET {path}: HTTP {status} {_reason(body)}")
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):     # RecursionError: absurdly deep nesting
            obj = None
        if not isinstance(obj, dict):
            raise KubeError(f"GET {path}: answer is not a JSON object")
        return obj

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""


def _reason(body: bytes) -> str:
    try:
        status = json.loads(body)
        return str(status.get("message") or status.get("reason") or "")[:300]
    except (ValueError, AttributeError, RecursionError):
        return body[:200].decode("utf-8", "replace")


def read_pod_and_namespace(kubeconfig_path: str, namespace: str, name: str,
                           timeout: float) -> tuple[dict | None, dict | None]:
    """(Pod, Namespace) from the API, None for either that does not exist."""
    reader = ApiReader(load_kubeconfig(kubeconfig_path), timeout)
    try:
        ns = quote(namespace)
        pod = reader.get(f"/api/v1/namespaces/{ns}/pods/{quote(name)}")
        namespace_obj = reader.get(f"/api/v1/namespaces/{ns}")
    finally:
        reader.close()
    return pod, namespace_obj
