"""One connection, one result: made at accept, finished exactly once.

Every connection a pod's listeners accept (and every HBONE stream) gets a
``ConnectionResult`` before anything else happens. Whatever path the
connection then takes, it ends in exactly one of ``refuse``, ``fail`` or
``track`` (a pipe whose end finishes the result), and the result alone
updates the pod's counters, Istio's metrics, the recent-connections log,
the access log and the problem log. No early exit can forget a counter,
and no counter is written twice.

It also replaces the coroutine an open connection used to keep alive: once
a pipe is tracked, the handler returns; the pipe's end calls ``_finish``.
An idle meshed connection then holds no task and no coroutine frames.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from agent.observe.metrics import flags_for_outcome
from agent.observe.problems import problem_key
from agent.proxy import hbone
from agent.proxy.copy import ByteCounter
from agent.proxy.counters import ConnectionRecord, DirectionCounters

if TYPE_CHECKING:
    from agent.observe.metrics import ConnectionMeter
    from agent.policy.request import PolicyDecision
    from agent.proxy.appsock import Pipe
    from agent.proxy.forward import DataPlane

log = logging.getLogger("agent.proxy.forward")


class ConnectionResult:
    __slots__ = ("plane", "pod", "direction", "protocol", "counters", "source", "destination",
                 "source_identity", "destination_identity", "labels", "decision", "app_is_source",
                 "started", "done", "counted", "meter", "pipe")

    def __init__(self, plane: DataPlane, pod: str, direction: str, protocol: str,
                 counters: DirectionCounters, source: tuple, destination: tuple = ("0.0.0.0", 0),
                 source_identity: str = "", destination_identity: str = "",
                 labels: dict | None = None, app_is_source: bool = True, count: bool = True) -> None:
        """``count``: this is a new connection for ``counters`` (an HBONE
        stream is not: its TLS connection was counted when it was accepted)."""
        self.plane = plane
        self.pod = pod
        self.direction = direction
        self.protocol = protocol
        self.counters = counters
        self.source = source
        self.destination = destination
        self.source_identity = source_identity
        self.destination_identity = destination_identity
        self.labels = labels
        self.decision: PolicyDecision | None = None
        self.app_is_source = app_is_source
        self.started = time.monotonic()
        self.done = False
        self.counted: ByteCounter | None = None
        self.meter: ConnectionMeter | None = None
        self.pipe: Pipe | None = None
        if count:
            counters.connections += 1

    # -- the three ways a connection ends --------------------------------------

    def refuse(self, reason: str) -> None:
        """Turned down (policy, a bad request, a limit): ``refused: <reason>``."""
        self._failed(f"refused: {reason}")

    def fail(self, reason: str) -> None:
        """Could not be carried (no route, unreachable, an error): ``failed: <reason>``."""
        self._failed(f"failed: {reason}")

    def track(self, pipe: Pipe, counted: ByteCounter) -> None:
        """The connection is open: its pipe's end finishes the result."""
        self.counters.active += 1
        self.counted = counted
        self.pipe = pipe
        if self.labels is not None and self.plane.metrics is not None:
            # A live meter: byte counters advance while the connection is open.
            totals = ((lambda: (counted.sent, counted.received)) if self.app_is_source
                      else (lambda: (counted.received, counted.sent)))
            self.meter = self.plane.metrics.connection(self.labels, totals=totals)
        pipe.done.add_done_callback(self._pipe_done)

    def _pipe_done(self, fut) -> None:
        self.counters.active -= 1
        self._finish(fut.result() if not fut.cancelled() else "reset")

    # -- accounting ----------------------------------------------------------

    def _failed(self, outcome: str) -> None:
        if self.done:
            return
        self.counters.failed += 1
        self._finish(outcome)

    def _finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        plane = self.plane
        sent = received = 0
        if self.counted is not None:
            c = self.counted
            sent, received = (c.sent, c.received) if self.app_is_source else (c.received, c.sent)
        elapsed = time.monotonic() - self.started
        decision = self.decision
        record = ConnectionRecord(
            direction=self.direction, protocol=self.protocol, pod=self.pod,
            source=hbone.format_authority(*self.source[:2]),
            destination=hbone.format_authority(*self.destination[:2]),
            source_identity=self.source_identity, destination_identity=self.destination_identity,
            bytes_sent=sent, bytes_received=received, duration_ms=int(elapsed * 1000),
            outcome=outcome, started=time.time() - elapsed,
            policy=decision.reason if decision else "", audit=decision.audit if decision else False)
        plane.log.add(record)
        if plane.access is not None:
            plane.access(record)
        metrics = plane.metrics
        if metrics is not None and self.labels is not None:
            flags = flags_for_outcome(outcome, decision.reason if decision else "")
            meter = self.meter
            if meter is None:
                # Opened with "-", closed and failed with the flag, as ztunnel.
                metrics.ended_early(self.labels, flags)
            elif flags == "-":
                meter.close(sent_total=sent, received_total=received)
            else:
                meter.fail(flags)
        args = (self.pod, self.direction, self.protocol, record.source, record.destination,
                self.source_identity or "-", self.destination_identity or "-", outcome)
        if outcome.startswith(("refused", "failed")):
            # Every connection is in the access log; this log says each
            # distinct problem once a minute, whatever the connection rate.
            plane.problems.report(logging.INFO, problem_key(self.pod, self.direction, outcome),
                                  "pod %s: %s %s %s -> %s (%s -> %s): %s", *args)
        else:
            log.debug("pod %s: %s %s %s -> %s (%s -> %s): %s", *args)
