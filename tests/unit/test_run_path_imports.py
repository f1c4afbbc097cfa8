"""What the long-running agent imports: only what it needs for days.

A module imported at start-up stays resident for the agent's life; the heavy
ones belong to other processes (the BPF loader, the CA) or to other modes
(``--state kube``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_agents_run_path_imports_neither_bcc_nor_grpc_nor_the_kubernetes_client():
    # Everything `ambient-agent run --state file:...` imports before it
    # starts. Resident cost of each when imported: bcc (LLVM) 65 MB and
    # 55 MB more per compile, grpc 17 MB, kubernetes 34 MB.
    code = (
        "import sys\n"
        "import agent.cli, agent.state.source\n"
        "agent.cli.build_parser().parse_args(['run', '--node', 'n1', '--state', 'file:/x.json'])\n"
        "agent.state.source.open_state_source('file:/nonexistent/state.json')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('bcc', 'grpc', 'kubernetes'))\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
