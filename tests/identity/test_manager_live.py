"""The certificate manager against the real CA over TLS, with certificates of a few seconds."""

from __future__ import annotations

import asyncio
import time


from agent.identity.client import CaClient
from agent.identity.manager import CertificateManager
from agent.identity.spiffe import parse_spiffe_uri

from .conftest import API_URI, free_port, running_ca

API = parse_spiffe_uri(API_URI)


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Recorder:
    """on_update callback: (monotonic time, certificate) per new certificate."""

    def __init__(self) -> None:
        self.updates: list[tuple[float, object]] = []
        self.event = asyncio.Event()

    def __call__(self, cert) -> None:
        self.updates.append((time.monotonic(), cert))
        self.event.set()

    async def next(self, timeout: float):
        self.event.clear()
        await asyncio.wait_for(self.event.wait(), timeout)
        return self.updates[-1]


class CountingClient:
    def __init__(self, client: CaClient) -> None:
        self.client = client
        self.calls = 0

    async def create_certificate(self, *args):
        self.calls += 1
        return await self.client.create_certificate(*args)


def test_renewal_at_half_life(env):
    async def scenario():
        async with running_ca(env.config()) as server:
            rec = Recorder()
            client = CaClient(f"127.0.0.1:{server.port}", server.root_pem, lambda: "token-node-a")
            manager = CertificateManager(client, "cluster.local", ttl_seconds=4, on_update=rec)
            first = await manager.certificate(API, timeout=5)
            t0 = rec.updates[0][0]
            # X.509 times are whole seconds, so "4 s" is 3 to 4 s from now.
            lifetime = first.not_after - time.time()
            assert 2.9 <= lifetime <= 4.1
            t1, second = await rec.next(timeout=4)
            # at half the lifetime, +-5 %, plus the time the request itself takes
            assert 0.95 * lifetime / 2 - 0.05 <= t1 - t0 <= 1.05 * lifetime / 2 + 0.5, (t1 - t0, lifetime)
            assert second.serial_number != first.serial_number
            assert await manager.certificate(API) is second
            await manager.close()
            await client.close()

    run(scenario())


def test_ca_outage_during_renewal(env):
    async def scenario():
        config = env.config(listen=f"127.0.0.1:{free_port()}")
        rec = Recorder()
        async with running_ca(config) as server:
            client = CaClient(f"127.0.0.1:{server.port}", server.root_pem, lambda: "token-node-a")
            manager = CertificateManager(client, "cluster.local", ttl_seconds=6, on_update=rec)
            first = await manager.certificate(API, timeout=5)
        # The CA is down now; the renewal (about 3 s in) fails and is retried.
        deadline = time.monotonic() + 8
        while manager.held()[0]["failures"] < 2:
            assert time.monotonic() < deadline, manager.held()
            await asyncio.sleep(0.1)
        status = manager.held()[0]
        assert status["state"] == "valid" and "UNAVAILABLE" in status["last_error"]
        assert await manager.certificate(API, timeout=0.1) is first     # old certificate still served
        assert len(rec.updates) == 1

        async with running_ca(config):                                  # same port, same root
            _, second = await rec.next(timeout=8)
            assert second.serial_number != first.serial_number
            assert manager.held()[0]["failures"] == 0
            assert (await manager.certificate(API, timeout=1)) is second
            await manager.close()
            await client.close()

    run(scenario())


def test_forget_stops_renewing(env):
    async def scenario():
        async with running_ca(env.config()) as server:
            client = CountingClient(CaClient(f"127.0.0.1:{server.port}", server.root_pem,
                                             lambda: "token-node-a"))
            manager = CertificateManager(client, "cluster.local", ttl_seconds=2)
            await manager.certificate(API, timeout=5)
            manager.forget(API)
            assert manager.held() == []
            await asyncio.sleep(1.6)                      # past the renewal point (about 1 s)
            assert client.calls == 1
            await manager.close()
            await client.client.close()

    run(scenario())


def test_ca_unreachable_at_start(env):
    async def scenario():
        config = env.config(listen=f"127.0.0.1:{free_port()}")
        # The root must be known before the CA runs: create the material first.
        from agent.ca.material import DirectorySigningSource
        root_pem = DirectorySigningSource(config.ca_dir).load().roots_pem()
        client = CaClient(config.listen, root_pem, lambda: "token-node-a", timeout=2)
        manager = CertificateManager(client, "cluster.local", ttl_seconds=60)
        waiter = asyncio.ensure_future(manager.certificate(API, timeout=15))
        await asyncio.sleep(1.5)
        assert not waiter.done()
        assert manager.held()[0]["state"] == "pending" and manager.held()[0]["failures"] >= 1
        started = time.monotonic()
        async with running_ca(config):
            cert = await waiter
            assert time.monotonic() - started < 4        # the next retry, not a long grpc backoff
            assert cert.identity == API
            await manager.close()
            await client.close()

    run(scenario())
