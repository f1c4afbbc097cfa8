"""The CA client's gRPC-over-HTTP/2 decisions, without a network.

The client talks to grpcio's server in tests/identity; these pin the parts
a well-behaved grpcio server rarely exercises.
"""

from __future__ import annotations

import pytest

from agent.identity.client import (CaError, StatusCode, call_status, frame_message, split_address,
                                   unframe_message)


def test_status_comes_from_the_trailers():
    headers = {":status": "200", "content-type": "application/grpc"}
    assert call_status(headers, {"grpc-status": "0"}) == (StatusCode.OK, "")
    assert call_status(headers, {"grpc-status": "7", "grpc-message": "node%20%27b%27%3A%20no%20pod"}) == \
        (StatusCode.PERMISSION_DENIED, "node 'b': no pod")


def test_a_trailers_only_response_carries_the_status_in_its_headers():
    assert call_status({":status": "200", "grpc-status": "16", "grpc-message": "unknown bearer token"}, {}) == \
        (StatusCode.UNAUTHENTICATED, "unknown bearer token")


@pytest.mark.parametrize("http,code", [("503", StatusCode.UNAVAILABLE), ("401", StatusCode.UNAUTHENTICATED),
                                       ("404", StatusCode.UNIMPLEMENTED), ("418", StatusCode.UNKNOWN)])
def test_a_response_that_is_not_http_200_maps_like_grpc_clients_do(http, code):
    got, message = call_status({":status": http}, {})
    assert got == code and http in message


def test_a_missing_or_unknown_grpc_status_is_not_success():
    assert call_status({":status": "200"}, {})[0] == StatusCode.INTERNAL
    assert call_status({":status": "200"}, {"grpc-status": "99"})[0] == StatusCode.UNKNOWN


def test_messages_are_length_prefixed_and_exactly_one_is_accepted():
    assert frame_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert unframe_message(frame_message(b"chain")) == b"chain"
    for bad, why in ((b"\x00\x00\x00", "holds no gRPC message"),
                     (b"\x01\x00\x00\x00\x01x", "compressed"),
                     (frame_message(b"a") + frame_message(b"b"), "exactly one message")):
        with pytest.raises(CaError, match=why) as err:
            unframe_message(bad)
        assert err.value.code == StatusCode.INTERNAL


def test_addresses():
    assert split_address("198.19.1.254:15012") == ("198.19.1.254", 15012)
    assert split_address("istiod.istio-system.svc:15012") == ("istiod.istio-system.svc", 15012)
    assert split_address("[fd00:198:18::1]:15012") == ("fd00:198:18::1", 15012)
    for bad in ("istiod", "istiod:", ":15012"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_codes_keep_grpcs_names_for_the_ca_request_metric():
    # The agent's metric labels a failed request by code.name.lower().
    assert StatusCode(14).name == "UNAVAILABLE" and StatusCode.DEADLINE_EXCEEDED == 4


def test_a_ca_that_never_answers_fails_the_call_at_the_deadline():
    import asyncio
    import time

    from agent.identity import pki
    from agent.identity.client import CaClient

    root = pki.certificate_pem(pki.create_root("test", pki.utcnow())[0])

    async def scenario():
        held = []

        async def silent(reader, writer):   # accepts TCP, never speaks TLS
            held.append(writer)
            await reader.read()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = CaClient(f"127.0.0.1:{port}", root, lambda: "t", timeout=0.5)
            started = time.monotonic()
            with pytest.raises(CaError) as err:
                await client.create_certificate("csr", 60, None)
            return err.value, time.monotonic() - started
        finally:
            for w in held:
                w.close()
            server.close()
            await server.wait_closed()

    error, took = asyncio.run(scenario())
    assert error.code == StatusCode.DEADLINE_EXCEEDED and "within 0.5 s" in error.message
    assert took < 3
