"""HTTP/2 peers with a valid mesh certificate that abuse the protocol:
foreign authorities, rapid reset, PING and SETTINGS floods, too many streams.
Each is bounded by the agent (issue 11, items 5 and 6); the mesh keeps serving."""

from __future__ import annotations

import pytest

from tests.hostile.conftest import APP_PORT
from tests.hostile.h2peer import CANCEL, ENHANCE_YOUR_CALM, REFUSED_STREAM


def test_connect_to_foreign_authorities_is_refused_without_an_upstream_connection(hostile, probe):
    peer = hostile.h2()
    accepts = hostile.app_accepts()
    authorities = {
        f"{hostile.web_ip}:{APP_PORT}": 400,          # another pod's address
        f"{hostile.outsider_ip}:22": 400,             # a pod outside the mesh
        f"127.0.0.1:{APP_PORT}": 400,                 # loopback of the pod
        f"{hostile.server_ip}:15008": 400,            # the agent's own ports
        f"{hostile.server_ip}:15001": 400,
        "example.com:80": 400,                        # not an address at all
        f"{hostile.server_ip}": 400,                  # no port
        f"{hostile.server_ip}:99999": 400,
    }
    try:
        sids = {}
        burst = b""
        for authority in authorities:
            sid = peer.stream_id()
            sids[sid] = authority
            burst += peer.connect(sid, authority)
        peer.send(burst)
        got = peer.read(10.0, until=lambda r: set(sids) <= set(r.statuses()) | set(r.resets()))
        statuses = got.statuses()
        assert {sids[s]: statuses.get(s) for s in sids} == authorities, got
        assert not got.closed and got.goaway() is None      # one connection served them all
    finally:
        peer.close()
    assert hostile.app_accepts() == accepts


def test_rapid_reset_opens_no_upstream_connections_and_is_cut_off(hostile, probe):
    """CVE-2023-44487: 2,000 CONNECTs each reset at once, in one burst."""
    peer = hostile.h2()
    accepts = hostile.app_accepts()
    try:
        burst = b"".join(peer.connect(sid, f"{hostile.server_ip}:{APP_PORT}") + peer.rst(sid, CANCEL)
                         for sid in (peer.stream_id() for _ in range(2000)))
        peer.send(burst)
        got = peer.read(10.0, until=lambda r: r.goaway() is not None)
    finally:
        peer.close()
    assert got.goaway() == ENHANCE_YOUR_CALM, got.frames[-5:]
    opened = hostile.app_accepts() - accepts
    assert opened <= 20, f"{opened} application connections for 2,000 reset streams"
    after = hostile.agent.sample()
    assert after.cpu_s - probe.cpu_s < 5.0
    print(f"rapid reset: {opened} application connections for 2,000 reset streams, GOAWAY after "
          f"{got.count('headers') + got.count('rst')} answers, {after.cpu_s - probe.cpu_s:.2f} s agent CPU")


@pytest.mark.parametrize("flood, frames, answer", [
    ("PING", 20_000, "ping-ack"),
    ("SETTINGS", 5_000, "settings-ack"),
])
def test_ping_and_settings_floods_end_with_enhance_your_calm(hostile, probe, flood, frames, answer):
    peer = hostile.h2()
    try:
        frame = peer.ping if flood == "PING" else (lambda n: peer.settings())
        peer.send(b"".join(frame(n) for n in range(frames)))
        got = peer.read(15.0, until=lambda r: r.goaway() is not None)
    finally:
        peer.close()
    assert got.goaway() == ENHANCE_YOUR_CALM, got.frames[-5:]
    assert got.count(answer) <= 200 + 1          # at most the budget's burst (+ our preface's), not one per frame
    after = hostile.agent.sample()
    assert after.cpu_s - probe.cpu_s < 3.0, f"{after.cpu_s - probe.cpu_s:.1f} s of agent CPU for {frames} frames"
    print(f"{flood} flood: {frames} frames, {got.count(answer)} answered, GOAWAY ENHANCE_YOUR_CALM, "
          f"{after.cpu_s - probe.cpu_s:.2f} s agent CPU")


def test_streams_over_the_limit_are_refused_alone(hostile, probe):
    """150 concurrent CONNECTs: 100 are served, 50 get RST_STREAM REFUSED_STREAM,
    and the connection (with the streams it serves) lives on."""
    peer = hostile.h2()
    try:
        sids = [peer.stream_id() for _ in range(150)]
        peer.send(b"".join(peer.connect(sid, f"{hostile.server_ip}:{APP_PORT}") for sid in sids))
        got = peer.read(20.0, until=lambda r: len(set(r.statuses()) | set(r.resets())) >= 150)
        statuses, resets = got.statuses(), got.resets()
        served = [s for s in sids if statuses.get(s) == 200]
        refused = [s for s in sids if resets.get(s) == REFUSED_STREAM]
        assert len(served) == 100 and len(refused) == 50, (len(served), len(refused), got.frames[-3:])
        assert not got.closed and got.goaway() is None
        # A served stream still carries bytes both ways.
        sid = served[0]
        peer.send(peer.data(sid, b"ping-through", end=True))
        got = peer.read(10.0, until=lambda r: b"ping-through" in r.data(sid))
        assert got.data(sid).startswith(b"app ") and got.data(sid).endswith(b"ping-through"), got.data(sid)
        for s in served[1:]:
            peer.send(peer.rst(s, CANCEL))
    finally:
        peer.close()
