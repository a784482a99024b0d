"""What autogenerate reads off a key and a schema entry: the signature (shape, dtype), the layer
indices in a name, and how alike two names are once those indices are set aside."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

Sig = tuple[tuple[int, ...], str]


def sig(entry: Mapping[str, Any]) -> Sig:
    return tuple(int(d) for d in entry["shape"]), str(entry["dtype"]).removeprefix("torch.")


def digits(key: str) -> tuple[str, ...]:
    """The numeric segments of a key, in order: ``layers.3.experts.7.w1`` → ``("3", "7")``."""
    return tuple(s for s in key.split(".") if s.isdigit())


def undigit(key: str) -> str:
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1#", key)


@lru_cache(maxsize=4096)
def regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@lru_cache(maxsize=4096)
def similarity(a: str, b: str) -> float:
    """How alike two names are (0..1), layer indices ignored."""
    a, b = re.sub(r"\d+", "", a), re.sub(r"\d+", "", b)
    return difflib.SequenceMatcher(None, a, b).ratio() if a or b else 1.0
