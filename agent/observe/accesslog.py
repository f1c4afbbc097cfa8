"""Access log: one line per completed (or refused) connection.

Field names follow ztunnel's access log (``src.addr``, ``dst.identity``,
``bytes_sent`` ...). Plain text is ``key=value`` in a fixed order; values
with spaces, quotes, ``=`` or control characters are double-quoted with
escapes, so a peer-supplied string (an HBONE authority in an error, say)
can never forge a field or a line. JSON output has the same keys.

The input is a ``ConnectionRecord`` or its ``asdict()``; optional extra
keys ``source_workload``, ``source_namespace``, ``destination_workload``,
``destination_namespace`` and ``destination_service`` are used when the
caller knows them; otherwise the served pod (``pod``, ``namespace/name``)
fills the side it is on (source for outbound, destination for inbound/hbone).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

ACCESS_LOGGER = "access"

# Output keys, in order.
FIELDS: tuple[str, ...] = (
    "start", "direction", "protocol",
    "src.addr", "src.workload", "src.namespace", "src.identity",
    "dst.addr", "dst.service", "dst.workload", "dst.namespace", "dst.identity",
    "bytes_sent", "bytes_recv", "duration_ms",
    "outcome", "policy", "audit", "error",
)


def _as_dict(record: Any) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        # Read only, and a ConnectionRecord's fields are flat values: its
        # __dict__ serves, without asdict()'s recursive copy (a visible cost
        # per connection in the new-connection profile, bench/notes.md).
        fields = getattr(record, "__dict__", None)
        return fields if fields is not None else dataclasses.asdict(record)
    return record


def _split_outcome(outcome: str) -> tuple[str, str]:
    """``"refused: 401 denied"`` -> ``("refused", "401 denied")``; ``"closed"`` -> ``("closed", "")``."""
    word, sep, rest = (outcome or "").partition(":")
    word = word.strip()
    if sep and word in ("refused", "failed"):
        return word, rest.strip()
    return (outcome or "").strip() or "-", ""


def _iso(ts: Any) -> str:
    try:
        ts = float(ts)
    except (TypeError, ValueError):
        return ""
    if ts <= 0:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def access_entry(record: Any) -> dict[str, Any]:
    """The access log fields of one connection record, ordered as ``FIELDS``."""
    r = _as_dict(record)
    direction = str(r.get("direction") or "")
    pod_ns, _, pod_name = str(r.get("pod") or "").partition("/")
    served_is_source = direction == "outbound"
    src_ns = r.get("source_namespace") or (pod_ns if served_is_source else "")
    dst_ns = r.get("destination_namespace") or ("" if served_is_source else pod_ns)
    src_wl = r.get("source_workload") or (pod_name if served_is_source else "")
    dst_wl = r.get("destination_workload") or ("" if served_is_source else pod_name)
    outcome, error = _split_outcome(str(r.get("outcome") or ""))
    entry = {
        "start": _iso(r.get("started")),
        "direction": direction,
        "protocol": str(r.get("protocol") or ""),
        "src.addr": str(r.get("source") or ""),
        "src.workload": str(src_wl or ""),
        "src.namespace": str(src_ns or ""),
        "src.identity": str(r.get("source_identity") or ""),
        "dst.addr": str(r.get("destination") or ""),
        "dst.service": str(r.get("destination_service") or ""),
        "dst.workload": str(dst_wl or ""),
        "dst.namespace": str(dst_ns or ""),
        "dst.identity": str(r.get("destination_identity") or ""),
        "bytes_sent": _int(r.get("bytes_sent")),
        "bytes_recv": _int(r.get("bytes_received")),
        "duration_ms": _int(r.get("duration_ms")),
        "outcome": outcome,
        "policy": str(r.get("policy") or ""),
        "audit": bool(r.get("audit")),
        "error": error,
    }
    return {k: entry[k] for k in FIELDS}


_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  "-_.:/[]@+,%~")


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if text and all(c in _SAFE for c in text):
        return text
    out = []
    for c in text:
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or c in "\u2028\u2029":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def format_access(record: Any, json_format: bool = False) -> str:
    """One line for one connection: ``key=value`` text (default) or JSON.

    Text omits empty string fields (``src.workload=`` says nothing) but keeps
    numbers and booleans; JSON always has every key.
    """
    entry = access_entry(record)
    if json_format:
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=True)
    return " ".join(f"{k}={_quote(v)}" for k, v in entry.items() if v != "")


class AccessLogSink:
    """Writes access lines to ``logging.getLogger("access")`` at INFO.

    ``sink(record)`` suits ``ConnectionLog`` hooks; it never raises.
    """

    def __init__(self, json_format: bool = False, logger: logging.Logger | None = None) -> None:
        self.json_format = json_format
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def __call__(self, record: Any) -> None:
        self.log(record)

    def log(self, record: Any) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        try:
            line = format_access(record, self.json_format)
        except Exception:    # a malformed record never breaks the data path
            self.logger.exception("access log: cannot format record %r", record)
            return
        self.logger.info("%s", line)
