"""cni.kube's small HTTP/1.1 client against canned answers from a loopback
TCP server: framing (Content-Length, chunked, until close), keep-alive,
errors, and the kubeconfig/URL forms it accepts."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from cni.kube import ApiReader, ApiTarget, KubeError, load_kubeconfig, quote

POD = {"kind": "Pod", "metadata": {"name": "web", "namespace": "mesh"}}
BODY = json.dumps(POD).encode()


class Canned:
    """Accepts connections; answers each request (read up to the blank line) with the next canned bytes."""

    def __init__(self, answers: list[bytes], close_after_each: bool = False) -> None:
        self.answers = list(answers)
        self.close_after_each = close_after_each
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                buf = b""
                while self.answers:
                    while b"\r\n\r\n" not in buf:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buf += chunk
                    if b"\r\n\r\n" not in buf:
                        break
                    request, _, buf = buf.partition(b"\r\n\r\n")
                    self.requests.append(request)
                    conn.sendall(self.answers.pop(0))
                    if self.close_after_each:
                        break

    def close(self) -> None:
        self.listener.close()
        self.thread.join(2)

    def reader(self, token="tok", timeout=2.0) -> ApiReader:
        return ApiReader(ApiTarget(f"http://127.0.0.1:{self.port}", token, None, None), timeout)


def ok(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def chunked(body: bytes, sizes=(7, 1, 1000)) -> bytes:
    out, rest = b"", body
    for n in sizes:
        if not rest:
            break
        piece, rest = rest[:n], rest[n:]
        out += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
    if rest:
        out += b"%x\r\n%s\r\n" % (len(rest), rest)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + out + b"0\r\nX-Trailer: 1\r\n\r\n"


@pytest.fixture
def canned():
    servers = []

    def make(answers, **kw):
        server = Canned(answers, **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize("answer", [ok(), chunked(BODY),
                                    b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + BODY],
                         ids=["content-length", "chunked", "until-close"])
def test_framings(canned, answer):
    server = canned([answer], close_after_each=True)
    assert server.reader().get("/api/v1/namespaces/mesh/pods/web") == POD


def test_two_gets_share_one_connection_and_send_the_token(canned):
    server = canned([ok(), chunked(json.dumps({"kind": "Namespace"}).encode())])
    reader = server.reader()
    assert reader.get("/api/v1/namespaces/mesh/pods/web") == POD
    assert reader.get("/api/v1/namespaces/mesh") == {"kind": "Namespace"}
    reader.close()
    assert server.connections == 1
    first = server.requests[0].decode()
    assert first.startswith("GET /api/v1/namespaces/mesh/pods/web HTTP/1.1\r\n")
    lines = first.split("\r\n")
    assert "Authorization: Bearer tok" in lines and f"Host: 127.0.0.1:{server.port}" in lines


def test_not_found_is_none(canned):
    status = json.dumps({"kind": "Status", "reason": "NotFound"}).encode()
    server = canned([b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(status), status)])
    assert server.reader().get("/api/v1/namespaces/mesh/pods/web") is None


@pytest.mark.parametrize("answer,message", [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 27\r\n\r\n{\"message\": \"pods is nope\"}", "HTTP 403 pods is nope"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x answer"),
    (ok(b"[1, 2]"), "not a JSON object"),
    (ok(b"{\"kind\": "), "not a JSON object"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n", "larger than"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"short\"", "connection closed"),
])
def test_bad_answers_are_errors_with_the_reason(canned, answer, message):
    server = canned([answer], close_after_each=True)
    with pytest.raises(KubeError, match=message):
        server.reader().get("/x")


def test_a_silent_server_hits_the_deadline(canned):
    listener = socket.create_server(("127.0.0.1", 0))      # accepts (backlog), never answers
    try:
        reader = ApiReader(ApiTarget(f"http://127.0.0.1:{listener.getsockname()[1]}", "", None, None), 0.3)
        with pytest.raises(KubeError, match="within 0.3 s"):
            reader.get("/x")
    finally:
        listener.close()


@pytest.mark.parametrize("server,host,port,base", [
    ("https://10.96.0.1:443", "10.96.0.1", 443, ""),
    ("https://kubernetes.default.svc", "kubernetes.default.svc", 443, ""),
    ("http://127.0.0.1:8080/prefix/", "127.0.0.1", 8080, "/prefix"),
    ("https://[fd00::1]:6443", "fd00::1", 6443, ""),
])
def test_server_urls(server, host, port, base):
    t = ApiTarget(server, "", None, None)
    assert (t.host, t.port, t.base_path) == (host, port, base)


@pytest.mark.parametrize("server", ["10.96.0.1:443", "ftp://x", "https://", "https://h:port"])
def test_bad_server_urls(server):
    with pytest.raises(KubeError):
        ApiTarget(server, "", None, None)


def test_quote_keeps_dns_names_and_escapes_the_rest():
    assert quote("web-0.x") == "web-0.x"
    assert quote("a/b c") == "a%2Fb%20c"


def test_kubeconfig_with_a_token_file(tmp_path):
    (tmp_path / "token").write_text("from-file\n")
    (tmp_path / "kc").write_text(json.dumps({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://10.0.0.1:6443", "certificate-authority": "/ca"}}],
        "users": [{"name": "u", "user": {"tokenFile": str(tmp_path / "token")}}]}))
    t = load_kubeconfig(str(tmp_path / "kc"))
    assert (t.token, t.ca_file, t.port) == ("from-file", "/ca", 6443)


@pytest.mark.parametrize("doc,message", [
    ({"current-context": "nope", "contexts": []}, "no context named 'nope'"),
    ({"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
      "clusters": [{"name": "k", "cluster": {"server": "https://h", "certificate-authority-data": "!!"}}],
      "users": [{"name": "u", "user": {}}]}, "not base64"),
])
def test_bad_kubeconfigs(tmp_path, doc, message):
    (tmp_path / "kc").write_text(json.dumps(doc))
    with pytest.raises(KubeError, match=message):
        load_kubeconfig(str(tmp_path / "kc"))
