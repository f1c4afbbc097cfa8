"""`ambient-agent ca` as a process: flags, readiness, a request, clean SIGTERM, start-up errors."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.identity.client import CaClient

from .conftest import API_URI, free_port, new_csr

REPO = Path(__file__).resolve().parents[2]


def ca_command(env, *extra: str) -> list[str]:
    return [sys.executable, "-m", "agent.ca.cli", "ca", "--ca-dir", env.ca_dir,
            "--tokens", env.tokens, "--state", f"file:{env.state}", *extra]


def test_ca_process_serves_and_stops_on_sigterm(env, tmp_path):
    port = free_port()
    bundle = tmp_path / "out" / "root.pem"
    bundle.parent.mkdir()
    log_path = tmp_path / "ca.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(ca_command(env, "--listen", f"127.0.0.1:{port}", "--max-ttl", "1h",
                                           "--san", "127.0.0.1", "--san", "ca.test",
                                           "--root-cert-out", str(bundle)),
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not bundle.exists():                  # written once the CA listens
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert bundle.read_bytes() == Path(env.ca_dir, "root-cert.pem").read_bytes()

        async def request():
            async with CaClient(f"127.0.0.1:{port}", bundle.read_bytes(), lambda: "token-node-a",
                                server_name="ca.test") as client:
                return await client.create_certificate(new_csr(API_URI), 7200, API_URI)

        chain = asyncio.run(request())
        assert len(chain) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
    output = log_path.read_text()
    assert rc == 0, output
    assert "issued spiffe://cluster.local/ns/backend/sa/api" in output
    assert "(3600 s; 7200 s requested)" in output          # --max-ttl 1h
    assert "CA stopping" in output


def test_start_up_errors_exit_1_without_creating_a_root(env, tmp_path):
    os.remove(env.tokens)
    result = subprocess.run(ca_command(env, "--listen", "127.0.0.1:0"), cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot run the CA: read token file" in result.stderr
    assert not os.path.exists(env.ca_dir)

    env.write_tokens({"t": "node-a"})
    result = subprocess.run(ca_command(env, "--trust-domain", "Bad Domain"), cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "trust domain 'Bad Domain'" in result.stderr

    result = subprocess.run(ca_command(env, "--max-ttl", "soon"), cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "invalid duration 'soon'" in result.stderr
