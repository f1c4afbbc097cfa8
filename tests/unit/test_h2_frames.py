"""DATA frames that bypass h2's buffers (agent/proxy/h2conn.py).

Sending: ``_HboneH2._prepare_for_sending`` writes a DATA frame as a 9-byte
header plus the payload, unserialised. Receiving: ``H2Connection._take_body``
reads a large DATA frame's body into a buffer of its own. Both must put and
take exactly the bytes stock h2 would, in the same order, with the same flow
control and the same protocol errors; these tests hold them to stock h2 as
the reference, over every way the bytes can be cut up.
"""

from __future__ import annotations

import asyncio
import functools
import random

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hyperframe.frame import DataFrame, Frame, HeadersFrame, PingFrame, WindowUpdateFrame

from agent.proxy import h2conn
from agent.proxy.h2conn import BIG_DATA, H2Connection, H2Stream, _HboneH2
from agent.proxy.hbone import CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW
from tests.unit.test_h2_tunnel import HEADERS
from tests.unit.test_pipe import FakeTransport

MIB = 1024 * 1024


def in_loop(fn):
    """Run a test inside an event loop (H2Connection needs a running one)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def main():
            return fn(*args, **kwargs)
        return asyncio.run(main())
    return wrapper


def _settings(conn: h2.connection.H2Connection, client: bool) -> None:
    conn.local_settings = h2.settings.Settings(client=client, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
    })
    conn.max_inbound_frame_size = MAX_FRAME_SIZE


def _pair(client_cls):
    """A client of ``client_cls`` and a stock h2 server, handshake done, one stream open."""
    client = client_cls(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    _settings(client, True)
    _settings(server, False)
    client.initiate_connection()
    server.initiate_connection()
    for conn in (client, server):
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, HEADERS)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


@pytest.mark.parametrize("size", [0, 1, 1000, 16383, 16384, 100_000, MIB])
@pytest.mark.parametrize("end", [False, True])
@pytest.mark.parametrize("as_view", [False, True])
def test_sent_data_frames_are_byte_identical_to_stock_h2(size, end, as_view):
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 + 1)
    payload = payload[:size]
    ours, ours_peer = _pair(_HboneH2)
    stock, _ = _pair(h2.connection.H2Connection)
    data = memoryview(payload) if as_view else payload
    # Something h2 serialises itself is queued first: the order must hold.
    for conn in (ours, stock):
        conn.ping(b"12345678")
        conn.send_data(1, data, end_stream=end)
        conn.ping(b"87654321")
    wire = ours.data_to_send()
    assert wire == stock.data_to_send()
    assert ours._out == [] and not ours._data_to_send
    events = ours_peer.receive_data(wire)
    got = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert got == payload
    assert any(isinstance(e, h2.events.StreamEnded) for e in events) == end


def test_large_payloads_are_written_without_a_copy():
    ours, _ = _pair(_HboneH2)
    big = b"b" * (h2conn.SEPARATE_PAYLOAD + 1)
    small = b"s" * 100
    ours.send_data(1, small)
    ours.send_data(1, big)
    ours.end_stream(1)
    out = ours.take_output()
    assert any(piece is big for piece in out)          # handed on as it is
    assert not any(piece is small for piece in out)    # joined to its header instead
    assert b"".join(out)[9:109] == small


def test_a_closed_window_still_refuses_data_as_stock_h2_does():
    ours, _ = _pair(_HboneH2)
    window = ours.local_flow_control_window(1)
    with pytest.raises(h2.exceptions.FlowControlError):
        ours.send_data(1, b"x" * (window + 1))
    ours.send_data(1, b"x" * min(window, MAX_FRAME_SIZE))
    assert ours.local_flow_control_window(1) == window - min(window, MAX_FRAME_SIZE)


class _Record:
    """The application end of a stream in pipe mode: what it was given."""

    def __init__(self):
        self.data = bytearray()
        self.eof = False
        self.reset = False

    def send(self, data): self.data += data
    def send_eof(self): self.eof = True
    def send_reset(self): self.reset = True
    def pause_reading(self, reason): pass
    def resume_reading(self, reason): pass


class _Transport(FakeTransport):
    """Records writes and whether it was closed."""

    def __init__(self):
        super().__init__()
        self.closed = False

    def close(self):
        self.closed = True

    abort = close

    def is_closing(self):
        return self.closed


class _Pipe:
    def __init__(self):
        self.counts = {}
        self.ended = []

    def count(self, attr, n): self.counts[attr] = self.counts.get(attr, 0) + n
    def finished(self, reset): self.ended.append(reset)


def _receiver(monkeypatch):  # noqa: C901 (one set-up, read top to bottom)
    """Our client connection on a fake transport, its stream 1 attached to a
    recorder, and a stock h2 server talking to it. Counts the bodies that
    took the fast path."""
    taken = []
    real = H2Connection._body_done

    def spy(self):
        taken.append(len(self._body))
        real(self)
    monkeypatch.setattr(H2Connection, "_body_done", spy)
    conn = H2Connection(client_side=True, name="t")
    transport = _Transport()
    conn.connection_made(transport)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    server.initiate_connection()
    server.receive_data(b"".join(transport.writes))
    transport.writes.clear()
    conn.data_received(server.data_to_send())
    server.receive_data(b"".join(transport.writes))
    transport.writes.clear()
    sid = conn.h2.get_next_available_stream_id()
    conn.h2.send_headers(sid, HEADERS)
    conn.flush()
    stream = H2Stream(conn, sid)
    conn.streams[sid] = stream
    record, pipe = _Record(), _Pipe()
    stream.attach(record, pipe, "received")
    server.receive_data(b"".join(transport.writes))
    transport.writes.clear()
    server.send_headers(sid, [(":status", "200")])
    return conn, transport, server, sid, record, pipe, taken


def _cuts(kind: str, total: int):
    rng = random.Random(kind)
    if kind == "whole":
        return [total]
    if kind == "tiny":                      # every header split, byte by byte at first
        return [1] * 64 + [7, 9, 2, 3] * 16 + [total]
    if kind == "tls-records":
        return [16384] * (total // 16384 + 1)
    return [rng.choice((1, 5, 9, 13, 700, 16384, 65536, 300_000)) for _ in range(total)]


def _feed(conn: H2Connection, wire: bytes, cuts, buffered: bool) -> list[int]:
    """Hand ``wire`` to the connection the way a transport would: in pieces
    of the given sizes (a buffered read also stops at the buffer's end)."""
    pos, ends = 0, []
    cuts = list(cuts)
    while pos < len(wire):
        cut = cuts[0] if len(cuts) == 1 else cuts.pop(0)
        if buffered:                         # get_buffer/buffer_updated, as uvloop's TLS does
            buf = conn.get_buffer(-1)
            n = min(len(buf), cut, len(wire) - pos)
            buf[:n] = wire[pos:pos + n]
            conn.buffer_updated(n)
        else:
            n = min(cut, len(wire) - pos)
            conn.data_received(wire[pos:pos + n])
        pos += n
        ends.append(pos)
    return ends


def _expected_fast(wire: bytes, ends: list[int]) -> list[int]:
    """The DATA frames that must have taken the fast path: large, and a read
    ended after their header but before their end (h2's buffer then held
    them incomplete); a frame that came whole within one read has nothing
    to wait for."""
    expected, pos = [], 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos:pos + 3], "big")
        body, end = pos + 9, pos + 9 + length
        if wire[pos + 3] == 0 and length >= BIG_DATA and any(body <= e < end for e in ends):
            expected.append(length)
        pos = end
    return expected


def _bulk(server, sid) -> bytes:
    sizes = [MIB, BIG_DATA, BIG_DATA - 1, 100, 300_000, MIB - 1, 5, 2 * BIG_DATA]
    sent = bytearray()
    for i, size in enumerate(sizes):
        chunk = bytes([i + 1]) * size
        server.send_data(sid, chunk, end_stream=(i == len(sizes) - 1))
        server.ping(bytes([i]) * 8)          # small frames between the large ones
        sent += chunk
    return bytes(sent), sizes


@pytest.mark.parametrize("cuts", ["whole", "tiny", "tls-records", "random"])
@pytest.mark.parametrize("buffered", [True, False])
@in_loop
def test_received_large_frames_arrive_whole_and_are_acknowledged(monkeypatch, cuts, buffered):
    # The reference: the same bytes through h2's own frame buffer alone.
    monkeypatch.setattr(h2conn, "BIG_DATA", 1 << 30)
    ref, ref_transport, ref_server, sid, ref_record, _, ref_taken = _receiver(monkeypatch)
    sent, sizes = _bulk(ref_server, sid)
    wire = ref_server.data_to_send()
    ref.data_received(wire)
    assert ref_taken == [] and bytes(ref_record.data) == sent
    monkeypatch.undo()

    conn, transport, server, sid, record, pipe, taken = _receiver(monkeypatch)
    assert _bulk(server, sid)[0] == sent and server.data_to_send() == wire
    ends = _feed(conn, wire, _cuts(cuts, len(wire)), buffered)
    assert bytes(record.data) == sent
    assert record.eof and not record.reset and not conn.closed
    assert pipe.counts["received"] == len(sent)
    assert taken == _expected_fast(wire, ends)
    if cuts == "tls-records":            # every large frame spans reads
        assert sorted(taken) == sorted(s for s in sizes if s >= BIG_DATA)
    # What we answered is what h2 alone answered: the same PING ACKs in the
    # same order, and the same window given back per stream. (Where the
    # WINDOW_UPDATEs fall between the ACKs depends on how the reads were cut.)
    assert _answers(b"".join(transport.writes)) == _answers(b"".join(ref_transport.writes))


def _answers(wire: bytes):
    pings, windows, pos = [], {}, 0
    while pos < len(wire):
        frame, length = Frame.parse_frame_header(memoryview(wire[pos:pos + 9]))
        frame.parse_body(memoryview(wire[pos + 9:pos + 9 + length]))
        pos += 9 + length
        if isinstance(frame, PingFrame):
            pings.append(frame.opaque_data)
        elif isinstance(frame, WindowUpdateFrame):
            windows[frame.stream_id] = windows.get(frame.stream_id, 0) + frame.window_increment
        else:
            raise AssertionError(f"unexpected answer {frame!r}")
    assert pings and windows
    return pings, windows


@in_loop
def test_a_large_frame_for_an_unknown_stream_goes_through_h2(monkeypatch):
    conn, transport, server, sid, record, pipe, taken = _receiver(monkeypatch)
    server.reset_stream(sid)        # the server forgets the stream; we still get its bytes below
    frame = DataFrame(sid + 2)
    frame.data = b"z" * (2 * BIG_DATA)
    wire = server.data_to_send() + frame.serialize()
    _feed(conn, wire, _cuts("tls-records", len(wire)), True)
    assert taken == []
    assert conn.closed and transport.closed   # DATA on a stream never opened: h2's PROTOCOL_ERROR


@in_loop
def test_an_oversized_frame_is_still_a_protocol_error(monkeypatch):
    conn, transport, server, sid, record, pipe, taken = _receiver(monkeypatch)
    frame = DataFrame(sid)
    frame.data = b"z" * (MAX_FRAME_SIZE + 1)
    _feed(conn, frame.serialize(), _cuts("tls-records", MAX_FRAME_SIZE + 10), True)
    assert taken == [] and conn.closed and transport.closed and record.reset
    assert b"".join(transport.writes)[3] == 7            # a GOAWAY went out


@in_loop
def test_data_inside_a_header_block_is_still_a_protocol_error(monkeypatch):
    conn, transport, server, sid, record, pipe, taken = _receiver(monkeypatch)
    headers = HeadersFrame(sid + 2)            # no END_HEADERS: a block is open
    headers.data = b""
    frame = DataFrame(sid)
    frame.data = b"z" * (2 * BIG_DATA)
    wire = server.data_to_send() + headers.serialize() + frame.serialize()
    _feed(conn, wire, _cuts("tls-records", len(wire)), True)
    assert taken == [] and conn.closed and transport.closed


@in_loop
def test_a_padded_large_frame_goes_through_h2_without_its_padding(monkeypatch):
    conn, transport, server, sid, record, pipe, taken = _receiver(monkeypatch)
    server.send_data(sid, b"p" * (2 * BIG_DATA), pad_length=200)
    wire = server.data_to_send()
    _feed(conn, wire, _cuts("tls-records", len(wire)), True)
    assert taken == [] and bytes(record.data).endswith(b"p" * (2 * BIG_DATA))
    assert not conn.closed


@in_loop
def test_a_connection_lost_mid_body_resets_the_stream(monkeypatch):
    conn, transport, server, sid, record, pipe, taken = _receiver(monkeypatch)
    server.send_data(sid, b"q" * MIB)
    wire = server.data_to_send()
    _feed(conn, wire[:len(wire) // 2], _cuts("tls-records", len(wire)), True)
    assert conn._body is not None
    conn.connection_lost(ConnectionResetError())
    assert conn._body is None and record.reset and not record.eof


class _Keeper(_Record):
    """An end that keeps the very objects it is given (as a transport whose
    socket is full keeps what it could not send yet)."""

    def __init__(self):
        super().__init__()
        self.kept = []

    def send(self, data):
        self.kept.append(data)


@pytest.mark.parametrize("keeps", [False, True])
@in_loop
def test_a_body_buffer_is_reused_only_when_nobody_kept_it(monkeypatch, keeps):
    conn, transport, server, sid, record, pipe, taken = _receiver(monkeypatch)
    monkeypatch.setattr(h2conn, "_pool", [])
    end = _Keeper() if keeps else _Record()
    conn.streams[sid].peer = end
    for i in range(4):
        server.send_data(sid, bytes([65 + i]) * MIB)
    wire = server.data_to_send()
    _feed(conn, wire, _cuts("tls-records", len(wire)), True)
    assert taken == [MIB] * 4
    if keeps:
        # Every kept body is intact: its buffer was not read into again.
        assert [bytes(k) for k in end.kept] == [bytes([65 + i]) * MIB for i in range(4)]
        assert len(h2conn._pool) == h2conn.POOL_SIZE
    else:
        # One buffer served every frame.
        assert bytes(end.data) == b"".join(bytes([65 + i]) * MIB for i in range(4))
        assert len(h2conn._pool) == 1


@in_loop
def test_the_pool_is_bounded_and_empties_when_the_agent_goes_quiet(monkeypatch):
    from agent.heap import IdleHeapTrimmer
    monkeypatch.setattr(h2conn, "_pool", [])
    kept = [h2conn._body_buffer(BIG_DATA) for _ in range(h2conn.POOL_SIZE + 3)]
    assert len(h2conn._pool) == h2conn.POOL_SIZE
    assert len({id(v.obj) for v in kept}) == len(kept)      # all distinct while held
    del kept
    assert h2conn._body_buffer(5).obj is h2conn._pool[0]     # free again: reused
    clock = iter([0.0, 5.0, 5.0, 5.0]).__next__              # busy, then quiet
    trimmer = IdleHeapTrimmer(interval=1.0, cpu_clock=clock, trim=lambda pad: 1)
    trimmer.tick()
    assert trimmer.tick() and h2conn._pool == []
