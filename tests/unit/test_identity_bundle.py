"""The trust bundle file: load, change detection, callbacks, keeping the last good version."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent.identity import pki
from agent.identity.bundle import TrustBundle, TrustBundleError


def root_pem() -> bytes:
    return pki.certificate_pem(pki.create_root("test", pki.utcnow())[0])


def write(path, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def test_load_versions_and_callbacks(tmp_path):
    path = tmp_path / "root-cert.pem"
    a, b = root_pem(), root_pem()
    write(path, a)
    bundle = TrustBundle(str(path))
    with pytest.raises(TrustBundleError, match="has not been loaded"):
        bundle.pem_bytes()
    seen = []
    bundle.on_change(seen.append)
    assert bundle.load() is True
    assert bundle.version == 1 and bundle.pem_bytes() == a and seen == [a]

    write(path, b"# a comment\n" + a)                     # same roots, written differently
    assert bundle.load() is False and bundle.version == 1

    write(path, a + b)                                     # rotation: both roots trusted
    assert bundle.load() is True
    assert bundle.version == 2 and len(bundle.certificates()) == 2 and seen[-1] == a + b


@pytest.mark.parametrize("content,message", [
    (None, "read trust bundle"),
    (b"", "no certificate found"),
    (b"not pem", "no certificate found"),
])
def test_unusable_files(tmp_path, content, message):
    path = tmp_path / "root-cert.pem"
    if content is not None:
        write(path, content)
    with pytest.raises(TrustBundleError, match=message):
        TrustBundle(str(path)).load()


def test_watch_reloads_and_keeps_the_last_good_version(tmp_path):
    path = tmp_path / "root-cert.pem"
    a, b = root_pem(), root_pem()

    async def scenario():
        polls = asyncio.Queue()

        async def sleep(_):
            await polls.get()

        bundle = TrustBundle(str(path), sleep=sleep)
        task = asyncio.ensure_future(bundle.watch())

        async def poll():
            polls.put_nowait(None)
            for _ in range(20):
                await asyncio.sleep(0)

        await poll()
        assert bundle.version == 0                          # no file yet: nothing, no error
        write(path, a)
        await poll()
        assert bundle.version == 1 and bundle.pem_bytes() == a
        write(path, b"garbage")
        await poll()
        assert bundle.version == 1 and bundle.pem_bytes() == a
        write(path, b)
        await poll()
        assert bundle.version == 2 and bundle.pem_bytes() == b
        task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10))
