"""JSON and zlib with bounds checked before the expensive step.

A few kilobytes of zlib can inflate to gigabytes, and ``json.loads`` of a megabyte of ``[[],[],...]``
builds millions of objects: an untrusted envelope must not cost more than its bounds. :func:`inflate`
stops at ``limit`` bytes of output; :func:`loads` counts values and nesting with a linear scan (its
steps bounded by ``max_values``, whatever the input's length) before it lets ``json`` build anything.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

#: Brackets and strings: each step of the scan is one of them (commas between are counted in bulk).
_STRUCTURE = re.compile(rb'[\[\]{}"]')
#: A string as one match; possessive, so ``re`` keeps no backtracking state per character or escape.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)


class JSONBoundsError(ValueError):
    """The document exceeds a bound (size, values or depth), or is not JSON."""


def inflate(data: bytes, limit: int) -> bytes:
    """``data`` (zlib, RFC 1950) inflated, refusing to produce more than ``limit`` bytes."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise JSONBoundsError(f"compressed data is corrupt: {exc}") from None
    if inflater.unconsumed_tail:
        raise JSONBoundsError(f"compressed data inflates past the limit of {limit:,} bytes")
    if not inflater.eof:
        raise JSONBoundsError("compressed data is truncated")
    return out


def check_shape(data: bytes, *, max_values: int, max_depth: int) -> None:
    """Refuse ``data`` if it holds more than ``max_values`` values or nests deeper than ``max_depth``.

    Only brackets and strings are visited (commas between them are counted in bulk), and the scan
    stops as soon as a bound is passed, so it takes at most ``max_values`` steps, each linear in
    the bytes it skips.
    """
    pos = depth = values = 0
    find, string = _STRUCTURE.search, _STRING.match
    while (m := find(data, pos)) is not None:
        values += data.count(b",", pos, m.start())  # each comma separates one more value
        char = data[m.start()]
        if char == 0x22:  # a string: key or value
            s = string(data, m.start())
            if s is None:
                raise JSONBoundsError("not JSON: an unterminated string")
            pos = s.end()
            values += 1
        else:
            pos = m.end()
            if char in b"[{":
                depth += 1
                values += 1
                if depth > max_depth:
                    raise JSONBoundsError(f"nested deeper than {max_depth} levels")
            else:
                depth -= 1
        if values > max_values:
            raise JSONBoundsError(f"holds more than {max_values:,} values")
    if values + data.count(b",", pos) > max_values:
        raise JSONBoundsError(f"holds more than {max_values:,} values")


def loads(data: bytes | str, *, max_bytes: int, max_values: int, max_depth: int) -> Any:
    """``json.loads`` after :func:`check_shape`, for UTF-8 text of at most ``max_bytes`` bytes."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise JSONBoundsError(f"{len(raw):,} bytes exceed the limit of {max_bytes:,}")
    check_shape(raw, max_values=max_values, max_depth=max_depth)
    try:
        return json.loads(raw)
    except RecursionError:
        raise JSONBoundsError("nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise JSONBoundsError(f"not JSON ({exc})"[:300]) from None
