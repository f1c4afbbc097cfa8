"""Freed heap memory goes back to the kernel once, when the agent goes quiet after load."""

from __future__ import annotations

import asyncio

from agent.heap import IdleHeapTrimmer, malloc_trim


class Cpu:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def trimmer(cpu: Cpu, calls: list) -> IdleHeapTrimmer:
    return IdleHeapTrimmer(interval=1.0, busy_share=0.10, cpu_clock=cpu,
                           trim=lambda pad: calls.append(pad) or 1)


def test_trims_once_when_the_process_goes_quiet_after_load():
    cpu, calls = Cpu(), []
    t = trimmer(cpu, calls)
    cpu.seconds += 0.9                 # busy: 90 % of a core
    assert not t.tick()
    cpu.seconds += 0.5
    assert not t.tick()                # still busy: never under load
    cpu.seconds += 0.02
    assert t.tick() and calls == [0]   # quiet after load: once
    for _ in range(5):
        cpu.seconds += 0.01
        assert not t.tick()            # quiet stays quiet: no more trims
    assert calls == [0] and t.trims == 1


def test_an_agent_that_was_never_busy_is_never_trimmed():
    cpu, calls = Cpu(), []
    t = trimmer(cpu, calls)
    for _ in range(5):
        cpu.seconds += 0.05            # 5 %: below the busy threshold
        assert not t.tick()
    assert calls == []


def test_every_burst_is_followed_by_one_trim():
    cpu, calls = Cpu(), []
    t = trimmer(cpu, calls)
    for _ in range(3):
        cpu.seconds += 0.5
        t.tick()
        cpu.seconds += 0.0
        assert t.tick()
    assert len(calls) == 3


def test_glibc_malloc_trim_is_found_and_callable():
    trim = malloc_trim()
    assert trim is not None            # Debian's glibc; musl would give None
    blobs = [bytearray(200_000) for _ in range(50)]
    del blobs
    assert trim(0) in (0, 1)


def test_run_stops_when_cancelled():
    async def scenario():
        t = IdleHeapTrimmer(interval=0.01, trim=lambda pad: 1)
        task = asyncio.ensure_future(t.run())
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(scenario())
