"""A stand-in node agent for the lab's own tests (never used by the product).

Takes the real agent's ``run --node N --state file:P --run-dir D --pin-dir X``
arguments and answers ``{"op": "status"}`` on ``D/agent.sock`` with the
node's pods from the state file, "enrolled" when their namespace carries
``istio.io/dataplane-mode=ambient``. ``--ignore-term`` makes it ignore
SIGTERM, to exercise the lab's SIGKILL escalation.
"""

import argparse
import json
import os
import signal
import socket


def status(args) -> dict:
    with open(args.state.removeprefix("file:")) as f:
        items = json.load(f)["items"]
    ns_labels = {o["metadata"]["name"]: o["metadata"].get("labels") or {}
                 for o in items if o["kind"] == "Namespace"}
    pods = []
    for o in items:
        if o["kind"] != "Pod" or o["spec"].get("nodeName") != args.node:
            continue
        ns = o["metadata"]["namespace"]
        on = ns_labels.get(ns, {}).get("istio.io/dataplane-mode") == "ambient"
        pods.append({"namespace": ns, "name": o["metadata"]["name"], "uid": o["metadata"].get("uid"),
                     "ips": [x["ip"] for x in o.get("status", {}).get("podIPs") or []],
                     "enrolled": on, "reason": "namespace is ambient" if on else "not in the mesh"})
    return {"ok": True, "node": args.node, "pods": pods}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["run"])
    p.add_argument("--node", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--pin-dir", required=True)
    p.add_argument("--ignore-term", action="store_true")
    args = p.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path = os.path.join(args.run_dir, "agent.sock")
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(16)
    print(f"fake agent for {args.node} listening on {path}", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            line = conn.makefile("rb").readline()
            try:
                req = json.loads(line)
                reply = status(args) if req.get("op") == "status" else {"ok": False, "error": "unknown op"}
            except ValueError as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    main()
