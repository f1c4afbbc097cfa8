"""JSON from callers we do not control: bounds are checked before json parses."""

import json
import time

import pytest

from agent.boundedjson import JsonError, JsonLimitError, loads

BOUNDS = dict(max_bytes=1 << 20, max_depth=8, max_digits=16)


@pytest.mark.parametrize("text", [
    '{"a": [1, 2, {"b": null}], "c": "x"}',
    "[" * 8 + "]" * 8,
    '{"n": 1234567890123456, "f": -1.5e300, "e": 1E+5}',
    '"[[[[[[[[[[[[[[[[[[[[ 12345678901234567890"',   # inside a string: neither depth nor digits
    r'{"s": "a \"[[[[[[[[[[\" b", "t": "\\"}',         # escaped quotes and backslashes
])
def test_within_bounds_parses_like_json(text):
    assert loads(text, **BOUNDS) == json.loads(text)


@pytest.mark.parametrize("text, message", [
    ("[" * 9 + "]" * 9, "nested deeper than 8 levels"),
    ('{"a": ' * 9 + "1" + "}" * 9, "nested deeper than 8 levels"),
    ("[" * 100000, "nested deeper than 8 levels"),                   # unbalanced: still bounded
    ("12345678901234567", "more than 16 digits"),
    ('{"x": 0.00000000000000001}', "more than 16 digits"),
    ('"\\"" [[[[[[[[[]]]]]]]]]', "nested deeper than 8 levels"),    # an escaped quote ends no string
])
def test_over_a_bound_is_refused_with_the_bound_named(text, message):
    with pytest.raises(JsonLimitError, match=message):
        loads(text, **BOUNDS)


def test_size_bound():
    with pytest.raises(JsonLimitError, match="1025 bytes, more than the 1024 allowed"):
        loads(b" " * 1024 + b"1", max_bytes=1024)


@pytest.mark.parametrize("text", ["{not json", b"\xff\xfe", "", "[1,]"])
def test_invalid_json_is_a_json_error_not_a_limit(text):
    with pytest.raises(JsonError) as info:
        loads(text, **BOUNDS)
    assert not isinstance(info.value, JsonLimitError)


def test_the_scan_is_cheap_on_hostile_input():
    hostile = "[" + "[]," * 300_000 + '"' + '\\"' * 100_000 + '"]'    # 1.1 MB of brackets and escapes
    start = time.perf_counter()
    with pytest.raises(JsonLimitError):
        loads(hostile, max_bytes=1 << 20, max_depth=8, max_digits=16)    # too long: refused first
    loads(hostile, max_bytes=1 << 22, max_depth=8, max_digits=16)
    assert time.perf_counter() - start < 2.0
