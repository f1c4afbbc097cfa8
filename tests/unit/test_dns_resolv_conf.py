"""The pod's resolv.conf as its processes see it: found through a /proc scan,
always read on a worker thread (never a scan on the event loop), re-read in
the background after RESOLV_CONF_TTL."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from agent.dns.resolver import ResolvConf
from agent.dns.server import RESOLV_CONF_TTL, PodResolvConf


def fake_proc(tmp_path: Path) -> tuple[Path, int, Path]:
    """A /proc with the agent (``self``) and one container process (pid 42) of the pod:
    its own network namespace file, another mount namespace, its resolv.conf."""
    proc = tmp_path / "proc"
    for pid in ("self", "42", "7"):
        (proc / pid / "ns").mkdir(parents=True)
        (proc / pid / "ns" / "mnt").write_text(pid)
    (proc / "self" / "ns" / "net").write_text("host")
    (proc / "7" / "ns" / "net").write_text("another pod")
    (proc / "42" / "ns" / "net").write_text("the pod")
    conf = proc / "42" / "root" / "etc" / "resolv.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("nameserver 198.18.0.10\nsearch ns.svc.cluster.local\n")
    return proc, os.open(proc / "42" / "ns" / "net", os.O_RDONLY), conf


def test_found_through_the_pods_process_then_refreshed_off_the_loop(tmp_path, monkeypatch):
    proc, netns_fd, conf = fake_proc(tmp_path)
    now = [100.0]
    reader = PodResolvConf(netns_fd, str(proc), clock=lambda: now[0])
    threads: list[str] = []
    read = reader._read

    def spying_read():
        threads.append(threading.current_thread().name)
        return read()
    monkeypatch.setattr(reader, "_read", spying_read)

    async def scenario():
        main = threading.current_thread().name
        assert (await reader.current()).nameservers == ("198.18.0.10",)   # the first read: awaited
        assert reader.source == f"{proc}/42/root/etc/resolv.conf"
        conf.write_text("nameserver 198.18.0.11\n")
        now[0] += RESOLV_CONF_TTL - 1
        assert (await reader.current()).nameservers == ("198.18.0.10",)   # within the TTL: no read
        assert len(threads) == 1
        now[0] += 2
        assert (await reader.current()).nameservers == ("198.18.0.10",)   # stale: the last answer serves ...
        assert (await reader.current()).nameservers == ("198.18.0.10",)   # ... one refresh at a time
        await reader._refreshing
        await asyncio.sleep(0)
        assert (await reader.current()).nameservers == ("198.18.0.11",)   # ... until the new one is in
        assert len(threads) == 2 and main not in threads                  # never on the loop's thread
    asyncio.run(scenario())
    os.close(netns_fd)


def test_a_process_sharing_our_mounts_is_the_fallback_and_a_failed_read_gives_no_resolvers(tmp_path):
    proc, netns_fd, _ = fake_proc(tmp_path)
    # The pod's only process is in the agent's mount namespace (no container yet).
    os.unlink(proc / "42" / "ns" / "mnt")
    os.link(proc / "self" / "ns" / "mnt", proc / "42" / "ns" / "mnt")
    reader = PodResolvConf(netns_fd, str(proc))

    def broken():
        raise OSError("gone")

    async def scenario():
        assert (await reader.current()).nameservers == ("198.18.0.10",)
        assert reader.source == f"{proc}/42/root/etc/resolv.conf"      # read as the fallback
        other = PodResolvConf(netns_fd, str(proc))
        other._read = broken                                             # type: ignore[method-assign]
        assert await other.current() == ResolvConf((), ())               # SERVFAIL follows, no crash
    asyncio.run(scenario())
    os.close(netns_fd)
