"""The private parts of h2 that agent/proxy/h2conn.py relies on still exist and
still behave as it assumes.

``_HboneH2`` overrides h2's private frame handlers (graceful GOAWAY, per-stream
refusals, DATA without h2's eager trace or copies) and ``H2Connection._take_body``
reads h2's frame buffer. h2 does not promise any of it, so pyproject pins h2
below 5; this test is what fails, by name, when an h2 release moves or renames
one of them, instead of the override silently no longer being called.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import h2
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.stream
import pytest
from hyperframe.frame import DataFrame, HeadersFrame

from agent.proxy.h2conn import _HboneH2

REPO = Path(__file__).resolve().parents[2]
Base = h2.connection.H2Connection

# name -> the parameters (after self) our override and its super() call use.
HOOKS = {
    "_receive_goaway_frame": ["frame"],
    "_receive_headers_frame": ["frame"],
    "_receive_frame": ["frame"],
    "_receive_data_frame": ["frame"],
    "_prepare_for_sending": ["frames"],
    "_terminate_connection": ["error_code"],
}


def test_h2_is_the_major_version_pyproject_pins():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if re.match(r"h2\b", d))
    assert "<5" in pin, f"pyproject must keep h2 below 5 (private hooks): {pin!r}"
    assert int(h2.__version__.split(".")[0]) == 4, f"h2 {h2.__version__}: hooks checked only for 4.x"


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_each_hook_is_an_h2_method_with_the_parameters_we_use(name):
    method = getattr(Base, name, None)
    assert method is not None, f"h2 {h2.__version__} has no H2Connection.{name}: agent/proxy/h2conn.py " \
                               f"overrides or calls it"
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    assert params == HOOKS[name], f"H2Connection.{name}{inspect.signature(method)} changed"


def test_every_private_name_our_subclass_overrides_exists_in_h2():
    overridden = [n for n in vars(_HboneH2) if n.startswith("_") and not n.startswith("__")]
    assert overridden, "nothing overridden? the test is looking at the wrong class"
    missing = [n for n in overridden if not hasattr(Base, n)]
    assert missing == [], f"h2 {h2.__version__} no longer has {missing}: the overrides would be dead code"
    assert isinstance(Base.MAX_CLOSED_STREAMS, int)           # overridden as a class attribute


# The hooks are still where h2 dispatches: a subclass that records the calls.
class Recording(Base):
    def __init__(self, *args, **kwargs):
        self.calls: list[str] = []
        super().__init__(*args, **kwargs)

    def _receive_frame(self, frame):
        self.calls.append(f"_receive_frame:{type(frame).__name__}")
        return super()._receive_frame(frame)

    def _receive_goaway_frame(self, frame):
        self.calls.append("_receive_goaway_frame")
        return super()._receive_goaway_frame(frame)

    def _receive_headers_frame(self, frame):
        self.calls.append("_receive_headers_frame")
        return super()._receive_headers_frame(frame)

    def _receive_data_frame(self, frame):
        self.calls.append("_receive_data_frame")
        result = super()._receive_data_frame(frame)
        assert isinstance(result, tuple) and len(result) == 2   # (frames, events)
        return result

    def _prepare_for_sending(self, frames):
        self.calls.append(f"_prepare_for_sending:{','.join(type(f).__name__ for f in frames)}")
        return super()._prepare_for_sending(frames)

    def _terminate_connection(self, error_code):
        self.calls.append(f"_terminate_connection:{int(error_code)}")
        return super()._terminate_connection(error_code)


def _pair():
    client = Base(h2.config.H2Configuration(client_side=True))
    server = Recording(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())      # the client's SETTINGS ACK
    server.calls.clear()
    return client, server


CONNECT = [(":method", "CONNECT"), (":authority", "198.18.0.10:80")]


def test_h2_dispatches_received_frames_to_the_hooks():
    client, server = _pair()
    client.send_headers(1, CONNECT)
    server.receive_data(client.data_to_send())
    assert server.calls[:2] == ["_receive_frame:HeadersFrame", "_receive_headers_frame"]

    server.send_headers(1, [(":status", "200")])
    assert server.calls[-1] == "_prepare_for_sending:HeadersFrame"
    client.receive_data(server.data_to_send())

    server.calls.clear()
    client.send_data(1, b"hello")
    server.receive_data(client.data_to_send())
    assert server.calls[:2] == ["_receive_frame:DataFrame", "_receive_data_frame"]

    server.calls.clear()
    client.close_connection()
    server.receive_data(client.data_to_send())
    assert server.calls[:2] == ["_receive_frame:GoAwayFrame", "_receive_goaway_frame"]


def test_a_protocol_error_terminates_through_the_hook():
    client, server = _pair()
    frame = DataFrame(3)             # DATA on a stream that was never opened
    frame.data = b"x"
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(frame.serialize())
    assert any(c.startswith("_terminate_connection:") for c in server.calls), server.calls
    sent = server.data_to_send()
    assert sent[3] == 0x07            # a GOAWAY frame was queued


def test_the_frame_buffer_internals_take_body_reads():
    # H2Connection._take_body reads incoming_buffer._data (an incomplete frame
    # waits there), _preamble_len (the client preface still expected) and
    # _headers_buffer (a header block waiting for CONTINUATION).
    fresh = Base(h2.config.H2Configuration(client_side=False))
    fb = fresh.incoming_buffer
    assert isinstance(fb, h2.frame_buffer.FrameBuffer)
    assert isinstance(fb._data, bytearray)
    assert fb._preamble_len > 0                    # a server waits for the preface
    assert isinstance(fb._headers_buffer, list) and not fb._headers_buffer

    client, server = _pair()
    assert server.incoming_buffer._preamble_len == 0
    client.send_headers(1, CONNECT)
    client.send_data(1, b"y" * 1000)
    wire = client.data_to_send()
    head = len(wire) - 1000 - 9 + 20                # the HEADERS frame and 20 bytes of DATA
    server.receive_data(wire[:head])
    assert bytes(server.incoming_buffer._data) == wire[len(wire) - 1009:head]

    # A HEADERS frame without END_HEADERS waits in _headers_buffer.
    _, server = _pair()
    headers = HeadersFrame(3)
    headers.data = client.encoder.encode(CONNECT)[:1]
    headers.flags.add("END_STREAM")
    server.receive_data(headers.serialize())
    assert len(server.incoming_buffer._headers_buffer) == 1
    assert isinstance(server.incoming_buffer._headers_buffer[0], HeadersFrame)


def test_the_other_internals_h2conn_uses():
    conn = Base(h2.config.H2Configuration(client_side=False))
    assert isinstance(conn._data_to_send, bytearray)            # _prepare_for_sending appends here
    assert hasattr(conn, "_closed_streams") and hasattr(conn, "highest_inbound_stream_id")
    assert callable(h2.connection._decode_headers)
    assert h2.errors._error_code_from_int(0) == h2.errors.ErrorCodes.NO_ERROR
    assert h2.stream.StreamClosedBy.SEND_RST_STREAM
    assert isinstance(conn.max_inbound_frame_size, int) and isinstance(conn.open_inbound_streams, int)
