"""Budgets for what one HTTP/2 peer may make the agent do (pure, no I/O).

A peer that floods PINGs or SETTINGS, or opens streams only to reset them
at once (HTTP/2 "rapid reset", CVE-2023-44487), costs the agent CPU and,
for resets, upstream connections, without ever moving a byte of payload.
Each such event spends a token from a per-connection bucket that refills
at a steady rate; a peer that runs a bucket dry gets GOAWAY
ENHANCE_YOUR_CALM and the connection closes. Legitimate peers stay far
below: ztunnel and our pool send one PING per keepalive interval, SETTINGS
once per connection, and reset a stream before its response only when the
application gave up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Budget:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second."""
    burst: float
    rate: float
    tokens: float = -1.0
    stamp: float = 0.0

    def spend(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens at time ``now``; False once the bucket is dry."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


# Per HTTP/2 connection (server and client side alike).
PING_BURST, PING_RATE = 100, 10.0              # PING frames (not ACKs) from the peer
SETTINGS_BURST, SETTINGS_RATE = 50, 5.0        # SETTINGS frames (not ACKs) from the peer
EARLY_RESET_BURST, EARLY_RESET_RATE = 200, 50.0  # streams the peer reset before our response
REFUSED_BURST, REFUSED_RATE = 200, 50.0        # streams we refused (over the limit, malformed)

# Server side: how long a TLS connection may go without sending the HTTP/2
# preface, and how long it may stay open with no stream.
PREFACE_SECONDS = 5.0
IDLE_SECONDS = 120.0
