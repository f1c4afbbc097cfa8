"""Per-pod connection and byte counters that tests and `status` read.

Kept deliberately small; the Prometheus metrics of the operations issue
will be fed from the same events.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DirectionCounters:
    connections: int = 0       # accepted by the listener
    active: int = 0
    failed: int = 0            # could not reach the destination / no original destination
    sent: int = 0              # bytes from the pod's application to its peer
    received: int = 0          # bytes from the peer to the pod's application


@dataclass
class PodCounters:
    outbound: DirectionCounters = field(default_factory=DirectionCounters)
    inbound: DirectionCounters = field(default_factory=DirectionCounters)
    hbone: DirectionCounters = field(default_factory=DirectionCounters)

    def as_dict(self) -> dict:
        return {
            name: {"connections": c.connections, "active": c.active, "failed": c.failed,
                   "bytes_sent": c.sent, "bytes_received": c.received}
            for name, c in (("outbound", self.outbound), ("inbound", self.inbound),
                            ("hbone", self.hbone))
        }


@dataclass
class ConnectionRecord:
    """One finished (or refused) connection, as status and the access log show it."""
    direction: str            # outbound, inbound, hbone
    protocol: str             # HBONE or TCP
    pod: str                  # namespace/name of the pod the agent served
    source: str               # ip:port
    destination: str          # ip:port (the original destination)
    source_identity: str = ""
    destination_identity: str = ""
    bytes_sent: int = 0       # from the source to the destination
    bytes_received: int = 0
    duration_ms: int = 0
    outcome: str = ""         # closed, reset, refused: <reason>, failed: <reason>
    started: float = 0.0
    policy: str = ""          # inbound: the policy decision's reason
    audit: bool = False       # inbound: an AUDIT policy matched


class ConnectionLog:
    """The most recent connection records, bounded."""

    def __init__(self, size: int = 256) -> None:
        import collections
        self._records: collections.deque[ConnectionRecord] = collections.deque(maxlen=size)

    def add(self, record: ConnectionRecord) -> None:
        self._records.append(record)

    def recent(self, pod: str | None = None) -> list[dict]:
        return [asdict(r) for r in self._records if pod is None or r.pod == pod]
