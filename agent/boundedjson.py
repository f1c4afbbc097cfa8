"""JSON from callers we do not control, with bounds checked before parsing.

``json.loads`` has two failure modes that are not ``JSONDecodeError``:
nesting deeper than the interpreter's recursion limit raises
``RecursionError`` (a 60 KB line of ``[`` is enough), and an integer of more
than 4,300 digits raises a plain ``ValueError`` (CPython's limit on
int/str conversion, CVE-2020-10735). Both escaped the callers' error
handling: the control socket logged a traceback and answered nothing, the
CNI plugin printed a traceback and exit code 999 (issue 11, item 7).

``loads`` refuses such input with ``JsonLimitError`` naming the bound, after a
scan that costs one regular-expression pass over the text and a loop over its
brackets; only then does ``json`` parse it.

Imports ``json`` and ``re`` only (not even ``typing``): the CNI plugin
imports this module (``cni/config.py``) and must start fast.
"""

from __future__ import annotations

import json
import re

# A JSON string, escapes included ("unrolled loop": linear, no backtracking).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


class JsonError(ValueError):
    """The text is not JSON (or exceeds a bound: ``JsonLimitError``)."""


class JsonLimitError(JsonError):
    """The text exceeds a bound; the message says which."""


def check_bounds(data: bytes, max_bytes: int, max_depth: int, max_digits: int) -> None:
    """Raise ``JsonLimitError`` if ``data`` is longer than ``max_bytes``, nests
    arrays/objects deeper than ``max_depth`` or holds a run of more than
    ``max_digits`` digits outside strings. Says nothing about validity."""
    if len(data) > max_bytes:
        raise JsonLimitError(f"{len(data)} bytes, more than the {max_bytes} allowed")
    bare = _STRING.sub(b'""', data)     # brackets and digits inside strings do not count
    if re.search(rb"[0-9]{%d}" % (max_digits + 1), bare):
        raise JsonLimitError(f"a number of more than {max_digits} digits")
    depth = 0
    for bracket in _BRACKETS.findall(bare):
        if bracket in b"[{":
            depth += 1
            if depth > max_depth:
                raise JsonLimitError(f"nested deeper than {max_depth} levels")
        else:
            depth -= 1


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = 32, max_digits: int = 64) -> object:
    """``json.loads`` within bounds: ``JsonLimitError`` for a bound exceeded,
    ``JsonError`` for anything else that is not JSON."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    check_bounds(raw, max_bytes, max_depth, max_digits)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:    # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise JsonError(str(exc)) from None
