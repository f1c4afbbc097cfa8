"""Handover of a node between two agents (issue 11, item 8): the running agent's side.

The agent is built but never started (no BPF, no pods): what is checked is
the protocol. A handover request freezes it (readiness false, changes
refused) after the change in progress; replacing its control socket file
makes it let go; the requester's exit before that makes it resume. The
end-to-end upgrade runs in tests/lab/test_upgrade.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from agent import control
from agent.control import CniAdd, ControlServer, Handover, parse_request
from agent.daemon import AgentConfig, HandingOver, NodeAgent
from agent.observe.admin import AdminServer
from agent.observe.metrics import Metrics

ADD = CniAdd("mesh", "web", "u-1", "c-1", "/run/netns/none", "eth0", ("198.18.1.5",), ("198.18.1.1",))


@pytest.fixture
def agent(tmp_path):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"},
                                 "items": []}))
    config = AgentConfig(node="n1", state_url=f"file:{state}", run_dir=str(tmp_path / "run"),
                         pin_dir=str(tmp_path / "pins"))
    a = NodeAgent(config)
    yield a
    a.switcher.close()


@pytest.fixture
def newcomer():
    """A process standing in for the new agent: its pid is what the old one watches."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _replace_socket_file(path: str) -> socket.socket:
    """What the new agent's ControlServer.start does: unlink, bind anew."""
    os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    return sock


def test_handover_request_freezes_then_replacing_the_socket_hands_the_node_over(agent, newcomer):
    async def main():
        await agent.control.start()
        reply = await agent.handle(Handover(pid=newcomer.pid))
        assert reply["ok"] and reply["pid"] == os.getpid()
        ready, reason = agent.readiness()
        assert not ready and reason == f"handing the node over to the agent with pid {newcomer.pid}"
        refused = await agent.handle(ADD)
        assert not refused["ok"] and "handing the node over" in refused["error"]
        # A second newcomer is turned away while the first one's handover runs.
        again = await agent.handle(Handover(pid=newcomer.pid))
        assert not again["ok"] and "already handing" in again["error"]
        assert not agent._stopping.is_set()
        replacement = _replace_socket_file(agent.control.path)
        try:
            await _until(agent._stopping.is_set)
            assert agent._handed_over
            assert agent.readiness() == (False, f"handed the node over to the agent with pid {newcomer.pid}")
        finally:
            replacement.close()
            await agent.control.close()
    asyncio.run(main())


def test_handover_is_undone_when_the_new_agent_exits_before_taking_over(agent, newcomer):
    async def main():
        await agent.control.start()
        assert (await agent.handle(Handover(pid=newcomer.pid)))["ok"]
        assert agent._changes.locked()
        newcomer.kill()
        newcomer.wait()
        await _until(lambda: agent._handover_to is None)
        assert not agent._changes.locked() and not agent._stopping.is_set()
        assert "handing" not in agent.readiness()[1]
        async with agent._changing():      # changes are allowed again
            pass
        await agent.control.close()
    asyncio.run(main())


def test_handover_waits_for_the_change_in_progress(agent, newcomer):
    async def main():
        await agent.control.start()
        async with agent._changing():          # a CNI ADD or one reconcile step, half done
            pending = asyncio.ensure_future(agent.handle(Handover(pid=newcomer.pid)))
            await asyncio.sleep(0.1)
            assert not pending.done()
            # Already frozen for everything that comes next.
            assert "handing the node over" in (await agent.handle(ADD))["error"]
        assert (await pending)["ok"]
        await agent.control.close()
    asyncio.run(main())


def test_handover_from_a_process_that_is_gone_changes_nothing(agent):
    async def main():
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        reply = await agent.handle(Handover(pid=proc.pid))
        assert not reply["ok"] and "cannot watch" in reply["error"]
        assert agent._handover_to is None and "handing" not in agent.readiness()[1]
        assert not (await agent.handle(Handover(pid=0)))["ok"]
    asyncio.run(main())


def test_an_agent_whose_socket_is_taken_without_a_handover_lets_go(agent, monkeypatch):
    monkeypatch.setattr("agent.daemon.CONTROL_PATH_CHECK_SECONDS", 0.01)

    async def main():
        async with agent._changing():      # a new agent re-adopting, before it binds: allowed
            pass
        await agent.control.start()
        replacement = _replace_socket_file(agent.control.path)
        # Even before the guard notices, no change is made any more.
        with pytest.raises(HandingOver, match="belongs to another agent"):
            async with agent._changing():
                pass
        assert "another agent" in (await agent.handle(ADD))["error"]
        guard = asyncio.ensure_future(agent._guard_control_path())
        try:
            await _until(agent._stopping.is_set)
            assert agent._handed_over
            assert agent.readiness() == (False, "another agent took the node over")
        finally:
            guard.cancel()
            replacement.close()
            await agent.control.close()
    asyncio.run(main())


# -- the control socket's part -------------------------------------------------------------

def test_handover_request_carries_the_kernels_pid_of_the_caller_never_the_requests(tmp_path):
    seen = []

    async def handler(request):
        seen.append(request)
        return {"ok": True}

    async def main():
        server = ControlServer(str(tmp_path / "agent.sock"), handler)
        await server.start()
        assert server.path_state() == "ours"
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(None, control.request, server.path, {"op": "handover", "pid": 1})
        assert reply == {"ok": True}
        os.unlink(server.path)
        assert server.path_state() == "missing"
        other = socket.socket(socket.AF_UNIX)
        other.bind(server.path)
        assert server.path_state() == "replaced"
        other.close()
        await server.close()
    asyncio.run(main())
    assert seen == [Handover(pid=os.getpid())]
    assert parse_request(b'{"op": "handover"}') == Handover(pid=0)


# -- the node's ports: retried while the old agent holds them ---------------------------------

def _admin(port: int) -> AdminServer:
    m = Metrics()
    return AdminServer(m.registry, lambda: (True, "ready"), dict, lambda: None,
                       metrics_addr=("127.0.0.1", port), ready_addr=("127.0.0.1", 0),
                       admin_addr=("127.0.0.1", 0))


def test_admin_ports_held_by_another_process_are_retried_until_free():
    async def main():
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError) as info:         # without retry_busy: fails at once, as before
            await _admin(port).start()
        assert info.value.errno == errno.EADDRINUSE
        admin = _admin(port)
        starting = asyncio.ensure_future(admin.start(retry_busy=True))
        await asyncio.sleep(0.3)
        assert not starting.done()
        holder.close()                                # the old agent lets go
        await asyncio.wait_for(starting, 5)
        assert admin.ports["metrics"] == port
        await admin.close()
        # A stop while waiting ends the wait without binding.
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        stop = asyncio.Event()
        admin = _admin(port)
        starting = asyncio.ensure_future(admin.start(retry_busy=True, stop=stop))
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(starting, 5)
        assert admin.listeners["metrics"].server is None
        await admin.close()
        holder.close()
    asyncio.run(main())
