"""JSON and zlib with bounds checked before the expensive step.

A few kilobytes of zlib can inflate to gigabytes, and ``json.loads`` of a megabyte of ``[[],[],...]``
builds millions of objects: an untrusted envelope must not cost more than its bounds. :func:`inflate`
stops at ``limit`` bytes of output; :func:`loads` counts values and
nesting in C passes over the text (no object built) before it lets ``json`` build anything.
"""

from __future__ import annotations

import json
import re
import zlib
from itertools import accumulate
from typing import Any

from ckptmigrate.formats import native

_jsonshape = native.load("_jsonshape")

#: The bytes that are not brackets, and each bracket's step of the nesting depth.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = [{0x5B: 1, 0x7B: 1, 0x5D: -1, 0x7D: -1}.get(b, 0) for b in range(256)]
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

    Values are the strings, the commas and the opening brackets outside strings, and the depth the
    running sum of the brackets: counted with no object built, in one C pass where
    ``formats/_jsonshape.c`` is built, else in a few (:func:`counts`). Either costs at most
    microseconds per value and bounded memory, whatever the input.
    """
    counted = _jsonshape.counts(data) if _jsonshape is not None else counts(data)
    if counted is None:
        raise JSONBoundsError("not JSON: an unterminated string")
    strings, commas, opening, closing, depth = counted
    if strings + commas + opening > max_values:
        raise JSONBoundsError(f"holds more than {max_values:,} values")
    if opening != closing:
        raise JSONBoundsError("not JSON: its brackets do not pair up")
    if depth > max_depth:
        raise JSONBoundsError(f"nested deeper than {max_depth} levels")


def counts(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(strings, commas, opening brackets, closing brackets, deepest running sum of the brackets, 0
    with none) of ``data``, the last four outside strings; None when a string is unterminated.

    Every string is cut out first (what is left then holds a quote only where one is unterminated);
    then each count is one C pass over what is left."""
    bare, strings = _STRING.subn(b"", data)
    if b'"' in bare:
        return None
    brackets = bare.translate(None, _NOT_BRACKETS)
    opening = bare.count(b"[") + bare.count(b"{")
    depth = max(accumulate(map(_DEPTH_STEP.__getitem__, brackets))) if brackets else 0
    return strings, bare.count(b","), opening, len(brackets) - opening, depth


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
