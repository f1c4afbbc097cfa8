"""The certificate manager against a fake signer, on a fake clock: renewal timing,
backoff, expiry, forgetting and the in-flight bound, all without waiting."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import pytest
from cryptography import x509

from agent.identity import pki
from agent.identity.client import CaError, StatusCode
from agent.identity.manager import (BACKOFF_MAX, CertificateError, CertificateManager,
                                    CertificateTimeout, WorkloadCertificate)
from agent.identity.spiffe import IdentityError, WorkloadIdentity

START = 1_800_000_000.0
API = WorkloadIdentity("cluster.local", "backend", "api")
WEB = WorkloadIdentity("cluster.local", "frontend", "web")


class FakeTime:
    """A clock that only moves when the test says so, and sleeps that wait for it."""

    def __init__(self) -> None:
        self.now = START
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        fut = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        target = self.now + seconds
        await settle()
        while True:
            due = sorted((t, f) for t, f in self._sleepers if t <= target and not f.done())
            if not due:
                break
            self.now = max(self.now, due[0][0])
            due[0][1].set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


class FakeSigner:
    """Signs CSRs with a throw-away root, at the fake clock's time; can fail or misbehave."""

    def __init__(self, time: FakeTime) -> None:
        self.time = time
        self.root, self.root_key = pki.create_root("test", dt.datetime.fromtimestamp(START, dt.timezone.utc))
        self.calls: list[tuple[str, int, str | None]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.tamper = None

    async def create_certificate(self, csr_pem, ttl_seconds, impersonate):
        self.calls.append((csr_pem, ttl_seconds, impersonate))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail is not None:
                raise self.fail
            csr = x509.load_pem_x509_csr(csr_pem.encode())
            now = dt.datetime.fromtimestamp(self.time.now, dt.timezone.utc)
            uri = pki.uri_sans(csr)[0]
            public_key = csr.public_key()
            if self.tamper == "key":
                public_key = pki.generate_key().public_key()
            if self.tamper == "uri":
                uri = "spiffe://cluster.local/ns/x/sa/y"
            leaf = pki.sign_workload(public_key, uri, self.root, self.root_key, now,
                                     dt.timedelta(seconds=ttl_seconds))
            return [pki.certificate_pem(c).decode() for c in (leaf, self.root)]
        finally:
            self.in_flight -= 1


def setup(**kwargs):
    time = FakeTime()
    signer = FakeSigner(time)
    manager = CertificateManager(signer, "cluster.local", clock=time.clock, sleep=time.sleep,
                                 ttl_seconds=kwargs.pop("ttl_seconds", 100), rng=random.Random(7), **kwargs)
    return time, signer, manager


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_first_certificate_then_renewal_near_half_life():
    async def scenario():
        time, signer, manager = setup()
        cert = await manager.certificate(API)
        assert isinstance(cert, WorkloadCertificate)
        assert cert.identity == API
        assert signer.calls[0][1:] == (100, API.uri)
        assert cert.not_after == START + 100
        assert cert.not_before == START - 60                 # the CA's backdating
        renew_in = time.sleeps[-1]
        assert 47.5 <= renew_in <= 52.5                      # half of 100 s, +-5 %
        await time.advance(renew_in - 1)
        assert len(signer.calls) == 1 and await manager.certificate(API) is cert
        await time.advance(1)
        assert len(signer.calls) == 2
        renewed = await manager.certificate(API)
        assert renewed.serial_number != cert.serial_number
        assert renewed.private_key_pem != cert.private_key_pem     # a fresh key each time
        await manager.close()
    run(scenario())


def test_renewal_jitter_spreads_identities():
    async def scenario():
        time, signer, manager = setup(ttl_seconds=1000)
        ids = [WorkloadIdentity("cluster.local", f"ns{i}", "sa") for i in range(20)]
        for identity in ids:
            await manager.certificate(identity)
        delays = time.sleeps
        assert all(475 <= d <= 525 for d in delays)
        assert len(set(round(d, 3) for d in delays)) > 10
        await manager.close()
    run(scenario())


def test_failures_back_off_keep_the_old_certificate_and_recover():
    async def scenario():
        time, signer, manager = setup(ttl_seconds=400)
        cert = await manager.certificate(API)
        signer.fail = CaError(StatusCode.UNAVAILABLE, "connection refused")
        await time.advance(time.sleeps[-1])                  # to the renewal point: it fails
        # Retries: 1, 2, 4, 8, 16, 32, 60, 60 ... seconds (+-20 %, never above 60).
        for n in range(1, 10):
            if n > 1:
                await time.advance(time.sleeps[-1])
            delay = time.sleeps[-1]
            base = min(BACKOFF_MAX, 2 ** (n - 1))
            assert 0.8 * base <= delay <= min(BACKOFF_MAX, 1.2 * base), (n, delay)
            assert await manager.certificate(API) is cert     # still valid: still served
        status = manager.held()[0]
        assert status["state"] == "valid" and status["failures"] == 9
        assert "UNAVAILABLE: connection refused" in status["last_error"]

        # The certificate expires during the outage: no expired certificate is handed out.
        await time.advance(cert.not_after - time.now)
        assert manager.held()[0]["state"] == "expired"
        with pytest.raises(CertificateTimeout, match="UNAVAILABLE: connection refused"):
            await manager.certificate(API, timeout=0.05)

        # The CA returns: a waiter gets the new certificate at the next retry.
        signer.fail = None
        waiter = asyncio.ensure_future(manager.certificate(API))
        await time.advance(60)
        fresh = await waiter
        assert fresh.serial_number != cert.serial_number
        assert manager.held()[0]["failures"] == 0 and manager.held()[0]["state"] == "valid"
        await manager.close()
    run(scenario())


def test_certificate_waits_until_the_ca_answers():
    async def scenario():
        time, signer, manager = setup()
        signer.fail = CaError(StatusCode.UNAVAILABLE, "down")
        waiter = asyncio.ensure_future(manager.certificate(API))
        await time.advance(5)
        assert not waiter.done() and len(signer.calls) >= 2
        assert manager.held()[0]["state"] == "pending"
        signer.fail = None
        await time.advance(10)
        assert (await waiter).identity == API
        await manager.close()
    run(scenario())


def test_forget_stops_renewal_and_fails_waiters():
    async def scenario():
        time, signer, manager = setup()
        await manager.certificate(API)
        manager.forget(API)
        assert manager.held() == []
        await time.advance(1000)
        assert len(signer.calls) == 1

        signer.fail = CaError(StatusCode.UNAVAILABLE, "down")
        waiter = asyncio.ensure_future(manager.certificate(WEB))
        await time.advance(1)
        manager.forget(WEB)
        with pytest.raises(CertificateError, match="forgotten"):
            await waiter
        manager.forget(WEB)                                   # idempotent
        await manager.close()
    run(scenario())


def test_in_flight_requests_are_bounded():
    async def scenario():
        time, signer, manager = setup(max_in_flight=3)
        signer.gate = asyncio.Event()
        ids = [WorkloadIdentity("cluster.local", f"ns{i}", "sa") for i in range(10)]
        waiters = [asyncio.ensure_future(manager.certificate(i)) for i in ids]
        await settle()
        assert signer.in_flight == 3
        signer.gate.set()
        await asyncio.gather(*waiters)
        assert signer.max_in_flight == 3
        assert {s["identity"] for s in manager.held()} == {i.uri for i in ids}
        await manager.close()
    run(scenario())


@pytest.mark.parametrize("tamper,message", [
    ("key", "another key"),
    ("uri", "spiffe://cluster.local/ns/x/sa/y"),
])
def test_wrong_certificates_from_the_ca_are_not_used(tamper, message):
    async def scenario():
        time, signer, manager = setup()
        signer.tamper = tamper
        with pytest.raises(CertificateTimeout, match=message):
            await manager.certificate(API, timeout=0.05)
        signer.tamper = None
        await time.advance(2)
        assert (await manager.certificate(API, timeout=1)).identity == API
        await manager.close()
    run(scenario())


def test_other_trust_domain_is_refused():
    async def scenario():
        _, _, manager = setup()
        with pytest.raises(IdentityError, match="not in this node's trust domain"):
            manager.track(WorkloadIdentity("other.org", "a", "b"))
        await manager.close()
    run(scenario())


def test_certificate_bytes_and_update_callback():
    async def scenario():
        updates = []
        _, signer, manager = setup(on_update=updates.append)
        cert = await manager.certificate(API)
        assert updates == [cert]
        chain = x509.load_pem_x509_certificates(cert.cert_chain_pem_bytes())
        assert len(chain) == 1 and pki.uri_sans(chain[0]) == [API.uri]      # root left out
        assert x509.load_pem_x509_certificate(cert.root_pem_bytes()) == signer.root
        assert cert.key_pem_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        assert len(cert.chain_pem) == 2
        await manager.close()
    run(scenario())
