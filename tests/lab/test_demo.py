"""`make demo` runs in CI, and shows what it claims to show."""

import subprocess
import sys
from pathlib import Path


def test_demo_shows_mtls_no_plaintext_a_denial_metrics_and_fail_closed():
    done = subprocess.run([sys.executable, "-m", "lab.demo"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "HBONE" in out and "(spiffe://cluster.local/ns/frontend/sa/website) ->" in out
    assert "(spiffe://cluster.local/ns/backend/sa/api)" in out
    assert "secret visible on the wire: False" in out and "15008" in out
    assert "denied" in out and "STRICT mTLS" in out
    assert "istio_tcp_connections_failed_total{reporter=destination, old -> api, unknown, flags=DENY} 1.0" in out
    assert "connection failed: [Errno 111] Connection refused" in out
    assert "left behind" not in out
