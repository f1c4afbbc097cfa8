"""A hostile HBONE peer: TLS clients and a frame-level HTTP/2 client (test-only).

``h2``'s own client refuses to break the protocol (it will not open a 101st
stream, for one), so ``RawH2`` builds frames with ``hyperframe`` and header
blocks with ``hpack`` itself, and parses whatever comes back into plain
``Frame`` tuples. Everything is blocking: an attack is a burst of bytes and
then a read of the answer.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              RstStreamFrame, SettingsFrame, WindowUpdateFrame)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8
REFUSED_STREAM = 0x7
ENHANCE_YOUR_CALM = 0xB


def client_context(chain: str | None, key: str | None, ca: str | None, *, tls12: bool = False) -> ssl.SSLContext:
    """A TLS client for 15008: ALPN h2, our CA (or none), a client certificate if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if chain:
        ctx.load_cert_chain(chain, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


@dataclass
class Received:
    """What the peer got back: frames in order, and how the connection ended."""
    frames: list[tuple[str, int, object]] = field(default_factory=list)   # (kind, stream, detail)
    closed: str = ""             # "" while open, else "eof", "reset" or the error's name

    def statuses(self) -> dict[int, int]:
        return {sid: int(dict(headers).get(":status", 0)) for kind, sid, headers in self.frames
                if kind == "headers"}

    def resets(self) -> dict[int, int]:
        return {sid: code for kind, sid, code in self.frames if kind == "rst"}

    def goaway(self) -> int | None:
        codes = [code for kind, _sid, code in self.frames if kind == "goaway"]
        return codes[-1] if codes else None

    def count(self, kind: str) -> int:
        return sum(1 for k, _s, _d in self.frames if k == kind)

    def data(self, sid: int) -> bytes:
        return b"".join(d for k, s, d in self.frames if k == "data" and s == sid)


class RawH2:
    """HTTP/2 client speaking frame by frame over a connected TLS socket."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.received = Received()
        self.next_id = 1
        self.send(PREFACE + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1 << 20,
                                                       SettingsFrame.ENABLE_PUSH: 0}).serialize())

    def stream_id(self) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        return sid

    # -- frames ------------------------------------------------------------------

    def connect(self, sid: int, authority: str, extra: list[tuple[str, str]] = ()) -> bytes:
        block = self.encoder.encode([(":method", "CONNECT"), (":authority", authority), *extra])
        return HeadersFrame(sid, data=block, flags=["END_HEADERS"]).serialize()

    @staticmethod
    def rst(sid: int, code: int = CANCEL) -> bytes:
        return RstStreamFrame(sid, error_code=code).serialize()

    @staticmethod
    def ping(n: int = 0) -> bytes:
        return PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize()

    @staticmethod
    def settings() -> bytes:
        return SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: 16384}).serialize()

    @staticmethod
    def data(sid: int, payload: bytes, end: bool = False) -> bytes:
        return DataFrame(sid, data=payload, flags=["END_STREAM"] if end else []).serialize()

    # -- I/O -------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """False if the agent has already closed the connection."""
        try:
            self.tls.sendall(data)
            return True
        except (OSError, ssl.SSLError):
            return False

    def read(self, seconds: float, until=None) -> Received:
        """Read frames for up to ``seconds`` or until ``until(received)`` or the end."""
        deadline = time.monotonic() + seconds
        while not self.received.closed and not (until and until(self.received)):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.tls.settimeout(left)
            try:
                chunk = self.tls.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            except ConnectionResetError:
                self.received.closed = "reset"
                break
            except (OSError, ssl.SSLError) as exc:
                self.received.closed = type(exc).__name__
                break
            if not chunk:
                self.received.closed = "eof"
                break
            self.buf += chunk
            self._parse()
        return self.received

    def _parse(self) -> None:
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            frame.parse_body(memoryview(self.buf[9:9 + length]))
            self.buf = self.buf[9 + length:]
            self._on(frame)

    def _on(self, frame) -> None:
        got = self.received.frames
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                self.send(SettingsFrame(0, flags=["ACK"]).serialize())
                got.append(("settings", 0, dict(frame.settings)))
            else:
                got.append(("settings-ack", 0, None))
        elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
            got.append(("headers", frame.stream_id, self.decoder.decode(frame.data, raw=False)))
        elif isinstance(frame, RstStreamFrame):
            got.append(("rst", frame.stream_id, frame.error_code))
        elif isinstance(frame, GoAwayFrame):
            got.append(("goaway", frame.last_stream_id, frame.error_code))
        elif isinstance(frame, PingFrame):
            got.append(("ping-ack" if "ACK" in frame.flags else "ping", 0, frame.opaque_data))
        elif isinstance(frame, DataFrame):
            got.append(("data", frame.stream_id, frame.data))
            if frame.flow_controlled_length:
                self.send(WindowUpdateFrame(0, window_increment=frame.flow_controlled_length).serialize()
                          + WindowUpdateFrame(frame.stream_id,
                                              window_increment=frame.flow_controlled_length).serialize())
            if "END_STREAM" in frame.flags:
                got.append(("end", frame.stream_id, None))

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass
