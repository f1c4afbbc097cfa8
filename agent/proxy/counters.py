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
